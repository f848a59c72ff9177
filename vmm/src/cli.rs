//! The command line: parsed by clap, checked, and turned into configs.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::boot::MAX_VCPUS;
use crate::guest::GuestConfig;
use crate::memory::{MemoryBackend, MIN_MEMORY_MIB};
use crate::runner::{DiskConfig, RunConfig};
use crate::sharing::{DedupMode, ScanPace, SharingConfig, DEFAULT_SCAN_NICE};

/// A KVM hypervisor that runs many guests in one process.
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
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    #[command(flatten)]
    pub sharing: SharingArgs,
}

impl ServeArgs {
    pub fn sharing_config(self) -> Result<SharingConfig, String> {
        self.sharing.into_config(0)
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
}

/// The memtest profile of `vmm bench`: docs/benchmarks.md says what it
/// models and why.
pub const BENCH_MEMTEST_CMDLINE: &str = "seed=1 share=0.35 zero=0.2 volatile=1024 idle=400 rounds=0";

impl TryFrom<BenchArgs> for crate::bench::BenchConfig {
    type Error = String;

    fn try_from(args: BenchArgs) -> Result<Self, String> {
        check_guest_shape(args.guests, args.memory, args.vcpus)?;
        let mut modes = args.modes;
        modes.sort();
        modes.dedup();
        if modes.contains(&crate::bench::Mode::KsmMatched) && !modes.contains(&crate::bench::Mode::Inprocess) {
            return Err("--modes ksm-matched needs inprocess too: it runs KSM at the CPU rate inprocess used".into());
        }
        let image = |rel: &str| args.images_dir.join(rel);
        let (name, kernel, initrd_parts, cmdline, duration) = match args.image {
            BenchImage::Memtest => (
                "memtest",
                image("memtest"),
                // The "OS image" every guest holds: a real kernel and its initramfs.
                vec![image("tiny-linux/vmlinux"), image("tiny-linux/initramfs.cpio.gz")],
                BENCH_MEMTEST_CMDLINE.to_string(),
                40,
            ),
            BenchImage::TinyLinux => (
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
        })
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// How many guests of this configuration to run.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub guests: usize,
    /// Kernel to boot: a vmlinux ELF, a bzImage, or one of our test guests.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
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
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default for Linux: console on ttyS0, plus what the host needs).
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// Guest RAM per guest.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub memory: u64,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u8,
    /// How guest RAM is backed: a shared memfd (in-process sharing) or
    /// anonymous memory (kernel KSM). Default: what --dedup needs.
    #[arg(long, value_enum)]
    pub memory_backend: Option<MemoryBackend>,
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
    #[command(flatten)]
    pub sharing: SharingArgs,
}

/// Page sharing flags.
#[derive(Args, Debug)]
pub struct SharingArgs {
    /// Who merges identical guest pages.
    #[arg(long, value_enum, default_value_t = DedupMode::Inprocess)]
    pub dedup: DedupMode,
    /// Pages the scanner looks at per step.
    #[arg(long, default_value_t = 16384, value_name = "N")]
    pub scan_pages: usize,
    /// Sleep between scanner steps.
    #[arg(long, default_value_t = 10, value_name = "MS")]
    pub scan_sleep_ms: u64,
    /// Advisor: pace the scanner to finish a full pass in this many seconds
    /// (overrides --scan-sleep-ms), within --scan-cpu-cap.
    #[arg(long, value_name = "SECS")]
    pub scan_target_secs: Option<f64>,
    /// Most CPU the advisor lets the scanner use, in percent of one core.
    #[arg(long, default_value_t = 100.0, value_name = "PCT")]
    pub scan_cpu_cap: f64,
    /// Scheduling priority (nice value, -20 to 19) of the scanner thread.
    #[arg(long, default_value_t = DEFAULT_SCAN_NICE, value_name = "N", allow_negative_numbers = true)]
    pub scan_nice: i32,
    /// Merges queued for a guest before it is frozen to make them (each
    /// freeze lasts about 20 ms at most): larger batches stop guests less
    /// often.
    #[arg(long, default_value_t = 8192, value_name = "N")]
    pub merge_batch: usize,
    /// Most guest pages one shared frame may serve.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_page_sharing: u32,
    /// Do not map zero pages to the kernel's zero page.
    #[arg(long)]
    pub no_zero_pages: bool,
    /// Merge groups (trust domains): pages merge only within a group. `all`
    /// (one group), `per-guest` (no sharing between guests), or one group
    /// number per guest, comma separated (e.g. 0,0,1,1).
    #[arg(long, default_value = "all", value_name = "SPEC")]
    pub merge_group: String,
    /// Guests (by index, comma separated) whose pages are never merged.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub dedup_opt_out: Vec<usize>,
    /// Raise vm.max_map_count to this first (needs root): merged pages cost
    /// mappings, and the scanner stops short of the limit.
    #[arg(long, value_name = "N")]
    pub raise_max_map_count: Option<usize>,
}

impl SharingArgs {
    fn into_config(self, guests: usize) -> Result<SharingConfig, String> {
        let groups = parse_merge_groups(&self.merge_group, guests)?;
        if let Some(bad) = self.dedup_opt_out.iter().find(|&&g| g >= guests) {
            return Err(format!("--dedup-opt-out {bad}: there are only {guests} guests (0 to {})", guests - 1));
        }
        if self.merge_batch == 0 {
            return Err("--merge-batch must be at least 1".into());
        }
        if self.scan_pages == 0 {
            return Err("--scan-pages must be at least 1".into());
        }
        if !(-20..=19).contains(&self.scan_nice) {
            return Err(format!("--scan-nice must be between -20 and 19 (got {})", self.scan_nice));
        }
        if self.max_page_sharing < 2 {
            return Err("--max-page-sharing must be at least 2".into());
        }
        if !(self.scan_cpu_cap > 0.0 && self.scan_cpu_cap <= 100.0) {
            return Err(format!("--scan-cpu-cap must be in (0, 100] percent (got {})", self.scan_cpu_cap));
        }
        let target_pass = match self.scan_target_secs {
            Some(s) if !(s > 0.0 && s.is_finite()) => {
                return Err(format!("--scan-target-secs must be a positive number of seconds (got {s})"))
            }
            s => s.map(Duration::from_secs_f64),
        };
        Ok(SharingConfig {
            mode: self.dedup,
            engine: dedup::Config {
                pages_to_scan: self.scan_pages,
                max_page_sharing: self.max_page_sharing,
                zero_pages: !self.no_zero_pages,
                batch: self.merge_batch,
                ..Default::default()
            },
            pace: ScanPace {
                sleep: Duration::from_millis(self.scan_sleep_ms),
                target_pass,
                cpu_cap: self.scan_cpu_cap / 100.0,
                nice: self.scan_nice,
            },
            groups,
            opt_out: (0..guests).map(|g| self.dedup_opt_out.contains(&g)).collect(),
            raise_max_map_count: self.raise_max_map_count,
        })
    }
}

fn parse_merge_groups(spec: &str, guests: usize) -> Result<Vec<u32>, String> {
    match spec {
        "all" => Ok(vec![0; guests]),
        "per-guest" => Ok((0..guests as u32).collect()),
        list => {
            let groups = list
                .split(',')
                .map(|g| g.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("--merge-group '{spec}': expected all, per-guest, or numbers like 0,0,1,1"))?;
            if groups.len() != guests {
                return Err(format!("--merge-group '{spec}' names {} groups for {guests} guests", groups.len()));
            }
            Ok(groups)
        }
    }
}

fn parse_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse().map_err(|_| format!("unknown log level '{text}' (error, warn, info, debug, trace)"))
}

/// What `run` and `bench` both check about --guests, --memory and --vcpus.
fn check_guest_shape(guests: usize, memory_mib: u64, vcpus: u8) -> Result<(), String> {
    if guests == 0 {
        return Err("--guests must be at least 1".into());
    }
    if memory_mib < MIN_MEMORY_MIB {
        return Err(format!("--memory must be at least {MIN_MEMORY_MIB} MiB (got {memory_mib})"));
    }
    if memory_mib > 1 << 20 {
        return Err(format!("--memory {memory_mib} MiB is more than the 1 TiB vmm supports per guest"));
    }
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(format!("--vcpus must be between 1 and {MAX_VCPUS} (got {vcpus})"));
    }
    Ok(())
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = String;

    fn try_from(args: RunArgs) -> Result<Self, String> {
        check_guest_shape(args.guests, args.memory, args.vcpus)?;
        if args.timeout == Some(0) {
            return Err("--timeout must be at least 1 second".into());
        }
        let backend = match (args.sharing.dedup, args.memory_backend) {
            (DedupMode::Inprocess, Some(MemoryBackend::Anon)) => {
                return Err("--dedup inprocess needs --memory-backend memfd (or --dedup ksm/off)".into())
            }
            (DedupMode::Ksm, Some(MemoryBackend::Memfd)) => {
                return Err("--dedup ksm needs --memory-backend anon: KSM merges anonymous memory only".into())
            }
            (DedupMode::Ksm, None) => MemoryBackend::Anon,
            (_, chosen) => chosen.unwrap_or(MemoryBackend::Memfd),
        };
        let disk = match (args.image, args.disk_readonly, args.overlay_dir) {
            (None, true, _) | (None, _, Some(_)) => {
                return Err("--disk-readonly and --overlay-dir need a disk IMAGE".into())
            }
            (Some(_), true, Some(_)) => return Err("--disk-readonly disks have no overlays: drop --overlay-dir".into()),
            (Some(image), read_only, overlay_dir) => Some(DiskConfig { image, read_only, overlay_dir }),
            (None, false, None) => None,
        };
        let sharing = args.sharing.into_config(args.guests)?;
        let dirty_log = sharing.mode == DedupMode::Inprocess;
        Ok(RunConfig {
            sharing,
            guest: GuestConfig {
                kernel: args.kernel,
                initrd: args.initrd,
                cmdline: args.cmdline,
                memory_mib: args.memory,
                vcpus: args.vcpus,
                backend,
                dirty_log,
            },
            guests: args.guests,
            console_dir: args.console_dir,
            overcommit: args.overcommit,
            timeout: args.timeout.map(Duration::from_secs),
            stats_file: args.stats_file,
            disk,
            api_socket: args.api_socket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(["vmm", "run"].iter().chain(args)).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else { unreachable!("parsed as run") };
        RunConfig::try_from(run)
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
    }

    #[test]
    fn defaults() {
        let c = run_config(&["--kernel", "k"]).unwrap();
        assert_eq!(c.guests, 1);
        assert_eq!(c.guest.memory_mib, 256);
        assert_eq!(c.guest.vcpus, 1);
        assert_eq!(c.guest.backend, MemoryBackend::Memfd);
        assert_eq!(c.guest.cmdline, None);
        assert!(!c.overcommit);
        assert_eq!(c.timeout, None);
        assert_eq!(c.sharing.mode, DedupMode::Inprocess);
        assert_eq!(c.sharing.groups, vec![0]);
        assert_eq!(c.sharing.opt_out, vec![false]);
        assert_eq!(c.sharing.pace.target_pass, None);
    }

    #[test]
    fn ksm_mode_picks_anonymous_memory() {
        let c = run_config(&["--kernel", "k", "--dedup", "ksm"]).unwrap();
        assert_eq!(c.guest.backend, MemoryBackend::Anon);
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
        ])
        .unwrap();
        assert_eq!(c.sharing.groups, vec![0, 1, 2, 3]);
        assert_eq!(c.sharing.opt_out, vec![false, true, false, true]);
        assert_eq!(c.sharing.engine.pages_to_scan, 100);
        assert_eq!(c.sharing.engine.max_page_sharing, 8);
        assert!(!c.sharing.engine.zero_pages);
        assert_eq!(c.sharing.pace.target_pass, Some(Duration::from_millis(2500)));
        assert_eq!(c.sharing.pace.cpu_cap, 0.5);
        assert_eq!(c.sharing.raise_max_map_count, Some(1_000_000));
        let c = run_config(&["--kernel", "k", "--guests", "3", "--merge-group", "5,5,6"]).unwrap();
        assert_eq!(c.sharing.groups, vec![5, 5, 6]);
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
        assert_eq!(c.guests, 8);
        assert_eq!(c.guest.memory_mib, 512);
        assert_eq!(c.guest.vcpus, 2);
        assert_eq!(c.guest.initrd, Some(PathBuf::from("/i")));
        assert_eq!(c.guest.cmdline.as_deref(), Some("rounds=3 share=0.5"));
        assert_eq!(c.guest.backend, MemoryBackend::Anon);
        assert_eq!(c.console_dir, Some(PathBuf::from("/tmp/c")));
        assert!(c.overcommit);
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
        ] {
            let err = run_config(args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }
}
