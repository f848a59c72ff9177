//! The scanner's decisions and the bookkeeping of merged pages. See the
//! crate documentation for the algorithm, [`crate::agent`] for the merge
//! step and docs/dedup.md for why a merge cannot lose a write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::agent::{GuestAgent, MergeOutcome, Protection, MAP_COUNT_MARGIN};
use crate::churn::{self, Heat, Tick, Why};
use crate::layout::{bit, set_bits, Layout, Region, Target};
use crate::os::{self, PageMap, PageMapEntry, PAGE_SIZE};
use crate::stats::{GuestStats, StallTimes, Stats};
use crate::store::{FrameId, GroupId, StableStore};

pub type GuestId = u32;

/// What the engine needs to share one guest's pages.
pub struct GuestMemory {
    /// The memfd behind every region; the engine maps it read-only to scan.
    pub memfd: File,
    /// The guest's RAM in the process that runs it.
    pub regions: Vec<Region>,
    pub group: GroupId,
    /// That process: its pagemap shows copy-on-write breaks, and a page it
    /// copied on write is read from it (the memfd no longer holds it).
    pub pid: u32,
    pub agent: Box<dyn GuestAgent>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Pages looked at per `scan` call.
    pub pages_to_scan: usize,
    /// Most guest pages one frame may serve (KSM's max_page_sharing).
    pub max_page_sharing: u32,
    /// Map zero pages to the kernel's zero page.
    pub zero_pages: bool,
    /// Merges queued for a guest before they are made.
    pub batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { pages_to_scan: 4096, max_page_sharing: 256, zero_pages: true, batch: 8192 }
    }
}

/// A page's sharing state, packed in a u32: a frame id, or one of these.
const UNMERGED: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
/// Waiting in the guest's merge queue (so a second look cannot queue it twice).
const QUEUED: u32 = u32::MAX - 2;

/// Kernel memory one mapping costs (a VMA and its share of the tree), for
/// `general_profit`: merging makes mappings, as KSM makes rmap items.
const MAPPING_BYTES: u64 = 256;

struct Guest {
    layout: Layout,
    group: GroupId,
    pid: u32,
    /// The engine's read-only mapping of the guest's memfd.
    view: *mut u8,
    view_len: usize,
    pagemap: PageMap,
    agent: Box<dyn GuestAgent>,
    state: Vec<u32>,
    /// Pages whose content lives in the guest process's private memory (a
    /// copy-on-write copy), not in the memfd.
    private: Vec<u64>,
    /// Content hash at the last look (0: unknown). Without a dirty log, a
    /// changed hash means the page is volatile and not worth merging yet.
    /// With one, a page not written since keeps its hash, so a pass need not
    /// read it again unless the hash matches something.
    last_hash: Vec<u64>,
    /// Pages written during the previous pass, from the dirty log.
    dirty: Vec<u64>,
    /// Pages whose dirty log the last status did not watch again (they
    /// were held): their next bit says nothing.
    unwatched: Vec<u64>,
    has_dirty_log: bool,
    /// How much each page has been caught changing (crate::churn).
    heat: Heat,
    /// Too close to its process's vm.max_map_count to merge more.
    at_map_limit: bool,
    /// Mappings its process had when it was added.
    base_mappings: Option<u64>,
    stats: GuestStats,
}

impl Guest {
    fn is_private(&self, page: usize) -> bool {
        bit(&self.private, page)
    }

    fn set_private(&mut self, page: usize, on: bool) {
        set_bits(&mut self.private, page, 1, on);
    }

    fn written_last_pass(&self, page: usize) -> bool {
        bit(&self.dirty, page)
    }

    fn lost(&self) -> bool {
        self.stats.lost.is_some()
    }

    /// Copies a page that its guest may be writing meanwhile. A stale copy
    /// only ever leads to a failed compare in the merge step.
    fn read_page(&self, page: usize, out: &mut [u8]) -> io::Result<()> {
        if self.is_private(page) {
            return os::read_remote(self.pid, self.layout.host(page), out);
        }
        // SAFETY: the view covers the memfd up to `view_len`, which holds
        // every region; a resident memfd page reads without allocating.
        unsafe { os::copy_page_racy(self.view.add(self.layout.file_offset(page) as usize), out) };
        Ok(())
    }

    /// mincore over `n` pages from `page` (all in one region) of the memfd.
    fn memfd_residency(&self, page: usize, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        // SAFETY: inside the view (see read_page).
        os::resident(unsafe { self.view.add(self.layout.file_offset(page) as usize) }, n * PAGE_SIZE, out)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the view was mapped in `add_guest` and only this guest uses it.
        unsafe { os::unmap(self.view, self.view_len) };
    }
}

/// A guest ready to be inserted into the engine ([`Engine::prepare`]).
pub struct PreparedGuest(Guest);

// SAFETY: as for the engine: the view is a mapping the guest owns.
unsafe impl Send for PreparedGuest {}

/// The engine's books checked against each other (tests, the soak).
#[derive(Clone, Debug, PartialEq)]
pub struct Audit {
    /// Frames the stores hold.
    pub live_frames: u64,
    /// Frames some guest page maps or a queued merge is for.
    pub referenced_frames: u64,
    /// Frames nobody maps or will map: must be 0.
    pub leaked_frames: u64,
    /// Memory the stores' files hold, in pages.
    pub store_pages: u64,
}

/// The in-VMM samepage merging engine.
pub struct Engine {
    config: Config,
    stores: HashMap<GroupId, StableStore>,
    guests: BTreeMap<GuestId, Guest>,
    next_guest: GuestId,
    /// Pages seen once this pass, by (group, hash): KSM's unstable tree.
    unstable: HashMap<(GroupId, u64), (GuestId, usize)>,
    /// Merges waiting to be made, per guest.
    pending: BTreeMap<GuestId, Vec<(u32, Target)>>,
    cursor: (GuestId, usize),
    stats: Stats,
    stalls: StallTimes,
    scratch: Box<[u8]>,
    scratch_other: Box<[u8]>,
    /// mincore's answer for the pages being looked at.
    residency: Vec<u8>,
    /// Where recent snapshots' pages were placed, oldest first (`adopt`).
    placements: Vec<Placement>,
    /// The engine's clock (crate::churn), read at each step.
    started: Instant,
    clock_offset: Duration,
    now: Tick,
    /// When the last pass ended, and the time between the last two passes.
    last_pass_end: Tick,
    look_interval: Tick,
}

/// Where one snapshot's pages were laid out (`Engine::lay_out`). Its
/// frames are pinned (one reservation each) while it is kept, so they stay
/// what they were however the clones write: each clone maps them without
/// reading the snapshot. Kept while its group has guests (or until one
/// has come and gone, for a placement laid out before any).
struct Placement {
    key: u64,
    group: GroupId,
    /// The guest's size in pages.
    pages: usize,
    zero_pages: bool,
    /// (page, target, content hash, frame generation), in page order.
    entries: Vec<(u32, Target, u64, u64)>,
}

impl Placement {
    /// Whether a clone `guest` can take it now: a guest of its group, size
    /// and zero-page setting with nothing merged yet, and every frame
    /// still the generation it was (frames never change while live, so the
    /// content is what it was) with room for another user.
    fn fits(&self, guest: &Guest, store: &StableStore, zero_pages: bool, max_users: u32) -> bool {
        self.is_for(guest.group, guest.state.len(), zero_pages)
            && guest.state.iter().all(|&s| s == UNMERGED)
            && self.holds(store, max_users)
    }

    /// Whether it was laid out for guests of `pages` pages in `group`,
    /// with zero pages on or off as `zero_pages` says.
    fn is_for(&self, group: GroupId, pages: usize, zero_pages: bool) -> bool {
        self.group == group && self.pages == pages && self.zero_pages == zero_pages
    }

    /// Whether every frame is still the generation it was, with room for
    /// another user.
    fn holds(&self, store: &StableStore, max_users: u32) -> bool {
        self.entries.iter().all(|&(_, target, _, generation)| match target {
            Target::Zero => true,
            Target::Frame(f) => store.is_generation(f, generation) && store.has_room(f, max_users),
        })
    }

    /// Queues its pages for `guest` (see `fits`), each frame reserved.
    fn queue_for(&self, guest: &mut Guest, store: &mut StableStore) -> Vec<(u32, Target)> {
        let mut queue = Vec::with_capacity(self.entries.len());
        for &(page, target, hash, _) in &self.entries {
            if let Target::Frame(f) = target {
                store.reserve(f);
                guest.last_hash[page as usize] = hash;
            }
            guest.state[page as usize] = QUEUED;
            queue.push((page, target));
        }
        queue
    }

    /// Its frames, each once.
    fn frames(&self) -> std::collections::BTreeSet<FrameId> {
        self.entries.iter().filter_map(|&(_, t, _, _)| if let Target::Frame(f) = t { Some(f) } else { None }).collect()
    }
}

/// A placement being laid out (`Engine::lay_out`): page `p` goes to
/// frame `base + p` of a block of the store, each frame pinned once.
struct Block<'a> {
    base: FrameId,
    store: &'a mut StableStore,
    entries: Vec<(u32, Target, u64, u64)>,
    zero_pages: bool,
}

/// Zero pages in runs at least this long stay on the zero page in a
/// laid-out placement (free there, for two more mappings); shorter runs
/// get zero frames of the block, so the guest's frames stay one mapping.
const ZERO_RUN_ON_ZERO_PAGE: usize = 64;

impl Block<'_> {
    /// Page `page` of `content` onto its frame.
    fn page(&mut self, page: usize, content: &[u8]) -> io::Result<()> {
        let hash = xxh3_64(content);
        self.frame(page, hash, Some(content))
    }

    /// The zero pages `pages` onto the zero page or zero frames.
    fn zeros(&mut self, pages: std::ops::Range<usize>) -> io::Result<()> {
        let on_zero_page = self.zero_pages && pages.len() >= ZERO_RUN_ON_ZERO_PAGE;
        for page in pages {
            match on_zero_page {
                true => self.entries.push((page as u32, Target::Zero, 0, 0)),
                false => self.frame(page, zero_hash(), None)?,
            }
        }
        Ok(())
    }

    fn frame(&mut self, page: usize, hash: u64, content: Option<&[u8]>) -> io::Result<()> {
        let frame = self.base + page as FrameId;
        self.store.fill_block(frame, hash, content)?;
        self.store.reserve(frame);
        self.entries.push((page as u32, Target::Frame(frame), hash, self.store.generation(frame)));
        Ok(())
    }
}

// SAFETY: the guests' views are mappings owned by the engine; the agents
// are Send; the engine is used by one thread at a time.
unsafe impl Send for Engine {}

/// What the engine says of a guest whose process has exited.
const GONE: &str = "its process has exited";

/// Whether an error reading a guest's process says the process is gone.
fn process_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof || e.raw_os_error() == Some(libc::ESRCH)
}

/// The zero page's content hash, computed once.
fn zero_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| xxh3_64(&[0; PAGE_SIZE]))
}

/// Pages a scan step looks at between checks for a thread waiting for the
/// engine (`Engine::scan_giving_way`): a few milliseconds of work.
pub const SCAN_STRETCH: usize = 2048;

impl Engine {
    pub fn new(config: Config) -> Self {
        Engine {
            config,
            stores: HashMap::new(),
            guests: BTreeMap::new(),
            next_guest: 0,
            unstable: HashMap::new(),
            pending: BTreeMap::new(),
            cursor: (0, 0),
            stats: Stats::default(),
            stalls: StallTimes::default(),
            scratch: vec![0; PAGE_SIZE].into_boxed_slice(),
            scratch_other: vec![0; PAGE_SIZE].into_boxed_slice(),
            residency: Vec::new(),
            placements: Vec::new(),
            started: Instant::now(),
            clock_offset: Duration::ZERO,
            now: churn::tick(Duration::ZERO),
            last_pass_end: churn::tick(Duration::ZERO),
            look_interval: 0,
        }
    }

    fn read_clock(&mut self) -> Tick {
        self.now = churn::tick(self.started.elapsed() + self.clock_offset);
        self.now
    }

    /// Moves the engine's clock on by `by`, as if that much time had passed
    /// (tests of how long pages are held).
    pub fn advance_clock(&mut self, by: Duration) {
        self.clock_offset += by;
        self.read_clock();
    }

    /// A page that changed now: held for a while if it keeps changing.
    fn changed(&mut self, id: GuestId, page: usize, why: Why) {
        let unit = churn::unit(self.look_interval);
        let guest = self.guests.get_mut(&id).unwrap();
        if guest.heat.changed(page, self.now, unit) > 0 {
            guest.stats.held.count(why);
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn set_config(&mut self, config: Config) {
        self.config = config;
    }

    fn store(&mut self, group: GroupId) -> io::Result<&mut StableStore> {
        if let std::collections::hash_map::Entry::Vacant(e) = self.stores.entry(group) {
            e.insert(StableStore::new(group)?);
        }
        Ok(self.stores.get_mut(&group).unwrap())
    }

    /// A read-only descriptor of `group`'s stable store, for the merge agent
    /// of a guest in that group (the store is made on first use).
    pub fn store_file(&mut self, group: GroupId) -> io::Result<File> {
        os::reopen_read_only(self.store(group)?.file())
    }

    /// Starts sharing `mem`'s pages under a new id. The memfd must hold
    /// every region.
    pub fn add_guest(&mut self, mem: GuestMemory) -> io::Result<GuestId> {
        while self.guests.contains_key(&self.next_guest) {
            self.next_guest += 1;
        }
        self.add_guest_as(self.next_guest, mem)
    }

    /// Starts sharing `mem`'s pages under the caller's id for the guest.
    pub fn add_guest_as(&mut self, id: GuestId, mem: GuestMemory) -> io::Result<GuestId> {
        let prepared = Engine::prepare(mem)?;
        self.insert(id, prepared).map(|()| id)
    }

    /// The part of adding a guest that needs no engine (its memory mapped
    /// for scanning, its page map opened), so it can be done without
    /// waiting for a scan step.
    pub fn prepare(mem: GuestMemory) -> io::Result<PreparedGuest> {
        let layout = Layout::new(mem.regions).map_err(io::Error::other)?;
        let file_len = mem.memfd.metadata()?.len();
        if layout.file_len() > file_len {
            return Err(io::Error::other(format!("guest regions reach past its memory file ({file_len} bytes)")));
        }
        let pagemap = PageMap::open(mem.pid)?;
        let view = os::map_file(&mem.memfd, file_len as usize, 0, true)?;
        let pages = layout.pages();
        Ok(PreparedGuest(Guest {
            layout,
            group: mem.group,
            pid: mem.pid,
            view,
            view_len: file_len as usize,
            pagemap,
            agent: mem.agent,
            state: vec![UNMERGED; pages],
            private: vec![0; pages.div_ceil(64)],
            last_hash: vec![0; pages],
            dirty: Vec::new(),
            unwatched: Vec::new(),
            has_dirty_log: false,
            heat: Heat::new(pages),
            at_map_limit: false,
            base_mappings: None,
            stats: GuestStats { group: mem.group, ..Default::default() },
        }))
    }

    /// Adds a prepared guest under `id`.
    pub fn insert(&mut self, id: GuestId, guest: PreparedGuest) -> io::Result<()> {
        if self.guests.contains_key(&id) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("guest {id} is shared already")));
        }
        self.store(guest.0.group)?;
        self.guests.insert(id, guest.0);
        Ok(())
    }

    /// Forgets a guest and drops its pages' hold on stable frames. Call once
    /// nothing maps its memory any more (its process has exited), else a
    /// frame it still maps could be freed. Every frame is released even if
    /// some release fails; the first failure is returned.
    pub fn remove_guest(&mut self, id: GuestId) -> io::Result<()> {
        let Some(guest) = self.guests.remove(&id) else { return Ok(()) };
        self.unstable.retain(|_, (g, _)| *g != id);
        let store = self.stores.get_mut(&guest.group).expect("a guest's group has a store");
        let mut first_error = Ok(());
        let mut note = |r: io::Result<()>| {
            if first_error.is_ok() {
                first_error = r;
            }
        };
        for (_, target) in self.pending.remove(&id).unwrap_or_default() {
            if let Target::Frame(f) = target {
                note(store.unreserve(f));
            }
        }
        for &s in &guest.state {
            if s < QUEUED {
                note(store.unmap(s));
            }
        }
        if let Err(e) = &first_error {
            self.count_error(format!("releasing guest {id}'s frames: {e}"));
        }
        // A group without guests keeps no frames, placements' included.
        if !self.guests.values().any(|g| g.group == guest.group) {
            let gone: Vec<Placement> = self.placements.extract_if(.., |p| p.group == guest.group).collect();
            self.unpin(gone);
        }
        first_error
    }

    /// Looks at up to `config.pages_to_scan` pages, continuing where the last
    /// call stopped, and merges what it can; stops early at the end of a
    /// full pass. Returns the pages looked at. Failures are counted in the
    /// stats and never stop the scan.
    pub fn scan(&mut self) -> usize {
        self.scan_giving_way(&|| false)
    }

    /// As [`Engine::scan`], but ends the step early, at the end of a stretch
    /// of [`SCAN_STRETCH`] pages, once `give_way` says another thread waits
    /// for the engine: the rest of the budget is the next step's.
    pub fn scan_giving_way(&mut self, give_way: &dyn Fn() -> bool) -> usize {
        self.read_clock();
        let mut budget = self.config.pages_to_scan.max(1);
        let mut scanned = 0;
        while budget > 0 && !self.guests.is_empty() {
            if scanned > 0 && give_way() {
                break;
            }
            let Some((&id, guest)) = self.guests.range(self.cursor.0..).next() else {
                // A call never runs into the next pass: callers pace by passes.
                self.finish_pass();
                break;
            };
            let pages = guest.layout.pages();
            let start = if id == self.cursor.0 { self.cursor.1.min(pages) } else { 0 };
            let end = pages.min(start + budget.min(SCAN_STRETCH));
            if start == 0 && !self.start_guest_pass(id) {
                // Not answering now: its pages wait for the next pass.
                budget -= 1;
                self.cursor = match id.checked_add(1) {
                    Some(next) => (next, 0),
                    None => (GuestId::MAX, usize::MAX),
                };
                continue;
            }
            self.look_at_range(id, start, end, false);
            budget -= (end - start).max(1).min(budget);
            scanned += end - start;
            self.cursor = match (end == pages, id.checked_add(1)) {
                (true, Some(next)) => (next, 0),
                (true, None) => (GuestId::MAX, usize::MAX),
                (false, _) => (id, end),
            };
        }
        self.stats.pages_scanned += scanned as u64;
        scanned
    }

    /// Merges everything it can in one guest now (SKSM's synchronous merge):
    /// one look at all its pages, each read afresh whatever the dirty log or
    /// a remembered hash says, against every frame and page seen so far.
    /// The dirty log is left for the scanner's pass.
    pub fn merge_now(&mut self, id: GuestId) -> io::Result<()> {
        let guest = self.guests.get(&id).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such guest"))?;
        if let Some(why) = &guest.stats.lost {
            return Err(io::Error::other(format!("page sharing gave this guest up: {why}")));
        }
        let pages = guest.layout.pages();
        self.read_clock();
        self.look_at_range(id, 0, pages, true);
        self.flush_all();
        Ok(())
    }

    /// Makes guest `id`, which has not run yet and whose memory is all
    /// holes, a clone of `pages` ((page, content) in page order; pages left
    /// out are zero): the pages are laid out on a block of new frames of
    /// the guest's group in page order (frame `base + page`), so the
    /// guest's agent maps them in with one mapping per memory region, as if
    /// every page had been merged; zero pages in long runs go onto the zero
    /// page instead (with zero pages on), shorter ones onto zero frames of
    /// the block, holes in the store that hold memory only once read (and
    /// then once for every clone). Returns how many pages were adopted; an
    /// error when any page could not be (the guest's memory is then
    /// incomplete: it must not run).
    ///
    /// `snapshot` names the pages' source for good (a caller's key): the
    /// placement is kept (`lay_out`), and the next clone of it takes it
    /// without reading `pages` at all, as long as it fits (`Placement::fits`);
    /// one that does not is laid out anew. A failed read fails the adoption
    /// (and nothing is kept).
    pub fn adopt(
        &mut self,
        id: GuestId,
        snapshot: Option<u64>,
        pages: impl IntoIterator<Item = io::Result<(usize, Vec<u8>)>>,
    ) -> io::Result<u64> {
        self.read_clock();
        let queue = match snapshot.and_then(|key| self.placement_again(id, key)) {
            Some(queue) => queue,
            None => self.lay_out_for(id, snapshot, pages)?,
        };
        let guest = self.guests.get_mut(&id).expect("placed pages of a listed guest");
        match guest.agent.adopt(&queue) {
            Ok(o) if o.merged.len() == queue.len() => {
                let adopted = o.merged.iter().filter(|&&m| m).count();
                self.book(id, &queue, o);
                if adopted < queue.len() {
                    return Err(io::Error::other(format!("{} of {} pages adopted", adopted, queue.len())));
                }
                Ok(adopted as u64)
            }
            Ok(o) => {
                let why = format!("its agent adopted {} pages of {}", o.merged.len(), queue.len());
                self.book_unknown_and_lose(id, &queue, why.clone());
                Err(io::Error::other(why))
            }
            Err(e) => {
                self.book_unknown_and_lose(id, &queue, format!("its agent failed to adopt a snapshot: {e}"));
                Err(e)
            }
        }
    }

    /// Lays the memory of snapshot `key` out for its clones before any is
    /// made, as `adopt` would for the first (`pages`: the snapshot's, for
    /// guests of `guest_pages` pages in `group`), and keeps the placement,
    /// so that every clone takes it. Nothing is done if a placement of
    /// `key` for such guests is kept already and holds another clone; on an
    /// error nothing is kept.
    pub fn lay_out(
        &mut self,
        key: u64,
        group: GroupId,
        guest_pages: usize,
        pages: impl IntoIterator<Item = io::Result<(usize, Vec<u8>)>>,
    ) -> io::Result<()> {
        if self.holds_placement(key, group, guest_pages) {
            return Ok(());
        }
        self.store(group)?;
        let plan = self.new_placement(key, group, guest_pages, pages)?;
        self.keep(plan);
        Ok(())
    }

    /// Whether a placement of snapshot `key` for guests of `guest_pages`
    /// pages in `group` is kept and holds another clone (`lay_out` would
    /// do nothing).
    pub fn holds_placement(&self, key: u64, group: GroupId, guest_pages: usize) -> bool {
        let Some(store) = self.stores.get(&group) else { return false };
        let (zero_pages, max_users) = (self.config.zero_pages, self.config.max_page_sharing);
        self.placements
            .iter()
            .any(|p| p.key == key && p.is_for(group, guest_pages, zero_pages) && p.holds(store, max_users))
    }

    /// Lays `pages` out for guest `id` (which must have nothing merged) and
    /// queues them for it; the placement is kept for `snapshot`, if named.
    fn lay_out_for(
        &mut self,
        id: GuestId,
        snapshot: Option<u64>,
        pages: impl IntoIterator<Item = io::Result<(usize, Vec<u8>)>>,
    ) -> io::Result<Vec<(u32, Target)>> {
        let guest = self.guests.get(&id).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such guest"))?;
        if guest.state.iter().any(|&s| s != UNMERGED) {
            return Err(io::Error::other("only a guest with nothing merged can adopt a snapshot"));
        }
        let plan = self.new_placement(snapshot.unwrap_or(0), guest.group, guest.state.len(), pages)?;
        let guest = self.guests.get_mut(&id).expect("looked up above");
        let store = self.stores.get_mut(&guest.group).expect("a guest's group has a store");
        let queue = plan.queue_for(guest, store);
        match snapshot {
            Some(_) => self.keep(plan),
            // Its guest's reservations hold the frames now.
            None => self.unpin(vec![plan]),
        }
        Ok(queue)
    }

    /// Lays `pages` out on a new block of frames of `group`'s store, each
    /// frame pinned, as `adopt` describes; on an error nothing stays
    /// reserved.
    fn new_placement(
        &mut self,
        key: u64,
        group: GroupId,
        guest_pages: usize,
        pages: impl IntoIterator<Item = io::Result<(usize, Vec<u8>)>>,
    ) -> io::Result<Placement> {
        let zero_pages = self.config.zero_pages;
        let store = self.stores.get_mut(&group).expect("a group in use has a store");
        let base = store.open_block(guest_pages)?;
        let mut block = Block { base, store, entries: Vec::with_capacity(guest_pages), zero_pages };
        // Pages before `next` are read; those from `zeros_from` on are zero
        // and not yet placed.
        let (mut next, mut zeros_from) = (0, 0);
        let mut failed = None;
        for read in pages {
            let (page, content) = match read {
                Ok(page) => page,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if page < next || page >= guest_pages || content.len() != PAGE_SIZE {
                failed = Some(io::Error::other(format!("page {page} cannot be adopted")));
                break;
            }
            next = page + 1;
            if content.iter().all(|&b| b == 0) {
                continue;
            }
            if let Err(e) = block.zeros(zeros_from..page).and_then(|()| block.page(page, &content)) {
                failed = Some(e);
                break;
            }
            zeros_from = next;
        }
        if failed.is_none() {
            failed = block.zeros(zeros_from..guest_pages).err();
        }
        let Block { store, entries, .. } = block;
        store.close_block(base, guest_pages);
        let plan = Placement { key, group, pages: guest_pages, zero_pages, entries };
        match failed {
            Some(e) => {
                self.unpin(vec![plan]);
                Err(e)
            }
            None => Ok(plan),
        }
    }

    /// The placement kept for snapshot `key`, queued again for guest `id`,
    /// if it fits (`Placement::fits`); None (nothing reserved) otherwise:
    /// the snapshot is then laid out anew.
    fn placement_again(&mut self, id: GuestId, key: u64) -> Option<Vec<(u32, Target)>> {
        let plan = self.placements.iter().find(|p| p.key == key)?;
        let guest = self.guests.get_mut(&id)?;
        let store = self.stores.get_mut(&guest.group)?;
        if !plan.fits(guest, store, self.config.zero_pages, self.config.max_page_sharing) {
            return None;
        }
        Some(plan.queue_for(guest, store))
    }

    /// Keeps `plan` for the next clones of its snapshot, in place of any
    /// kept for it (the last few snapshots are kept).
    fn keep(&mut self, plan: Placement) {
        const KEPT: usize = 4;
        let old: Vec<Placement> = self.placements.extract_if(.., |p| p.key == plan.key).collect();
        self.unpin(old);
        if self.placements.len() == KEPT {
            let oldest = self.placements.remove(0);
            self.unpin(vec![oldest]);
        }
        self.placements.push(plan);
    }

    /// Lets go of placements' frames (each frees with its last user).
    fn unpin(&mut self, placements: Vec<Placement>) {
        let mut failures = Vec::new();
        for plan in placements {
            let Some(store) = self.stores.get_mut(&plan.group) else { continue };
            for f in plan.frames() {
                // A failed punch still forgets the frame: go on with the rest.
                if let Err(e) = store.unreserve(f) {
                    failures.push(format!("releasing a kept placement's frame: {e}"));
                }
            }
        }
        for what in failures {
            self.count_error(what);
        }
    }

    fn count_error(&mut self, what: String) {
        if self.stats.errors == 0 || self.stats.errors.is_power_of_two() {
            log::warn!("page sharing: {what} ({} failures so far; sharing goes on)", self.stats.errors + 1);
        }
        self.stats.errors += 1;
        self.stats.last_error = Some(what);
    }

    /// Stops scanning and merging a guest whose process does not answer or
    /// is gone; its pages keep their frames until it is removed.
    fn lose(&mut self, id: GuestId, why: String) {
        let Some(guest) = self.guests.get_mut(&id) else { return };
        if guest.lost() {
            return;
        }
        if why.contains(GONE) {
            log::info!("page sharing: guest {id} is gone: {why}");
        } else {
            log::warn!("page sharing: giving up guest {id}: {why}");
            self.stats.guests_lost += 1;
        }
        guest.stats.lost = Some(why);
        // Merges not yet sent never happened.
        let store = self.stores.get_mut(&guest.group).expect("a guest's group has a store");
        for (page, target) in self.pending.remove(&id).unwrap_or_default() {
            guest.state[page as usize] = UNMERGED;
            if let Target::Frame(f) = target {
                let _ = store.unreserve(f);
            }
        }
        self.unstable.retain(|_, (g, _)| *g != id);
    }

    fn note_map_limit(&mut self, id: GuestId, limit: u64) {
        let guest = self.guests.get_mut(&id).unwrap();
        if !guest.stats.map_limit_reached {
            log::warn!(
                "page sharing: guest {id}'s process is close to vm.max_map_count ({limit}); it merges no more \
                 until the limit is raised"
            );
        }
        guest.stats.map_limit_reached = true;
        self.stats.map_limit_reached = true;
    }

    /// The agent's news at the start of a pass over one guest: its dirty
    /// log and how close its process is to its mapping limit. False when
    /// its agent cannot answer now: the pass goes on without it.
    fn start_guest_pass(&mut self, id: GuestId) -> bool {
        let guest = self.guests.get_mut(&id).unwrap();
        if guest.lost() {
            return true;
        }
        match guest.agent.status() {
            Ok(status) => {
                guest.has_dirty_log = status.dirty.is_some();
                guest.dirty = status.dirty.unwrap_or_default();
                guest.base_mappings.get_or_insert(status.mappings);
                guest.stats.mappings = status.mappings;
                guest.stats.map_limit = status.map_limit;
                guest.at_map_limit = status.mappings + MAP_COUNT_MARGIN + 64 > status.map_limit;
                if guest.at_map_limit {
                    self.note_map_limit(id, status.map_limit);
                }
                self.forget_discarded(id, &status.discarded);
                self.judge_written(id);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                guest.stats.passes_skipped += 1;
                return false;
            }
            Err(e) if process_gone(&e) => self.lose(id, format!("{GONE}: {e}")),
            Err(e) => self.lose(id, format!("its merge agent did not answer: {e}")),
        }
        true
    }

    /// Pages the guest gave back (a balloon, [`crate::Agent::discard`]):
    /// the memfd holds holes there and the guest's mapping is the memfd's
    /// again. Whatever they were merged with is released, and they are as
    /// pages never written. A page queued for a merge keeps its place in
    /// the queue: the merge compares it again and books what it finds.
    fn forget_discarded(&mut self, id: GuestId, runs: &[(u32, u32)]) {
        let guest = self.guests.get_mut(&id).unwrap();
        let store = self.stores.get_mut(&guest.group).expect("a guest's group has a store");
        let mut release_errors = Vec::new();
        for &(first, n) in runs {
            let (first, pages) = (first as usize, guest.layout.pages());
            for page in first.min(pages)..first.saturating_add(n as usize).min(pages) {
                match guest.state[page] {
                    UNMERGED | QUEUED => {}
                    ZERO => {
                        guest.state[page] = UNMERGED;
                        guest.stats.zero_pages -= 1;
                    }
                    frame => {
                        guest.state[page] = UNMERGED;
                        guest.stats.merged_pages -= 1;
                        if let Err(e) = store.unmap(frame) {
                            release_errors.push(e);
                        }
                    }
                }
                guest.set_private(page, false);
                guest.last_hash[page] = 0;
                guest.stats.discarded_pages += 1;
            }
        }
        for e in release_errors {
            self.count_error(format!("freeing a stable frame: {e}"));
        }
    }

    /// Reads the guest's dirty log the moment it is read: each page written
    /// since it was last watched is a change (crate::churn), unless its bit
    /// says nothing (it was not watched: held then); then every written page
    /// that is not held now is watched again, and the held ones are left
    /// alone, so the guest's writes to them cost it no fault.
    fn judge_written(&mut self, id: GuestId) {
        let guest = self.guests.get_mut(&id).unwrap();
        let (now, pages) = (self.now, guest.layout.pages());
        let mut changed = Vec::new();
        for (w, &word) in guest.dirty.iter().enumerate() {
            let unwatched = guest.unwatched.get(w).copied().unwrap_or(0);
            let mut bits = word & !unwatched;
            while bits != 0 {
                let page = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if page < pages && guest.state[page] == UNMERGED && !guest.heat.is_held(page, now) {
                    guest.last_hash[page] = 0;
                    changed.push(page);
                }
            }
        }
        guest.stats.volatile_this_pass += changed.len() as u64;
        for page in changed {
            self.changed(id, page, Why::Rewritten);
        }
        let guest = self.guests.get_mut(&id).unwrap();
        let (held, n) = guest.heat.held_bitmap(now);
        guest.stats.held.now = n;
        let watch: Vec<u64> =
            guest.dirty.iter().zip(held.iter().chain(std::iter::repeat(&0))).map(|(&d, &h)| d & !h).collect();
        guest.unwatched = guest.dirty.iter().zip(&watch).map(|(&d, &w)| d & !w).collect();
        if guest.has_dirty_log && watch.iter().any(|&w| w != 0) {
            if let Err(e) = guest.agent.watch(&watch) {
                self.count_error(format!("guest {id}: watching its dirty log again: {e}"));
            }
        }
    }

    /// Looks at the guest's pages in `start..end` that have memory behind
    /// them: resident in the memfd, or a private copy in its process. A
    /// page never written is a hole in the memfd: it costs nothing, and
    /// reading it would allocate it.
    fn look_at_range(&mut self, id: GuestId, start: usize, end: usize, fresh: bool) {
        let mut residency = std::mem::take(&mut self.residency);
        let mut page = start;
        while page < end {
            let guest = &self.guests[&id];
            if guest.lost() {
                break;
            }
            let n = guest.layout.pages_left_in_region(page, end - page);
            if let Err(e) = guest.memfd_residency(page, n, &mut residency) {
                self.count_error(format!("guest {id}: mincore: {e}"));
                break;
            }
            for (i, &r) in residency[..n].iter().enumerate() {
                if r & 1 != 0 || self.guests[&id].is_private(page + i) {
                    self.look_at(id, page + i, fresh);
                }
            }
            page += n;
        }
        self.residency = residency;
    }

    /// End of a full pass over every guest: forget the unstable tree (its
    /// entries may be stale) and notice pages whose sharing was broken.
    fn finish_pass(&mut self) {
        self.flush_all();
        self.stats.pages_unshared = self.unstable.len() as u64;
        self.unstable.clear();
        self.stats.pages_volatile = self.guests.values().map(|g| g.stats.volatile_this_pass).sum();
        for g in self.guests.values_mut() {
            g.stats.volatile_this_pass = 0;
        }
        self.collect_cow_breaks();
        self.stats.full_scans += 1;
        self.cursor = (0, 0);
        self.look_interval = self.now.saturating_sub(self.last_pass_end);
        self.last_pass_end = self.now;
        if log::log_enabled!(log::Level::Debug) {
            let mut levels = [0u64; churn::MAX_LEVEL as usize + 1];
            for g in self.guests.values() {
                for p in 0..g.layout.pages() {
                    levels[g.heat.level(p) as usize] += 1;
                }
            }
            log::debug!("page sharing: pages by heat level {levels:?}, look interval {} ticks", self.look_interval);
        }
    }

    fn look_at(&mut self, id: GuestId, page: usize, fresh: bool) {
        let guest = self.guests.get_mut(&id).unwrap();
        if guest.state[page] != UNMERGED || guest.at_map_limit {
            return;
        }
        // A fresh look (a merge on request) takes every page as it is now.
        if !fresh && guest.heat.is_held(page, self.now) {
            return;
        }
        // Written since the last look (judged when the log was read).
        if !fresh && guest.written_last_pass(page) {
            return;
        }
        let group = guest.group;
        // The dirty log says the page has not changed since its hash was
        // taken: reuse the hash, and read the page only if that hash has a
        // match. (The hash only picks candidates; every merge compares bytes.)
        let known = Some(guest.last_hash[page]).filter(|&h| h != 0 && guest.has_dirty_log && !fresh);
        if let Some(hash) = known {
            let maybe_zero = hash == zero_hash() && self.config.zero_pages;
            let in_store = self.stores.get(&group).is_some_and(|s| s.has_hash(hash));
            if !maybe_zero && !in_store && !self.unstable.contains_key(&(group, hash)) {
                self.unstable.insert((group, hash), (id, page));
                return;
            }
        }
        if let Err(e) = guest.read_page(page, &mut self.scratch) {
            if process_gone(&e) {
                self.lose(id, format!("{GONE}: {e}"));
            } else {
                self.count_error(format!("guest {id}: reading a page: {e}"));
            }
            return;
        }
        self.stats.pages_hashed += 1;
        let hash = xxh3_64(&self.scratch);
        let guest = self.guests.get_mut(&id).unwrap();
        let last = std::mem::replace(&mut guest.last_hash[page], hash);
        if !guest.has_dirty_log && !fresh {
            if last == 0 {
                // First look without a dirty log: a page is a candidate only
                // once it has stayed unchanged for a whole pass (a fresh
                // guest is still writing). With a dirty log, not written
                // since the last pass already says so.
                return;
            }
            if last != hash {
                guest.stats.volatile_this_pass += 1;
                self.changed(id, page, Why::Rewritten);
                return;
            }
        }
        if hash == zero_hash() && self.config.zero_pages && self.scratch.iter().all(|&b| b == 0) {
            return self.queue(id, page, Target::Zero);
        }
        let max_users = self.config.max_page_sharing;
        let store = self.stores.get_mut(&group).expect("a guest's group has a store");
        if let Some(frame) = store.find(hash, &self.scratch, max_users) {
            store.reserve(frame);
            return self.queue(id, page, Target::Frame(frame));
        }
        let Some((other_id, other_page)) = self.twin(id, page, group, hash) else {
            self.unstable.insert((group, hash), (id, page));
            return;
        };
        self.unstable.remove(&(group, hash));
        let store = self.stores.get_mut(&group).unwrap();
        let frame = match store.insert(hash, &self.scratch) {
            Ok(f) => f,
            Err(e) => return self.count_error(format!("making a stable frame: {e}")),
        };
        // Both users are reserved now; a failed merge drops its reservation.
        store.reserve(frame);
        store.reserve(frame);
        self.queue(other_id, other_page, Target::Frame(frame));
        self.queue(id, page, Target::Frame(frame));
    }

    /// A page seen earlier this pass with the same content, still unmerged
    /// and in a guest that can still merge.
    fn twin(&mut self, id: GuestId, page: usize, group: GroupId, hash: u64) -> Option<(GuestId, usize)> {
        let (other_id, other_page) = *self.unstable.get(&(group, hash))?;
        if (other_id, other_page) == (id, page) {
            return None;
        }
        let other = self.guests.get(&other_id)?;
        if other.state[other_page] != UNMERGED || other.lost() || other.at_map_limit {
            return None;
        }
        other.read_page(other_page, &mut self.scratch_other).ok()?;
        (self.scratch_other == self.scratch).then_some((other_id, other_page))
    }

    fn queue(&mut self, id: GuestId, page: usize, target: Target) {
        self.guests.get_mut(&id).unwrap().state[page] = QUEUED;
        let q = self.pending.entry(id).or_default();
        q.push((page as u32, target));
        if q.len() >= self.config.batch {
            self.flush(id);
        }
    }

    fn flush_all(&mut self) {
        let ids: Vec<GuestId> = self.pending.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
    }

    /// Sends one guest's queued merges to its agent and books the outcome.
    fn flush(&mut self, id: GuestId) {
        let Some(mut queue) = self.pending.remove(&id) else { return };
        queue.sort_unstable_by_key(|&(page, _)| page);
        let guest = self.guests.get_mut(&id).unwrap();
        let asked = Instant::now();
        let answer = guest.agent.merge(&queue);
        log::debug!("page sharing: guest {id} merged a batch of {} pages in {:?}", queue.len(), asked.elapsed());
        match answer {
            Ok(outcome) if outcome.merged.len() == queue.len() => self.book(id, &queue, outcome),
            // Not asked: none was made.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let none = MergeOutcome { merged: vec![false; queue.len()], ..Default::default() };
                self.book(id, &queue, none);
            }
            answer => {
                let why = match answer {
                    Err(e) if process_gone(&e) => format!("{GONE}: {e}"),
                    Err(e) => format!("its merge agent failed: {e}"),
                    Ok(o) => format!("its merge agent answered {} merges for {}", o.merged.len(), queue.len()),
                };
                self.book_unknown_and_lose(id, &queue, why);
            }
        }
    }

    /// The agent's answer to `queue` is unknown (it failed, or answered
    /// for other pages): nobody knows what it mapped, so every page is
    /// booked as merged (keeping its frame until the guest is removed) and
    /// the guest is given up.
    fn book_unknown_and_lose(&mut self, id: GuestId, queue: &[(u32, Target)], why: String) {
        let all = MergeOutcome { merged: vec![true; queue.len()], ..Default::default() };
        self.book(id, queue, all);
        self.lose(id, why);
    }

    fn book(&mut self, id: GuestId, queue: &[(u32, Target)], outcome: MergeOutcome) {
        let unit = churn::unit(self.look_interval);
        let guest = self.guests.get_mut(&id).unwrap();
        let store = self.stores.get_mut(&guest.group).expect("a guest's group has a store");
        let mut release_errors = Vec::new();
        for (i, (&(page, target), &merged)) in queue.iter().zip(&outcome.merged).enumerate() {
            let page = page as usize;
            if merged {
                guest.heat.merged(page, self.now);
                guest.state[page] = match target {
                    Target::Zero => ZERO,
                    Target::Frame(f) => f,
                };
                guest.set_private(page, false);
                match target {
                    Target::Zero => guest.stats.zero_pages += 1,
                    Target::Frame(f) => {
                        store.reserved_to_mapped(f);
                        guest.stats.merged_pages += 1;
                    }
                }
            } else {
                // Not merged: it changed since it was hashed (or the agent
                // could not map it).
                guest.state[page] = UNMERGED;
                guest.last_hash[page] = 0;
                if outcome.changed.get(i) == Some(&true) && guest.heat.changed(page, self.now, unit) > 0 {
                    guest.stats.held.count(Why::ChangedInMerge);
                }
                if let Target::Frame(f) = target {
                    if let Err(e) = store.unreserve(f) {
                        release_errors.push(e);
                    }
                }
            }
        }
        if outcome.mappings > 0 {
            guest.stats.mappings = outcome.mappings;
            guest.stats.map_limit = outcome.map_limit;
        }
        if outcome.map_limited {
            guest.at_map_limit = true;
            self.note_map_limit(id, outcome.map_limit);
        }
        match outcome.protection {
            Some(Protection::WriteProtect) => self.stats.merges_write_protected += 1,
            Some(Protection::Freeze) => self.stats.merges_frozen += 1,
            None => {}
        }
        for d in outcome.stalls {
            self.stalls.record(d);
        }
        for _ in 1..outcome.errors {
            self.stats.errors += 1;
        }
        if let Some(e) = outcome.first_error {
            self.count_error(format!("guest {id}: {e}"));
        }
        for e in release_errors {
            self.count_error(format!("freeing a stable frame: {e}"));
        }
    }

    /// Finds merged pages that were written since (the kernel copied them on
    /// write, so they no longer map the frame) and releases their frames.
    fn collect_cow_breaks(&mut self) {
        let mut entries = vec![PageMapEntry(0); 512];
        let ids: Vec<GuestId> = self.guests.keys().copied().collect();
        for id in ids {
            match self.collect_guest_breaks(id, &mut entries) {
                Ok(()) => {}
                Err(e) if process_gone(&e) => self.lose(id, format!("{GONE}: {e}")),
                // Breaks not seen now are seen at the end of the next pass.
                Err(e) => self.count_error(format!("guest {id}: reading its page map: {e}")),
            }
        }
    }

    fn collect_guest_breaks(&mut self, id: GuestId, entries: &mut [PageMapEntry]) -> io::Result<()> {
        let unit = churn::unit(self.look_interval);
        let guest = self.guests.get_mut(&id).unwrap();
        if guest.lost() {
            return Ok(());
        }
        let store = self.stores.get_mut(&guest.group).expect("a guest's group has a store");
        let mut page = 0;
        while page < guest.layout.pages() {
            let n = guest.layout.pages_left_in_region(page, entries.len());
            if guest.state[page..page + n].iter().all(|&s| s == UNMERGED || s == QUEUED) {
                page += n;
                continue;
            }
            guest.pagemap.read(guest.layout.host(page), &mut entries[..n])?;
            for (i, e) in entries[..n].iter().enumerate() {
                let s = guest.state[page + i];
                let broken = match s {
                    UNMERGED | QUEUED => false,
                    // A written zero page is an anonymous page of its own.
                    ZERO => (e.present() && e.exclusive()) || (e.swapped() && !e.uffd_wp()),
                    // A written frame page is no longer the file's page.
                    _ => e.private_copy(),
                };
                if !broken {
                    continue;
                }
                guest.state[page + i] = UNMERGED;
                guest.set_private(page + i, true);
                guest.last_hash[page + i] = 0;
                guest.stats.cow_breaks += 1;
                if guest.heat.changed(page + i, self.now, unit) > 0 {
                    guest.stats.held.count(Why::BrokenSoon);
                }
                if s == ZERO {
                    guest.stats.zero_pages -= 1;
                } else {
                    guest.stats.merged_pages -= 1;
                    if let Err(e) = store.unmap(s) {
                        self.stats.errors += 1;
                        self.stats.last_error = Some(format!("freeing a stable frame: {e}"));
                    }
                }
            }
            page += n;
        }
        Ok(())
    }

    /// Counters for everything, like KSM's sysfs files.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.pages_shared = self.stores.values().map(|st| st.mapped_frames() as u64).sum();
        let merged: u64 = self.guests.values().map(|g| g.stats.merged_pages).sum();
        s.pages_sharing = merged.saturating_sub(s.pages_shared);
        s.zero_pages = self.guests.values().map(|g| g.stats.zero_pages).sum();
        s.cow_breaks = self.guests.values().map(|g| g.stats.cow_breaks).sum();
        for g in self.guests.values() {
            s.held.add(&g.stats.held);
        }
        s.mappings_used = self.guests.values().map(|g| g.stats.mappings).sum();
        let made: u64 =
            self.guests.values().map(|g| g.stats.mappings.saturating_sub(g.base_mappings.unwrap_or(0))).sum();
        let metadata = self.stores.values().map(StableStore::metadata_bytes).sum::<usize>()
            + self.guests.values().map(|g| g.layout.pages() * 13).sum::<usize>()
            + self.unstable.capacity() * 24;
        s.general_profit = ((s.pages_sharing + s.zero_pages) * PAGE_SIZE as u64) as i64
            - metadata as i64
            - (made * MAPPING_BYTES) as i64;
        s.stall = self.stalls.summary();
        s
    }

    pub fn guest_stats(&self, id: GuestId) -> Option<GuestStats> {
        self.guests.get(&id).map(|g| g.stats.clone())
    }

    /// Pages of every registered guest: one full pass.
    pub fn total_pages(&self) -> usize {
        self.guests.values().map(|g| g.layout.pages()).sum()
    }

    pub fn guest_ids(&self) -> Vec<GuestId> {
        self.guests.keys().copied().collect()
    }

    /// Recounts the frames guests use and compares with what the stores hold.
    pub fn audit(&self) -> Audit {
        let mut referenced: HashSet<(GroupId, FrameId)> = HashSet::new();
        for g in self.guests.values() {
            referenced.extend(g.state.iter().filter(|&&s| s < QUEUED).map(|&s| (g.group, s)));
        }
        for (id, q) in &self.pending {
            let group = self.guests[id].group;
            referenced.extend(q.iter().filter_map(|&(_, t)| match t {
                Target::Frame(f) => Some((group, f)),
                Target::Zero => None,
            }));
        }
        for plan in &self.placements {
            referenced.extend(plan.frames().into_iter().map(|f| (plan.group, f)));
        }
        let live: u64 = self.stores.values().map(|s| s.live_frames() as u64).sum();
        let store_pages = self
            .stores
            .values()
            .map(|s| {
                // SAFETY: fstat into a zeroed stat buffer of our own.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: as above, on a descriptor the store holds.
                unsafe { libc::fstat(s.file().as_raw_fd(), &mut st) };
                st.st_blocks as u64 * 512 / PAGE_SIZE as u64
            })
            .sum();
        Audit {
            live_frames: live,
            referenced_frames: referenced.len() as u64,
            leaked_frames: live.saturating_sub(referenced.len() as u64),
            store_pages,
        }
    }
}
