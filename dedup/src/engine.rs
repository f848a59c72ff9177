//! The scanner and the merge step. See the crate documentation for the
//! algorithm and docs/dedup.md for why a merge cannot lose a write.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::os::{self, PageMap, PageMapEntry, PAGE_SIZE};
use crate::stats::{FreezeTimes, GuestStats, Stats};
use crate::store::{FrameId, GroupId, StableStore};

pub type GuestId = u32;

/// Stops and restarts everything that can write one guest's memory: its
/// vCPUs and its device threads. `freeze` returns only once none can write.
pub trait Freezer: Send + Sync {
    fn freeze(&self);
    fn thaw(&self);
}

/// Tells which guest pages were written since the last call: KVM's dirty
/// log, cheaper and more exact than comparing checksums.
pub trait DirtyTracker: Send + Sync {
    /// A bitmap over the guest's pages (regions in order, bit i of word
    /// i / 64) of the pages written since the previous call.
    fn take_dirty(&self) -> io::Result<Vec<u64>>;
}

/// A contiguous piece of guest RAM: a `MAP_SHARED` mapping of the guest's
/// memfd at `file_offset`, `len` bytes long at host address `host`.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub host: *mut u8,
    pub len: usize,
    pub file_offset: u64,
}

/// What the engine needs to share one guest's pages.
pub struct GuestMemory {
    /// The memfd behind every region (its frames are punched out on merge).
    pub memfd: File,
    pub regions: Vec<Region>,
    pub group: GroupId,
    pub freezer: Arc<dyn Freezer>,
    /// Without one, volatility is judged by content checksums.
    pub dirty: Option<Arc<dyn DirtyTracker>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Pages looked at per `scan` call.
    pub pages_to_scan: usize,
    /// Most guest pages one frame may serve (KSM's max_page_sharing).
    pub max_page_sharing: u32,
    /// Map zero pages to the kernel's zero page.
    pub zero_pages: bool,
    /// Merges queued for a guest before they are made (in freezes of at
    /// most `freeze_budget` each).
    pub batch: usize,
    /// Stop creating mappings this close to `vm.max_map_count`.
    pub map_count_margin: usize,
    /// Longest a guest stays frozen for merges before it runs again (the
    /// last remap may overrun it); the rest of a batch waits for the next
    /// freeze.
    pub freeze_budget: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pages_to_scan: 4096,
            max_page_sharing: 256,
            zero_pages: true,
            batch: 8192,
            map_count_margin: 4096,
            freeze_budget: Duration::from_millis(20),
        }
    }
}

/// A page's sharing state, packed in a u32: a frame id, or one of these.
const UNMERGED: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Frame(FrameId),
    Zero,
}

struct Guest {
    mem: GuestMemory,
    /// Page index at which each region starts.
    region_start: Vec<usize>,
    pages: usize,
    state: Vec<u32>,
    /// Content hash at the last look (0: unknown). Without a dirty log, a
    /// changed hash means the page is volatile and not worth merging yet.
    /// With one, a page not written since keeps its hash, so a pass need not
    /// read it again unless the hash matches something.
    last_hash: Vec<u64>,
    /// Pages written during the previous pass, from the dirty log.
    dirty: Vec<u64>,
    stats: GuestStats,
}

impl Guest {
    fn locate(&self, page: usize) -> (usize, usize) {
        let r = self.region_start.partition_point(|&s| s <= page) - 1;
        (r, page - self.region_start[r])
    }

    fn host(&self, page: usize) -> *mut u8 {
        let (r, off) = self.locate(page);
        // SAFETY: `off` is inside region `r` by construction of `locate`.
        unsafe { self.mem.regions[r].host.add(off * PAGE_SIZE) }
    }

    fn file_offset(&self, page: usize) -> u64 {
        let (r, off) = self.locate(page);
        self.mem.regions[r].file_offset + (off * PAGE_SIZE) as u64
    }

    /// Reads the dirty log at the start of a pass over this guest.
    fn refresh_dirty(&mut self) -> io::Result<()> {
        if let Some(tracker) = &self.mem.dirty {
            self.dirty = tracker.take_dirty()?;
        }
        Ok(())
    }

    fn written_last_pass(&self, page: usize) -> bool {
        self.dirty.get(page / 64).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Copies a page that its guest may be writing meanwhile. A stale copy
    /// only ever leads to a failed re-compare under the freeze.
    fn copy_page(&self, page: usize, out: &mut [u8]) {
        // SAFETY: the page stays mapped while the guest is registered, and
        // `out` is a page-sized buffer of our own.
        unsafe { std::ptr::copy_nonoverlapping(self.host(page), out.as_mut_ptr(), PAGE_SIZE) };
    }

    /// The page itself; only while the guest is frozen, when nobody writes it.
    fn frozen_content(&self, page: usize) -> &[u8] {
        // SAFETY: mapped while registered; the caller holds the freeze.
        unsafe { std::slice::from_raw_parts(self.host(page), PAGE_SIZE) }
    }
}

/// The in-process samepage merging engine.
pub struct Engine {
    config: Config,
    store: StableStore,
    guests: BTreeMap<GuestId, Guest>,
    next_guest: GuestId,
    /// Pages seen once this pass, by (group, hash): KSM's unstable tree.
    unstable: HashMap<(GroupId, u64), (GuestId, usize)>,
    /// Merges waiting for their guest's next freeze.
    pending: BTreeMap<GuestId, Vec<(usize, Target)>>,
    cursor: (GuestId, usize),
    pagemap: PageMap,
    stats: Stats,
    /// How long each guest was stopped for a merge batch.
    freezes: FreezeTimes,
    /// How long it took its vCPUs to park (they run meanwhile).
    park_waits: FreezeTimes,
    map_limit: usize,
    scratch: Box<[u8]>,
    scratch_other: Box<[u8]>,
    /// mincore's answer for the pages being looked at.
    residency: Vec<u8>,
    /// At least as many mappings as the process has (0: not read yet).
    mappings_bound: u64,
    /// Whether mappings may have changed since `mappings_bound` was read
    /// (a merge, a guest added or removed): reading /proc/self/maps costs
    /// time in proportion to the mappings, so settled passes skip it.
    mappings_changed: bool,
}

// SAFETY: the raw region pointers refer to guest mappings that stay valid
// while their guest is registered; the engine is used by one thread at a time.
unsafe impl Send for Engine {}

fn zero_hash() -> u64 {
    static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    xxh3_64(&ZERO_PAGE)
}

impl Engine {
    pub fn new(config: Config) -> io::Result<Self> {
        Ok(Engine {
            config,
            store: StableStore::new()?,
            guests: BTreeMap::new(),
            next_guest: 0,
            unstable: HashMap::new(),
            pending: BTreeMap::new(),
            cursor: (0, 0),
            pagemap: PageMap::open()?,
            stats: Stats::default(),
            freezes: FreezeTimes::default(),
            park_waits: FreezeTimes::default(),
            map_limit: os::max_map_count().unwrap_or(65530),
            scratch: vec![0; PAGE_SIZE].into_boxed_slice(),
            scratch_other: vec![0; PAGE_SIZE].into_boxed_slice(),
            mappings_bound: 0,
            mappings_changed: true,
            residency: Vec::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn set_config(&mut self, config: Config) {
        self.config = config;
    }

    /// Starts sharing `mem`'s pages. Its regions must stay mapped until
    /// [`Engine::remove_guest`].
    pub fn add_guest(&mut self, mem: GuestMemory) -> GuestId {
        self.mappings_changed = true;
        let mut region_start = Vec::new();
        let mut pages = 0;
        for r in &mem.regions {
            assert!(
                (r.host as usize).is_multiple_of(PAGE_SIZE) && r.len.is_multiple_of(PAGE_SIZE),
                "unaligned guest region"
            );
            region_start.push(pages);
            pages += r.len / PAGE_SIZE;
        }
        let id = self.next_guest;
        self.next_guest += 1;
        let group = mem.group;
        self.guests.insert(
            id,
            Guest {
                mem,
                region_start,
                pages,
                state: vec![UNMERGED; pages],
                last_hash: vec![0; pages],
                dirty: Vec::new(),
                stats: GuestStats { group, ..Default::default() },
            },
        );
        id
    }

    /// Stops sharing a guest's pages and drops its users of stable frames.
    /// Call before its memory is unmapped.
    pub fn remove_guest(&mut self, id: GuestId) -> io::Result<()> {
        self.mappings_changed = true;
        for (_, target) in self.pending.remove(&id).unwrap_or_default() {
            if let Target::Frame(f) = target {
                self.store.drop_user(f)?;
            }
        }
        self.unstable.retain(|_, (g, _)| *g != id);
        if let Some(guest) = self.guests.remove(&id) {
            for &s in &guest.state {
                if s != UNMERGED && s != ZERO {
                    self.store.drop_user(s)?;
                }
            }
        }
        Ok(())
    }

    /// Looks at up to `config.pages_to_scan` pages, continuing where the last
    /// call stopped, and merges what it can; stops early at the end of a
    /// full pass. Returns the pages looked at.
    pub fn scan(&mut self) -> io::Result<usize> {
        let mut budget = self.config.pages_to_scan;
        let mut scanned = 0;
        while budget > 0 && !self.guests.is_empty() {
            let Some((&id, guest)) = self.guests.range(self.cursor.0..).next() else {
                // A call never runs into the next pass: callers pace by passes.
                self.finish_pass()?;
                break;
            };
            let start = if id == self.cursor.0 { self.cursor.1 } else { 0 };
            let end = guest.pages.min(start + budget);
            if start == 0 {
                self.guests.get_mut(&id).unwrap().refresh_dirty()?;
            }
            self.look_at_range(id, start, end)?;
            budget -= end - start;
            scanned += end - start;
            self.cursor = if end == self.guests[&id].pages { (id + 1, 0) } else { (id, end) };
        }
        // Queued merges wait for a full batch or the end of the pass: every
        // freeze costs the guest a stop, so each should carry many merges.
        self.stats.pages_scanned += scanned as u64;
        Ok(scanned)
    }

    /// Merges everything it can in one guest now (SKSM's synchronous merge):
    /// one full look at its pages against every frame and page seen so far.
    pub fn merge_now(&mut self, id: GuestId) -> io::Result<()> {
        let Some(guest) = self.guests.get_mut(&id) else { return Ok(()) };
        guest.refresh_dirty()?;
        let pages = guest.pages;
        self.look_at_range(id, 0, pages)?;
        self.flush_all()
    }

    /// Looks at the guest's pages in `start..end` that have memory behind
    /// them. A page never written is a hole in the memfd: it costs nothing,
    /// and reading it would allocate it.
    fn look_at_range(&mut self, id: GuestId, start: usize, end: usize) -> io::Result<()> {
        let mut page = start;
        while page < end {
            let guest = &self.guests[&id];
            let (r, off) = guest.locate(page);
            let n = (guest.mem.regions[r].len / PAGE_SIZE - off).min(end - page);
            os::resident(guest.host(page), n * PAGE_SIZE, &mut self.residency)?;
            for i in 0..n {
                if self.residency[i] & 1 != 0 {
                    self.look_at(id, page + i)?;
                }
            }
            page += n;
        }
        Ok(())
    }

    /// End of a full pass over every guest: forget the unstable tree (its
    /// entries may be stale) and notice pages whose sharing was broken.
    fn finish_pass(&mut self) -> io::Result<()> {
        self.flush_all()?;
        self.stats.pages_unshared = self.unstable.len() as u64;
        self.unstable.clear();
        self.stats.pages_volatile = self.guests.values().map(|g| g.stats.volatile_this_pass).sum();
        for g in self.guests.values_mut() {
            g.stats.volatile_this_pass = 0;
        }
        self.collect_cow_breaks()?;
        if std::mem::take(&mut self.mappings_changed) {
            self.mappings_bound = os::mapping_count()? as u64;
            self.stats.mappings_used = self.mappings_bound;
        }
        self.stats.full_scans += 1;
        self.cursor = (0, 0);
        Ok(())
    }

    fn look_at(&mut self, id: GuestId, page: usize) -> io::Result<()> {
        let guest = self.guests.get_mut(&id).unwrap();
        if guest.state[page] != UNMERGED {
            return Ok(());
        }
        if guest.written_last_pass(page) {
            guest.stats.volatile_this_pass += 1;
            guest.last_hash[page] = 0;
            return Ok(());
        }
        // The dirty log says the page has not changed since its hash was
        // taken: reuse the hash, and read the page only if that hash has a
        // match. (The hash only picks candidates; every merge compares bytes.)
        let known = Some(guest.last_hash[page]).filter(|&h| h != 0 && guest.mem.dirty.is_some());
        if let Some(hash) = known {
            let group = guest.mem.group;
            let maybe_zero = hash == zero_hash() && self.config.zero_pages;
            if !maybe_zero && !self.store.has_hash(group, hash) && !self.unstable.contains_key(&(group, hash)) {
                self.unstable.insert((group, hash), (id, page));
                return Ok(());
            }
        }
        // Work on a copy: the guest may be writing the page right now.
        guest.copy_page(page, &mut self.scratch);
        self.stats.pages_hashed += 1;
        let content: &[u8] = &self.scratch;
        let hash = xxh3_64(content);
        let last = std::mem::replace(&mut guest.last_hash[page], hash);
        if guest.mem.dirty.is_none() && last == 0 {
            // First look without a dirty log: a page is a candidate only once
            // it has stayed unchanged for a whole pass (a fresh guest is
            // still writing). With a dirty log, not written since the last
            // pass (or, at first, since the guest started) already says so.
            return Ok(());
        }
        if guest.mem.dirty.is_none() && last != hash {
            guest.stats.volatile_this_pass += 1;
            return Ok(());
        }
        let group = guest.mem.group;
        if hash == zero_hash() && self.config.zero_pages && content.iter().all(|&b| b == 0) {
            return self.queue(id, page, Target::Zero);
        }
        if let Some(frame) = self.store.find(group, hash, content, self.config.max_page_sharing) {
            self.store.add_user(frame);
            return self.queue(id, page, Target::Frame(frame));
        }
        let twin = match self.unstable.get(&(group, hash)).copied() {
            Some((other_id, other_page)) if (other_id, other_page) != (id, page) => {
                let other = &self.guests[&other_id];
                let unmerged = other.state[other_page] == UNMERGED;
                if unmerged {
                    other.copy_page(other_page, &mut self.scratch_other);
                }
                (unmerged && self.scratch_other == self.scratch).then_some((other_id, other_page))
            }
            _ => None,
        };
        let Some((other_id, other_page)) = twin else {
            self.unstable.insert((group, hash), (id, page));
            return Ok(());
        };
        self.unstable.remove(&(group, hash));
        let frame = self.store.insert(group, hash, &self.scratch)?;
        // Both users are reserved now; a failed re-compare drops one.
        self.store.add_user(frame);
        self.store.add_user(frame);
        self.queue(other_id, other_page, Target::Frame(frame))?;
        self.queue(id, page, Target::Frame(frame))
    }

    fn queue(&mut self, id: GuestId, page: usize, target: Target) -> io::Result<()> {
        let q = self.pending.entry(id).or_default();
        q.push((page, target));
        if q.len() >= self.config.batch {
            self.flush(id)?;
        }
        Ok(())
    }

    fn flush_all(&mut self) -> io::Result<()> {
        let ids: Vec<GuestId> = self.pending.keys().copied().collect();
        for id in ids {
            self.flush(id)?;
        }
        Ok(())
    }

    /// The merge step for one guest's queued merges: a series of freezes,
    /// each as long as `config.freeze_budget` allows. See docs/dedup.md.
    fn flush(&mut self, id: GuestId) -> io::Result<()> {
        let Some(mut queue) = self.pending.remove(&id) else {
            return Ok(());
        };
        queue.sort_unstable_by_key(|&(page, _)| page);
        let mut rest = &queue[..];
        while !rest.is_empty() {
            let done = self.merge_frozen(id, rest)?;
            rest = &rest[done..];
        }
        Ok(())
    }

    /// Freezes the guest, re-compares queued pages with their targets run by
    /// run and remaps the runs still equal, until the queue is done or the
    /// freeze has lasted `config.freeze_budget`; then thaws. A guest is
    /// stopped for the budget plus one remap at most, however slow remaps
    /// are (the process mmap lock is contended while many guests fault
    /// pages in, and the scanner competes for a core). Returns how many
    /// queue entries it handled.
    fn merge_frozen(&mut self, id: GuestId, queue: &[(usize, Target)]) -> io::Result<usize> {
        let runs = mapping_runs(&self.guests[&id], queue);
        // Each mapping made may split one mapping into three.
        let over_limit = self.mappings_would_exceed(runs.len());
        let guest = self.guests.get(&id).unwrap();

        let started = Instant::now();
        guest.mem.freezer.freeze();
        let parked = Instant::now();
        let mut merged: Vec<(usize, Target)> = Vec::new();
        let mut failed: Vec<(usize, Target)> = Vec::new();
        let mut handled = 0;
        let mut remapped = Ok(());
        for (i, n) in runs {
            if handled > 0 && parked.elapsed() >= self.config.freeze_budget {
                break;
            }
            let equal_from = merged.len();
            for &(page, target) in &queue[i..i + n] {
                let same = !over_limit
                    && match target {
                        Target::Zero => guest.frozen_content(page).iter().all(|&b| b == 0),
                        Target::Frame(f) => guest.frozen_content(page) == self.store.page(f),
                    };
                if same {
                    merged.push((page, target));
                } else {
                    failed.push((page, target));
                }
            }
            handled = i + n;
            remapped = remap_runs(guest, &self.store, &merged[equal_from..]);
            if remapped.is_err() {
                break;
            }
        }
        self.mappings_changed |= !merged.is_empty();
        guest.mem.freezer.thaw();
        self.freezes.record(parked.elapsed());
        self.park_waits.record(parked - started);
        remapped?;

        for (start, len) in page_runs(merged.iter().map(|&(p, _)| p)) {
            os::punch_hole(&guest.mem.memfd, guest.file_offset(start), (len * PAGE_SIZE) as u64)?;
            // Map the shared frames in now, in one go: otherwise each vCPU
            // access faults them in one by one, every fault holding the
            // process's mmap lock that the next remap needs.
            os::populate_read(guest.host(start), len * PAGE_SIZE);
        }
        let guest = self.guests.get_mut(&id).unwrap();
        for &(page, target) in &merged {
            guest.state[page] = match target {
                Target::Zero => ZERO,
                Target::Frame(f) => f,
            };
            match target {
                Target::Zero => guest.stats.zero_pages += 1,
                Target::Frame(_) => guest.stats.merged_pages += 1,
            }
        }
        for (page, target) in failed {
            // It changed since it was hashed.
            guest.last_hash[page] = 0;
            if let Target::Frame(f) = target {
                self.store.drop_user(f)?;
            }
        }
        if over_limit && !self.stats.map_limit_reached {
            log::warn!(
                "page sharing paused: the process is close to vm.max_map_count ({}); raise it to share more",
                self.map_limit
            );
        }
        self.stats.map_limit_reached |= over_limit;
        Ok(handled)
    }

    /// Whether making `new_runs` more mappings could pass `vm.max_map_count`.
    /// Reading /proc/self/maps is slow with many mappings, so an upper bound
    /// (each adds at most two) is kept, and re-read only near the limit.
    fn mappings_would_exceed(&mut self, new_runs: usize) -> bool {
        let fits = |used: u64| used as usize + 2 * new_runs + self.config.map_count_margin <= self.map_limit;
        if self.mappings_bound == 0 || !fits(self.mappings_bound) {
            self.mappings_bound = os::mapping_count().unwrap_or(usize::MAX / 4) as u64;
            self.stats.mappings_used = self.mappings_bound;
        }
        if !fits(self.mappings_bound) {
            return true;
        }
        self.mappings_bound += 2 * new_runs as u64;
        false
    }

    /// Finds merged pages that were written since (the kernel copied them on
    /// write, so they no longer map the frame) and releases their frames.
    fn collect_cow_breaks(&mut self) -> io::Result<()> {
        let mut entries = vec![PageMapEntry(0); 512];
        for guest in self.guests.values_mut() {
            let mut page = 0;
            while page < guest.pages {
                let (r, off) = guest.locate(page);
                let region_pages = guest.mem.regions[r].len / PAGE_SIZE;
                let n = entries.len().min(region_pages - off);
                if guest.state[page..page + n].iter().all(|&s| s == UNMERGED) {
                    page += n;
                    continue;
                }
                self.pagemap.read(guest.host(page), &mut entries[..n])?;
                for (i, e) in entries[..n].iter().enumerate() {
                    let s = guest.state[page + i];
                    let broken = match s {
                        UNMERGED => false,
                        // A written zero page is an anonymous page of its own.
                        ZERO => e.present() && e.exclusive(),
                        // A written frame page is no longer the file's page.
                        _ => e.present() && !e.file_or_shared(),
                    };
                    if broken {
                        guest.state[page + i] = UNMERGED;
                        guest.last_hash[page + i] = 0;
                        guest.stats.cow_breaks += 1;
                        if s == ZERO {
                            guest.stats.zero_pages -= 1;
                        } else {
                            guest.stats.merged_pages -= 1;
                            self.store.drop_user(s)?;
                        }
                    }
                }
                page += n;
            }
        }
        Ok(())
    }

    /// Counters for everything, like KSM's sysfs files.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.pages_shared = self.store.live_frames() as u64;
        let merged: u64 = self.guests.values().map(|g| g.stats.merged_pages).sum();
        s.pages_sharing = merged.saturating_sub(s.pages_shared);
        s.zero_pages = self.guests.values().map(|g| g.stats.zero_pages).sum();
        s.cow_breaks = self.guests.values().map(|g| g.stats.cow_breaks).sum();
        let metadata = self.store.metadata_bytes()
            + self.guests.values().map(|g| g.pages * 12).sum::<usize>()
            + self.unstable.capacity() * 24;
        s.general_profit = ((s.pages_sharing + s.zero_pages) * PAGE_SIZE as u64) as i64 - metadata as i64;
        s.freeze = self.freezes.summary();
        s.park_wait = self.park_waits.summary();
        s
    }

    pub fn guest_stats(&self, id: GuestId) -> Option<GuestStats> {
        self.guests.get(&id).map(|g| g.stats.clone())
    }

    /// Pages of every registered guest: one full pass.
    pub fn total_pages(&self) -> usize {
        self.guests.values().map(|g| g.pages).sum()
    }

    pub fn guest_ids(&self) -> Vec<GuestId> {
        self.guests.keys().copied().collect()
    }
}

/// Consecutive page indexes, as (first, count) runs.
fn page_runs(pages: impl Iterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == p => *len += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// Splits merged pages (sorted by page) into the runs one mapping can
/// cover: consecutive guest pages in one region with consecutive frames (or
/// all zero). Returns (index of the run's first entry, pages in the run).
fn mapping_runs(guest: &Guest, merged: &[(usize, Target)]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < merged.len() {
        let (first, target) = merged[i];
        let region = guest.locate(first).0;
        let mut n = 1;
        while let Some(&(p, t)) = merged.get(i + n) {
            let next = match (target, t) {
                (Target::Zero, Target::Zero) => true,
                (Target::Frame(a), Target::Frame(b)) => b as usize == a as usize + n,
                _ => false,
            };
            if p != first + n || !next || guest.locate(p).0 != region {
                break;
            }
            n += 1;
        }
        runs.push((i, n));
        i += n;
    }
    runs
}

/// Maps each run of merged pages (see [`mapping_runs`]) in one call.
fn remap_runs(guest: &Guest, store: &StableStore, merged: &[(usize, Target)]) -> io::Result<()> {
    for (i, n) in mapping_runs(guest, merged) {
        let (first, target) = merged[i];
        let addr = guest.host(first);
        // SAFETY: the pages belong to a registered guest whose writers are
        // frozen, and were just found equal to their target: replacing the
        // mapping loses nothing.
        unsafe {
            match target {
                Target::Zero => os::map_zero(addr, n * PAGE_SIZE)?,
                Target::Frame(f) => os::map_private(addr, n * PAGE_SIZE, store.file(), StableStore::offset(f))?,
            }
        }
    }
    Ok(())
}
