//! `vmm run`: many guests of one configuration in one process.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::devices::console::Console;
use crate::disk::{BaseImage, Disk};
use crate::guest::{Guest, GuestConfig};
use crate::host::HostKind;
use crate::hypervisor::Hypervisor;
use crate::memory::{host_available_memory, MIB};
use crate::outcome::GuestEnd;
use crate::sharing::{DedupMode, Sharing, SharingConfig};
use crate::snapshot::{self, RunSnapshot, SharingSnapshot};

#[derive(Clone, Debug, PartialEq)]
pub struct RunConfig {
    pub guest: GuestConfig,
    pub guests: usize,
    /// Where per-guest console logs go; `None`: the terminal for one guest,
    /// a fresh temporary directory for several.
    pub console_dir: Option<PathBuf>,
    /// Start even if the guests' RAM exceeds what the host has available.
    pub overcommit: bool,
    /// Stop every guest after this long.
    pub timeout: Option<Duration>,
    pub sharing: SharingConfig,
    /// Rewrite a JSON [`RunSnapshot`] here every [`snapshot::INTERVAL`].
    pub stats_file: Option<PathBuf>,
    /// The disk image every guest gets, if any.
    pub disk: Option<DiskConfig>,
    /// Serve the API here (the guests are then managed through it).
    pub api_socket: Option<PathBuf>,
}

/// One base image for all guests, read-only, and how guests write to it.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskConfig {
    pub image: PathBuf,
    /// A plain read-only disk: no overlays.
    pub read_only: bool,
    /// Keep the per-guest overlays here (default: a temporary directory,
    /// removed at exit).
    pub overlay_dir: Option<PathBuf>,
}

/// How every guest ended.
pub struct RunReport {
    pub ends: Vec<GuestEnd>,
}

impl RunReport {
    pub fn all_clean(&self) -> bool {
        self.ends.iter().all(GuestEnd::is_clean)
    }
}

/// Refuses to start guests whose RAM the host cannot hold, unless told to.
pub fn check_memory_fits(guests: usize, memory_mib: u64, available: u64, overcommit: bool) -> Result<(), String> {
    let wanted = guests as u64 * memory_mib * MIB;
    if wanted > available && !overcommit {
        return Err(format!(
            "{guests} guests x {memory_mib} MiB = {} MiB is more than the {} MiB of memory this host has \
             available; use fewer or smaller guests, or pass --overcommit to start anyway \
             (page sharing may make them fit)",
            wanted / MIB,
            available / MIB
        ));
    }
    Ok(())
}

/// Sets up and runs every guest until all have ended.
pub fn run(config: &RunConfig) -> Result<RunReport, String> {
    if let Some(socket) = &config.api_socket {
        return crate::api::run_with_api(config, socket);
    }
    let hv = Hypervisor::open()?;
    if hv.host == HostKind::Pvm {
        eprintln!(
            "vmm: KVM-on-PVM host (kvm_pvm): guest kernel code is emulated (slow); \
             Linux guests without --cmdline get PVM-safe parameters"
        );
    }
    let available = host_available_memory().map_err(|e| format!("cannot read host memory: {e}"))?;
    check_memory_fits(config.guests, config.guest.memory_mib, available, config.overcommit)?;

    // Bad images are refused before any guest exists.
    let disks = Disks::open(config.disk.as_ref())?;
    let sharing = start_sharing(&config.sharing)?;
    let consoles = consoles(config)?;
    let mut guests = Vec::with_capacity(config.guests);
    for (id, console) in consoles.into_iter().enumerate() {
        let in_guest = |e: String| {
            if config.guests == 1 {
                e
            } else {
                format!("guest {id}: {e}")
            }
        };
        let created = disks
            .for_guest(id)
            .and_then(|disk| Guest::create(&hv, id, &config.guest, console, disk))
            .and_then(|guest| share_guest(&config.sharing, sharing.as_ref(), &guest).map(|()| guest));
        match created {
            Ok(guest) => guests.push(guest),
            Err(e) => {
                // Release the guests made so far before their memory goes.
                if let Some(s) = &sharing {
                    guests.iter().for_each(|g| s.remove_guest(g.id));
                }
                return Err(in_guest(e));
            }
        }
    }

    crate::vstate::control::install_kick_handler();
    crate::signals::install_stop_handlers()?;
    let (finished_tx, finished_rx) = mpsc::channel();
    let started = Instant::now();
    for i in 0..guests.len() {
        if let Err(e) = guests[i].start(finished_tx.clone()) {
            for guest in guests {
                guest.stop(GuestEnd::Stopped);
                if let Some(s) = &sharing {
                    s.remove_guest(guest.id);
                }
                guest.join();
            }
            return Err(format!("cannot start guest {i}: {e}"));
        }
    }
    drop(finished_tx);

    let mut slots: Vec<Option<Guest>> = guests.into_iter().map(Some).collect();
    let mut ends: Vec<Option<GuestEnd>> = vec![None; slots.len()];
    let mut remaining = slots.len();
    let mut stop_sent = false;
    let mut last_snapshot = Instant::now();
    while remaining > 0 {
        if let Some(path) = &config.stats_file {
            if last_snapshot.elapsed() >= snapshot::INTERVAL {
                last_snapshot = Instant::now();
                write_snapshot(path, &take_snapshot(started, &slots, &ends, sharing.as_ref()));
            }
        }
        match finished_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(id) => {
                let guest = slots[id].take().expect("a guest finished twice");
                // Its vCPUs are gone; release its pages before its RAM is unmapped.
                if let Some(s) = &sharing {
                    s.remove_guest(id);
                }
                let end = guest.join();
                report_end(id, config.guests, &end);
                ends[id] = Some(end);
                remaining -= 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stop_sent {
            continue;
        }
        let reason = if crate::signals::stop_requested() {
            Some(GuestEnd::Stopped)
        } else {
            config.timeout.filter(|t| started.elapsed() >= *t).map(GuestEnd::TimedOut)
        };
        if let Some(reason) = reason {
            eprintln!("vmm: stopping {remaining} guest(s): {reason}");
            slots.iter().flatten().for_each(|g| g.stop(reason.clone()));
            stop_sent = true;
        }
    }
    let mut last = RunSnapshot { finished: true, ..take_snapshot(started, &slots, &ends, None) };
    if let Some(sharing) = sharing {
        let (uptime, cpu) = (sharing.uptime(), sharing.scanner_cpu());
        let report = sharing.stop();
        report_sharing(&report.stats, uptime, cpu);
        report_sharing_per_guest(&report.guests);
        // What sharing had reached while every guest was still there.
        last.sharing = Some(SharingSnapshot::new(&report.stats, cpu));
    }
    if let Some(path) = &config.stats_file {
        write_snapshot(path, &last);
    }
    Ok(RunReport { ends: ends.into_iter().map(|e| e.unwrap_or(GuestEnd::Stopped)).collect() })
}

/// The run as it stands: `slots` holds the guests still running, `ends`
/// how the others ended.
fn take_snapshot(
    started: Instant,
    slots: &[Option<Guest>],
    ends: &[Option<GuestEnd>],
    sharing: Option<&Sharing>,
) -> RunSnapshot {
    let running = slots.iter().flatten();
    let ended = ends.iter().flatten();
    let ended_corrupted: u64 = ended
        .clone()
        .map(|e| match e {
            GuestEnd::MemtestFailed { mismatches, .. } => *mismatches,
            _ => 0,
        })
        .sum();
    RunSnapshot {
        elapsed_s: started.elapsed().as_secs_f64(),
        guests: slots.len(),
        guests_running: running.clone().count(),
        guests_failed: ended.clone().filter(|e| !e.is_clean()).count()
            + running.clone().filter(|g| g.reported_mismatches() > 0).count(),
        corrupted_pages: ended_corrupted + running.map(Guest::reported_mismatches).sum::<u64>(),
        sharing: sharing.map(|s| SharingSnapshot::new(&s.stats(), s.scanner_cpu())),
        finished: false,
    }
}

fn write_snapshot(path: &Path, snapshot: &RunSnapshot) {
    if let Err(e) = snapshot.write_to(path) {
        log::warn!("cannot write the stats file {}: {e}", path.display());
    }
}

/// The shared base image and where each guest's overlay goes.
struct Disks {
    base: Option<Arc<BaseImage>>,
    read_only: bool,
    overlay_dir: PathBuf,
    /// The overlay directory is ours to remove at the end.
    temporary: bool,
}

impl Disks {
    fn open(config: Option<&DiskConfig>) -> Result<Disks, String> {
        let Some(config) = config else {
            return Ok(Disks { base: None, read_only: true, overlay_dir: PathBuf::new(), temporary: false });
        };
        let base = BaseImage::open(&config.image).map_err(|e| e.to_string())?;
        let (overlay_dir, temporary) = match (&config.overlay_dir, config.read_only) {
            (_, true) => (PathBuf::new(), false),
            (Some(dir), false) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create overlay directory {}: {e}", dir.display()))?;
                (dir.clone(), false)
            }
            (None, false) => (fresh_temp_dir("vmm-overlays")?, true),
        };
        Ok(Disks { base: Some(base), read_only: config.read_only, overlay_dir, temporary })
    }

    fn for_guest(&self, id: usize) -> Result<Option<Disk>, String> {
        let Some(base) = &self.base else { return Ok(None) };
        if self.read_only {
            return Ok(Some(Disk::read_only(base.clone())));
        }
        let path = self.overlay_dir.join(format!("guest-{id}.overlay"));
        Disk::with_overlay(base.clone(), &path).map(Some).map_err(|e| e.to_string())
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.overlay_dir);
        }
    }
}

pub(crate) fn start_sharing(config: &SharingConfig) -> Result<Option<Sharing>, String> {
    if config.mode != DedupMode::Inprocess {
        if config.mode == DedupMode::Ksm && ksm_is_off() {
            eprintln!("vmm: guest RAM is MADV_MERGEABLE, but kernel KSM is off (/sys/kernel/mm/ksm/run is 0)");
        }
        return Ok(None);
    }
    if let Some(n) = config.raise_max_map_count {
        if dedup::os::max_map_count().unwrap_or(0) < n {
            dedup::os::set_max_map_count(n)
                .map_err(|e| format!("cannot raise vm.max_map_count to {n}: {e} (needs root)"))?;
        }
    }
    Sharing::start(config.engine.clone(), config.pace.clone())
        .map(Some)
        .map_err(|e| format!("cannot start page sharing: {e}"))
}

fn share_guest(config: &SharingConfig, sharing: Option<&Sharing>, guest: &Guest) -> Result<(), String> {
    match (config.mode, sharing) {
        (DedupMode::Ksm, _) => guest.ram().mark_mergeable().map_err(|e| format!("MADV_MERGEABLE failed: {e}")),
        (DedupMode::Inprocess, Some(s)) if !config.opt_out[guest.id] => s.add_guest(guest, config.groups[guest.id]),
        _ => Ok(()),
    }
}

/// One line per merge group, then one per guest when there are several.
fn report_sharing_per_guest(guests: &std::collections::BTreeMap<usize, dedup::GuestStats>) {
    let mut groups: std::collections::BTreeMap<u32, (usize, u64, u64, u64)> = Default::default();
    for g in guests.values() {
        let e = groups.entry(g.group).or_default();
        *e = (e.0 + 1, e.1 + g.merged_pages, e.2 + g.zero_pages, e.3 + g.cow_breaks);
    }
    if groups.len() > 1 {
        for (group, (n, merged, zero, cow)) in &groups {
            eprintln!("vmm: merge group {group} ({n} guests): {merged} pages on shared frames, {zero} zero pages, {cow} copy-on-write breaks");
        }
    }
    if guests.len() > 1 {
        for (id, g) in guests {
            eprintln!(
                "vmm: guest {id} sharing: {} pages on shared frames, {} zero pages, {} copy-on-write breaks (group {})",
                g.merged_pages, g.zero_pages, g.cow_breaks, g.group
            );
        }
    }
}

fn ksm_is_off() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/ksm/run").is_ok_and(|s| s.trim() == "0")
}

fn report_sharing(s: &dedup::Stats, uptime: Duration, cpu: Duration) {
    let mib = |pages: u64| pages as f64 * 4096.0 / (1 << 20) as f64;
    eprintln!(
        "vmm: page sharing: {:.1} MiB saved ({} pages: {} sharing {} frames, {} zero), \
         {} full scans in {:.1} s using {:.2} CPU-s, {} pages unshared, {} volatile, {} copy-on-write breaks, \
         {} mappings{}; freezes: {} (p50 {} us, p99 {} us, max {} us; parking p50 {} us, p99 {} us)",
        mib(s.pages_saved()),
        s.pages_saved(),
        s.pages_sharing,
        s.pages_shared,
        s.zero_pages,
        s.full_scans,
        uptime.as_secs_f64(),
        cpu.as_secs_f64(),
        s.pages_unshared,
        s.pages_volatile,
        s.cow_breaks,
        s.mappings_used,
        if s.map_limit_reached { " (vm.max_map_count reached: raise it with --raise-max-map-count)" } else { "" },
        s.freeze.count,
        s.freeze.p50.as_micros(),
        s.freeze.p99.as_micros(),
        s.freeze.max.as_micros(),
        s.park_wait.p50.as_micros(),
        s.park_wait.p99.as_micros(),
    );
}

fn report_end(id: usize, total: usize, end: &GuestEnd) {
    if total > 1 {
        eprintln!("vmm: guest {id}: {end}");
    } else {
        eprintln!("vmm: {end}");
    }
}

/// One console per guest: the terminal for a single guest without a
/// console directory, else a log file per guest.
fn consoles(config: &RunConfig) -> Result<Vec<Console>, String> {
    if config.guests == 1 && config.console_dir.is_none() {
        return Ok(vec![Console::stdout()]);
    }
    let dir = match &config.console_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create console directory {}: {e}", dir.display()))?;
            dir.clone()
        }
        None => fresh_temp_dir("vmm-consoles")?,
    };
    eprintln!("vmm: guest consoles in {}", dir.display());
    (0..config.guests)
        .map(|id| {
            let path = console_path(&dir, id);
            Console::file(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))
        })
        .collect()
}

pub fn console_path(dir: &Path, id: usize) -> PathBuf {
    dir.join(format!("guest-{id}.log"))
}

/// A new directory in the temp dir, named `prefix` and a random suffix.
pub fn fresh_temp_dir(prefix: &str) -> Result<PathBuf, String> {
    let template = std::env::temp_dir().join(format!("{prefix}-XXXXXX"));
    let mut bytes = template.into_os_string().into_encoded_bytes();
    bytes.push(0);
    // SAFETY: `bytes` is a writable NUL-terminated template, as mkdtemp needs.
    let ptr = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if ptr.is_null() {
        return Err(format!("cannot create a {prefix} directory: {}", std::io::Error::last_os_error()));
    }
    bytes.pop();
    // SAFETY: mkdtemp only replaced the X's with ASCII characters.
    Ok(PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(bytes) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_check_refuses_unless_overcommitting() {
        let err = check_memory_fits(8, 4096, 16 << 30, false).unwrap_err();
        assert!(err.contains("8 guests x 4096 MiB = 32768 MiB") && err.contains("--overcommit"), "{err}");
        assert!(check_memory_fits(8, 4096, 16 << 30, true).is_ok());
        assert!(check_memory_fits(4, 1024, 16 << 30, false).is_ok());
    }

    #[test]
    fn temp_console_dirs_are_fresh() {
        let a = fresh_temp_dir("vmm-test").unwrap();
        let b = fresh_temp_dir("vmm-test").unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        std::fs::remove_dir(a).unwrap();
        std::fs::remove_dir(b).unwrap();
    }
}
