//! The supervisor's guests: the only place guests are made, started,
//! paused, stopped, reaped and forgotten, for `vmm run` and the API alike.
//!
//! Every guest runs in a process of its own (process/): a guest that
//! crashes, is killed or misbehaves ends alone, and is reported with the
//! reason. Guests go Created -> Running <-> Paused -> Ended. A guest's
//! pages leave page sharing only once its process has exited, so no frame
//! it still maps can be freed; its memory goes with it. A failed create
//! leaves nothing behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{check_memory_fits, DedupMode, GuestConfig, Source, SupervisorConfig};
use crate::error::{Error, Result};
use crate::host::HostKind;
use crate::image::boot_entry::BootEntry;
use crate::image::BaseImage;
use crate::memory::{guest_memfd, host_available_memory, MemoryBackend, MIB};
use crate::outcome::GuestEnd;
use crate::protocol::KvmCounters;
use crate::protocol::{Event, Reply, Request, Setup};
use crate::snapshot::SavedState;
pub use crate::stats_file::{GuestTimings, TimingStep};
use crate::supervisor::cgroup::MemoryCgroup;
use crate::supervisor::handle::{Descriptors, Exit, GuestProcess, Spare};
use crate::supervisor::pool::Pool;
use crate::supervisor::pressure::{Action, Governor, GuestMemory, Wall};
use crate::supervisor::sharing::Sharing;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    Created,
    Running,
    Paused,
    Ended,
}

/// A guest as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct GuestInfo {
    pub id: usize,
    pub state: GuestState,
    pub spec: GuestConfig,
    /// How it ended, once it has.
    pub end: Option<String>,
    pub clean: Option<bool>,
    /// Its process, while it runs.
    pub pid: Option<u32>,
    /// Host memory its process uses now (its memory cgroup, or its Pss).
    pub memory_bytes: Option<u64>,
    /// Host memory its RAM holds now, exactly: the pages of its memory
    /// file (not those page sharing merged, nor those it gave back) and
    /// its process's anonymous memory (its copies of merged pages it
    /// wrote, and the VMM's heap). `null` for anonymous guest RAM.
    pub ram_bytes: Option<u64>,
    /// Corrupted pages a memtest guest has reported.
    pub corrupted_pages: u64,
    /// Rounds a memtest guest has verified on every vCPU since it started
    /// (a clone's count starts at 0).
    pub rounds_verified: u64,
    /// Held by the memory governor now, and for how long in all.
    pub throttled: bool,
    pub throttled_ms: u64,
    /// How page sharing holds off its writers during a merge.
    pub merge_protection: Option<String>,
    pub sharing: Option<GuestSharing>,
    /// What it has cost KVM so far: page faults, TLB flushes, exits.
    pub kvm: KvmCounters,
    /// The user and group its process runs as in its jail (`null`: not
    /// jailed, `--no-jail`).
    pub jail: Option<crate::protocol::Jail>,
    /// Why its process cannot be asked anything now (stopped by SIGSTOP,
    /// or no longer answering); `null` when it answers. Such a guest can
    /// still be stopped and deleted: its process is killed.
    pub unresponsive: Option<String>,
    /// For a guest that boots its disk image: the boot loader entry it
    /// boots, and where it was found.
    pub boot_entry: Option<String>,
    /// Its memory balloon, for a guest that has one.
    pub balloon: Option<BalloonInfo>,
    /// How long it took, from the request that made it.
    pub timings: GuestTimings,
}

/// Where a guest's balloon stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BalloonInfo {
    /// What the guest was asked to hold in its balloon, and holds (MiB).
    pub target_mib: u64,
    pub actual_mib: u64,
    /// Its driver runs the device (else targets are refused).
    pub driver_ready: bool,
    /// What its driver took: free page reporting, deflate on OOM.
    pub free_page_reporting: bool,
    pub deflate_on_oom: bool,
    /// 4 KiB pages it gave back by inflating, took back by deflating, and
    /// reported free, since it booted (a clone goes on counting from its
    /// snapshot's).
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_pages: u64,
    /// Pages it named that are not its RAM (skipped).
    pub bad_pages: u64,
    /// Its last memory statistics, by name (memory in bytes, events in
    /// counts).
    pub stats: std::collections::BTreeMap<String, u64>,
}

impl From<&crate::protocol::BalloonStatus> for BalloonInfo {
    fn from(s: &crate::protocol::BalloonStatus) -> Self {
        let mib = |pages: u32| u64::from(pages) * crate::protocol::BALLOON_PAGE / MIB;
        BalloonInfo {
            target_mib: mib(s.target_pages),
            actual_mib: mib(s.actual_pages),
            driver_ready: s.driver_ready,
            free_page_reporting: s.reporting,
            deflate_on_oom: s.deflate_on_oom,
            inflated_pages: s.inflated_pages,
            deflated_pages: s.deflated_pages,
            reported_pages: s.reported_pages,
            bad_pages: s.bad_pages,
            stats: s.stats.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct GuestSharing {
    pub group: u32,
    pub merged_pages: u64,
    pub zero_pages: u64,
    pub cow_breaks: u64,
    pub mappings: u64,
    pub map_limit_reached: bool,
    /// Pages held back because they keep changing, at its last look, and
    /// holds begun so far.
    pub pages_held: u64,
    pub holds: u64,
    /// Scan passes that went by it because its process did not answer
    /// (stopped).
    pub passes_skipped: u64,
    /// Pages it gave back (its balloon) that page sharing let go of.
    pub discarded_pages: u64,
}

impl From<&dedup::GuestStats> for GuestSharing {
    fn from(s: &dedup::GuestStats) -> Self {
        GuestSharing {
            group: s.group,
            merged_pages: s.merged_pages,
            zero_pages: s.zero_pages,
            cow_breaks: s.cow_breaks,
            mappings: s.mappings,
            map_limit_reached: s.map_limit_reached,
            pages_held: s.held.now,
            holds: s.held.holds(),
            passes_skipped: s.passes_skipped,
            discarded_pages: s.discarded_pages,
        }
    }
}

struct Entry {
    config: GuestConfig,
    state: GuestState,
    process: Option<Arc<GuestProcess>>,
    /// Registered with page sharing (until its process has exited).
    shared: bool,
    /// The supervisor's handle on its RAM (memfd backend).
    memory: Option<File>,
    cgroup: Option<MemoryCgroup>,
    /// Its vsock socket, removed with its process.
    vsock_socket: Option<crate::supervisor::vsock_host::SocketFile>,
    /// How the guest process said the guest ended.
    reported_end: Option<GuestEnd>,
    end: Option<GuestEnd>,
    console_tail: String,
    corrupted_pages: u64,
    rounds_verified: u64,
    /// Its process died of a SIGKILL the VMM did not send.
    killed_from_outside: bool,
    /// Since when the memory governor holds it, and for how long it held
    /// it before.
    throttled_since: Option<Instant>,
    throttled_before: Duration,
    gaps: crate::gaps::Gaps,
    /// What it has cost KVM, as its process last said.
    kvm: KvmCounters,
    /// Its balloon, as its process last said.
    balloon: Option<crate::protocol::BalloonStatus>,
    /// When it was asked for (the host's monotonic clock, ns), and how
    /// long each step took from then.
    requested_ns: u64,
    timings: GuestTimings,
    protection: Option<String>,
    jail: Option<crate::protocol::Jail>,
    /// The boot loader entry it boots (a guest without a kernel).
    boot_entry: Option<String>,
    /// Set once `create` has finished with it: listed from then on.
    made: bool,
}

impl Entry {
    fn ms_since_request(&self, ns: u64) -> f64 {
        ns.saturating_sub(self.requested_ns) as f64 / 1e6
    }

    /// What its balloon could give back: the free memory its driver last
    /// reported, less a sixteenth of its RAM (at least 8 MiB) the guest
    /// keeps, less what it was asked for and has not given yet.
    fn spare_memory(&self) -> u64 {
        let Some(b) = self.balloon.as_ref().filter(|b| b.driver_ready) else { return 0 };
        let free = b.stats.get("free_memory").copied().unwrap_or(0);
        let pending = u64::from(b.target_pages.saturating_sub(b.actual_pages)) * crate::protocol::BALLOON_PAGE;
        let margin = (self.config.memory_bytes() / 16).max(8 * MIB);
        free.saturating_sub(margin).saturating_sub(pending)
    }

    fn new(config: GuestConfig) -> Entry {
        Entry {
            config,
            state: GuestState::Created,
            process: None,
            shared: false,
            memory: None,
            cgroup: None,
            vsock_socket: None,
            reported_end: None,
            end: None,
            console_tail: String::new(),
            corrupted_pages: 0,
            rounds_verified: 0,
            killed_from_outside: false,
            throttled_since: None,
            throttled_before: Duration::ZERO,
            gaps: Default::default(),
            kvm: Default::default(),
            balloon: None,
            requested_ns: crate::proc::monotonic_ns(),
            timings: GuestTimings::default(),
            protection: None,
            jail: None,
            boot_entry: None,
            made: false,
        }
    }

    fn throttled(&self) -> Duration {
        self.throttled_before + self.throttled_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Books the memory governor holding it; false if it already was.
    fn hold(&mut self) -> bool {
        let held = self.throttled_since.is_none();
        self.throttled_since.get_or_insert_with(Instant::now);
        held
    }

    /// Books the governor letting it go; false if it was not held.
    fn let_go(&mut self) -> bool {
        let Some(since) = self.throttled_since.take() else { return false };
        self.throttled_before += since.elapsed();
        true
    }
}

struct Guests {
    next_id: usize,
    map: BTreeMap<usize, Entry>,
}

/// A directory the manager made for itself (removed at the end) or was given.
struct Dir {
    path: PathBuf,
    ours: bool,
}

impl Dir {
    fn new(given: Option<&PathBuf>, prefix: &str) -> Result<Dir> {
        match given {
            Some(path) => {
                std::fs::create_dir_all(path)
                    .map_err(|e| Error::bad_input(format!("cannot create directory {}: {e}", path.display())))?;
                Ok(Dir { path: path.clone(), ours: false })
            }
            // The pid in the name tells a later supervisor whose it is
            // (leftovers.rs).
            None => Ok(Dir { path: fresh_temp_dir(&format!("{prefix}-{}", std::process::id()))?, ours: true }),
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if self.ours {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Nice value of the supervisor's threads (the scanner's is its own).
const SUPERVISOR_NICE: i32 = -5;
/// The supervisor's OOM score adjustment: never the OOM killer's pick
/// (each guest process's is `protocol::GUEST_OOM_SCORE_ADJ`).
const SUPERVISOR_OOM_SCORE_ADJ: i32 = -900;

pub struct Manager {
    config: SupervisorConfig,
    host: HostKind,
    sharing: Option<Sharing>,
    guests: Mutex<Guests>,
    /// Signalled whenever a guest changes state.
    changed: Condvar,
    consoles: Dir,
    overlays: Dir,
    /// Bridges made for guests' networks, removed when the manager goes.
    bridges: crate::supervisor::network::MadeBridges,
    /// Guest processes started ahead of need (before `cgroups`: theirs
    /// are in it, and go first).
    pool: Option<Arc<Pool>>,
    /// The cgroup the guests' cgroups live in, where the host allows one.
    cgroups: Option<MemoryCgroup>,
    /// The memory governor, unless it is off or cannot see the guests.
    governed: Option<Governed>,
    /// Snapshots read for clones, kept while their files stay the same.
    snapshots: crate::snapshot::OpenSnapshots,
    this: Weak<Manager>,
}

/// What memory pressure did to the guests so far.
pub struct PressureCounts {
    /// Time the memory governor held each guest it held.
    pub held: BTreeMap<usize, Duration>,
    /// Guests it ended because sharing could not make room.
    pub ended_for_memory: usize,
    /// Guests whose processes a SIGKILL from outside the VMM ended (with a
    /// memory limit and no governor: the kernel's OOM killer).
    pub killed_from_outside: usize,
    /// Balloon requests it made to reclaim guests' free memory, what they
    /// asked for in all, and requests to give it back.
    pub balloon_reclaims: u64,
    pub balloon_reclaimed_bytes: u64,
    pub balloon_returns: u64,
}

/// The memory governor (pressure.rs) and its threads: one looks and
/// decides; one carries out the merges it asks for, which take as long as
/// a guest's pass (the looking must never wait for them).
struct Governed {
    wall: Wall,
    governor: Mutex<Governor>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    merges: Mutex<Option<std::sync::mpsc::Sender<usize>>>,
    /// Guests asked to be merged whose merge has not begun.
    merges_waiting: Mutex<std::collections::BTreeSet<usize>>,
    merger: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: std::sync::atomic::AtomicBool,
}

impl Governed {
    /// Whether a guest of `bytes` may start now (counted as filling if so).
    fn admits(&self, bytes: u64) -> bool {
        self.governor.lock().unwrap().admits(Instant::now(), self.wall.room(), bytes)
    }
}

impl Manager {
    /// Checks KVM is there and starts page sharing, if on. Call from the
    /// thread that will run the supervisor, before it starts any other.
    pub fn new(config: SupervisorConfig) -> Result<Arc<Manager>> {
        // The supervisor's threads (and those they start) run above the
        // guests: making, stopping and answering for guests must not wait
        // behind their vCPUs. (Guest processes go back to the default.)
        dedup::os::set_thread_nice(SUPERVISOR_NICE, "the supervisor");
        crate::supervisor::headroom::make();
        // The supervisor maps every guest's memory to scan it, so to the
        // kernel's OOM killer it looks the biggest process of all: killing
        // it would end every guest. Ask the kernel to pick a guest instead
        // (guest processes raise their own score).
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", SUPERVISOR_OOM_SCORE_ADJ.to_string()) {
            log::info!("cannot lower the supervisor's OOM score ({e}): the OOM killer may pick it over a guest");
        }
        // Fail here, with KVM's own words, rather than in each guest.
        let hv = crate::hypervisor::Hypervisor::open().map_err(Error::host)?;
        if let Some(why) = config.jail.and_then(|_| crate::supervisor::jailer::unavailable()) {
            return Err(Error::bad_input(format!(
                "cannot jail guest processes: {why}; pass --no-jail to run them unjailed (docs/security.md)"
            )));
        }
        let sharing = match config.sharing.mode {
            DedupMode::Inprocess => Some(Sharing::start(&config.sharing)?),
            DedupMode::Ksm => {
                if std::fs::read_to_string("/sys/kernel/mm/ksm/run").is_ok_and(|s| s.trim() == "0") {
                    eprintln!("vmm: guest RAM is MADV_MERGEABLE, but kernel KSM is off (/sys/kernel/mm/ksm/run is 0)");
                }
                None
            }
            DedupMode::Off => None,
        };
        for stale in crate::supervisor::leftovers::remove_stale() {
            log::info!("removed {}, left by a supervisor that no longer runs", stale.display());
        }
        let [consoles, overlays] = crate::supervisor::leftovers::TEMP_PREFIXES;
        let consoles = Dir::new(config.console_dir.as_ref(), consoles)?;
        let overlays = Dir::new(config.overlay_dir.as_ref(), overlays)?;
        let cgroups = match MemoryCgroup::create(&format!("vmm-{}", std::process::id()), None) {
            Ok(cg) => Some(cg),
            Err(e) => {
                log::info!("no memory cgroup per guest ({e}); guest memory is measured by Pss");
                None
            }
        };
        let governed = match (config.memory_reserve_pct, &cgroups) {
            (0, _) => None,
            (_, None) => {
                log::warn!("no memory cgroup per guest: the memory governor cannot see guests grow, and is off");
                None
            }
            (pct, Some(_)) => {
                let wall = Wall::find();
                let governor = Governor::new(wall.size() / 100 * pct);
                log::info!(
                    "memory governor: {} MiB reserve; the wall is {}",
                    governor.reserve() >> 20,
                    wall.describe()
                );
                Some(Governed {
                    wall,
                    governor: Mutex::new(governor),
                    thread: Mutex::new(None),
                    merges: Mutex::new(None),
                    merges_waiting: Default::default(),
                    merger: Mutex::new(None),
                    stop: Default::default(),
                })
            }
        };
        let pool = match config.pool {
            0 => None,
            size => {
                let pool = Pool::start(size, config.jail.is_some(), cgroups.as_ref().map(MemoryCgroup::place))
                    .map_err(|e| Error::host(format!("cannot start the guest process pool: {e}")))?;
                Some(pool)
            }
        };
        let manager = Arc::new_cyclic(|this| Manager {
            config,
            host: hv.host,
            sharing,
            guests: Mutex::new(Guests { next_id: 0, map: BTreeMap::new() }),
            changed: Condvar::new(),
            consoles,
            overlays,
            bridges: Default::default(),
            pool,
            cgroups,
            governed,
            snapshots: Default::default(),
            this: this.clone(),
        });
        if let Some(g) = &manager.governed {
            let this = Arc::downgrade(&manager);
            let thread = std::thread::Builder::new().name("memory-governor".into()).spawn(move || {
                let mut wait = crate::supervisor::pressure::TICK;
                loop {
                    std::thread::sleep(wait);
                    match this.upgrade() {
                        Some(m) if !m.governed.as_ref().is_some_and(|g| g.stop.load(Ordering::Relaxed)) => {
                            wait = m.govern();
                        }
                        _ => return,
                    }
                }
            });
            *g.thread.lock().unwrap() =
                Some(thread.map_err(|e| Error::host(format!("cannot start the memory governor: {e}")))?);
            let (merges, asked) = std::sync::mpsc::channel::<usize>();
            let this = Arc::downgrade(&manager);
            let merger = std::thread::Builder::new().name("memory-merges".into()).spawn(move || {
                for id in asked {
                    let Some(m) = this.upgrade() else { return };
                    if let Some(g) = &m.governed {
                        g.merges_waiting.lock().unwrap().remove(&id);
                    }
                    if let Some(s) = &m.sharing {
                        let _ = s.merge_now(id);
                    }
                }
            });
            *g.merger.lock().unwrap() =
                Some(merger.map_err(|e| Error::host(format!("cannot start the memory governor: {e}")))?);
            *g.merges.lock().unwrap() = Some(merges);
        }
        Ok(manager)
    }

    /// Stops the memory governor's thread, so that the caller's hold on
    /// the manager is the last: its drop (which removes its directories)
    /// then runs before the process exits, not on that thread.
    pub fn close(&self) {
        if let Some(g) = &self.governed {
            g.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = g.thread.lock().unwrap().take() {
                let _ = thread.join();
            }
            // Its channel closed, the merger ends after the merge at hand.
            g.merges.lock().unwrap().take();
            if let Some(thread) = g.merger.lock().unwrap().take() {
                let _ = thread.join();
            }
        }
    }

    /// Has page sharing merge guest `id` at once, on the governor's merge
    /// thread (a request already waiting is not queued twice).
    fn ask_merge(&self, id: usize) {
        if let (Some(g), Some(_)) = (&self.governed, &self.sharing) {
            if g.merges_waiting.lock().unwrap().insert(id) {
                if let Some(merges) = g.merges.lock().unwrap().as_ref() {
                    let _ = merges.send(id);
                }
            }
        }
    }

    /// One look of the memory governor: measure, decide, apply. Returns
    /// how long until the next.
    fn govern(&self) -> Duration {
        let Some(g) = &self.governed else { return crate::supervisor::pressure::SLOW_TICK };
        let room = g.wall.room();
        let guests: Vec<GuestMemory> = self
            .lock()
            .map
            .iter()
            .filter(|(_, e)| e.made && e.state != GuestState::Ended)
            .filter_map(|(&id, e)| {
                let bytes = e.cgroup.as_ref()?.charged()?;
                let size = e.config.memory_bytes();
                Some(GuestMemory { id, bytes, size, running: e.state == GuestState::Running, spare: e.spare_memory() })
            })
            .collect();
        let (actions, next) = {
            let mut governor = g.governor.lock().unwrap();
            (governor.step(Instant::now(), room, &guests), governor.next_tick())
        };
        for action in actions {
            match action {
                Action::Throttle(id) => self.throttle(id, true),
                Action::Release(id) => self.throttle(id, false),
                Action::Merge(id) => self.ask_merge(id),
                Action::Urgent(on) => {
                    log::info!(
                        "memory governor: room is {}: page sharing {}",
                        if on { "short" } else { "plentiful" },
                        if on { "runs ahead of the vCPUs" } else { "yields to the vCPUs" }
                    );
                    if let Some(s) = &self.sharing {
                        s.set_urgent(on);
                    }
                }
                Action::End(id, why) => {
                    eprintln!("vmm: guest {id}: ending it: {why}");
                    let _ = self.send_stop(id, GuestEnd::OutOfMemory(why));
                }
                Action::Balloon(id, bytes) => {
                    log::info!("memory governor: guest {id}'s balloon to {} MiB", bytes / MIB);
                    if let Err(e) = self.set_balloon(id, bytes / MIB) {
                        log::info!("memory governor: guest {id}'s balloon: {}", e.message);
                    }
                }
            }
        }
        next
    }

    /// Holds guest `id`'s vCPUs for memory (and has its pages merged
    /// first), or lets them go.
    fn throttle(&self, id: usize, on: bool) {
        let process = {
            let mut g = self.lock();
            let Some(entry) = g.map.get_mut(&id) else { return };
            let changed = if on { entry.hold() } else { entry.let_go() };
            if !changed {
                return;
            }
            entry.process.clone()
        };
        if let Some(p) = process {
            // A process that does not answer is ended by `ask`.
            let _ = Self::ask(&p, Request::Throttle(on));
        }
        if on {
            self.ask_merge(id);
        }
    }

    /// Waits until a guest of `bytes` may start without pushing the others
    /// into the wall (the governor's waves); returns how long it waited.
    pub fn wait_for_room(&self, bytes: u64) -> Duration {
        let started = Instant::now();
        let Some(g) = &self.governed else { return Duration::ZERO };
        while !crate::signals::stop_requested() && !g.admits(bytes) {
            std::thread::sleep(crate::supervisor::pressure::TICK);
        }
        started.elapsed()
    }

    /// What memory pressure did so far.
    pub fn pressure(&self) -> PressureCounts {
        let (balloon_reclaims, balloon_reclaimed_bytes, balloon_returns) =
            self.governed.as_ref().map_or((0, 0, 0), |g| {
                let gov = g.governor.lock().unwrap();
                (gov.reclaims, gov.reclaimed_bytes, gov.returns)
            });
        let g = self.lock();
        let held: BTreeMap<usize, Duration> =
            g.map.iter().map(|(&id, e)| (id, e.throttled())).filter(|(_, d)| !d.is_zero()).collect();
        PressureCounts {
            balloon_reclaims,
            balloon_reclaimed_bytes,
            balloon_returns,
            held,
            ended_for_memory: g.map.values().filter(|e| matches!(e.end, Some(GuestEnd::OutOfMemory(_)))).count(),
            killed_from_outside: g.map.values().filter(|e| e.killed_from_outside).count(),
        }
    }

    pub fn sharing(&self) -> Option<&Sharing> {
        self.sharing.as_ref()
    }

    pub fn host(&self) -> HostKind {
        self.host
    }

    pub fn console_dir(&self) -> &Path {
        &self.consoles.path
    }

    fn lock(&self) -> MutexGuard<'_, Guests> {
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a guest in a process of its own, ready to start; returns its
    /// id. `source` names its settings in errors the way the user gave them.
    pub fn create(&self, config: GuestConfig, source: Source) -> Result<usize> {
        // Making a guest is short, bounded work that must not queue for a
        // core behind every running guest's vCPUs: with hundreds running,
        // a thread at the supervisor's nice got about 1% of a core here,
        // and a clone took most of a second to make. (Laying a snapshot out,
        // which reads all of it, runs behind them: Sharing::lay_out_snapshot.)
        dedup::os::ahead_of_others(|| self.create_now(config, source))
    }

    fn create_now(&self, mut config: GuestConfig, source: Source) -> Result<usize> {
        let requested_ns = crate::proc::monotonic_ns();
        config.validate(source)?;
        let snapshot = match &config.restore {
            None => None,
            Some(dir) => {
                let snapshot = self.snapshots.open(dir)?;
                config = snapshot.clone_config(&config, dir)?;
                Some(snapshot.state.clone())
            }
        };
        if !self.config.overcommit {
            let available =
                host_available_memory().map_err(|e| Error::host(format!("cannot read host memory: {e}")))?;
            check_memory_fits(1, config.memory_mib, available, false)?;
        }
        let boot_entry = match &config.disk {
            Some(disk) => {
                let image = BaseImage::open(disk).map_err(|e| Error::bad_input(e.to_string()))?;
                let boots_disk = config.kernel.as_os_str().is_empty() && config.restore.is_none();
                boots_disk.then(|| self.disk_boot(&image, &mut config)).transpose()?
            }
            None => None,
        };
        // The entry exists (hidden) before the process does, so its events
        // and its end always find it.
        let id = {
            let mut g = self.lock();
            let id = g.next_id;
            g.next_id += 1;
            config.merge_group.get_or_insert(self.config.sharing.groups.default_for(id));
            let mut entry = Entry::new(config.clone());
            entry.requested_ns = requested_ns;
            entry.boot_entry = boot_entry.as_ref().map(|e| e.described.clone());
            g.map.insert(id, entry);
            id
        };
        // A snapshot is laid out for its clones once; a failure is the
        // adoption's to report.
        if let Err(e) = self.lay_out_snapshot(&config) {
            log::info!("guest {id}: {}", e.message);
        }
        let made = self.make(id, config, snapshot, boot_entry).map_err(|e| e.context(format!("guest {id}")));
        if made.is_err() {
            self.lock().map.remove(&id);
        }
        made.map(|()| id)
    }

    /// What a guest without a kernel boots from its disk `image`: the
    /// entry its boot loader would take, whose command line becomes the
    /// guest's, with what this host needs and the user's words after it.
    fn disk_boot(&self, image: &BaseImage, config: &mut GuestConfig) -> Result<BootEntry> {
        let entry = crate::image::boot_entry::find(image).map_err(Error::bad_input)?;
        let words =
            [entry.options.as_str(), self.host.default_linux_cmdline(), config.cmdline.as_deref().unwrap_or("")];
        config.cmdline = Some(words.iter().map(|w| w.trim()).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" "));
        log::info!("{} boots {}", image.path().display(), entry.described);
        Ok(entry)
    }

    fn make(
        &self,
        id: usize,
        config: GuestConfig,
        snapshot: Option<SavedState>,
        boot_entry: Option<BootEntry>,
    ) -> Result<()> {
        let group = config.merge_group.unwrap_or(0);
        let shared = self.sharing.as_ref().filter(|_| !config.dedup_opt_out);
        let overlay = (config.disk.is_some() && !config.disk_readonly)
            .then(|| self.overlays.path.join(format!("guest-{id}.overlay")));
        let network = config
            .net
            .as_ref()
            .map(|n| crate::supervisor::network::set_up_guest(id, n, snapshot.is_some(), &self.bridges))
            .transpose()?;
        // What was chosen is shown, and goes into the guest's snapshots.
        let mut config = config;
        if let Some(n) = &network {
            config.net = Some(n.shown.clone());
            if let Some(entry) = self.lock().map.get_mut(&id) {
                entry.config.net = config.net.clone();
            }
        }
        let (tap, net) = match network {
            Some(n) => (Some(std::os::fd::OwnedFd::from(n.tap)), Some(n.setup)),
            None => (None, None),
        };
        let vsock = config.vsock.as_ref().map(|v| crate::supervisor::vsock_host::set_up_guest(id, v)).transpose()?;
        let (vsock_fd, vsock_dial, vsock_setup, vsock_file) = match vsock {
            Some(v) => {
                config.vsock = Some(v.shown);
                if let Some(entry) = self.lock().map.get_mut(&id) {
                    entry.config.vsock = config.vsock.clone();
                }
                let (listener, dial) = (std::os::fd::OwnedFd::from(v.listener), std::os::fd::OwnedFd::from(v.dial));
                (Some(listener), Some(dial), Some(v.setup), Some(v.file))
            }
            None => (None, None, None, None),
        };
        let jail = self
            .config
            .jail
            .map(|j| crate::protocol::Jail::for_guest(j.uid_base, id))
            .transpose()
            .map_err(|e| Error::bad_input(e.to_string()))?;
        // Clones of a snapshot share its memory from the start.
        let adopt_memory = snapshot.is_some() && shared.is_some() && self.config.backend == MemoryBackend::Memfd;
        let setup = Box::new(Setup {
            id,
            guest: config.clone(),
            backend: self.config.backend,
            disk_overlay: overlay.clone(),
            keep_overlay: !self.overlays.ours,
            sharing: shared.map(|s| crate::protocol::AgentSetup {
                protect: self.config.sharing.protect,
                dirty_log: self.config.sharing.volatility == crate::config::Volatility::DirtyLog,
                nice: s.settings().scan_nice as i32,
            }),
            ksm: self.config.sharing.mode == DedupMode::Ksm,
            adopt_memory,
            restore: snapshot,
            boot_entry,
            net,
            vsock: vsock_setup,
            jail,
            console_limit: (!self.config.console_to_terminal).then_some(self.config.console_limit_bytes),
            // Filled in with the descriptors it is sent.
            files: Vec::new(),
        });
        let memory = match self.config.backend {
            MemoryBackend::Memfd => Some(
                guest_memfd(&format!("guest{id}"), config.memory_bytes())
                    .map_err(|e| Error::host(format!("cannot make its memory: {e}")))?,
            ),
            MemoryBackend::Anon => None,
        };
        let store = shared.map(|s| s.store_file(group)).transpose()?;
        let console = self.console_file(id)?;
        let mut spare = self.pool.as_ref().and_then(|p| p.take());
        let cgroup = match spare.as_mut().and_then(Spare::take_cgroup) {
            Some(mut cgroup) => {
                // Named as other guests' are, where cgroups can be renamed.
                let _ = cgroup.rename(&format!("guest-{id}"));
                Some(cgroup)
            }
            None => self.cgroups.as_ref().and_then(|parent| {
                MemoryCgroup::create(&format!("guest-{id}"), Some(parent))
                    .map_err(|e| log::warn!("guest {id}: no memory cgroup of its own: {e}"))
                    .ok()
            }),
        };
        let (on_event, on_gone) = (self.this.clone(), self.this.clone());
        let t0 = Instant::now();
        let (process, created) = GuestProcess::spawn(
            setup,
            Descriptors { memory: memory.as_ref(), store, console, tap, vsock: vsock_fd, vsock_dial },
            cgroup.as_ref(),
            spare,
            move |event| {
                if let Some(m) = on_event.upgrade() {
                    m.on_event(id, event);
                }
            },
            move |exit| {
                if let Some(m) = on_gone.upgrade() {
                    m.on_gone(id, exit);
                }
            },
        )?;
        let t1 = Instant::now();
        let registered = match (shared, &memory) {
            (Some(s), Some(memfd)) => match s.add_guest(id, memfd, created.regions, group, process.clone()) {
                Ok(()) => true,
                Err(e) => {
                    process.kill_for(e.message.clone());
                    return Err(e);
                }
            },
            _ => false,
        };
        let t2 = Instant::now();
        if let (true, Some(s), Some(dir)) = (adopt_memory, shared, &config.restore) {
            if let Err(e) = s.adopt_snapshot(id, dir) {
                // Its memory is incomplete: it must never run.
                process.kill_for(e.message.clone());
                process.exits_within(Duration::from_secs(10));
                s.remove_guest(id);
                return Err(e);
            }
        }
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
        let t3 = Instant::now();
        let stages: Vec<String> = created.stages.iter().map(|(name, ms)| format!("{name} {ms:.1}")).collect();
        log::debug!(
            "guest {id}: its {} set up in {:.1} ms ({} ms), registered for sharing in {:.1} ms, memory adopted \
             in {:.1} ms",
            if created.pooled { "pooled process" } else { "process" },
            ms(t0, t1),
            stages.join(", "),
            ms(t1, t2),
            ms(t2, t3)
        );
        let mut g = self.lock();
        let entry = g.map.get_mut(&id).expect("a guest being made stays listed");
        if entry.state == GuestState::Ended {
            // Its process is gone already.
            let why = entry.end.as_ref().map(|e| e.to_string()).unwrap_or_default();
            drop(g);
            if let (true, Some(s)) = (registered, shared) {
                s.remove_guest(id);
            }
            return Err(Error::host(format!("its process ended while it was set up: {why}")));
        }
        entry.process = Some(process);
        entry.shared = registered;
        entry.memory = memory;
        entry.cgroup = cgroup;
        entry.protection = created.protection;
        entry.vsock_socket = vsock_file;
        entry.jail = jail;
        entry.timings.made_ms = Some(entry.ms_since_request(crate::proc::monotonic_ns()));
        entry.made = true;
        drop(g);
        self.changed.notify_all();
        Ok(())
    }

    /// Where guest `id`'s console goes: our stdout for the one guest of a
    /// run, else its log file.
    fn console_file(&self, id: usize) -> Result<File> {
        if self.config.console_to_terminal {
            // SAFETY: dup of our own stdout; the new descriptor is ours.
            let fd = unsafe { libc::dup(libc::STDOUT_FILENO) };
            if fd >= 0 {
                // SAFETY: as above.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
        let path = console_path(&self.consoles.path, id);
        // Readable too: at its cap the guest process moves its newest half
        // to its start (guest/devices/console.rs).
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::host(format!("cannot create {}: {e}", path.display())))
    }

    fn on_event(&self, id: usize, event: Event) {
        let mut g = self.lock();
        let Some(entry) = g.map.get_mut(&id) else { return };
        match event {
            Event::Ready => {}
            Event::Mismatches(n) => entry.corrupted_pages = n,
            Event::Rounds(n) => {
                entry.rounds_verified = n;
                if n >= 1 && entry.timings.first_round_ms.is_none() {
                    entry.timings.first_round_ms = Some(entry.ms_since_request(crate::proc::monotonic_ns()));
                }
            }
            Event::FirstEntry(ns) => entry.timings.first_instruction_ms = Some(entry.ms_since_request(ns)),
            Event::Gaps(gaps) => entry.gaps = gaps,
            Event::Kvm(counters) => entry.kvm = counters,
            Event::Balloon(status) => entry.balloon = Some(status),
            Event::Ended { end, console } => {
                entry.reported_end = Some(end);
                entry.console_tail = console;
            }
        }
    }

    /// The guest's process has exited: its pages leave page sharing (its
    /// mappings are gone now), and the guest is ended with its reason.
    fn on_gone(&self, id: usize, exit: Exit) {
        let shared = self.lock().map.get_mut(&id).is_some_and(|e| std::mem::take(&mut e.shared));
        if let (true, Some(s)) = (shared, &self.sharing) {
            s.remove_guest(id);
        }
        let mut g = self.lock();
        let Some(entry) = g.map.get_mut(&id) else { return };
        let oom = entry.cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0);
        let killed_for = entry.process.as_ref().and_then(|p| p.killed_for());
        // Nobody here sent it: the OOM killer (not always counted in the
        // guest's own cgroup when the limit is an ancestor's), or a person.
        entry.killed_from_outside = exit.sigkilled() && killed_for.is_none() && entry.reported_end.is_none();
        let end = match (entry.reported_end.take(), killed_for) {
            (Some(end), _) => end,
            (None, Some(why)) => GuestEnd::ProcessEnded(why),
            (None, None) => GuestEnd::ProcessEnded(exit.reason(oom)),
        };
        // A memtest guest that had reported corrupted pages failed, however
        // its process ended.
        let end = match end {
            GuestEnd::ProcessEnded(why) if entry.corrupted_pages > 0 => {
                GuestEnd::ProcessEnded(format!("{why}, after reporting {} corrupted pages", entry.corrupted_pages))
            }
            end => end,
        };
        entry.end = Some(end);
        entry.state = GuestState::Ended;
        entry.let_go();
        entry.process = None;
        entry.memory = None;
        entry.cgroup = None;
        entry.vsock_socket = None;
        drop(g);
        self.changed.notify_all();
    }

    pub fn list(&self) -> Vec<GuestInfo> {
        let ids: Vec<usize> = self.lock().map.iter().filter(|(_, e)| e.made).map(|(&id, _)| id).collect();
        ids.into_iter().filter_map(|id| self.get(id).ok()).collect()
    }

    pub fn get(&self, id: usize) -> Result<GuestInfo> {
        let stats = self.sharing.as_ref().and_then(|s| s.guest_stats(id));
        let g = self.lock();
        let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
        let process = entry.process.as_ref();
        Ok(GuestInfo {
            id,
            state: entry.state,
            spec: entry.config.clone(),
            end: entry.end.as_ref().map(|e| e.to_string()),
            clean: entry.end.as_ref().map(GuestEnd::is_clean),
            pid: process.map(|p| p.pid),
            memory_bytes: process.and_then(|p| {
                entry.cgroup.as_ref().and_then(MemoryCgroup::usage).or_else(|| crate::proc::pss_bytes(p.pid))
            }),
            ram_bytes: process
                .zip(entry.memory.as_ref())
                .and_then(|(p, memfd)| Some(crate::proc::file_bytes(memfd)? + crate::proc::anon_bytes(p.pid)?)),
            corrupted_pages: entry.corrupted_pages,
            rounds_verified: entry.rounds_verified,
            throttled: entry.throttled_since.is_some(),
            throttled_ms: entry.throttled().as_millis() as u64,
            merge_protection: entry.protection.clone(),
            jail: entry.jail,
            unresponsive: process.and_then(|p| p.unresponsive()),
            boot_entry: entry.boot_entry.clone(),
            sharing: stats.as_ref().filter(|_| entry.shared).map(GuestSharing::from),
            kvm: entry.kvm,
            balloon: entry
                .config
                .balloon
                .as_ref()
                .map(|_| entry.balloon.as_ref().map(BalloonInfo::from).unwrap_or_default()),
            timings: entry.timings.clone(),
        })
    }

    /// The guest's process, if `id` is in one of `from`; sets `to` after
    /// `f` succeeds on it.
    fn transition(
        &self,
        id: usize,
        verb: &str,
        from: &[GuestState],
        to: GuestState,
        f: impl FnOnce(&GuestProcess) -> Result<()>,
    ) -> Result<GuestInfo> {
        let process = {
            let g = self.lock();
            let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
            if !from.contains(&entry.state) {
                return Err(Error::conflict(
                    format!("cannot {verb} guest {id}: it is {:?}", entry.state).to_lowercase(),
                ));
            }
            entry.process.clone().ok_or_else(|| Error::conflict(format!("guest {id} has ended")))?
        };
        // The lock is not held while the guest's process answers.
        f(&process)?;
        {
            let mut g = self.lock();
            if let Some(entry) = g.map.get_mut(&id).filter(|e| e.state != GuestState::Ended) {
                entry.state = to;
            }
        }
        self.changed.notify_all();
        self.get(id)
    }

    fn ask(process: &GuestProcess, request: Request) -> Result<()> {
        process.request(&request, &[]).map(drop).inspect_err(|e| {
            if e.kind == crate::error::Kind::Host {
                // Its channel is broken: it cannot be controlled any more.
                process.kill_for(e.message.clone());
            }
        })
    }

    /// Starts a guest; one that does not fit beside what the others may
    /// still fill starts held by the memory governor, which lets it go
    /// with the guests it holds (waves, for guests started through the
    /// API).
    pub fn start(&self, id: usize) -> Result<GuestInfo> {
        let size = self.lock().map.get(&id).filter(|e| e.made).map(|e| e.config.memory_bytes());
        let hold = match (&self.governed, size) {
            (Some(g), Some(size)) => !g.admits(size),
            _ => false,
        };
        self.start_held(id, hold)
    }

    /// Starts a guest `wait_for_room` has let in.
    pub fn start_admitted(&self, id: usize) -> Result<GuestInfo> {
        self.start_held(id, false)
    }

    fn start_held(&self, id: usize, hold: bool) -> Result<GuestInfo> {
        self.transition(id, "start", &[GuestState::Created], GuestState::Running, |p| {
            if hold {
                Self::ask(p, Request::Throttle(true))?;
            }
            let started = Self::ask(p, Request::Start);
            if started.is_err() && hold {
                let _ = Self::ask(p, Request::Throttle(false));
            }
            started
        })?;
        if let (true, Some(g)) = (hold, &self.governed) {
            g.governor.lock().unwrap().hold(id);
            if let Some(entry) = self.lock().map.get_mut(&id) {
                entry.hold();
            }
        }
        self.get(id)
    }

    /// Asks guest `id` to hold `mib` MiB in its balloon (0: take it all
    /// back). Refused for a guest without a balloon, one whose driver has
    /// not started, and more than the guest has.
    pub fn set_balloon(&self, id: usize, mib: u64) -> Result<GuestInfo> {
        let process = {
            let g = self.lock();
            let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
            if entry.config.balloon.is_none() {
                return Err(Error::conflict(format!(
                    "guest {id} has no balloon: create it with --balloon (\"balloon\": {{}} in POST /guests)"
                )));
            }
            if mib > entry.config.memory_mib {
                return Err(Error::bad_input(format!(
                    "a balloon of {mib} MiB is more than guest {id}'s {} MiB",
                    entry.config.memory_mib
                )));
            }
            entry.process.clone().ok_or_else(|| Error::conflict(format!("guest {id} has ended")))?
        };
        let pages = (mib * MIB / crate::protocol::BALLOON_PAGE) as u32;
        Self::ask(&process, Request::Balloon(pages))
            .map_err(|e| Error { message: format!("guest {id}: {}", e.message), ..e })?;
        // Its process says so too, at its next event; the reply says it now.
        if let Some(entry) = self.lock().map.get_mut(&id) {
            entry.balloon.get_or_insert_default().target_pages = pages;
        }
        self.get(id)
    }

    pub fn pause(&self, id: usize) -> Result<GuestInfo> {
        self.transition(id, "pause", &[GuestState::Running], GuestState::Paused, |p| Self::ask(p, Request::Pause))
    }

    pub fn resume(&self, id: usize) -> Result<GuestInfo> {
        self.transition(id, "resume", &[GuestState::Paused], GuestState::Running, |p| Self::ask(p, Request::Resume))
    }

    /// Asks a guest to end for `reason`; does not wait.
    fn send_stop(&self, id: usize, reason: GuestEnd) -> Result<()> {
        let process = {
            let g = self.lock();
            let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
            match &entry.process {
                Some(p) => p.clone(),
                None => return Ok(()),
            }
        };
        if let Err(e) = Self::ask(&process, Request::Stop(reason)) {
            process.kill_for(match e.kind {
                crate::error::Kind::Unresponsive => "it was stopped by a signal when asked to end".into(),
                _ => "it did not answer a stop request".into(),
            });
        }
        Ok(())
    }

    /// Waits until guest `id` has ended, up to `limit`; false if it has not.
    fn wait_ended(&self, id: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.lock();
        loop {
            match g.map.get(&id) {
                None => return true,
                Some(e) if e.state == GuestState::Ended => return true,
                Some(_) => {}
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return false };
            g = self.changed.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Stops a guest and waits until it has ended; one that does not end
    /// within 10 s is killed.
    pub fn stop(&self, id: usize) -> Result<GuestInfo> {
        self.stop_with(id, GuestEnd::Stopped)?;
        self.get(id)
    }

    fn stop_with(&self, id: usize, reason: GuestEnd) -> Result<()> {
        {
            let g = self.lock();
            let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
            if entry.state == GuestState::Ended {
                return Err(Error::conflict(format!("cannot stop guest {id}: it has ended")));
            }
        }
        self.send_stop(id, reason)?;
        self.finish_stopping(id);
        Ok(())
    }

    fn finish_stopping(&self, id: usize) {
        if self.wait_ended(id, Duration::from_secs(10)) {
            return;
        }
        if let Some(p) = self.lock().map.get(&id).and_then(|e| e.process.clone()) {
            p.kill_for("it did not stop within 10 s".into());
        }
        self.wait_ended(id, Duration::from_secs(10));
    }

    /// Stops the guest if it runs, then forgets it.
    pub fn delete(&self, id: usize) -> Result<()> {
        let ended = self.get(id)?.state == GuestState::Ended;
        if !ended {
            self.stop_with(id, GuestEnd::Stopped)?;
        }
        // Its overlay, unless kept, went when its process opened it.
        self.lock().map.remove(&id).ok_or_else(|| not_found(id))?;
        self.changed.notify_all();
        Ok(())
    }

    /// The guest's console: live while it runs, as it ended after.
    pub fn console(&self, id: usize) -> Result<String> {
        let (process, tail) = {
            let g = self.lock();
            let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
            (entry.process.clone(), entry.console_tail.clone())
        };
        let Some(process) = process else { return Ok(tail) };
        match process.request(&Request::Console, &[]) {
            Ok((Reply::Console(text), _)) => Ok(text),
            // It is ending: its last words come with its end.
            Err(_) if process.has_exited() => {
                Ok(self.lock().map.get(&id).map(|e| e.console_tail.clone()).unwrap_or(tail))
            }
            Err(e) => Err(e),
            Ok((other, _)) => Err(Error::host(format!("guest {id} answered {other:?} for its console"))),
        }
    }

    pub fn merge_now(&self, id: usize) -> Result<GuestInfo> {
        let sharing = self.sharing.as_ref().ok_or_else(|| Error::conflict("page sharing is off"))?;
        let (shared, process) = {
            let g = self.lock();
            let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
            if entry.state == GuestState::Ended {
                return Err(Error::conflict(format!("guest {id} has ended")));
            }
            if entry.config.dedup_opt_out {
                return Err(Error::conflict(format!("guest {id} opted out of page sharing")));
            }
            (entry.shared, entry.process.clone())
        };
        if !shared {
            return Err(Error::conflict(format!("guest {id} does not share pages")));
        }
        if let Some(why) = process.as_ref().and_then(|p| p.unresponsive()) {
            return Err(Error::new(crate::error::Kind::Unresponsive, format!("cannot merge guest {id}: {why}")));
        }
        sharing.merge_now(id)?;
        self.get(id)
    }

    /// Writes paused guest `id` to `dir`, a new or empty directory (made
    /// here; removed again if the snapshot fails). Returns the directory,
    /// absolute, and what was written.
    pub fn snapshot(&self, id: usize, dir: &Path) -> Result<(PathBuf, crate::snapshot::Written)> {
        let (process, memory_mib, has_disk) = {
            let g = self.lock();
            let entry = g.map.get(&id).filter(|e| e.made).ok_or_else(|| not_found(id))?;
            if entry.state != GuestState::Paused {
                return Err(Error::conflict(format!(
                    "guest {id} is {}: pause it before taking a snapshot",
                    serde_json::to_value(entry.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                )));
            }
            (
                entry.process.clone().ok_or_else(|| Error::conflict(format!("guest {id} has ended")))?,
                entry.config.memory_mib,
                entry.config.disk.is_some(),
            )
        };
        let dir = super::snapshot_dir::prepare(dir)?;
        let files = crate::snapshot::SnapshotFiles::create(&dir, has_disk)
            .map_err(|e| Error::host(format!("cannot make the snapshot's files in {}: {e}", dir.display())));
        // Writing runs at disk speed: allow for a slow disk (16 MiB/s).
        let limit = Duration::from_secs(60 + memory_mib / 16);
        let result = files
            .and_then(|files| process.request_with_files(&Request::Snapshot, &files.descriptors(), limit))
            .and_then(|reply| match reply {
                (Reply::Snapshotted(written), _) => super::snapshot_dir::finish(&dir)
                    .map(|()| (dir.clone(), written))
                    .map_err(|e| Error::host(format!("cannot finish the snapshot in {}: {e}", dir.display()))),
                (other, _) => Err(Error::host(format!("guest {id} answered {other:?} to a snapshot"))),
            });
        if result.is_err() {
            super::snapshot_dir::discard(&dir);
        }
        result
    }

    /// Waits until something about the guests changes, or `limit` passes.
    pub fn wait_for_change(&self, limit: Duration) {
        let g = self.lock();
        let _ = self.changed.wait_timeout(g, limit);
    }

    /// Ends every guest still running, all at once, for `reason`, and
    /// waits for them.
    pub fn stop_all(&self, reason: GuestEnd) {
        let ids: Vec<usize> =
            self.lock().map.iter().filter(|(_, e)| e.made && e.state != GuestState::Ended).map(|(&id, _)| id).collect();
        for &id in &ids {
            let _ = self.send_stop(id, reason.clone());
        }
        for id in ids {
            self.finish_stopping(id);
        }
    }

    /// Lays the memory of the snapshot `config` restores out for its
    /// clones before the first is made, where clones adopt it (page
    /// sharing on, memfd memory): no clone then reads the snapshot. How
    /// long that took, if it was done.
    pub fn lay_out_snapshot(&self, config: &GuestConfig) -> Result<Option<Duration>> {
        let shared = self.sharing.as_ref().filter(|_| !config.dedup_opt_out);
        let (Some(s), Some(dir), MemoryBackend::Memfd) = (shared, &config.restore, self.config.backend) else {
            return Ok(None);
        };
        let t = Instant::now();
        s.lay_out_snapshot(dir, config.merge_group.unwrap_or(0))?;
        Ok(Some(t.elapsed()))
    }

    /// Waits up to `limit` for the guest process pool to be full; how long
    /// that took, if there is a pool and it filled.
    pub fn wait_for_pool(&self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        self.pool.as_ref().filter(|p| p.wait_full(limit)).map(|_| t.elapsed())
    }

    /// What the guest process pool holds now, if there is one.
    pub fn pool(&self) -> Option<crate::supervisor::pool::PoolStatus> {
        self.pool.as_ref().map(|p| p.status())
    }

    /// How each guest ended so far, by id (`None`: not yet).
    pub fn ends(&self) -> BTreeMap<usize, Option<GuestEnd>> {
        self.lock().map.iter().filter(|(_, e)| e.made).map(|(&id, e)| (id, e.end.clone())).collect()
    }

    /// Guests not yet ended.
    pub fn live(&self) -> usize {
        self.lock().map.values().filter(|e| e.made && e.state != GuestState::Ended).count()
    }

    /// How long pages took in every guest so far (memtest guests).
    pub fn gaps(&self) -> crate::gaps::Gaps {
        let mut all = crate::gaps::Gaps::default();
        for e in self.lock().map.values() {
            all.add(&e.gaps);
        }
        all
    }

    /// What the guests have cost KVM, ended ones included.
    pub fn kvm_counters(&self) -> KvmCounters {
        let mut all = KvmCounters::default();
        for e in self.lock().map.values() {
            all.add(&e.kvm);
        }
        all
    }

    /// Guests that have verified at least one round of memtest, and the
    /// rounds verified over all guests.
    pub fn verified(&self) -> (usize, u64) {
        let g = self.lock();
        let made = g.map.values().filter(|e| e.made);
        made.fold((0, 0), |(guests, rounds), e| {
            (guests + usize::from(e.rounds_verified > 0), rounds + e.rounds_verified)
        })
    }

    /// Corrupted pages over every guest, and guests that failed or
    /// reported any (for the stats file).
    pub fn failures(&self) -> (u64, usize) {
        let g = self.lock();
        let corrupted = g.map.values().map(|e| e.corrupted_pages).sum();
        let failed = g.map.values().filter(|e| e.corrupted_pages > 0 || e.end.as_ref().is_some_and(|e| !e.is_clean()));
        (corrupted, failed.count())
    }
}

impl Drop for Manager {
    /// No guest outlives the supervisor's manager (they would die with the
    /// process anyway; this ends them before their directories go).
    fn drop(&mut self) {
        for entry in self.guests.get_mut().unwrap_or_else(|e| e.into_inner()).map.values() {
            if let Some(p) = &entry.process {
                p.kill();
            }
        }
        if let Some(pool) = &self.pool {
            pool.stop();
        }
    }
}

fn not_found(id: usize) -> Error {
    Error::not_found(format!("no guest {id}"))
}

pub fn console_path(dir: &Path, id: usize) -> PathBuf {
    dir.join(format!("guest-{id}.log"))
}

/// A new directory in the temp dir, named `prefix` and a random suffix.
pub fn fresh_temp_dir(prefix: &str) -> Result<PathBuf> {
    let template = std::env::temp_dir().join(format!("{prefix}-XXXXXX"));
    let mut bytes = template.into_os_string().into_encoded_bytes();
    bytes.push(0);
    // SAFETY: `bytes` is a writable NUL-terminated template, as mkdtemp needs.
    let ptr = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if ptr.is_null() {
        return Err(Error::host(format!("cannot create a {prefix} directory: {}", std::io::Error::last_os_error())));
    }
    bytes.pop();
    // SAFETY: mkdtemp only replaced the X's with ASCII characters.
    Ok(PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(bytes) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_fresh() {
        let a = fresh_temp_dir("vmm-test").unwrap();
        let b = fresh_temp_dir("vmm-test").unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        std::fs::remove_dir(a).unwrap();
        std::fs::remove_dir(b).unwrap();
    }
}
