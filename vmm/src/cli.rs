//! The command line: parsed by clap, checked, and turned into configs.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::boot::MAX_VCPUS;
use crate::guest::GuestConfig;
use crate::memory::{MemoryBackend, MIN_MEMORY_MIB};
use crate::runner::RunConfig;
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
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// How many guests of this configuration to run.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub guests: usize,
    /// Kernel to boot: a vmlinux ELF, a bzImage, or one of our test guests.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
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
    /// Most pages merged under one freeze of a guest: larger batches stop
    /// guests less often, smaller ones for less time.
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

impl TryFrom<RunArgs> for RunConfig {
    type Error = String;

    fn try_from(args: RunArgs) -> Result<Self, String> {
        if args.guests == 0 {
            return Err("--guests must be at least 1".into());
        }
        if args.memory < MIN_MEMORY_MIB {
            return Err(format!("--memory must be at least {MIN_MEMORY_MIB} MiB (got {})", args.memory));
        }
        if args.memory > 1 << 20 {
            return Err(format!("--memory {} MiB is more than the 1 TiB vmm supports per guest", args.memory));
        }
        if args.vcpus == 0 || args.vcpus > MAX_VCPUS {
            return Err(format!("--vcpus must be between 1 and {MAX_VCPUS} (got {})", args.vcpus));
        }
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(["vmm", "run"].iter().chain(args)).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command;
        RunConfig::try_from(run)
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
