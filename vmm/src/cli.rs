//! The command line: parsed by clap, checked, and turned into configs.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::RateLimit;
use crate::config::{
    self, DedupMode, DedupSettings, GuestConfig, JailConfig, MergeGroups, MergeProtect, RunConfig, SharingConfig,
    Source, SupervisorConfig,
};
use crate::error::Error;
use crate::memory::MemoryBackend;

/// A KVM hypervisor that runs many guests, each in a process of its own,
/// and merges their identical memory pages.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start guests and run them until they end (Ctrl-C stops them all).
    Run(RunArgs),
    /// Run the same guests with no sharing, in-process sharing and kernel
    /// KSM in turn, and compare host memory, speed and CPU (needs root for KSM).
    Bench(BenchArgs),
    /// Serve the REST API on a Unix socket, starting with no guests.
    Serve(ServeArgs),
    /// Talk to a running vmm's API.
    Ctl(crate::ctl::CtlArgs),
    /// Write a paused guest of a running vmm to a new directory (as `vmm
    /// ctl snapshot`); `vmm run --restore DIR` starts clones of it.
    Snapshot(SnapshotArgs),
    /// (Internal) one guest's process, started by `vmm run` or `vmm serve`.
    #[command(hide = true)]
    Guest,
    /// Print the API's OpenAPI description (docs/api.json is this).
    ApiSpec,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The server's socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// The guest (paused).
    pub id: usize,
    /// A directory that does not exist yet, or is empty.
    pub dir: PathBuf,
}

impl From<SnapshotArgs> for crate::ctl::CtlArgs {
    fn from(a: SnapshotArgs) -> Self {
        crate::ctl::CtlArgs {
            api_socket: a.api_socket,
            json: false,
            command: crate::ctl::CtlCommand::Snapshot { id: a.id, dir: a.dir },
        }
    }
}

/// What the bench guests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchImage {
    /// memtest with an OS-like profile, preloaded with a real kernel image
    /// (docs/benchmarks.md); verifies its memory twice a second.
    Memtest,
    /// Real Linux guests (tiny-linux): minutes to boot on PVM hosts.
    TinyLinux,
}

/// What the bench's memtest guests do (docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchProfile {
    /// A mostly idle fleet of one OS image: shared, zero, private and
    /// volatile memory and a real kernel image, verified twice a second.
    Os,
    /// Busy guests whose churn pages hold the same content in every guest
    /// and change every round (buffers zeroed or read again), 90 s a mode.
    Churn,
    /// `churn` with one shared page in five a near-duplicate (one byte
    /// apart in each guest: never mergeable, and many more mappings).
    ChurnNear,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub guests: usize,
    /// Guest RAM per guest.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: u64,
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u8,
    #[arg(long, value_enum, default_value_t = BenchImage::Memtest)]
    pub image: BenchImage,
    /// What the memtest guests do.
    #[arg(long, value_enum, default_value_t = BenchProfile::Os)]
    pub profile: BenchProfile,
    /// The scanner's settings for the in-process modes.
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Where guest-images/build.sh put the images.
    #[arg(long, default_value = "guest-images/out", value_name = "DIR")]
    pub images_dir: PathBuf,
    /// Kernel to boot instead of the image's.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initrd instead of the image's.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Guest command line instead of the image's profile.
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// Modes to run, comma separated; they run in the order off, inprocess,
    /// ksm-matched, ksm-default (ksm-matched needs inprocess).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off,inprocess,ksm-matched,ksm-default")]
    pub modes: Vec<crate::bench::Mode>,
    /// N clones of one snapshot against N booted guests: the modes
    /// inprocess and cloned (cloned restores a snapshot of one guest booted
    /// first until it verified a round).
    #[arg(long, conflicts_with = "modes")]
    pub clone: bool,
    /// Seconds each mode runs (default 40 for memtest, 150 for tiny-linux).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Write every sample and figure as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Draw host memory over time per mode as SVG here.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
    /// Keep consoles, stats and logs of each run here (default: a temp dir,
    /// removed unless a guest failed or the bench stopped on an error).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// For the inprocess run: raise vm.max_map_count to N first (as `vmm
    /// run --raise-max-map-count`; many guests need more mappings than the
    /// default 65530 allows).
    #[arg(long, value_name = "N")]
    pub raise_max_map_count: Option<usize>,
    /// Limit each run's memory cgroup to this much (guest RAM may exceed
    /// it): the table says per mode whether every guest survived, how many
    /// the OOM killer took, and how long the memory governor held guests.
    #[arg(long, value_name = "MIB")]
    pub host_memory: Option<u64>,
    /// Run every mode's guests unjailed (`vmm run --no-jail`): run twice,
    /// with and without, to see what the jail and its filters cost.
    #[arg(long)]
    pub no_jail: bool,
    /// Give every mode's guests a balloon (`vmm run --balloon`): with
    /// `--host-memory`, the memory governor reclaims the free memory the
    /// guests hold through their balloons before it holds or ends any
    /// (memtest's `hold=` gives them free memory to hold).
    #[arg(long)]
    pub balloon: bool,
    /// Guest processes each run keeps started ahead of need (`vmm run
    /// --pool`; the run waits for them before its first guest); by default
    /// as many as there are guests with --clone (a pool that holds a burst
    /// of restores), else `vmm run`'s default.
    #[arg(long, value_name = "N")]
    pub pool: Option<u64>,
    /// Measure the network instead: ping round trips to memtest guests on
    /// a bridge against a kernel-only veth peer, and UDP echo rates, for
    /// each of --net-guests (needs root and ping).
    #[arg(long)]
    pub net: bool,
    /// Guest counts for --net, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,50", value_name = "N,...")]
    pub net_guests: Vec<usize>,
}

/// The memtest profiles of `vmm bench`: docs/benchmarks.md says what they
/// model and why.
pub const BENCH_MEMTEST_CMDLINE: &str = "seed=1 share=0.35 zero=0.2 volatile=1024 idle=400 rounds=0";
pub const BENCH_CHURN_CMDLINE: &str = "seed=1 share=0.6 zero=0.1 churn=8192 idle=30 rounds=0";
pub const BENCH_CHURN_NEAR_CMDLINE: &str = "seed=1 share=0.6 zero=0.1 churn=8192 near=0.2 idle=30 rounds=0";

impl TryFrom<BenchArgs> for crate::bench::BenchConfig {
    type Error = String;

    fn try_from(args: BenchArgs) -> Result<Self, String> {
        config::GUESTS.check(args.guests as u64, Source::Cli)?;
        config::MEMORY_MIB.check(args.memory, Source::Cli)?;
        config::VCPUS.check(u64::from(args.vcpus), Source::Cli)?;
        let mut modes = match args.clone {
            true => vec![crate::bench::Mode::Inprocess, crate::bench::Mode::Cloned],
            false => args.modes,
        };
        modes.sort();
        modes.dedup();
        if modes.contains(&crate::bench::Mode::KsmMatched) && !modes.contains(&crate::bench::Mode::Inprocess) {
            return Err("--modes ksm-matched needs inprocess too: it runs KSM at the CPU rate inprocess used".into());
        }
        if modes.contains(&crate::bench::Mode::Cloned) && args.image != BenchImage::Memtest {
            return Err("the cloned mode needs --image memtest: its template is snapshotted once it has verified \
                        a round of its memory"
                .into());
        }
        let image = |rel: &str| args.images_dir.join(rel);
        if args.image != BenchImage::Memtest && args.profile != BenchProfile::Os {
            return Err("--profile is for --image memtest".into());
        }
        let (name, kernel, initrd_parts, cmdline, duration) = match (args.image, args.profile) {
            (BenchImage::Memtest, BenchProfile::Os) => (
                "memtest",
                image("memtest"),
                // The "OS image" every guest holds: a real kernel and its initramfs.
                vec![image("tiny-linux/vmlinux"), image("tiny-linux/initramfs.cpio.gz")],
                BENCH_MEMTEST_CMDLINE.to_string(),
                40,
            ),
            (BenchImage::Memtest, churn) => (
                "memtest",
                image("memtest"),
                vec![],
                match churn {
                    BenchProfile::ChurnNear => BENCH_CHURN_NEAR_CMDLINE,
                    _ => BENCH_CHURN_CMDLINE,
                }
                .to_string(),
                90,
            ),
            (BenchImage::TinyLinux, _) => (
                "tiny-linux",
                image("tiny-linux/vmlinux"),
                vec![image("tiny-linux/initramfs.cpio.gz")],
                // panic=0: a guest whose init cannot run stays up, holding its memory.
                crate::host::HostKind::detect().default_linux_cmdline().replace("panic=-1", "panic=0"),
                150,
            ),
        };
        let initrd_parts = args.initrd.map_or(initrd_parts, |p| vec![p]);
        let kernel = args.kernel.unwrap_or(kernel);
        for path in std::iter::once(&kernel).chain(&initrd_parts) {
            if !path.is_file() {
                return Err(format!(
                    "{} not found: build the guest images with guest-images/build.sh (from the repository root, \
                     or pass --images-dir), or pass --kernel/--initrd",
                    path.display()
                ));
            }
        }
        let duration = args.duration.unwrap_or(duration);
        if duration < 5 {
            return Err(format!("--duration must be at least 5 seconds (got {duration})"));
        }
        Ok(crate::bench::BenchConfig {
            guests: args.guests,
            memory_mib: args.memory,
            vcpus: args.vcpus,
            image: name.into(),
            kernel,
            initrd_parts,
            cmdline: args.cmdline.unwrap_or(cmdline),
            modes,
            duration: Duration::from_secs(duration),
            json: args.json,
            plot: args.plot,
            work_dir: args.work_dir,
            raise_max_map_count: args.raise_max_map_count,
            scan_flags: args.scan.as_flags(),
            host_memory_mib: args.host_memory.map(|m| config::HOST_MEMORY_MIB.check(m, Source::Cli)).transpose()?,
            no_jail: args.no_jail,
            balloon: args.balloon,
            pool: match (args.pool, args.clone) {
                (Some(n), _) => Some(config::POOL.check(n, Source::Cli)?),
                (None, true) => Some((args.guests as u64).min(config::POOL.max)),
                (None, false) => None,
            },
        })
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// How many guests of this configuration to run.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub guests: u64,
    /// Kernel to boot: a vmlinux ELF, a bzImage, or one of our test guests.
    /// Without it, guests boot the Linux their IMAGE's boot loader entry
    /// names (a Boot Loader Specification entry or GRUB's default), with
    /// --cmdline added to that entry's command line.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "image"])]
    pub kernel: Option<PathBuf>,
    /// Start the guests from this snapshot (`vmm snapshot`) instead of
    /// booting: each is a clone of the snapshotted guest, with its kernel,
    /// command line, memory and vCPUs.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "vcpus", "image", "disk_readonly", "transport"])]
    pub restore: Option<PathBuf>,
    /// Raw disk image every guest gets as its virtio-blk disk (/dev/vda):
    /// opened read-only and shared; each guest writes to its own overlay.
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Keep the per-guest disk overlays in this directory (default: a
    /// temporary one, removed at exit).
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Give guests the image as a read-only disk, without overlays.
    #[arg(long)]
    pub disk_readonly: bool,
    /// How the virtio devices reach the guest: `pci` (PCI bus with ACPI,
    /// MSI-X) or `mmio` (virtio-mmio, announced on the kernel command
    /// line). Default: pci for Linux, mmio for our test guests.
    #[arg(long, value_enum)]
    pub transport: Option<config::Transport>,
    /// A network device per guest: `bridge=NAME[,subnet=CIDR]` (a TAP of
    /// its own on bridge NAME, made with the subnet's first address if
    /// absent; guest i gets address base + 2 + i, as `ip=` on its command
    /// line) or `tap=NAME` (an existing or new TAP; one guest); either with
    /// `mac=MAC`.
    #[arg(long, value_name = "SPEC", value_parser = config::NetConfig::check_cli)]
    pub net: Option<String>,
    /// A vsock device per guest, its host side a Unix socket: PATH (one
    /// guest) or an existing directory, where guest i's is `guest-<i>.sock`.
    /// Connect and write `CONNECT <port>\n` to reach the guest's port; the
    /// guest's connections to host port P go to `<socket>_P`.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    #[command(flatten)]
    pub balloon: BalloonArgs,
    /// Cap each guest's disk: `bytes=N,ops=N[,bytes-burst=N][,ops-burst=N]`
    /// per second (sizes in bytes, or with K, M, G); the same keys go in
    /// `--net` for its frames.
    #[arg(long, value_name = "SPEC", value_parser = check_limit)]
    pub disk_limit: Option<String>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default for Linux: console on ttyS0, plus what the host needs).
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// Guest RAM per guest.
    #[arg(long, default_value_t = config::MEMORY_MIB.default, value_name = "MIB")]
    pub memory: u64,
    /// vCPUs per guest.
    #[arg(long, default_value_t = config::VCPUS.default, value_name = "N")]
    pub vcpus: u64,
    /// Directory for per-guest console logs (default with several guests: a fresh temp dir).
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
    /// Start even if the guests' RAM exceeds the host's available memory.
    #[arg(long)]
    pub overcommit: bool,
    /// Stop all guests after this many seconds (they then count as failed).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Keep a JSON snapshot of the run (guests, failures, sharing stats) in
    /// this file, rewritten twice a second.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
    /// Serve the REST API on this Unix socket while the guests run.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Guests (by index, comma separated) whose pages are never merged.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub dedup_opt_out: Vec<usize>,
    #[command(flatten)]
    pub host: HostArgs,
}

/// Flags `vmm run` and `vmm serve` share: how guests are kept and shared.
#[derive(Args, Debug)]
pub struct HostArgs {
    /// How guest RAM is backed: a shared memfd (in-process sharing) or
    /// anonymous memory (kernel KSM). Default: what --dedup needs.
    #[arg(long, value_enum)]
    pub memory_backend: Option<MemoryBackend>,
    /// Who merges identical guest pages.
    #[arg(long, value_enum, default_value_t = DedupMode::Inprocess)]
    pub dedup: DedupMode,
    #[command(flatten)]
    pub scan: ScanArgs,
    /// Merges queued for a guest before they are made.
    #[arg(long, default_value_t = config::MERGE_BATCH.default, value_name = "N")]
    pub merge_batch: u64,
    /// Most guest pages one shared frame may serve.
    #[arg(long, default_value_t = config::MAX_PAGE_SHARING.default, value_name = "N")]
    pub max_page_sharing: u64,
    /// Do not map zero pages to the kernel's zero page.
    #[arg(long)]
    pub no_zero_pages: bool,
    /// How a merge holds off the guest's writers: write-protect just the
    /// pages it merges (userfaultfd; `auto` uses it where the host allows),
    /// or freeze the guest.
    #[arg(long, value_enum, default_value_t = MergeProtect::Auto)]
    pub merge_protect: MergeProtect,
    /// How the scanner tells a page is being written: KVM's dirty log (and
    /// the VMM's device writes), or content checksums (no dirty log).
    #[arg(long, value_enum, default_value_t = config::Volatility::DirtyLog)]
    pub volatility: config::Volatility,
    /// Merge groups (trust domains): pages merge only within a group. `all`
    /// (one group), `per-guest` (no sharing between guests), or one group
    /// number per guest of a run, comma separated (e.g. 0,0,1,1).
    #[arg(long, default_value = "all", value_name = "SPEC")]
    pub merge_group: String,
    /// Run guest processes unjailed: as this user, with its capabilities,
    /// in the host's namespaces (docs/security.md says what that gives up).
    #[arg(long)]
    pub no_jail: bool,
    /// Guest N's process runs as user and group id BASE + N.
    #[arg(long, default_value_t = crate::config::DEFAULT_UID_BASE, value_name = "BASE")]
    pub jail_uid_base: u32,
    /// Cap of each guest's console log file: past it, its oldest half is
    /// dropped (a line says so at its top).
    #[arg(long, default_value_t = config::CONSOLE_LIMIT_KIB.default, value_name = "KIB")]
    pub console_limit: u64,
    /// Raise vm.max_map_count to this first (needs root).
    #[arg(long, value_name = "N")]
    pub raise_max_map_count: Option<u64>,
    /// Never raise vm.max_map_count by itself (by default it is raised,
    /// as root, when a guest's merged pages need more mappings).
    #[arg(long)]
    pub no_raise_max_map_count: bool,
    /// Memory kept free, in percent of host RAM (or of the memory cgroup's
    /// limit, if smaller): below it, guests whose memory grows are
    /// throttled while page sharing makes room, and when it cannot, the
    /// largest guest is ended. 0 turns this off (the kernel's OOM killer
    /// decides).
    #[arg(long, default_value_t = config::MEMORY_RESERVE_PCT.default, value_name = "PCT")]
    pub memory_reserve: u64,
    /// Guest processes to keep started ahead of need, jailed like any
    /// (each has KVM open and an empty VM made): making a guest, a clone
    /// above all, then takes one instead of starting a process. 0: none.
    #[arg(long, default_value_t = config::POOL.default, value_name = "N")]
    pub pool: u64,
}

/// How fast and at what priority the scanner works (`vmm run`, `vmm serve`
/// and, for its in-process modes, `vmm bench`).
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ScanArgs {
    /// Pages the scanner looks at per step.
    #[arg(long, default_value_t = config::SCAN_PAGES.default, value_name = "N")]
    pub scan_pages: u64,
    /// Sleep between scanner steps.
    #[arg(long, default_value_t = config::SCAN_SLEEP_MS.default, value_name = "MS")]
    pub scan_sleep_ms: u64,
    /// Advisor: pace the scanner to finish a full pass in this many seconds
    /// (overrides --scan-sleep-ms), within --scan-cpu-cap.
    #[arg(long, value_name = "SECS")]
    pub scan_target_secs: Option<f64>,
    /// Most CPU the advisor lets the scanner use, in percent of one core.
    #[arg(long, default_value_t = config::SCAN_CPU_CAP_PCT.default, value_name = "PCT")]
    pub scan_cpu_cap: f64,
    /// Scheduling priority (nice value, -20 to 19) of the scanner thread
    /// while memory is plentiful: below the vCPUs by default (the memory
    /// governor runs it at -10 while room is short).
    #[arg(long, default_value_t = config::SCAN_NICE.default, value_name = "N", allow_negative_numbers = true)]
    pub scan_nice: i64,
}

impl ScanArgs {
    /// The same settings as `vmm run` flags.
    pub fn as_flags(&self) -> Vec<String> {
        let mut flags = vec![
            format!("--scan-pages={}", self.scan_pages),
            format!("--scan-sleep-ms={}", self.scan_sleep_ms),
            format!("--scan-cpu-cap={}", self.scan_cpu_cap),
            format!("--scan-nice={}", self.scan_nice),
        ];
        if let Some(secs) = self.scan_target_secs {
            flags.push(format!("--scan-target-secs={secs}"));
        }
        flags
    }
}

impl HostArgs {
    fn into_config(self) -> Result<SupervisorConfig, Error> {
        let settings = DedupSettings {
            enabled: true,
            scan_pages: self.scan.scan_pages,
            scan_sleep_ms: self.scan.scan_sleep_ms,
            scan_target_secs: self.scan.scan_target_secs,
            scan_cpu_cap_pct: self.scan.scan_cpu_cap,
            scan_nice: self.scan.scan_nice,
            max_page_sharing: self.max_page_sharing,
            zero_pages: !self.no_zero_pages,
            merge_batch: self.merge_batch,
        };
        settings.validate(Source::Cli)?;
        let sharing = SharingConfig {
            mode: self.dedup,
            settings,
            protect: self.merge_protect,
            volatility: self.volatility,
            groups: MergeGroups::parse(&self.merge_group)?,
            raise_max_map_count: self.raise_max_map_count,
            auto_raise_max_map_count: !self.no_raise_max_map_count,
        };
        if let Some(n) = self.raise_max_map_count {
            config::MAX_MAP_COUNT.check(n, Source::Cli)?;
        }
        let backend = sharing.backend(self.memory_backend)?;
        let memory_reserve_pct = config::MEMORY_RESERVE_PCT.check(self.memory_reserve, Source::Cli)?;
        let jail = match self.no_jail {
            true => None,
            false => Some(JailConfig { uid_base: self.jail_uid_base }),
        };
        let console_limit_bytes = config::CONSOLE_LIMIT_KIB.check(self.console_limit, Source::Cli)? << 10;
        let pool = config::POOL.check(self.pool, Source::Cli)? as usize;
        Ok(SupervisorConfig {
            sharing,
            backend,
            memory_reserve_pct,
            jail,
            console_limit_bytes,
            pool,
            ..Default::default()
        })
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Directory for the guests' console logs (default: a temporary one).
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
    /// Keep guests' disk overlays in this directory (default: a temporary one).
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Create guests even if their RAM exceeds the host's available memory.
    #[arg(long)]
    pub overcommit: bool,
    /// (Refused: `vmm serve` starts with no guests; give `dedup_opt_out` in
    /// `POST /guests` instead.)
    #[arg(long, value_name = "LIST", hide = true)]
    pub dedup_opt_out: Option<String>,
    #[command(flatten)]
    pub host: HostArgs,
}

impl TryFrom<ServeArgs> for SupervisorConfig {
    type Error = Error;

    fn try_from(args: ServeArgs) -> Result<Self, Error> {
        if args.dedup_opt_out.is_some() {
            return Err(Error::bad_input(
                "--dedup-opt-out: vmm serve starts with no guests; opt a guest out with \"dedup_opt_out\": true \
                 in its POST /guests",
            ));
        }
        let mut config = args.host.into_config()?;
        if let MergeGroups::List(_) = config.sharing.groups {
            return Err(Error::bad_input(
                "--merge-group with a list needs the guests of a vmm run; for vmm serve use all or per-guest, \
                 or give merge_group in POST /guests",
            ));
        }
        config.console_dir = args.console_dir;
        config.overlay_dir = args.overlay_dir;
        config.overcommit = args.overcommit;
        Ok(config)
    }
}

/// The balloon's flags, as `vmm run` and `vmm ctl create` take them.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BalloonArgs {
    /// A memory balloon (virtio-balloon) per guest: `vmm ctl balloon ID
    /// MIB` asks a guest to give that much memory back, and the guest
    /// hands back the pages it frees (free page reporting) as it goes.
    #[arg(long)]
    pub balloon: bool,
    /// With --balloon: no free page reporting.
    #[arg(long, requires = "balloon")]
    pub no_page_reporting: bool,
    /// With --balloon: the guest may not take memory back from its
    /// balloon when it runs out (it fails allocations instead).
    #[arg(long, requires = "balloon")]
    pub no_deflate_on_oom: bool,
    /// With --balloon: seconds between the guest's memory statistics
    /// (0: none asked).
    #[arg(long, requires = "balloon", value_name = "SECONDS", default_value_t = config::BALLOON_STATS_INTERVAL_S.default)]
    pub balloon_stats_interval: u64,
}

impl BalloonArgs {
    pub fn config(&self) -> Option<config::BalloonConfig> {
        self.balloon.then_some(config::BalloonConfig {
            free_page_reporting: !self.no_page_reporting,
            deflate_on_oom: !self.no_deflate_on_oom,
            stats_interval_s: self.balloon_stats_interval,
        })
    }
}

fn parse_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse().map_err(|_| format!("unknown log level '{text}' (error, warn, info, debug, trace)"))
}

/// Checks a `--disk-limit` spec, and keeps it as given.
fn check_limit(s: &str) -> Result<String, String> {
    RateLimit::parse_cli(s).map(|_| s.to_string())
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = Error;

    fn try_from(args: RunArgs) -> Result<Self, Error> {
        let guests = config::GUESTS.check(args.guests, Source::Cli)? as usize;
        let timeout = args.timeout.map(|t| config::TIMEOUT_SECS.check(t, Source::Cli)).transpose()?;
        let disk_readonly = match (&args.image, args.disk_readonly, &args.overlay_dir) {
            // A snapshot brings its disk: its clones' overlays go to --overlay-dir.
            (None, false, Some(_)) if args.restore.is_some() => false,
            (None, true, _) | (None, _, Some(_)) => {
                return Err(Error::bad_input("--disk-readonly and --overlay-dir need a disk IMAGE (or --restore)"))
            }
            (Some(_), true, Some(_)) => {
                return Err(Error::bad_input("--disk-readonly disks have no overlays: drop --overlay-dir"))
            }
            (_, read_only, _) => read_only,
        };
        let mut supervisor = args.host.into_config()?;
        supervisor.console_to_terminal = guests == 1 && args.console_dir.is_none();
        supervisor.console_dir = args.console_dir;
        supervisor.overlay_dir = args.overlay_dir;
        supervisor.overcommit = args.overcommit;
        let guest = GuestConfig {
            kernel: args.kernel.unwrap_or_default(),
            restore: args.restore,
            initrd: args.initrd,
            cmdline: args.cmdline,
            memory_mib: args.memory,
            vcpus: args.vcpus,
            disk: args.image,
            disk_readonly,
            merge_group: None,
            dedup_opt_out: false,
            net: args.net.map(|n| config::NetConfig::parse_cli(&n)).transpose().map_err(Error::bad_input)?,
            disk_limit: args.disk_limit.map(|l| RateLimit::parse_cli(&l)).transpose().map_err(Error::bad_input)?,
            vsock: args.vsock.map(|socket| config::VsockConfig { socket, cid: None }),
            balloon: args.balloon.config(),
            transport: args.transport,
        };
        let config = RunConfig {
            guest,
            guests,
            opt_out: args.dedup_opt_out,
            supervisor,
            timeout: timeout.map(Duration::from_secs),
            stats_file: args.stats_file,
            api_socket: args.api_socket,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(["vmm", "run"].iter().chain(args)).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else { unreachable!("parsed as run") };
        RunConfig::try_from(run).map_err(|e| e.message)
    }

    fn serve_config(args: &[&str]) -> Result<SupervisorConfig, String> {
        let cli =
            Cli::try_parse_from(["vmm", "serve", "--api-socket", "s"].iter().chain(args)).map_err(|e| e.to_string())?;
        let Command::Serve(serve) = cli.command else { unreachable!("parsed as serve") };
        SupervisorConfig::try_from(serve).map_err(|e| e.message)
    }

    fn bench_args(args: &[&str]) -> BenchArgs {
        let cli = Cli::try_parse_from(["vmm", "bench"].iter().chain(args)).unwrap();
        let Command::Bench(bench) = cli.command else { unreachable!("parsed as bench") };
        bench
    }

    #[test]
    fn bench_defaults_and_mode_order() {
        let args = bench_args(&["--modes", "ksm-default,inprocess,off,inprocess"]);
        assert_eq!((args.guests, args.memory, args.image), (8, 256, BenchImage::Memtest));
        // The images may not be built where unit tests run: check up to the files.
        let err =
            crate::bench::BenchConfig::try_from(BenchArgs { images_dir: "/nonexistent".into(), ..args }).unwrap_err();
        assert!(err.contains("/nonexistent/memtest not found") && err.contains("guest-images/build.sh"), "{err}");
        let err = crate::bench::BenchConfig::try_from(bench_args(&["--modes", "ksm-matched"])).unwrap_err();
        assert!(err.contains("needs inprocess"), "{err}");
        let err = crate::bench::BenchConfig::try_from(bench_args(&["--clone", "--image", "tiny-linux"])).unwrap_err();
        assert!(err.contains("cloned mode needs --image memtest"), "{err}");
        assert!(Cli::try_parse_from(["vmm", "bench", "--clone", "--modes", "off"]).is_err());
        let images = crate::supervisor::manager::fresh_temp_dir("vmm-cli-test").unwrap();
        std::fs::create_dir(images.join("tiny-linux")).unwrap();
        for f in ["memtest", "tiny-linux/vmlinux", "tiny-linux/initramfs.cpio.gz"] {
            std::fs::write(images.join(f), "").unwrap();
        }
        let config =
            crate::bench::BenchConfig::try_from(BenchArgs { images_dir: images.clone(), ..bench_args(&["--clone"]) });
        std::fs::remove_dir_all(&images).unwrap();
        assert_eq!(config.unwrap().modes, [crate::bench::Mode::Inprocess, crate::bench::Mode::Cloned]);
    }

    #[test]
    fn defaults() {
        let c = run_config(&["--kernel", "k"]).unwrap();
        assert_eq!(c.guests, 1);
        assert_eq!((c.guest.memory_mib, c.guest.vcpus, c.guest.cmdline.as_deref()), (256, 1, None));
        let s = &c.supervisor;
        assert_eq!(s.backend, MemoryBackend::Memfd);
        assert!(!s.overcommit && s.console_to_terminal);
        assert_eq!(c.timeout, None);
        assert_eq!(s.sharing.mode, DedupMode::Inprocess);
        assert_eq!(s.sharing.protect, MergeProtect::Auto);
        assert!(s.sharing.auto_raise_max_map_count);
        assert_eq!(c.guest(0).merge_group, Some(0));
        assert!(!c.guest(0).dedup_opt_out);
        assert_eq!(s.sharing.settings, DedupSettings::default());
    }

    #[test]
    fn ksm_mode_picks_anonymous_memory() {
        let c = run_config(&["--kernel", "k", "--dedup", "ksm"]).unwrap();
        assert_eq!(c.supervisor.backend, MemoryBackend::Anon);
    }

    #[test]
    fn sharing_flags() {
        let c = run_config(&[
            "--kernel",
            "k",
            "--guests",
            "4",
            "--merge-group",
            "per-guest",
            "--dedup-opt-out",
            "1,3",
            "--scan-pages",
            "100",
            "--scan-target-secs",
            "2.5",
            "--scan-cpu-cap",
            "50",
            "--max-page-sharing",
            "8",
            "--no-zero-pages",
            "--raise-max-map-count",
            "1000000",
            "--merge-protect",
            "freeze",
            "--no-raise-max-map-count",
        ])
        .unwrap();
        assert_eq!((0..4).map(|i| c.guest(i).merge_group.unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!((0..4).map(|i| c.guest(i).dedup_opt_out).collect::<Vec<_>>(), vec![false, true, false, true]);
        let sharing = &c.supervisor.sharing;
        let (engine, pace) = (sharing.settings.engine(), sharing.settings.pace());
        assert_eq!((engine.pages_to_scan, engine.max_page_sharing, engine.zero_pages), (100, 8, false));
        assert_eq!(pace.target_pass, Some(Duration::from_millis(2500)));
        assert_eq!(pace.cpu_cap, 0.5);
        assert_eq!(sharing.raise_max_map_count, Some(1_000_000));
        assert!(!sharing.auto_raise_max_map_count);
        assert_eq!(sharing.protect, MergeProtect::Freeze);
        let c = run_config(&["--kernel", "k", "--guests", "3", "--merge-group", "5,5,6"]).unwrap();
        assert_eq!(c.guest(2).merge_group, Some(6));
    }

    #[test]
    fn all_flags() {
        let c = run_config(&[
            "--guests",
            "8",
            "--memory",
            "512",
            "--vcpus",
            "2",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "rounds=3 share=0.5",
            "--memory-backend",
            "anon",
            "--dedup",
            "off",
            "--console-dir",
            "/tmp/c",
            "--overcommit",
            "--timeout",
            "30",
        ])
        .unwrap();
        assert_eq!((c.guests, c.guest.memory_mib, c.guest.vcpus), (8, 512, 2));
        assert_eq!(c.guest.initrd, Some(PathBuf::from("/i")));
        assert_eq!(c.guest.cmdline.as_deref(), Some("rounds=3 share=0.5"));
        assert_eq!(c.supervisor.backend, MemoryBackend::Anon);
        assert_eq!(c.supervisor.console_dir, Some(PathBuf::from("/tmp/c")));
        assert!(c.supervisor.overcommit && !c.supervisor.console_to_terminal);
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--kernel", "k", "--memory", "0"][..], "--memory"),
            (&["--kernel", "k", "--guests", "0"], "--guests"),
            (&["--kernel", "k", "--vcpus", "0"], "--vcpus"),
            (&["--kernel", "k", "--vcpus", "33"], "--vcpus"),
            (&["--kernel", "k", "--timeout", "0"], "--timeout"),
            (&["--kernel", "k", "--memory", "lots"], "--memory"),
            (&["--kernel", "k", "--memory-backend", "disk"], "--memory-backend"),
            (&["--memory", "64"], "--kernel"),
            (&["--kernel", "k", "--memory-backend", "anon"], "--dedup inprocess"),
            (&["--kernel", "k", "--dedup", "ksm", "--memory-backend", "memfd"], "--dedup ksm"),
            (&["--kernel", "k", "--guests", "2", "--merge-group", "0,1,2"], "--merge-group"),
            (&["--kernel", "k", "--guests", "2", "--merge-group", "a,b"], "--merge-group"),
            (&["--kernel", "k", "--guests", "2", "--dedup-opt-out", "2"], "--dedup-opt-out"),
            (&["--kernel", "k", "--scan-cpu-cap", "0"], "--scan-cpu-cap"),
            (&["--kernel", "k", "--scan-target-secs", "0"], "--scan-target-secs"),
            (&["--kernel", "k", "--scan-target-secs", "1e300"], "--scan-target-secs"),
            (&["--kernel", "k", "--scan-pages", "0"], "--scan-pages"),
            (&["--kernel", "k", "--scan-nice", "-40"], "--scan-nice"),
            (&["--kernel", "k", "--raise-max-map-count", "5"], "--raise-max-map-count"),
            (&["--kernel", "k", "--disk-readonly"], "need a disk IMAGE"),
        ] {
            let err = run_config(args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }

    /// `vmm serve` takes the same sharing flags with the same checks, and
    /// says what it cannot do instead of ignoring it.
    #[test]
    fn serve_flags() {
        let c = serve_config(&["--merge-group", "per-guest", "--scan-pages", "99"]).unwrap();
        assert_eq!(c.sharing.groups, MergeGroups::PerGuest);
        assert_eq!(c.sharing.settings.scan_pages, 99);
        assert!(serve_config(&["--scan-target-secs", "0"]).unwrap_err().contains("--scan-target-secs"));
        let err = serve_config(&["--dedup-opt-out", "1"]).unwrap_err();
        assert!(err.contains("starts with no guests") && !err.contains("18446744073709551615"), "{err}");
        assert!(serve_config(&["--merge-group", "0,1"]).unwrap_err().contains("per-guest"));
    }
}
