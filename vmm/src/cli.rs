//! The command line: parsed by clap, checked, and turned into configs.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::boot::MAX_VCPUS;
use crate::guest::GuestConfig;
use crate::memory::{MemoryBackend, MIN_MEMORY_MIB};
use crate::runner::RunConfig;

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
    /// How guest RAM is backed: a shared memfd (for page sharing) or anonymous memory (for kernel KSM).
    #[arg(long, value_enum, default_value_t = MemoryBackend::Memfd)]
    pub memory_backend: MemoryBackend,
    /// Directory for per-guest console logs (default with several guests: a fresh temp dir).
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
    /// Start even if the guests' RAM exceeds the host's available memory.
    #[arg(long)]
    pub overcommit: bool,
    /// Stop all guests after this many seconds (they then count as failed).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

fn parse_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse()
        .map_err(|_| format!("unknown log level '{text}' (error, warn, info, debug, trace)"))
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = String;

    fn try_from(args: RunArgs) -> Result<Self, String> {
        if args.guests == 0 {
            return Err("--guests must be at least 1".into());
        }
        if args.memory < MIN_MEMORY_MIB {
            return Err(format!(
                "--memory must be at least {MIN_MEMORY_MIB} MiB (got {})",
                args.memory
            ));
        }
        if args.memory > 1 << 20 {
            return Err(format!(
                "--memory {} MiB is more than the 1 TiB vmm supports per guest",
                args.memory
            ));
        }
        if args.vcpus == 0 || args.vcpus > MAX_VCPUS {
            return Err(format!(
                "--vcpus must be between 1 and {MAX_VCPUS} (got {})",
                args.vcpus
            ));
        }
        if args.timeout == Some(0) {
            return Err("--timeout must be at least 1 second".into());
        }
        Ok(RunConfig {
            guest: GuestConfig {
                kernel: args.kernel,
                initrd: args.initrd,
                cmdline: args.cmdline,
                memory_mib: args.memory,
                vcpus: args.vcpus,
                backend: args.memory_backend,
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
        let cli =
            Cli::try_parse_from(["vmm", "run"].iter().chain(args)).map_err(|e| e.to_string())?;
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
            (
                &["--kernel", "k", "--memory-backend", "disk"],
                "--memory-backend",
            ),
            (&["--memory", "64"], "--kernel"),
        ] {
            let err = run_config(args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }
}
