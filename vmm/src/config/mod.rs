//! One home for configuration. Every knob has one name, one default and one
//! valid range ([`Knob`]), checked once by the same code whether it comes
//! from the command line (`vmm run`, `vmm serve`) or the API (a guest's
//! `POST /guests` body, a `PATCH /dedup/config`). Errors name the knob the
//! way the user wrote it: `--scan-pages` on the command line, `scan_pages`
//! in the API.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

mod address;
mod rate_limit;

pub use address::{check_cid, mac_for_guest, Subnet, DEFAULT_GUEST_CID, HOST_CID};
pub use rate_limit::RateLimit;

use crate::error::{Error, Result};
use crate::memory::{MemoryBackend, MIB};

/// User ids for guest processes start here by default (`--jail-uid-base`):
/// above the ranges systemd hands to containers (up to 1,879,048,191),
/// below 2^31, with room for millions of guests.
pub const DEFAULT_UID_BASE: u32 = 1_900_000_000;

/// Where a value came from, for naming it in an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cli,
    Api,
}

/// A numeric setting: its names, default and inclusive range.
pub struct Knob<T> {
    /// As a field of the API's JSON.
    pub field: &'static str,
    /// As a command-line flag.
    pub flag: &'static str,
    pub default: T,
    pub min: T,
    pub max: T,
}

impl<T: PartialOrd + Copy + std::fmt::Display> Knob<T> {
    pub fn name(&self, source: Source) -> &'static str {
        match source {
            Source::Cli => self.flag,
            Source::Api => self.field,
        }
    }

    /// `value` if it is in range, else an error naming the knob and range.
    pub fn check(&self, value: T, source: Source) -> Result<T> {
        if value < self.min || value > self.max {
            return Err(Error::bad_input(format!(
                "{} must be between {} and {} (got {value})",
                self.name(source),
                self.min,
                self.max
            )));
        }
        Ok(value)
    }
}

pub const GUESTS: Knob<u64> = Knob { field: "guests", flag: "--guests", default: 1, min: 1, max: 4096 };
pub const MEMORY_MIB: Knob<u64> = Knob { field: "memory_mib", flag: "--memory", default: 256, min: 8, max: 1 << 20 };
pub const VCPUS: Knob<u64> = Knob { field: "vcpus", flag: "--vcpus", default: 1, min: 1, max: 32 };
/// Seconds between a balloon's statistics (0: none asked).
pub const BALLOON_STATS_INTERVAL_S: Knob<u64> =
    Knob { field: "balloon.stats_interval_s", flag: "--balloon-stats-interval", default: 5, min: 0, max: 3600 };
/// A console file's cap: past it, its oldest half is dropped.
pub const CONSOLE_LIMIT_KIB: Knob<u64> =
    Knob { field: "console_limit_kib", flag: "--console-limit", default: 16 << 10, min: 64, max: 1 << 30 };
pub const TIMEOUT_SECS: Knob<u64> =
    Knob { field: "timeout_secs", flag: "--timeout", default: 0, min: 1, max: 10 * 365 * 86_400 };
pub const SCAN_PAGES: Knob<u64> =
    Knob { field: "scan_pages", flag: "--scan-pages", default: 16384, min: 1, max: 1 << 22 };
pub const SCAN_SLEEP_MS: Knob<u64> =
    Knob { field: "scan_sleep_ms", flag: "--scan-sleep-ms", default: 10, min: 0, max: 60_000 };
/// The advisor's target pass time; 0 in the API turns the advisor off.
pub const SCAN_TARGET_SECS: Knob<f64> =
    Knob { field: "scan_target_secs", flag: "--scan-target-secs", default: 0.0, min: 0.1, max: 86_400.0 };
pub const SCAN_CPU_CAP_PCT: Knob<f64> =
    Knob { field: "scan_cpu_cap_pct", flag: "--scan-cpu-cap", default: 100.0, min: 1.0, max: 100.0 };
pub const SCAN_NICE: Knob<i64> =
    Knob { field: "scan_nice", flag: "--scan-nice", default: dedup::DEFAULT_SCAN_NICE as i64, min: -20, max: 19 };
pub const MERGE_BATCH: Knob<u64> =
    Knob { field: "merge_batch", flag: "--merge-batch", default: 8192, min: 1, max: 1 << 20 };
pub const MAX_PAGE_SHARING: Knob<u64> =
    Knob { field: "max_page_sharing", flag: "--max-page-sharing", default: 256, min: 2, max: 1 << 20 };
/// The memory governor's reserve, in percent of what there is (0: no
/// governor: the kernel's OOM killer decides, as without a VMM that knows).
pub const MEMORY_RESERVE_PCT: Knob<u64> =
    Knob { field: "memory_reserve", flag: "--memory-reserve", default: 5, min: 0, max: 50 };
/// Guest processes kept started ahead of need (supervisor/pool.rs).
pub const POOL: Knob<u64> = Knob { field: "pool", flag: "--pool", default: 2, min: 0, max: 256 };
/// `vmm bench --host-memory`: each run's memory cgroup limit.
pub const HOST_MEMORY_MIB: Knob<u64> =
    Knob { field: "host_memory", flag: "--host-memory", default: 0, min: 64, max: 1 << 30 };
pub const MAX_MAP_COUNT: Knob<u64> =
    Knob { field: "max_map_count", flag: "--raise-max-map-count", default: 65530, min: 65530, max: i32::MAX as u64 };

/// A field that may be left out but, when given, must be a value (not null).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// An integer field: JSON's 12 or 12.0 (an integer, as JSON Schema counts
/// them), never 12.5 or one out of the type's range.
fn integer<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> std::result::Result<T, D::Error> {
    struct Integer;
    impl serde::de::Visitor<'_> for Integer {
        type Value = i128;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<i128, E> {
            Ok(v.into())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<i128, E> {
            Ok(v.into())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<i128, E> {
            if v.fract() == 0.0 && v.abs() < 1e30 {
                Ok(v as i128)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    let v = d.deserialize_any(Integer)?;
    T::try_from(v).map_err(|_| serde::de::Error::custom(format!("integer {v} is out of range")))
}

/// [`integer`] for a field that may be left out.
fn present_integer<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> std::result::Result<Option<T>, D::Error> {
    integer(d).map(Some)
}

fn default_memory() -> u64 {
    MEMORY_MIB.default
}

fn default_vcpus() -> u64 {
    VCPUS.default
}

/// One guest: the body of `POST /guests`, and each guest of `vmm run`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kernel": "guest-images/out/memtest", "memory_mib": 16, "cmdline": "rounds=0 idle=1000"}))]
pub struct GuestConfig {
    /// A vmlinux ELF, a bzImage, or one of our test guests (left out when
    /// restoring: the snapshot's guest is used; left out with a `disk`: the
    /// Linux its boot loader entry names, with `cmdline` added to the
    /// entry's command line).
    #[serde(default)]
    #[schema(value_type = String)]
    pub kernel: PathBuf,
    /// Start from the snapshot in this directory (`PUT
    /// /guests/{id}/snapshot`) instead of booting: kernel, command line,
    /// memory and vCPUs are the snapshot's.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, nullable = false)]
    pub restore: Option<PathBuf>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, nullable = false)]
    pub initrd: Option<PathBuf>,
    /// `None`: our own guests get an empty line, Linux the host's default.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cmdline: Option<String>,
    /// Guest RAM, 8 MiB to 1 TiB.
    #[serde(default = "default_memory", deserialize_with = "integer")]
    #[schema(default = 256, minimum = 8, maximum = 1048576)]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus", deserialize_with = "integer")]
    #[schema(default = 1, minimum = 1, maximum = 32)]
    pub vcpus: u64,
    /// A raw disk image, shared read-only, each guest writing to an overlay.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, nullable = false)]
    pub disk: Option<PathBuf>,
    /// A plain read-only disk, without an overlay.
    #[serde(default)]
    pub disk_readonly: bool,
    /// At most so many bytes and requests a second to the disk.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub disk_limit: Option<RateLimit>,
    /// Pages merge only within a group; left out: the server's policy
    /// (`--merge-group`).
    #[serde(default, deserialize_with = "present_integer", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub merge_group: Option<u32>,
    /// Never merge this guest's pages.
    #[serde(default)]
    pub dedup_opt_out: bool,
    /// A network device (virtio-net over a TAP).
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub net: Option<NetConfig>,
    /// A vsock device whose host side is a Unix socket.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub vsock: Option<VsockConfig>,
    /// A memory balloon (virtio-balloon): the guest gives memory back
    /// when asked (`PUT /guests/{id}/balloon`) and reports the pages it
    /// frees.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub balloon: Option<BalloonConfig>,
    /// How the virtio devices reach the guest; left out: PCI for Linux,
    /// MMIO for our own test guests (a snapshot's guest keeps the one it
    /// had; one from before PCI had MMIO).
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub transport: Option<Transport>,
}

/// A guest's memory balloon (virtio-balloon).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"free_page_reporting": true}))]
pub struct BalloonConfig {
    /// The guest hands back the pages it frees (free page reporting),
    /// where its driver can.
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub free_page_reporting: bool,
    /// The guest may take pages back from its balloon when it runs out
    /// of memory, rather than fail.
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub deflate_on_oom: bool,
    /// Seconds between the guest's memory statistics (0: none asked).
    #[serde(default = "default_stats_interval", deserialize_with = "integer")]
    #[schema(default = 5, minimum = 0, maximum = 3600)]
    pub stats_interval_s: u64,
}

fn yes() -> bool {
    true
}

fn default_stats_interval() -> u64 {
    BALLOON_STATS_INTERVAL_S.default
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig { free_page_reporting: true, deflate_on_oom: true, stats_interval_s: default_stats_interval() }
    }
}

/// The virtio transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Devices on PCI bus 0 (virtio-pci, MSI-X), described by ACPI.
    Pci,
    /// virtio-mmio devices, announced on the kernel command line.
    Mmio,
}

/// A guest's vsock device (virtio-vsock), its host side a Unix socket as
/// Firecracker's hybrid vsock: a host program connects to `socket` and
/// writes `CONNECT <port>\n` to reach the guest's port; the guest's
/// connections to the host's port P go to `<socket>_P`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"socket": "/run/vmm/vsock"}))]
pub struct VsockConfig {
    /// The socket's path (made by the supervisor; it must not exist), or
    /// an existing directory, in which guest i's socket is
    /// `guest-<i>.sock`. `GET /guests/{id}` shows the path chosen. A
    /// clone's socket is `guest-<id>.sock` beside its template's unless
    /// its request gives `vsock`.
    #[schema(value_type = String)]
    pub socket: PathBuf,
    /// The guest's address (CID), 3 by default.
    #[serde(default, deserialize_with = "present_integer", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 3, maximum = 4294967294u64)]
    pub cid: Option<u64>,
}

impl VsockConfig {
    pub fn validate(&self, source: Source) -> Result<()> {
        let name = if source == Source::Cli { "--vsock" } else { "vsock" };
        if self.socket.as_os_str().is_empty() {
            return Err(Error::bad_input(format!("{name}: the socket's path is empty")));
        }
        if let Some(cid) = self.cid {
            check_cid(cid).map_err(|e| Error::bad_input(format!("{name}: {e}")))?;
        }
        Ok(())
    }
}

/// A guest's network: a TAP of its own on a bridge, or a TAP named. The
/// supervisor fills in what it chose (the TAP, the MAC, the address), and
/// `GET /guests/{id}` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"bridge": "vmmbr0", "subnet": "198.18.0.0/24"}))]
pub struct NetConfig {
    /// The TAP (made if it does not exist): one guest's alone. With a
    /// bridge it is attached there; left out, the supervisor makes one per
    /// guest and names it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub tap: Option<String>,
    /// A bridge for the guest's TAP, made (with the subnet's first address)
    /// if it does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub bridge: Option<String>,
    /// The bridge's IPv4 subnet (`198.18.0.0/24`): guest i gets its address
    /// base + 2 + i, on its kernel command line (`ip=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub subnet: Option<String>,
    /// The guest's MAC (`06:76:6d:00:00:01`); derived from its id if left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub mac: Option<String>,
    /// The guest's address, from the subnet (set by the supervisor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub address: Option<String>,
    /// At most so many bytes and frames a second, both ways together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub limit: Option<RateLimit>,
    /// Put the guest's TAP in a network namespace of its own (not on a
    /// bridge), with the subnet's first address: clones of one template,
    /// which share its address, are each reachable in theirs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub netns: bool,
    /// The namespace's name (set by the supervisor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub namespace: Option<String>,
}

impl NetConfig {
    /// Parses `--net`: `tap=NAME` and/or `bridge=NAME[,subnet=CIDR]`, or
    /// `netns[,subnet=CIDR]`, with
    /// an optional `mac=MAC` and limits (`bytes=`, `ops=`, `bytes-burst=`,
    /// `ops-burst=`: see `RateLimit::parse_cli`).
    pub fn parse_cli(s: &str) -> std::result::Result<NetConfig, String> {
        let mut net = NetConfig::default();
        let mut limits = Vec::new();
        for part in s.split(',') {
            if part == "netns" {
                net.netns = true;
                continue;
            }
            let (key, value) = part.split_once('=').ok_or_else(|| format!("--net: {part:?} is not KEY=VALUE"))?;
            if ["bytes", "ops", "bytes-burst", "ops-burst"].contains(&key) {
                limits.push(part);
                continue;
            }
            let field = match key {
                "tap" => &mut net.tap,
                "bridge" => &mut net.bridge,
                "subnet" => &mut net.subnet,
                "mac" => &mut net.mac,
                _ => return Err(format!("--net: unknown key {key:?} (tap, bridge, subnet, mac)")),
            };
            if field.replace(value.to_string()).is_some() {
                return Err(format!("--net: {key} given twice"));
            }
        }
        if !limits.is_empty() {
            let limit = RateLimit::parse_cli(&limits.join(","));
            net.limit = Some(limit.map_err(|e| format!("--net: {e}"))?);
        }
        Ok(net)
    }

    /// Checks a `--net` spec, and keeps it as given (parsed when used).
    pub fn check_cli(s: &str) -> std::result::Result<String, String> {
        NetConfig::parse_cli(s).map(|_| s.to_string())
    }

    /// Checks what a user gave (`address` is the supervisor's to set: a
    /// given one is replaced).
    pub fn validate(&self, source: Source) -> Result<()> {
        let name = if source == Source::Cli { "--net" } else { "net" };
        let bad = |why: String| Error::bad_input(format!("{name}: {why}"));
        if self.tap.is_none() && self.bridge.is_none() && !self.netns {
            return Err(bad("give a tap, a bridge or netns".into()));
        }
        if self.netns && self.bridge.is_some() {
            return Err(bad("netns puts the TAP in a namespace of its own, not on a bridge".into()));
        }
        if self.subnet.is_some() && self.bridge.is_none() && !self.netns {
            return Err(bad("a subnet goes with a bridge or netns".into()));
        }
        for n in self.tap.iter().chain(&self.bridge) {
            crate::tap::check_ifname(n).map_err(bad)?;
        }
        if let Some(subnet) = &self.subnet {
            subnet.parse::<Subnet>().map_err(bad)?;
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac).map_err(bad)?;
        }
        if let Some(limit) = &self.limit {
            limit.validate().map_err(|e| bad(format!("limit: {e}")))?;
        }
        Ok(())
    }
}

/// A unicast MAC, `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address (like 06:76:6d:00:00:01)");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address; a guest needs a unicast one"));
    }
    Ok(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl GuestConfig {
    pub fn new(kernel: PathBuf) -> Self {
        GuestConfig {
            kernel,
            restore: None,
            initrd: None,
            cmdline: None,
            memory_mib: MEMORY_MIB.default,
            vcpus: VCPUS.default,
            disk: None,
            disk_readonly: false,
            merge_group: None,
            dedup_opt_out: false,
            net: None,
            disk_limit: None,
            vsock: None,
            balloon: None,
            transport: None,
        }
    }

    /// The transport's name, for messages ("pci", "mmio", or "mmio" for a
    /// guest restored from before PCI).
    pub fn transport_name(&self) -> &'static str {
        match self.transport {
            Some(Transport::Pci) => "pci",
            _ => "mmio",
        }
    }

    pub fn validate(&self, source: Source) -> Result<()> {
        MEMORY_MIB.check(self.memory_mib, source)?;
        VCPUS.check(self.vcpus, source)?;
        if self.disk.is_none() && self.disk_readonly {
            let name = if source == Source::Cli { "--disk-readonly" } else { "disk_readonly" };
            return Err(Error::bad_input(format!("{name} needs a disk image")));
        }
        if let Some(net) = &self.net {
            net.validate(source)?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate(source)?;
        }
        if let Some(balloon) = &self.balloon {
            BALLOON_STATS_INTERVAL_S.check(balloon.stats_interval_s, source)?;
        }
        if let Some(limit) = &self.disk_limit {
            let name = if source == Source::Cli { "--disk-limit" } else { "disk_limit" };
            if self.disk.is_none() {
                return Err(Error::bad_input(format!("{name} needs a disk image")));
            }
            limit.validate().map_err(|e| Error::bad_input(format!("{name}: {e}")))?;
        }
        let (kernel, restore) = match source {
            Source::Cli => ("--kernel", "--restore"),
            Source::Api => ("kernel", "restore"),
        };
        match (&self.restore, self.kernel.as_os_str().is_empty()) {
            // Without a kernel, the disk image's own boot entry (and its initrd).
            (None, true) if self.disk.is_some() && self.initrd.is_some() => {
                let initrd = if source == Source::Cli { "--initrd" } else { "initrd" };
                return Err(Error::bad_input(format!(
                    "{initrd} goes with {kernel}: a guest that boots its disk image takes the initrd its boot entry names"
                )));
            }
            (None, true) if self.disk.is_some() => {}
            (None, true) => {
                return Err(Error::bad_input(format!(
                    "{kernel} must name a file (or give {restore}, or a disk image that boots Linux)"
                )))
            }
            (Some(_), false) => {
                return Err(Error::bad_input(format!(
                    "give {kernel} or {restore}, not both: a restored guest runs its snapshot's kernel"
                )))
            }
            (Some(dir), true) if dir.as_os_str().is_empty() => {
                return Err(Error::bad_input(format!("{restore} must name a snapshot directory")))
            }
            (Some(_), true) if self.transport.is_some() => {
                let transport = if source == Source::Cli { "--transport" } else { "transport" };
                return Err(Error::bad_input(format!(
                    "give {transport} or {restore}, not both: a clone keeps its snapshot's devices where they were"
                )));
            }
            _ => {}
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib * MIB
    }
}

/// Who merges identical guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// Our own scanner, in the VMM (memfd-backed RAM).
    Inprocess,
    /// The kernel's KSM: anonymous RAM marked MADV_MERGEABLE; ksmd does the work.
    Ksm,
    /// No sharing.
    Off,
}

/// How merges hold off a guest's writers (`--merge-protect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MergeProtect {
    /// userfaultfd write-protection where the host has it, else the freeze.
    #[default]
    Auto,
    /// Write-protect just the pages being merged (userfaultfd).
    Uffd,
    /// Park the guest's vCPUs and hold its devices for each batch.
    Freeze,
}

impl From<MergeProtect> for dedup::ProtectMode {
    fn from(m: MergeProtect) -> Self {
        match m {
            MergeProtect::Auto => dedup::ProtectMode::Auto,
            MergeProtect::Uffd => dedup::ProtectMode::WriteProtect,
            MergeProtect::Freeze => dedup::ProtectMode::Freeze,
        }
    }
}

/// How page sharing tells a page is being written (`--volatility`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Volatility {
    /// KVM's dirty log plus the VMM's own device writes.
    #[default]
    DirtyLog,
    /// A page whose content hash changed between two looks (no dirty log:
    /// guests run without KVM's write tracking).
    Checksum,
}

/// The page-sharing settings that can change while guests run (`GET` and
/// `PATCH /dedup/config`).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DedupSettings {
    /// Off: the scanner sleeps; merged pages stay merged.
    pub enabled: bool,
    pub scan_pages: u64,
    pub scan_sleep_ms: u64,
    /// The advisor's target time for a full pass (null: off).
    pub scan_target_secs: Option<f64>,
    pub scan_cpu_cap_pct: f64,
    pub scan_nice: i64,
    pub max_page_sharing: u64,
    pub zero_pages: bool,
    pub merge_batch: u64,
}

impl Default for DedupSettings {
    fn default() -> Self {
        DedupSettings {
            enabled: true,
            scan_pages: SCAN_PAGES.default,
            scan_sleep_ms: SCAN_SLEEP_MS.default,
            scan_target_secs: None,
            scan_cpu_cap_pct: SCAN_CPU_CAP_PCT.default,
            scan_nice: SCAN_NICE.default,
            max_page_sharing: MAX_PAGE_SHARING.default,
            zero_pages: true,
            merge_batch: MERGE_BATCH.default,
        }
    }
}

impl DedupSettings {
    pub fn validate(&self, source: Source) -> Result<()> {
        SCAN_PAGES.check(self.scan_pages, source)?;
        SCAN_SLEEP_MS.check(self.scan_sleep_ms, source)?;
        if let Some(t) = self.scan_target_secs {
            if !t.is_finite() {
                return Err(Error::bad_input(format!("{} must be a number of seconds", SCAN_TARGET_SECS.name(source))));
            }
            SCAN_TARGET_SECS.check(t, source)?;
        }
        if !self.scan_cpu_cap_pct.is_finite() {
            return Err(Error::bad_input(format!("{} must be a number", SCAN_CPU_CAP_PCT.name(source))));
        }
        SCAN_CPU_CAP_PCT.check(self.scan_cpu_cap_pct, source)?;
        SCAN_NICE.check(self.scan_nice, source)?;
        MAX_PAGE_SHARING.check(self.max_page_sharing, source)?;
        MERGE_BATCH.check(self.merge_batch, source)?;
        Ok(())
    }

    /// The engine's part (valid settings only).
    pub fn engine(&self) -> dedup::Config {
        dedup::Config {
            pages_to_scan: self.scan_pages as usize,
            max_page_sharing: self.max_page_sharing as u32,
            zero_pages: self.zero_pages,
            batch: self.merge_batch as usize,
        }
    }

    /// The scanner thread's part (valid settings only).
    pub fn pace(&self) -> dedup::ScanPace {
        dedup::ScanPace {
            sleep: Duration::from_millis(self.scan_sleep_ms),
            target_pass: self.scan_target_secs.map(Duration::from_secs_f64),
            cpu_cap: self.scan_cpu_cap_pct / 100.0,
            nice: self.scan_nice as i32,
        }
    }
}

/// The body of `PATCH /dedup/config`: what to change; absent fields stay.
/// Ranges are those of the command line's flags (README).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupUpdate {
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false)]
    pub enabled: Option<bool>,
    #[serde(default, deserialize_with = "present_integer")]
    #[schema(nullable = false, minimum = 1, maximum = 4194304)]
    pub scan_pages: Option<u64>,
    #[serde(default, deserialize_with = "present_integer")]
    #[schema(nullable = false, minimum = 0, maximum = 60000)]
    pub scan_sleep_ms: Option<u64>,
    /// 0 turns the advisor off.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, minimum = 0, maximum = 86400)]
    pub scan_target_secs: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, minimum = 1, maximum = 100)]
    pub scan_cpu_cap_pct: Option<f64>,
    #[serde(default, deserialize_with = "present_integer")]
    #[schema(nullable = false, minimum = -20, maximum = 19)]
    pub scan_nice: Option<i64>,
    #[serde(default, deserialize_with = "present_integer")]
    #[schema(nullable = false, minimum = 2, maximum = 1048576)]
    pub max_page_sharing: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false)]
    pub zero_pages: Option<bool>,
    #[serde(default, deserialize_with = "present_integer")]
    #[schema(nullable = false, minimum = 1, maximum = 1048576)]
    pub merge_batch: Option<u64>,
}

impl DedupUpdate {
    /// `current` with this update applied, checked as a whole before
    /// anything changes.
    pub fn apply_to(&self, current: &DedupSettings) -> Result<DedupSettings> {
        let mut s = current.clone();
        s.enabled = self.enabled.unwrap_or(s.enabled);
        s.scan_pages = self.scan_pages.unwrap_or(s.scan_pages);
        s.scan_sleep_ms = self.scan_sleep_ms.unwrap_or(s.scan_sleep_ms);
        if let Some(t) = self.scan_target_secs {
            s.scan_target_secs = (t != 0.0).then_some(t);
        }
        s.scan_cpu_cap_pct = self.scan_cpu_cap_pct.unwrap_or(s.scan_cpu_cap_pct);
        s.scan_nice = self.scan_nice.unwrap_or(s.scan_nice);
        s.max_page_sharing = self.max_page_sharing.unwrap_or(s.max_page_sharing);
        s.zero_pages = self.zero_pages.unwrap_or(s.zero_pages);
        s.merge_batch = self.merge_batch.unwrap_or(s.merge_batch);
        s.validate(Source::Api)?;
        Ok(s)
    }
}

/// Which guests may share pages with which (trust domains).
#[derive(Clone, Debug, PartialEq)]
pub enum MergeGroups {
    /// One group for every guest.
    All,
    /// A group per guest: pages merge within a guest only.
    PerGuest,
    /// Group of each guest of a `vmm run`, in order.
    List(Vec<u32>),
}

impl MergeGroups {
    pub fn parse(spec: &str) -> Result<MergeGroups> {
        match spec {
            "all" => Ok(MergeGroups::All),
            "per-guest" => Ok(MergeGroups::PerGuest),
            list => list
                .split(',')
                .map(|g| g.trim().parse::<u32>())
                .collect::<std::result::Result<_, _>>()
                .map(MergeGroups::List)
                .map_err(|_| {
                    Error::bad_input(format!(
                        "--merge-group '{spec}': expected all, per-guest, or numbers like 0,0,1,1"
                    ))
                }),
        }
    }

    /// The group of guest `id` when it did not ask for one.
    pub fn default_for(&self, id: usize) -> u32 {
        match self {
            MergeGroups::All => 0,
            MergeGroups::PerGuest => id as u32,
            MergeGroups::List(groups) => groups.get(id).copied().unwrap_or(0),
        }
    }
}

/// Page sharing for a whole supervisor.
#[derive(Clone, Debug, PartialEq)]
pub struct SharingConfig {
    pub mode: DedupMode,
    pub settings: DedupSettings,
    pub protect: MergeProtect,
    pub volatility: Volatility,
    pub groups: MergeGroups,
    /// Raise vm.max_map_count to this before the guests start.
    pub raise_max_map_count: Option<u64>,
    /// Raise vm.max_map_count while running when a guest needs it (root).
    pub auto_raise_max_map_count: bool,
}

impl Default for SharingConfig {
    fn default() -> Self {
        SharingConfig {
            mode: DedupMode::Inprocess,
            settings: DedupSettings::default(),
            protect: MergeProtect::Auto,
            volatility: Volatility::DirtyLog,
            groups: MergeGroups::All,
            raise_max_map_count: None,
            auto_raise_max_map_count: true,
        }
    }
}

impl SharingConfig {
    /// The guests' RAM: a memfd for our sharing (and by default), anonymous
    /// memory for KSM.
    pub fn backend(&self, asked: Option<MemoryBackend>) -> Result<MemoryBackend> {
        match (self.mode, asked) {
            (DedupMode::Inprocess, Some(MemoryBackend::Anon)) => {
                Err(Error::bad_input("--dedup inprocess needs --memory-backend memfd (or --dedup ksm/off)"))
            }
            (DedupMode::Ksm, Some(MemoryBackend::Memfd)) => {
                Err(Error::bad_input("--dedup ksm needs --memory-backend anon: KSM merges anonymous memory only"))
            }
            (DedupMode::Ksm, None) => Ok(MemoryBackend::Anon),
            (_, chosen) => Ok(chosen.unwrap_or(MemoryBackend::Memfd)),
        }
    }
}

/// What a supervisor (`vmm run` or `vmm serve`) needs to make and run guests.
#[derive(Clone, Debug, PartialEq)]
pub struct SupervisorConfig {
    pub sharing: SharingConfig,
    pub backend: MemoryBackend,
    /// Per-guest console logs go here (default: a temporary directory).
    pub console_dir: Option<PathBuf>,
    /// The one guest of a run writes its console to our stdout.
    pub console_to_terminal: bool,
    /// A console file's cap in bytes: past it, its oldest half is dropped.
    pub console_limit_bytes: u64,
    /// Disk overlays go here, kept (default: a temporary directory).
    pub overlay_dir: Option<PathBuf>,
    /// Start guests whose RAM the host does not have available.
    pub overcommit: bool,
    /// The memory governor's reserve in percent (supervisor/pressure.rs); 0: off.
    pub memory_reserve_pct: u64,
    /// How guest processes are jailed; `None`: they are not (`--no-jail`).
    pub jail: Option<JailConfig>,
    /// Guest processes kept started ahead of need (0: each is started
    /// when its guest is made).
    pub pool: usize,
}

/// The jail of guest processes (guest/jail.rs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JailConfig {
    /// Guest N runs as user and group id `uid_base + N`.
    pub uid_base: u32,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            sharing: SharingConfig::default(),
            backend: MemoryBackend::Memfd,
            console_dir: None,
            console_to_terminal: false,
            console_limit_bytes: CONSOLE_LIMIT_KIB.default << 10,
            overlay_dir: None,
            overcommit: false,
            memory_reserve_pct: MEMORY_RESERVE_PCT.default,
            jail: Some(JailConfig { uid_base: DEFAULT_UID_BASE }),
            pool: POOL.default as usize,
        }
    }
}

/// `vmm run`: N guests of one configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct RunConfig {
    pub guest: GuestConfig,
    pub guests: usize,
    /// Guests (by index) whose pages are never merged.
    pub opt_out: Vec<usize>,
    pub supervisor: SupervisorConfig,
    /// Stop every guest after this long.
    pub timeout: Option<Duration>,
    /// Rewrite a JSON [`crate::stats_file::RunStats`] here twice a second.
    pub stats_file: Option<PathBuf>,
    /// Serve the API here while the guests run.
    pub api_socket: Option<PathBuf>,
}

impl RunConfig {
    /// Checks what the parts alone cannot: guest counts against lists.
    pub fn validate(&self) -> Result<()> {
        GUESTS.check(self.guests as u64, Source::Cli)?;
        self.guest.validate(Source::Cli)?;
        self.supervisor.sharing.settings.validate(Source::Cli)?;
        if let MergeGroups::List(groups) = &self.supervisor.sharing.groups {
            if groups.len() != self.guests {
                return Err(Error::bad_input(format!(
                    "--merge-group names {} groups for {} guests",
                    groups.len(),
                    self.guests
                )));
            }
        }
        if let Some(net) = self.guest.net.as_ref().filter(|_| self.guests > 1) {
            if net.tap.is_some() || net.mac.is_some() {
                return Err(Error::bad_input(format!(
                    "--net tap= and mac= are one guest's; {} guests need bridge= (a TAP and a MAC each)",
                    self.guests
                )));
            }
        }
        if let Some(vsock) = self.guest.vsock.as_ref().filter(|v| self.guests > 1 && !v.socket.is_dir()) {
            return Err(Error::bad_input(format!(
                "--vsock {} is one guest's socket; {} guests need an existing directory (a socket each)",
                vsock.socket.display(),
                self.guests
            )));
        }
        if let Some(bad) = self.opt_out.iter().find(|&&g| g >= self.guests) {
            return Err(Error::bad_input(format!(
                "--dedup-opt-out {bad}: there are only {} guests (0 to {})",
                self.guests,
                self.guests - 1
            )));
        }
        Ok(())
    }

    /// Guest `i` of the run.
    pub fn guest(&self, i: usize) -> GuestConfig {
        GuestConfig {
            merge_group: Some(self.supervisor.sharing.groups.default_for(i)),
            dedup_opt_out: self.opt_out.contains(&i),
            ..self.guest.clone()
        }
    }
}

/// Refuses to start guests whose RAM the host cannot hold, unless told to.
pub fn check_memory_fits(guests: usize, memory_mib: u64, available: u64, overcommit: bool) -> Result<()> {
    let wanted = guests as u64 * memory_mib * MIB;
    if wanted > available && !overcommit {
        return Err(Error::bad_input(format!(
            "{guests} guests x {memory_mib} MiB = {} MiB is more than the {} MiB of memory this host has \
             available; use fewer or smaller guests, or pass --overcommit to start anyway \
             (page sharing may make them fit)",
            wanted / MIB,
            available / MIB
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_boots_a_kernel_a_snapshot_or_its_disk_image() {
        let err = |c: &GuestConfig| c.validate(Source::Api).unwrap_err().to_string();
        let mut c = GuestConfig::new(PathBuf::new());
        assert!(err(&c).contains("or a disk image that boots Linux"), "{}", err(&c));
        c.disk = Some("disk.img".into());
        assert!(c.validate(Source::Api).is_ok(), "a disk alone boots its own entry");
        c.initrd = Some("initrd".into());
        assert!(err(&c).contains("initrd goes with kernel"), "{}", err(&c));
        c.kernel = "vmlinux".into();
        assert!(c.validate(Source::Api).is_ok());
    }

    #[test]
    fn knobs_name_themselves_by_source() {
        let e = SCAN_PAGES.check(0, Source::Cli).unwrap_err();
        assert!(e.message.contains("--scan-pages must be between 1 and"), "{e}");
        let e = SCAN_PAGES.check(0, Source::Api).unwrap_err();
        assert!(e.message.starts_with("scan_pages must be between"), "{e}");
        assert_eq!(VCPUS.check(32, Source::Api).unwrap(), 32);
    }

    #[test]
    fn an_update_is_checked_whole_before_it_applies() {
        let current = DedupSettings::default();
        for (body, words) in [
            (r#"{"scan_target_secs": 1e300}"#, "scan_target_secs must be between"),
            (r#"{"scan_target_secs": 1e19}"#, "scan_target_secs must be between"),
            (r#"{"scan_pages": 0}"#, "scan_pages must be between"),
            (r#"{"scan_cpu_cap_pct": 0}"#, "scan_cpu_cap_pct"),
            (r#"{"scan_nice": 40}"#, "scan_nice"),
        ] {
            let update: DedupUpdate = serde_json::from_str(body).unwrap();
            let e = update.apply_to(&current).unwrap_err();
            assert!(e.message.contains(words), "{body}: {e}");
        }
        let update: DedupUpdate = serde_json::from_str(r#"{"scan_pages": 100, "scan_target_secs": 2.5}"#).unwrap();
        let s = update.apply_to(&current).unwrap();
        assert_eq!((s.scan_pages, s.scan_target_secs), (100, Some(2.5)));
        let off: DedupUpdate = serde_json::from_str(r#"{"scan_target_secs": 0}"#).unwrap();
        assert_eq!(off.apply_to(&s).unwrap().scan_target_secs, None);
    }

    /// The API's description states each knob's range as the knob has it.
    #[test]
    fn the_api_description_states_the_knobs_ranges() {
        let spec: serde_json::Value = serde_json::from_str(&crate::api::routes::openapi_json()).unwrap();
        let fields = &spec["components"]["schemas"]["DedupUpdate"]["properties"];
        let check = |field: &str, min: f64, max: f64| {
            let f = &fields[field];
            assert_eq!((f["minimum"].as_f64(), f["maximum"].as_f64()), (Some(min), Some(max)), "{field}: {f}");
        };
        for k in [SCAN_PAGES, SCAN_SLEEP_MS, MAX_PAGE_SHARING, MERGE_BATCH] {
            check(k.field, k.min as f64, k.max as f64);
        }
        check(SCAN_TARGET_SECS.field, 0.0, SCAN_TARGET_SECS.max);
        check(SCAN_CPU_CAP_PCT.field, SCAN_CPU_CAP_PCT.min, SCAN_CPU_CAP_PCT.max);
        check(SCAN_NICE.field, SCAN_NICE.min as f64, SCAN_NICE.max as f64);
        let guest = &spec["components"]["schemas"]["GuestConfig"]["properties"];
        assert_eq!(guest["memory_mib"]["maximum"].as_u64(), Some(MEMORY_MIB.max));
        assert_eq!(guest["vcpus"]["maximum"].as_u64(), Some(VCPUS.max));
    }

    /// 12.0 is an integer to JSON Schema, so to the API; 12.5 is not.
    #[test]
    fn integral_floats_are_integers() {
        let u: DedupUpdate = serde_json::from_str(r#"{"scan_nice": -12.0, "scan_pages": 100.0}"#).unwrap();
        assert_eq!((u.scan_nice, u.scan_pages), (Some(-12), Some(100)));
        assert!(serde_json::from_str::<DedupUpdate>(r#"{"scan_pages": 1.5}"#).is_err());
        assert!(serde_json::from_str::<DedupUpdate>(r#"{"scan_pages": -1}"#).is_err());
        let g: GuestConfig =
            serde_json::from_str(r#"{"kernel": "k", "memory_mib": 64.0, "merge_group": 3.0}"#).unwrap();
        assert_eq!((g.memory_mib, g.merge_group), (64, Some(3)));
    }

    #[test]
    fn null_is_not_a_value() {
        assert!(serde_json::from_str::<DedupUpdate>(r#"{"scan_pages": null}"#).is_err());
        assert!(serde_json::from_str::<GuestConfig>(r#"{"kernel": "k", "initrd": null}"#).is_err());
        let g: GuestConfig = serde_json::from_str(r#"{"kernel": "k"}"#).unwrap();
        assert_eq!(g, GuestConfig::new("k".into()));
    }

    #[test]
    fn guests_of_a_run_get_their_groups_and_opt_outs() {
        let mut run = RunConfig {
            guest: GuestConfig::new("k".into()),
            guests: 3,
            opt_out: vec![1],
            supervisor: SupervisorConfig::default(),
            timeout: None,
            stats_file: None,
            api_socket: None,
        };
        run.supervisor.sharing.groups = MergeGroups::List(vec![4, 4, 5]);
        run.validate().unwrap();
        assert_eq!(run.guest(2).merge_group, Some(5));
        assert!(run.guest(1).dedup_opt_out && !run.guest(0).dedup_opt_out);
        run.guests = 2;
        assert!(run.validate().unwrap_err().message.contains("names 3 groups for 2 guests"));
        assert_eq!(MergeGroups::PerGuest.default_for(7), 7);
    }

    #[test]
    fn memory_check_refuses_unless_overcommitting() {
        let err = check_memory_fits(8, 4096, 16 << 30, false).unwrap_err();
        assert!(err.message.contains("8 guests x 4096 MiB = 32768 MiB") && err.message.contains("--overcommit"));
        assert!(check_memory_fits(8, 4096, 16 << 30, true).is_ok());
        assert!(check_memory_fits(4, 1024, 16 << 30, false).is_ok());
    }
}
