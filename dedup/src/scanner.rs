//! The scanner thread: drives the engine step by step at a pace, backs off
//! when passes find little, and publishes what it has done so readers never
//! wait for a step.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{Engine, GuestId, PreparedGuest};
use crate::stats::{GuestStats, Stats};

/// Below the vCPUs (nice 0), as ksmd runs: memory that is plentiful is not
/// worth the guests' CPU. The VMM's memory governor raises it while room
/// is short (docs/dedup.md, "What a merge costs a guest").
pub const DEFAULT_SCAN_NICE: i32 = 5;

/// How fast the scanner works.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanPace {
    /// Sleep between steps.
    pub sleep: Duration,
    /// Advisor: pace the scan to finish a full pass in this time...
    pub target_pass: Option<Duration>,
    /// ...while using at most this fraction of one CPU.
    pub cpu_cap: f64,
    /// Scheduling priority of the scanner thread (nice value):
    /// [`DEFAULT_SCAN_NICE`] unless set.
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
        let cap = self.cpu_cap.clamp(0.01, 1.0);
        // Steps per pass at this step size, and the time each may take.
        let per_step = target.mul_f64(pages.max(1) as f64 / total.max(1) as f64);
        let for_target = per_step.saturating_sub(busy);
        // busy / (busy + sleep) <= cap
        let for_cap = busy.mul_f64((1.0 - cap) / cap);
        for_target.max(for_cap).min(MAX_SLEEP)
    }
}

/// The longest sleep between steps, whatever the pace asks.
const MAX_SLEEP: Duration = Duration::from_secs(10);

/// What the scanner last published: a consistent picture, copied out
/// without touching the engine.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub stats: Stats,
    pub guests: BTreeMap<GuestId, GuestStats>,
    /// Pages saved at the end of each full pass, by time since the start.
    pub timeline: Vec<(Duration, u64)>,
    /// CPU time of the scanner thread so far.
    pub cpu: Duration,
}

/// Guests coming and going, applied by the scanner between steps: a guest
/// is added or removed without waiting for a step (which may be making
/// merges) to end.
enum Change {
    Add(GuestId, Box<PreparedGuest>),
    Remove(GuestId),
}

type Changes = Arc<Mutex<Vec<Change>>>;

fn apply_changes(engine: &mut Engine, changes: &Mutex<Vec<Change>>) {
    for change in std::mem::take(&mut *changes.lock().unwrap()) {
        match change {
            Change::Add(id, guest) => {
                if let Err(e) = engine.insert(id, *guest) {
                    log::error!("page sharing: cannot share guest {id}'s pages: {e}");
                }
            }
            // Failures are counted by the engine, which releases the rest.
            Change::Remove(id) => drop(engine.remove_guest(id)),
        }
    }
}

/// The running scanner and the engine it drives.
pub struct Scanner {
    engine: Arc<Mutex<Engine>>,
    changes: Changes,
    published: Arc<Mutex<Arc<Published>>>,
    pace: Arc<Mutex<ScanPace>>,
    /// While false the scanner only sleeps.
    enabled: Arc<AtomicBool>,
    /// A nice value to run at instead of the pace's, when it is lower
    /// (memory is short): i32::MAX for none.
    urgent_nice: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
    /// Threads waiting for the engine: the step under way gives way.
    waiting: Arc<AtomicUsize>,
    /// The scanner thread's id (0 until it runs).
    tid: Arc<AtomicI32>,
}

impl Scanner {
    /// Starts the scanner thread, named `name`; `after_step` runs after each
    /// step with the engine (the VMM raises vm.max_map_count there).
    pub fn start(
        engine: Engine,
        pace: ScanPace,
        name: &str,
        after_step: Box<dyn FnMut(&mut Engine) + Send>,
    ) -> std::io::Result<Scanner> {
        let engine = Arc::new(Mutex::new(engine));
        let published = Arc::new(Mutex::new(Arc::new(Published::default())));
        let stop = Arc::new(AtomicBool::new(false));
        let pace = Arc::new(Mutex::new(pace));
        let enabled = Arc::new(AtomicBool::new(true));
        let urgent_nice = Arc::new(AtomicI32::new(i32::MAX));
        let changes: Changes = Arc::default();
        let started = Instant::now();
        let (waiting, tid) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicI32::new(0)));
        let thread = {
            let shared = Loop {
                engine: engine.clone(),
                changes: changes.clone(),
                published: published.clone(),
                stop: stop.clone(),
                pace: pace.clone(),
                enabled: enabled.clone(),
                urgent_nice: urgent_nice.clone(),
                started,
                after_step,
                waiting: waiting.clone(),
                tid: tid.clone(),
            };
            std::thread::Builder::new().name(name.into()).spawn(move || shared.run())?
        };
        Ok(Scanner {
            engine,
            changes,
            published,
            pace,
            enabled,
            urgent_nice,
            stop,
            thread: Some(thread),
            started,
            waiting,
            tid,
        })
    }

    /// The engine, with every guest added or removed so far, for merging
    /// on request and settings. Held while a step runs: it waits for one.
    ///
    /// The step under way ends early, within a stretch of pages. A
    /// real-time caller (a guest being made) lends the scanner thread its
    /// priority meanwhile: the scanner runs behind the vCPUs, and could
    /// otherwise wait a long time for a core while it holds the engine.
    pub fn engine(&self) -> MutexGuard<'_, Engine> {
        let mut e = match self.engine.try_lock() {
            Ok(e) => e,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                let tid = self.tid.load(Ordering::SeqCst);
                let lent = crate::os::lend_priority(tid);
                let e = self.engine.lock().unwrap_or_else(|e| e.into_inner());
                if lent {
                    crate::os::take_priority_back(tid);
                }
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                e
            }
        };
        apply_changes(&mut e, &self.changes);
        e
    }

    /// Adds a guest at the next step, without waiting for this one.
    pub fn add_guest(&self, id: GuestId, guest: PreparedGuest) {
        self.changes.lock().unwrap().push(Change::Add(id, Box::new(guest)));
    }

    /// Removes a guest at the next step (see [`Engine::remove_guest`] for
    /// when that is safe), without waiting for this one.
    pub fn remove_guest(&self, id: GuestId) {
        self.changes.lock().unwrap().push(Change::Remove(id));
    }

    /// What the scanner last published.
    pub fn published(&self) -> Arc<Published> {
        self.published.lock().unwrap().clone()
    }

    pub fn pace(&self) -> ScanPace {
        self.pace.lock().unwrap().clone()
    }

    /// Applies at the next step.
    pub fn set_pace(&self, pace: ScanPace) {
        *self.pace.lock().unwrap() = pace;
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Runs the scanner at `nice` while that is below the pace's own (memory
    /// is short, and what it frees is needed now), or at the pace's again
    /// (None). Applies at the next step.
    pub fn set_urgent_nice(&self, nice: Option<i32>) {
        self.urgent_nice.store(nice.unwrap_or(i32::MAX), Ordering::SeqCst);
    }

    /// Turns scanning off (merged pages stay merged) or back on.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Time since the scanner started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the thread; returns what it published last.
    pub fn stop(mut self) -> Arc<Published> {
        self.halt();
        self.published()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Loop {
    engine: Arc<Mutex<Engine>>,
    changes: Changes,
    published: Arc<Mutex<Arc<Published>>>,
    stop: Arc<AtomicBool>,
    pace: Arc<Mutex<ScanPace>>,
    enabled: Arc<AtomicBool>,
    urgent_nice: Arc<AtomicI32>,
    started: Instant,
    after_step: Box<dyn FnMut(&mut Engine) + Send>,
    waiting: Arc<AtomicUsize>,
    tid: Arc<AtomicI32>,
}

impl Loop {
    fn run(mut self) {
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        let mut nice = self.nice();
        set_thread_nice(nice);
        let (mut backoff, mut last_saved) = (Duration::ZERO, 0);
        let mut timeline = Vec::new();
        let cpu_at_start = thread_cpu();
        while !self.stop.load(Ordering::SeqCst) {
            let pace = self.pace.lock().unwrap().clone();
            if self.nice() != nice {
                nice = self.nice();
                set_thread_nice(nice);
            }
            if !self.enabled.load(Ordering::SeqCst) {
                apply_changes(&mut self.engine.lock().unwrap_or_else(|e| e.into_inner()), &self.changes);
                self.sleep(Duration::from_millis(50));
                continue;
            }
            let step_started = Instant::now();
            let (scanned, total, pass_done) = {
                let mut e = self.engine.lock().unwrap_or_else(|e| e.into_inner());
                apply_changes(&mut e, &self.changes);
                let passes = e.stats().full_scans;
                let waiting = &self.waiting;
                let scanned = e.scan_giving_way(&|| waiting.load(Ordering::SeqCst) > 0);
                (self.after_step)(&mut e);
                let now = e.stats();
                let pass_done = now.full_scans > passes;
                if pass_done {
                    let t = self.started.elapsed();
                    log::info!(
                        "page sharing: pass {} done at {:.2} s: {} pages saved, {} volatile, {} held, {} hashed, \
                         {:.2} CPU-s so far",
                        now.full_scans,
                        t.as_secs_f64(),
                        now.pages_saved(),
                        now.pages_volatile,
                        now.held.now,
                        now.pages_hashed,
                        thread_cpu().saturating_sub(cpu_at_start).as_secs_f64()
                    );
                    timeline.push((t, now.pages_saved()));
                    // Pages found still being written are the next pass's
                    // candidates: a pass that saw them was not idle.
                    let changed = now.pages_saved().abs_diff(last_saved) + now.pages_volatile;
                    backoff = idle_backoff(backoff, changed);
                    last_saved = now.pages_saved();
                }
                let guests = e.guest_ids().into_iter().filter_map(|id| Some((id, e.guest_stats(id)?))).collect();
                let cpu = thread_cpu().saturating_sub(cpu_at_start);
                *self.published.lock().unwrap() =
                    Arc::new(Published { stats: now, guests, timeline: timeline.clone(), cpu });
                (scanned, e.total_pages(), pass_done)
            };
            let mut sleep = pace.sleep_after(step_started.elapsed(), scanned, total);
            if pass_done || scanned == 0 {
                sleep += backoff.max(if scanned == 0 { Duration::from_millis(50) } else { Duration::ZERO });
            }
            self.sleep(sleep);
        }
    }

    /// The nice value to run at now: the pace's, or the urgent one if lower.
    fn nice(&self) -> i32 {
        self.pace.lock().unwrap().nice.min(self.urgent_nice.load(Ordering::SeqCst))
    }

    /// Sleeps in short slices so stopping is prompt.
    fn sleep(&self, time: Duration) {
        let wake = Instant::now() + time;
        while !self.stop.load(Ordering::SeqCst) && Instant::now() < wake {
            std::thread::sleep((wake - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

/// The extra sleep after a full pass, from how many pages the pass changed:
/// merged or lost (net), or found being written (they are the next pass's
/// candidates: guests still filling their memory). Booting or busy guests
/// keep breaking and re-forming a few shares every pass; rescanning at full
/// speed for those costs a steady slice of a core (0.15 of one for four
/// booting Linux guests) and saves nothing. So: a pass that changed less
/// than `SMALL` pages doubles the pause (up to 1 s), a modest change halves
/// it, and real progress drops it to zero so a converging scan runs flat
/// out. (Pages rewritten pass after pass are held back, not counted.)
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

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into our own timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn set_thread_nice(nice: i32) {
    crate::os::set_thread_nice(nice, "the scanner");
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
    fn a_huge_target_never_sleeps_past_the_cap() {
        let p = ScanPace { target_pass: Some(Duration::from_secs(86_400 * 365)), ..Default::default() };
        assert_eq!(p.sleep_after(Duration::from_millis(1), 1, 2), MAX_SLEEP);
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
