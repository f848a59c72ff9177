//! `vmm bench`: the same guests under each page-sharing mode in turn, one
//! `vmm run` child process per mode, measured from outside every 0.5 s.
//!
//! Modes run in a fixed order: `off` (no sharing), `inprocess` (our
//! scanner), `cloned` (our scanner, the guests restored from a snapshot of
//! one booted guest instead of booted: template.rs), `ksm-matched` (kernel KSM at about the CPU rate our scanner
//! used while converging, held there by a feedback loop on ksmd's CPU
//! time) and `ksm-default` (KSM at its own defaults). docs/benchmarks.md
//! explains the method and the guest profile.
//!
//! With `--host-memory`, each run's memory cgroup is limited to that much:
//! guest RAM may then exceed what the run may use, and the table says which
//! modes' guests all survived. Our modes run with the memory governor
//! (pressure.rs); `off` and the KSM modes without it, as the VMMs people
//! use today run: at the wall, the kernel's OOM killer decides.

mod ksm;
mod meter;
pub mod net;
mod plot;
pub mod report;
mod template;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::memory::{host_available_memory, MIB};
use crate::stats_file::RunStats;
use ksm::Ksm;
use meter::Meter;
use report::{BenchReport, ModeResult, Sample};

/// Page-sharing setups the bench compares, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Off,
    Inprocess,
    Cloned,
    KsmMatched,
    KsmDefault,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Inprocess => "inprocess",
            Mode::Cloned => "cloned",
            Mode::KsmMatched => "ksm-matched",
            Mode::KsmDefault => "ksm-default",
        }
    }

    fn dedup_flag(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Inprocess | Mode::Cloned => "inprocess",
            Mode::KsmMatched | Mode::KsmDefault => "ksm",
        }
    }

    fn is_ksm(self) -> bool {
        matches!(self, Mode::KsmMatched | Mode::KsmDefault)
    }

    /// Ours: page sharing by this VMM, and its memory governor.
    pub fn is_ours(self) -> bool {
        matches!(self, Mode::Inprocess | Mode::Cloned)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BenchConfig {
    pub guests: usize,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// What the guests run, for the report (`memtest`, `tiny-linux`, a path).
    pub image: String,
    pub kernel: PathBuf,
    /// Files the initrd is made of, concatenated page by page in order.
    pub initrd_parts: Vec<PathBuf>,
    pub cmdline: String,
    /// Sorted, no repeats.
    pub modes: Vec<Mode>,
    /// How long each mode runs once its child has started.
    pub duration: Duration,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// Consoles, stats files and child logs go here, one directory per mode.
    /// None: a temporary directory, removed after a run in which every
    /// guest passed, kept (and named on stderr) otherwise.
    pub work_dir: Option<PathBuf>,
    /// Passed to the inprocess run.
    pub raise_max_map_count: Option<usize>,
    /// The scanner's settings, as `vmm run` flags, for our modes.
    pub scan_flags: Vec<String>,
    /// Each run's memory cgroup is limited to this (guests may overcommit).
    pub host_memory_mib: Option<u64>,
    /// Guests run unjailed (`--no-jail`).
    pub no_jail: bool,
    /// Guests have balloons (`--balloon`), which the governor may use.
    pub balloon: bool,
    /// `vmm run --pool` for every run (None: its default).
    pub pool: Option<u64>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// The stretch at the end of a run that counts as its steady state.
const STEADY: Duration = Duration::from_secs(5);
/// Where the KSM feedback loop starts.
const KSM_FIRST_PAGES_TO_SCAN: u64 = 1000;

/// Runs every mode and writes the report where asked.
pub fn run(config: &BenchConfig) -> Result<BenchReport, String> {
    check_fits(config)?;
    crate::signals::install_stop_handlers()?;
    let work_dir = match &config.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            dir.clone()
        }
        None => crate::supervisor::manager::fresh_temp_dir("vmm-bench")?,
    };
    let outcome = run_modes(config, &work_dir);
    match &outcome {
        Ok(report) if report.failures() == 0 && config.work_dir.is_none() => {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        Ok(report) if report.failures() == 0 => {}
        _ => eprintln!("vmm bench: the runs' consoles and logs are in {}", work_dir.display()),
    }
    outcome
}

fn run_modes(config: &BenchConfig, work_dir: &Path) -> Result<BenchReport, String> {
    // Taken once for every KSM mode; dropping it unmerges and restores.
    let ksm = match config.modes.iter().any(|m| m.is_ksm()) {
        true => Some(Ksm::take().map_err(|e| format!("kernel KSM is needed for the ksm modes: {e}"))?),
        false => None,
    };
    let initrd = build_initrd(config, work_dir)?;
    let template = match config.modes.contains(&Mode::Cloned) {
        true => Some(template::make(config, initrd.as_deref(), &work_dir.join("template"))?),
        false => None,
    };
    let mut results: Vec<ModeResult> = Vec::new();
    let mut memory_measure = String::new();
    for &mode in &config.modes {
        let target_cpu = match mode {
            Mode::KsmMatched => Some(
                results
                    .iter()
                    .find(|r| r.mode == Mode::Inprocess)
                    .and_then(ModeResult::converging_cpu_rate)
                    .ok_or("ksm-matched needs an inprocess run that saved memory first")?,
            ),
            _ => None,
        };
        let meter = Meter::new(&format!("vmm-bench-{}-{}", std::process::id(), mode.name()));
        if let Some(mib) = config.host_memory_mib {
            meter.limit(mib * MIB)?;
        }
        memory_measure = meter.describe();
        let guests = match (mode, &template) {
            (Mode::Cloned, Some(t)) => Guests::Restored(&t.dir),
            _ => Guests::Booted(initrd.as_deref()),
        };
        let result = run_mode(config, work_dir, guests, mode, &meter, ksm.as_ref(), target_cpu)?;
        if let Some(ksm) = &ksm {
            ksm.unmerge().map_err(|e| e.to_string())?;
        }
        results.push(result);
    }
    drop(ksm);
    let report = BenchReport::new(config, memory_measure, template, results);
    if let Some(path) = &config.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &config.plot {
        std::fs::write(path, plot::svg(&report)).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(report)
}

/// Every mode fills all its guests' RAM before sharing catches up (`off`
/// never does), so the host must hold all of it; with `--host-memory`, it
/// must hold that limit.
fn check_fits(config: &BenchConfig) -> Result<(), String> {
    let available = host_available_memory().map_err(|e| format!("cannot read host memory: {e}"))?;
    if let Some(mib) = config.host_memory_mib {
        if mib * MIB > available {
            return Err(format!(
                "--host-memory {mib} is more than the {} MiB this host has available",
                available / MIB
            ));
        }
        return Ok(());
    }
    let wanted = config.guests as u64 * config.memory_mib * MIB;
    if wanted > available {
        return Err(format!(
            "{} guests x {} MiB = {} MiB is more than the {} MiB this host has available; every mode (and \
             `off` throughout) needs all of it, so use fewer guests or less --memory",
            config.guests,
            config.memory_mib,
            wanted / MIB,
            available / MIB
        ));
    }
    Ok(())
}

/// The guests' initrd: the one file, or the parts joined, each starting on
/// a page boundary (as files lie in a guest's page cache).
fn build_initrd(config: &BenchConfig, work_dir: &Path) -> Result<Option<PathBuf>, String> {
    match config.initrd_parts.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        parts => {
            let mut image = Vec::new();
            for part in parts {
                image.extend(std::fs::read(part).map_err(|e| format!("cannot read {}: {e}", part.display()))?);
                image.resize(image.len().next_multiple_of(4096), 0);
            }
            let path = work_dir.join("initrd.img");
            std::fs::write(&path, image).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(Some(path))
        }
    }
}

/// How a run's guests start.
#[derive(Clone, Copy)]
enum Guests<'a> {
    /// Booted from the bench's kernel, with this initrd.
    Booted(Option<&'a Path>),
    /// Clones of this snapshot.
    Restored(&'a Path),
}

fn run_mode(
    config: &BenchConfig,
    work_dir: &Path,
    guests: Guests,
    mode: Mode,
    meter: &Meter,
    ksm: Option<&Ksm>,
    target_cpu: Option<f64>,
) -> Result<ModeResult, String> {
    let dir = work_dir.join(mode.name());
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let stats_file = dir.join("stats.json");
    let _ = std::fs::remove_file(&stats_file);
    let mut ksm_pages = None;
    if let Some(ksm) = ksm.filter(|_| mode.is_ksm()) {
        let pages = if mode == Mode::KsmDefault { ksm::DEFAULT_PAGES_TO_SCAN } else { KSM_FIRST_PAGES_TO_SCAN };
        ksm.start(pages, ksm::DEFAULT_SLEEP_MS).map_err(|e| e.to_string())?;
        ksm_pages = Some(pages);
    }
    let ksmd_at_start = ksm::ksmd_cpu().unwrap_or_default();
    let mut command = run_command(config, config.guests, guests, &dir)?;
    command.args(["--dedup", mode.dedup_flag()]).arg("--stats-file").arg(&stats_file);
    if let (true, Some(n)) = (mode.is_ours(), config.raise_max_map_count) {
        command.args(["--raise-max-map-count", &n.to_string()]);
    }
    if mode.is_ours() {
        command.args(&config.scan_flags);
    }
    if config.host_memory_mib.is_some() {
        command.arg("--overcommit");
        if !mode.is_ours() {
            command.args(["--memory-reserve", "0"]);
        }
    }
    meter.enroll(&mut command);
    let stall_at_start = crate::memory::host_memory_stall();
    let mut child = command.spawn().map_err(|e| format!("cannot start vmm run for {}: {e}", mode.name()))?;
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut progress = Progress::new(mode, config.duration);
    let mut last_snapshot = RunStats::default();
    let mut pss_at_end = None;
    let exited_early = loop {
        // Sample on a fixed grid, whatever the sampling itself costs.
        let next = SAMPLE_EVERY * (samples.len() as u32 + 1);
        std::thread::sleep(next.saturating_sub(started.elapsed()));
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if crate::signals::stop_requested() {
            stop_child(&mut child);
            return Err("interrupted; KSM settings restored".into());
        }
        if let Ok(snap) = RunStats::read_from(&stats_file) {
            last_snapshot = snap;
        }
        let cpu = match mode {
            _ if mode.is_ours() => last_snapshot.sharing.as_ref().map_or(0.0, |s| s.scanner_cpu_s),
            Mode::KsmMatched | Mode::KsmDefault => {
                ksm::ksmd_cpu().unwrap_or_default().saturating_sub(ksmd_at_start).as_secs_f64()
            }
            _ => 0.0,
        };
        let saved_pages = match (mode, ksm) {
            _ if mode.is_ours() => last_snapshot.sharing.as_ref().map_or(0, |s| s.pages_saved),
            (Mode::KsmMatched | Mode::KsmDefault, Some(k)) => k.pages_saved(),
            _ => 0,
        };
        let sample = Sample {
            t: started.elapsed().as_secs_f64(),
            memory_mib: meter.bytes(child.id()).unwrap_or(0) as f64 / MIB as f64,
            saved_mib: saved_pages as f64 * 4096.0 / MIB as f64,
            cpu_s: cpu,
            verified: last_snapshot.guests_verified,
        };
        progress.show(&sample);
        if let (Some(target), Some(ksm), Some(pages)) = (target_cpu, ksm, ksm_pages.as_mut()) {
            steer_ksm(ksm, pages, target, &samples, &sample);
        }
        samples.push(sample);
        if started.elapsed() >= config.duration {
            pss_at_end = crate::proc::pss_tree_bytes(child.id()).map(|b| b as f64 / MIB as f64);
            break None;
        }
    };
    progress.finish();
    let status = match exited_early {
        Some(status) => status,
        None => stop_child(&mut child),
    };
    if let Ok(snap) = RunStats::read_from(&stats_file) {
        last_snapshot = snap;
    }
    let log = dir.join("vmm.log");
    if status.code() == Some(2) || (exited_early.is_some() && samples.len() < 2) {
        return Err(format!("{} run failed ({status}); its log {}:\n{}", mode.name(), log.display(), tail(&log)));
    }
    let mut result =
        ModeResult::new(mode, config, samples, pss_at_end, &last_snapshot, ksm_pages, exited_early.is_some());
    result.oom_kills = meter.oom_kills();
    result.memory_stall_s = stall_at_start
        .zip(crate::memory::host_memory_stall())
        .map(|(before, after)| after.some_us.saturating_sub(before.some_us) as f64 / 1e6);
    Ok(result)
}

/// `vmm run` for `guests` of the bench's guests, its consoles and log in
/// `dir`.
fn run_command(config: &BenchConfig, guests: usize, how: Guests, dir: &Path) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the vmm binary: {e}"))?;
    let log = std::fs::File::create(dir.join("vmm.log")).map_err(|e| format!("cannot create a log in {dir:?}: {e}"))?;
    let mut command = Command::new(exe);
    command.arg("run").args(["--guests", &guests.to_string()]);
    if config.no_jail {
        command.arg("--no-jail");
    }
    if config.balloon {
        command.arg("--balloon");
    }
    if let Some(n) = config.pool {
        command.args(["--pool", &n.to_string()]);
    }
    match how {
        // A snapshot brings its kernel, command line, memory and vCPUs.
        Guests::Restored(snapshot) => {
            command.arg("--restore").arg(snapshot);
        }
        Guests::Booted(initrd) => {
            command
                .args(["--memory", &config.memory_mib.to_string()])
                .args(["--vcpus", &config.vcpus.to_string()])
                .arg("--kernel")
                .arg(&config.kernel)
                .args(["--cmdline", &config.cmdline]);
            if let Some(initrd) = initrd {
                command.arg("--initrd").arg(initrd);
            }
        }
    }
    command
        .arg("--console-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    Ok(command)
}

/// SIGTERM (the child stops its guests and exits), then SIGKILL if it
/// takes more than 30 s.
fn stop_child(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid, which we have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().expect("wait for a killed child");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Holds ksmd near `target` CPU-seconds per second: each second, scales
/// pages_to_scan by how far off the last second was (at most 2x a step).
fn steer_ksm(ksm: &Ksm, pages: &mut u64, target: f64, samples: &[Sample], now: &Sample) {
    let Some(before) = samples.iter().rev().find(|s| now.t - s.t >= 0.99) else {
        return;
    };
    if !samples.len().is_multiple_of(2) {
        return;
    }
    let used = (now.cpu_s - before.cpu_s) / (now.t - before.t);
    let factor = (target / used.max(1e-3)).clamp(0.5, 2.0);
    let next = ((*pages as f64 * factor) as u64).clamp(10, 200_000);
    if next != *pages && ksm.set_pages_to_scan(next).is_ok() {
        *pages = next;
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// One line, redrawn in place on a terminal; a line per mode otherwise.
struct Progress {
    mode: Mode,
    duration: Duration,
    tty: bool,
}

impl Progress {
    fn new(mode: Mode, duration: Duration) -> Progress {
        let tty = std::io::stderr().is_terminal();
        if !tty {
            eprintln!("vmm bench: {} for {} s", mode.name(), duration.as_secs());
        }
        Progress { mode, duration, tty }
    }

    fn show(&mut self, s: &Sample) {
        if !self.tty {
            return;
        }
        const WIDTH: usize = 30;
        let done = ((s.t / self.duration.as_secs_f64()) * WIDTH as f64).min(WIDTH as f64) as usize;
        eprint!(
            "\r{:<12} [{}{}] {:>4.0}/{} s  host memory {:>7.0} MiB  saved {:>7.0} MiB  CPU {:>5.1} s ",
            self.mode.name(),
            "#".repeat(done),
            "-".repeat(WIDTH - done),
            s.t,
            self.duration.as_secs(),
            s.memory_mib,
            s.saved_mib,
            s.cpu_s
        );
        let _ = std::io::stderr().flush();
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
