//! Page sharing for the guests of this process: the glue between the VMM
//! and the dedup engine, and the scanner thread that drives it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dedup::{Engine, GuestId, Stats};

use crate::guest::Guest;

/// Who merges guest pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DedupMode {
    /// Our own scanner, in this process (memfd-backed RAM).
    Inprocess,
    /// The kernel's KSM: anonymous RAM marked MADV_MERGEABLE; ksmd does the work.
    Ksm,
    /// No sharing.
    Off,
}

/// Everything about page sharing for one `vmm run`.
#[derive(Clone, Debug, PartialEq)]
pub struct SharingConfig {
    pub mode: DedupMode,
    pub engine: dedup::Config,
    pub pace: ScanPace,
    /// Merge group of each guest.
    pub groups: Vec<u32>,
    /// Guests whose pages are never merged.
    pub opt_out: Vec<bool>,
    pub raise_max_map_count: Option<usize>,
}

pub const DEFAULT_SCAN_NICE: i32 = -10;

/// How fast the scanner works.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanPace {
    /// Sleep between steps.
    pub sleep: Duration,
    /// Advisor: pace the scan to finish a full pass in this time...
    pub target_pass: Option<Duration>,
    /// ...while using at most this fraction of one CPU.
    pub cpu_cap: f64,
    /// Scheduling priority of the scanner thread (nice value). Below zero by
    /// default: guests whose vCPUs keep every core busy would otherwise
    /// starve it, and the memory it frees pays for its CPU; the pace and
    /// the CPU cap bound what it takes.
    pub nice: i32,
}

impl Default for ScanPace {
    fn default() -> Self {
        ScanPace { sleep: Duration::from_millis(10), target_pass: None, cpu_cap: 1.0, nice: DEFAULT_SCAN_NICE }
    }
}

impl ScanPace {
    /// The sleep after a step of `pages` that took `busy`, out of `total` pages.
    pub fn sleep_after(&self, busy: Duration, pages: usize, total: usize) -> Duration {
        let Some(target) = self.target_pass else {
            return self.sleep;
        };
        // Steps per pass at this step size, and the time each may take.
        let per_step = target.mul_f64(pages.max(1) as f64 / total.max(1) as f64);
        let for_target = per_step.saturating_sub(busy);
        // busy / (busy + sleep) <= cap
        let for_cap = busy.mul_f64((1.0 - self.cpu_cap.clamp(0.01, 1.0)) / self.cpu_cap.clamp(0.01, 1.0));
        for_target.max(for_cap)
    }
}

/// What a run reports about sharing when it ends.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The stats after the last scan step while every guest was still
    /// there: guests that end take their pages with them.
    pub stats: Stats,
    /// Per guest (by vmm guest id), at the same moment as `stats`.
    pub guests: std::collections::BTreeMap<usize, dedup::GuestStats>,
    /// Pages saved at the end of each full pass, by time since the start.
    pub timeline: Vec<(Duration, u64)>,
    /// Engine ids of the guests, to vmm guest ids.
    names: HashMap<GuestId, usize>,
    /// Set once the first guest is gone; `stats` no longer changes.
    settled: bool,
}

/// The running scanner and the engine it drives.
pub struct Sharing {
    engine: Arc<Mutex<Engine>>,
    report: Arc<Mutex<Report>>,
    /// Read by the scanner before every step: changes apply at once.
    pace: Arc<Mutex<ScanPace>>,
    /// While false the scanner only sleeps.
    enabled: Arc<AtomicBool>,
    ids: Mutex<HashMap<usize, GuestId>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
    cpu_at_start: Duration,
}

impl Sharing {
    pub fn start(config: dedup::Config, pace: ScanPace) -> std::io::Result<Sharing> {
        let engine = Arc::new(Mutex::new(Engine::new(config)?));
        let report = Arc::new(Mutex::new(Report::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let pace = Arc::new(Mutex::new(pace));
        let enabled = Arc::new(AtomicBool::new(true));
        let thread = {
            let (engine, report, stop) = (engine.clone(), report.clone(), stop.clone());
            let (pace, enabled) = (pace.clone(), enabled.clone());
            std::thread::Builder::new()
                .name("dedup-scanner".into())
                .spawn(move || scan_loop(&engine, &report, &stop, &pace, &enabled, started))?
        };
        Ok(Sharing {
            engine,
            report,
            pace,
            enabled,
            ids: Mutex::new(HashMap::new()),
            stop,
            thread: Some(thread),
            started,
            cpu_at_start: crate::proc::thread_cpu_time("dedup-scanner").unwrap_or_default(),
        })
    }

    /// Starts sharing `guest`'s RAM within merge group `group`.
    pub fn add_guest(&self, guest: &Guest, group: u32) -> Result<(), String> {
        let memory = guest.ram().sharing_view(group, guest.freezer(), guest.dirty_tracker())?;
        let id = self.engine.lock().unwrap().add_guest(memory);
        self.ids.lock().unwrap().insert(guest.id, id);
        self.report.lock().unwrap().names.insert(id, guest.id);
        Ok(())
    }

    /// Stops sharing a guest's RAM; call before the RAM is unmapped.
    pub fn remove_guest(&self, guest: usize) {
        self.report.lock().unwrap().settled = true;
        if let Some(id) = self.ids.lock().unwrap().remove(&guest) {
            if let Err(e) = self.engine.lock().unwrap().remove_guest(id) {
                log::warn!("page sharing: releasing guest {guest}: {e}");
            }
        }
    }

    pub fn stats(&self) -> Stats {
        self.engine.lock().unwrap().stats()
    }

    /// A guest's sharing counters, while it is registered.
    pub fn guest_stats(&self, guest: usize) -> Option<dedup::GuestStats> {
        let id = *self.ids.lock().unwrap().get(&guest)?;
        self.engine.lock().unwrap().guest_stats(id)
    }

    pub fn pace(&self) -> ScanPace {
        self.pace.lock().unwrap().clone()
    }

    pub fn set_pace(&self, pace: ScanPace) {
        *self.pace.lock().unwrap() = pace;
    }

    pub fn engine_config(&self) -> dedup::Config {
        self.engine.lock().unwrap().config().clone()
    }

    pub fn set_engine_config(&self, config: dedup::Config) {
        self.engine.lock().unwrap().set_config(config);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Turns scanning off (merged pages stay merged) or back on.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Merges what it can in one guest right now.
    pub fn merge_now(&self, guest: usize) -> std::io::Result<()> {
        let id = self.ids.lock().unwrap().get(&guest).copied();
        match id {
            Some(id) => self.engine.lock().unwrap().merge_now(id),
            None => Ok(()),
        }
    }

    /// Time since the scanner started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// CPU time the scanner thread has used.
    pub fn scanner_cpu(&self) -> Duration {
        crate::proc::thread_cpu_time("dedup-scanner").unwrap_or_default().saturating_sub(self.cpu_at_start)
    }

    /// Stops the scanner and returns what the run should report.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut report = self.report.lock().unwrap().clone();
        report.stats.full_scans = self.stats().full_scans;
        report
    }
}

impl Drop for Sharing {
    /// A run that ends early (an error while starting guests) still stops
    /// the scanner before the guests' memory goes away.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn scan_loop(
    engine: &Mutex<Engine>,
    report: &Mutex<Report>,
    stop: &AtomicBool,
    pace: &Mutex<ScanPace>,
    enabled: &AtomicBool,
    started: Instant,
) {
    set_thread_nice(pace.lock().unwrap().nice);
    let (mut backoff, mut last_saved) = (Duration::ZERO, 0);
    while !stop.load(Ordering::SeqCst) {
        if !enabled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let pace = pace.lock().unwrap().clone();
        let step_started = Instant::now();
        let (scanned, total, pass_done) = {
            let mut e = engine.lock().unwrap();
            let total = e.total_pages();
            let passes = e.stats().full_scans;
            let scanned = match e.scan() {
                Ok(n) => n,
                Err(err) => {
                    log::error!("page sharing stopped: {err}");
                    return;
                }
            };
            let now = e.stats();
            let pass_done = now.full_scans > passes;
            let mut report = report.lock().unwrap();
            if pass_done {
                let t = started.elapsed();
                log::info!(
                    "page sharing: pass {} done at {:.2} s: {} pages saved, {} volatile, {} hashed so far",
                    now.full_scans,
                    t.as_secs_f64(),
                    now.pages_saved(),
                    now.pages_volatile,
                    now.pages_hashed
                );
                report.timeline.push((t, now.pages_saved()));
                backoff = idle_backoff(backoff, now.pages_saved().abs_diff(last_saved));
                last_saved = now.pages_saved();
            }
            if !report.settled {
                report.stats = now;
                report.guests = e
                    .guest_ids()
                    .into_iter()
                    .filter_map(|id| Some((*report.names.get(&id)?, e.guest_stats(id)?)))
                    .collect();
            }
            (scanned, total, pass_done)
        };
        let mut sleep = pace.sleep_after(step_started.elapsed(), scanned, total);
        if pass_done {
            sleep += backoff;
        }
        // Sleep in short slices so stopping is prompt.
        let wake = Instant::now() + sleep;
        while !stop.load(Ordering::SeqCst) && Instant::now() < wake {
            std::thread::sleep((wake - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

/// The extra sleep after a full pass, from how many pages the pass merged or
/// lost (net). Booting or busy guests keep breaking and re-forming a few
/// shares every pass; rescanning at full speed for those costs a steady
/// slice of a core (0.15 of one for four booting Linux guests) and
/// saves nothing. So: a pass that changed less than `SMALL` pages doubles
/// the pause (up to 1 s), a modest change halves it, and real progress
/// drops it to zero so a converging scan runs flat out.
fn idle_backoff(previous: Duration, pages_changed: u64) -> Duration {
    const SMALL: u64 = 64;
    const FIRST: Duration = Duration::from_millis(20);
    const MAX: Duration = Duration::from_secs(1);
    if pages_changed >= 16 * SMALL {
        Duration::ZERO
    } else if pages_changed >= SMALL {
        let half = previous / 2;
        if half < FIRST {
            Duration::ZERO
        } else {
            half
        }
    } else {
        (previous * 2).clamp(FIRST, MAX)
    }
}

/// Sets this thread's nice value; without the privilege for it, says so and
/// goes on at the default priority.
fn set_thread_nice(nice: i32) {
    // SAFETY: gettid and setpriority on our own thread id; no memory involved.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if ret != 0 {
        log::warn!("page sharing: cannot set the scanner's nice value to {nice}: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_pace_without_advisor() {
        let p = ScanPace::default();
        assert_eq!(p.sleep_after(Duration::from_millis(3), 4096, 100_000), Duration::from_millis(10));
    }

    #[test]
    fn advisor_meets_the_target_pass_time() {
        let p = ScanPace { target_pass: Some(Duration::from_secs(10)), cpu_cap: 1.0, ..Default::default() };
        // 1000 of 100k pages per step: 100 steps, 100 ms each; busy 30 ms leaves 70 ms.
        let s = p.sleep_after(Duration::from_millis(30), 1000, 100_000);
        assert_eq!(s, Duration::from_millis(70));
    }

    #[test]
    fn idle_passes_back_off_and_progress_resets() {
        let mut b = Duration::ZERO;
        for _ in 0..10 {
            b = idle_backoff(b, 0);
        }
        assert_eq!(b, Duration::from_secs(1));
        assert_eq!(idle_backoff(Duration::ZERO, 0), Duration::from_millis(20));
        assert_eq!(idle_backoff(Duration::from_millis(40), 63), Duration::from_millis(80));
        // A little churn halves the pause; real progress ends it.
        assert_eq!(idle_backoff(b, 64), Duration::from_millis(500));
        assert_eq!(idle_backoff(Duration::from_millis(30), 100), Duration::ZERO);
        assert_eq!(idle_backoff(b, 1024), Duration::ZERO);
    }

    #[test]
    fn advisor_respects_the_cpu_cap() {
        let p = ScanPace { target_pass: Some(Duration::from_millis(1)), cpu_cap: 0.25, ..Default::default() };
        // Target wants no sleep at all; a 25% cap needs 3x the busy time asleep.
        let s = p.sleep_after(Duration::from_millis(10), 1000, 1000);
        assert_eq!(s, Duration::from_millis(30));
    }
}
