//! The merge step, carried out in the process that maps the guest's memory
//! (the guest's own process in the VMM), under that process's mmap lock:
//! protect, compare again, remap, release. See docs/dedup.md for why no
//! write can be lost.
//!
//! Writers are held off one of two ways:
//! - **write-protection** (userfaultfd): a window of a few hundred pages is
//!   write-protected; a vCPU or device thread that writes one of them
//!   waits in the kernel until the window is released, then its write lands
//!   on whatever is mapped there by then (copy-on-write for a merged page).
//!   Nothing else about the guest stops.
//! - the **freeze** fallback, where userfaultfd is unavailable: the guest's
//!   vCPUs are parked and its device threads held for a bounded time.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::layout::{page_runs, set_bits, set_runs, Layout, Region, Target};
use crate::os::{self, PAGE_SIZE};
use crate::store::{StableStore, StoreView};
use crate::uffd::Uffd;

/// Stops and restarts everything that can write one guest's memory: its
/// vCPUs and its device threads. `freeze` returns only once none can write,
/// with how many threads it stopped.
pub trait Freezer: Send + Sync {
    fn freeze(&self) -> usize;
    fn thaw(&self);
}

/// Tells which guest pages were written: KVM's dirty log and the VMM's own
/// device writes.
pub trait DirtyTracker: Send + Sync {
    /// A bitmap over the guest's pages (bit i of word i / 64) of the pages
    /// written since each was last watched again (`watch`): a page nobody
    /// asked to watch again reads as written for ever.
    fn take_dirty(&self) -> io::Result<Vec<u64>>;
    /// Watches the pages set in `pages` (a bitmap as above, or shorter)
    /// again: KVM write-protects them, and the guest's next write to each
    /// costs it a fault. Pages left out cost nothing more, whatever the
    /// guest writes.
    fn watch(&self, pages: &[u64]) -> io::Result<()>;
}

/// How a merge holds off the guest's writers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProtectMode {
    /// Write-protection where the host allows it, else the freeze.
    #[default]
    Auto,
    WriteProtect,
    Freeze,
}

/// The one a guest uses, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    WriteProtect,
    Freeze,
}

/// What the agent tells the engine once per pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentStatus {
    /// Pages written since the last status; `None` without a dirty log.
    pub dirty: Option<Vec<u64>>,
    /// Mappings the guest's process has (an upper bound), and its limit.
    pub mappings: u64,
    pub map_limit: u64,
    /// Pages the guest gave back since the last status and not merged
    /// since, as runs (first page, count): see [`Agent::discard`].
    pub discarded: Vec<(u32, u32)>,
}

/// What one merge call did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeOutcome {
    /// Per requested merge, whether the page now maps its target.
    pub merged: Vec<bool>,
    /// Per requested merge, whether it was left alone because the page
    /// changed: its compare failed, or a writer hit it while it was held.
    pub changed: Vec<bool>,
    /// How long each writer held by the merge waited at most (one entry
    /// per blocked thread: a write that hit a protected page, or a vCPU
    /// or device thread stopped by a freeze).
    pub stalls: Vec<Duration>,
    pub protection: Option<Protection>,
    /// Merges not made because the process is too close to its
    /// `vm.max_map_count`.
    pub map_limited: bool,
    pub mappings: u64,
    pub map_limit: u64,
    /// Calls that failed (each counted; the first is described).
    pub errors: u32,
    pub first_error: Option<String>,
}

impl MergeOutcome {
    fn error(&mut self, what: &str, e: io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }
}

/// A guest as seen by the engine: where its merges are made.
///
/// An error of kind [`io::ErrorKind::WouldBlock`] from any call means the
/// agent cannot answer now (its process is stopped) and was not asked:
/// nothing happened, and the engine passes the guest by until it answers.
pub trait GuestAgent: Send {
    /// The dirty log (see [`DirtyTracker::take_dirty`]) and the mapping
    /// count.
    fn status(&mut self) -> io::Result<AgentStatus>;
    /// Watches the written pages in `pages` again ([`DirtyTracker::watch`]).
    fn watch(&mut self, pages: &[u64]) -> io::Result<()>;
    /// Makes the merges it can of `merges` (sorted by page); an `Err` means
    /// nobody knows which happened (the guest is then given up).
    fn merge(&mut self, merges: &[(u32, Target)]) -> io::Result<MergeOutcome>;
    /// Maps frames over pages of a guest that has not run yet, without
    /// comparing: its memory is to become theirs (a clone of a snapshot).
    fn adopt(&mut self, pages: &[(u32, Target)]) -> io::Result<MergeOutcome>;
}

enum Hold {
    WriteProtect(Uffd),
    Freeze(Arc<dyn Freezer>),
}

/// Most pages write-protected together: one protect and one release for a
/// window of touching runs. A window holds only pages being merged: a
/// write-protection makes KVM drop its mappings of every page it covers
/// (the MMU notifier does not tell a protection from an unmap), and the
/// guest would fault each one in again.
const WINDOW_PAGES: usize = 512;
/// Longest a freeze lasts before the vCPUs run again (the last remap may
/// overrun it); the rest of a batch waits for the next freeze.
pub const FREEZE_BUDGET: Duration = Duration::from_millis(20);
/// Mappings left free below `vm.max_map_count` for everything else the
/// process maps.
pub const MAP_COUNT_MARGIN: u64 = 4096;

/// The merge agent of one guest, in the process that maps its RAM.
pub struct Agent {
    layout: Layout,
    memfd: File,
    store: StoreView,
    hold: Hold,
    dirty: Option<Arc<dyn DirtyTracker>>,
    /// At least as many mappings as the process has (0: not read yet).
    mappings_bound: u64,
    /// Stands in for vm.max_map_count (tests).
    map_limit: Option<u64>,
    /// Memfd ranges whose freeing failed: tried again at the next call.
    unfreed: Vec<(u64, u64)>,
    /// Pages mapped elsewhere than their memfd page (a frame or the zero
    /// page, or a private copy of one): a discard maps the memfd back.
    remapped: Vec<u64>,
    /// Pages discarded since the last status and not merged since.
    discarded: Vec<u64>,
    /// Called with the first page of each remap, before it (tests).
    #[cfg(test)]
    before_remap: Option<Box<dyn FnMut(u32)>>,
}

// SAFETY: the agent's addresses are the guest's mappings in this process,
// valid while the agent lives; it is used by one thread at a time.
unsafe impl Send for Agent {}

impl Agent {
    /// `regions` are this process's mappings of `memfd`; `store` is a
    /// read-only descriptor of the guest's group's stable store; `freezer`
    /// stops the guest when write-protection is not used.
    pub fn new(
        regions: Vec<Region>,
        memfd: File,
        store: File,
        mode: ProtectMode,
        freezer: Arc<dyn Freezer>,
        dirty: Option<Arc<dyn DirtyTracker>>,
    ) -> io::Result<Agent> {
        let layout = Layout::new(regions).map_err(io::Error::other)?;
        // A remap splits the mapping it lands in: cut it up before the guest
        // runs, where that costs it nothing (see os::cut_at_half_blocks).
        let max_pieces = os::max_map_count().unwrap_or(65530) / 16;
        for r in &layout.regions {
            os::cut_at_half_blocks(r.host as *mut u8, r.len, max_pieces);
        }
        let hold = match mode {
            ProtectMode::Freeze => Hold::Freeze(freezer),
            ProtectMode::WriteProtect => Hold::WriteProtect(Self::write_protection(&layout)?),
            ProtectMode::Auto => match Self::write_protection(&layout) {
                Ok(uffd) => Hold::WriteProtect(uffd),
                Err(e) => {
                    log::info!("page sharing: merges freeze the guest ({e})");
                    Hold::Freeze(freezer)
                }
            },
        };
        let words = layout.pages().div_ceil(64);
        Ok(Agent {
            layout,
            memfd,
            store: StoreView::new(store)?,
            hold,
            dirty,
            mappings_bound: 0,
            map_limit: None,
            unfreed: Vec::new(),
            remapped: vec![0; words],
            discarded: vec![0; words],
            #[cfg(test)]
            before_remap: None,
        })
    }

    fn write_protection(layout: &Layout) -> io::Result<Uffd> {
        let uffd = Uffd::open()?;
        for r in &layout.regions {
            uffd.register(r.host as *const u8, r.len)?;
        }
        Ok(uffd)
    }

    pub fn protection(&self) -> Protection {
        match self.hold {
            Hold::WriteProtect(_) => Protection::WriteProtect,
            Hold::Freeze(_) => Protection::Freeze,
        }
    }

    fn ptr(&self, page: usize) -> *mut u8 {
        self.layout.host(page) as *mut u8
    }

    /// The page as it is now; only while its writers are held off.
    fn held_content(&self, page: usize) -> &[u8] {
        // SAFETY: mapped while the agent lives; nobody writes it while held.
        unsafe { std::slice::from_raw_parts(self.ptr(page), PAGE_SIZE) }
    }

    /// Uses `limit` in place of vm.max_map_count (tests of the limit).
    pub fn pretend_map_limit(&mut self, limit: u64) {
        self.map_limit = Some(limit);
    }

    fn refresh_mappings(&mut self) -> (u64, u64) {
        let limit = self.map_limit.unwrap_or_else(|| os::max_map_count().unwrap_or(65530) as u64);
        if self.mappings_bound == 0 || self.mappings_bound + MAP_COUNT_MARGIN > limit {
            self.mappings_bound = os::mapping_count().map_or(u64::MAX / 4, |n| n as u64);
        }
        (self.mappings_bound, limit)
    }

    /// Checks a request (pages in order, all in the guest) and plans its
    /// mappings: the outcome to fill in, the runs (index, length) that fit
    /// under vm.max_map_count, and that limit. Err: refused, and why.
    #[allow(clippy::type_complexity)]
    fn plan(
        &mut self,
        what: &str,
        pages: &[(u32, Target)],
    ) -> Result<(MergeOutcome, Vec<(usize, usize)>, u64), MergeOutcome> {
        let mut out =
            MergeOutcome { merged: vec![false; pages.len()], changed: vec![false; pages.len()], ..Default::default() };
        let sorted = pages.windows(2).all(|w| w[0].0 < w[1].0);
        if !sorted || pages.last().is_some_and(|m| m.0 as usize >= self.layout.pages()) {
            out.error(what, io::Error::other("pages out of order or beyond the guest"));
            return Err(out);
        }
        let mut runs = self.layout.mapping_runs(pages);
        // Each mapping made may split one mapping into three.
        let (bound, limit) = self.refresh_mappings();
        let room = limit.saturating_sub(bound + MAP_COUNT_MARGIN) / 2;
        if (runs.len() as u64) > room {
            runs.truncate(room as usize);
            out.map_limited = true;
        }
        Ok((out, runs, limit))
    }

    /// Makes what merges it can; see the module documentation.
    pub fn merge(&mut self, merges: &[(u32, Target)]) -> MergeOutcome {
        let (mut out, runs, limit) = match self.plan("merge request", merges) {
            Ok(plan) => plan,
            Err(refused) => return refused,
        };
        out.protection = Some(self.protection());
        match &self.hold {
            Hold::WriteProtect(_) => self.merge_write_protected(merges, &runs, &mut out),
            Hold::Freeze(_) => self.merge_frozen(merges, &runs, &mut out),
        }
        let merged_pages = merges.iter().zip(&out.merged).filter(|(_, &m)| m).map(|(&(p, _), _)| p as usize);
        for (start, len) in page_runs(&self.layout, merged_pages) {
            // Nothing maps these memfd pages now (private copies were freed
            // with their mapping; their offsets are holes already).
            self.unfreed.push((self.layout.file_offset(start), (len * PAGE_SIZE) as u64));
            // Map the shared frames in now, in one go, rather than one fault
            // per vCPU access.
            os::populate_read(self.ptr(start), len * PAGE_SIZE);
        }
        if let Err(e) = self.free_merged() {
            out.error("freeing merged pages", e);
        }
        out.mappings = self.mappings_bound;
        out.map_limit = limit;
        out
    }

    /// Maps each page onto its target without comparing: only for a guest
    /// that has not run yet, whose memory is still holes (a clone whose
    /// memory is the snapshot's frames). Nothing can be writing it, so
    /// nothing needs holding off, and nothing is punched: the memfd holds
    /// nothing there.
    pub fn adopt(&mut self, pages: &[(u32, Target)]) -> MergeOutcome {
        let (mut out, runs, limit) = match self.plan("adopt request", pages) {
            Ok(plan) => plan,
            Err(refused) => return refused,
        };
        for (start, n) in runs {
            match self.remap(pages[start], n) {
                Ok(()) => out.merged[start..start + n].fill(true),
                Err(e) => out.error("mapping a snapshot's frames", e),
            }
        }
        out.mappings = self.mappings_bound;
        out.map_limit = limit;
        out
    }

    fn merge_write_protected(&mut self, merges: &[(u32, Target)], runs: &[(usize, usize)], out: &mut MergeOutcome) {
        let mut i = 0;
        let last_page_of = |(start, n): (usize, usize)| merges[start + n - 1].0 as usize;
        while i < runs.len() {
            // A window: runs of one region, each starting where the last
            // ended, within WINDOW_PAGES of the first.
            let first_page = merges[runs[i].0].0 as usize;
            let region = self.layout.locate(first_page).0;
            let mut j = i + 1;
            while j < runs.len() {
                let (start, _) = runs[j];
                let touches = merges[start].0 as usize == last_page_of(runs[j - 1]) + 1;
                let end_page = last_page_of(runs[j]);
                if !touches || end_page - first_page >= WINDOW_PAGES || self.layout.locate(end_page).0 != region {
                    break;
                }
                j += 1;
            }
            let last_page = last_page_of(runs[j - 1]);
            let (addr, len) = (self.ptr(first_page), (last_page + 1 - first_page) * PAGE_SIZE);
            self.write_protected_window(merges, &runs[i..j], addr, len, out);
            i = j;
        }
    }

    fn write_protected_window(
        &mut self,
        merges: &[(u32, Target)],
        runs: &[(usize, usize)],
        addr: *mut u8,
        len: usize,
        out: &mut MergeOutcome,
    ) {
        let Hold::WriteProtect(uffd) = &self.hold else { unreachable!("write-protected merge without userfaultfd") };
        let held = Instant::now();
        if let Err(e) = uffd.protect(addr, len) {
            // A mapping in the window is not registered yet (one made by an
            // earlier merge): register them all and try once more.
            let again = uffd.register(addr, len).and_then(|()| uffd.protect(addr, len));
            if let Err(again) = again {
                out.error(&format!("write-protecting pages to merge ({e})"), again);
                // Some mappings may be protected: release page by page.
                release_pages(uffd, addr, len);
                return;
            }
        }
        let mut window = HeldWindow::new(addr, len, held);
        let protected = held.elapsed();
        for &(start, n) in runs {
            self.remap_equal(merges, start..start + n, out, Some(&mut window));
        }
        let remapping = held.elapsed() - protected;
        let Hold::WriteProtect(uffd) = &self.hold else { unreachable!() };
        // Release: unprotect what is still the old mapping (which wakes its
        // writers) and wake the writers on remapped pages, who retry against
        // the frame and get their private copy. The new mappings are not
        // registered, so they are never given to UFFDIO_WRITEPROTECT.
        let mut at = addr;
        let end = addr.wrapping_add(len);
        let mut failed = false;
        for &(start, n) in &window.remapped {
            let (start, bytes) = (start as *mut u8, n * PAGE_SIZE);
            if start > at {
                failed |= uffd.unprotect(at, start as usize - at as usize).is_err();
            }
            failed |= uffd.wake(start, bytes).is_err();
            at = start.wrapping_add(bytes);
        }
        if end > at {
            failed |= uffd.unprotect(at, end as usize - at as usize).is_err();
        }
        if failed {
            out.error(
                "releasing write-protected pages",
                std::io::Error::other("release failed; released page by page"),
            );
            release_pages(uffd, addr, len);
        }
        // Writers that came after the last look were released just now.
        window.release_writers(uffd, out);
        let whole = held.elapsed();
        if whole > Duration::from_millis(2) {
            log::debug!(
                "page sharing: a window of {} pages ({} runs) was held {whole:?}: protect {protected:?}, \
                 compare and remap {remapping:?}, release {:?}; {} writers let go early",
                len / PAGE_SIZE,
                runs.len(),
                whole - protected - remapping,
                window.writers
            );
        }
    }

    /// Under a freeze: as many runs per freeze as the budget allows.
    fn merge_frozen(&mut self, merges: &[(u32, Target)], runs: &[(usize, usize)], out: &mut MergeOutcome) {
        let Hold::Freeze(freezer) = &self.hold else { unreachable!("frozen merge without a freezer") };
        let freezer = freezer.clone();
        let mut i = 0;
        while i < runs.len() {
            let held = Instant::now();
            let threads = freezer.freeze();
            let parked = Instant::now();
            let first = i;
            while i < runs.len() && (i == first || parked.elapsed() < FREEZE_BUDGET) {
                let (start, n) = runs[i];
                self.remap_equal(merges, start..start + n, out, None);
                i += 1;
            }
            freezer.thaw();
            out.stalls.extend(std::iter::repeat_n(held.elapsed(), threads));
            if i < runs.len() {
                // Let the vCPUs run before the next freeze.
                std::thread::yield_now();
            }
        }
    }

    /// With the writers of the run `merges[range]` held off: compares each
    /// page with its target and remaps the longest stretches still equal,
    /// one mapping each, marking them merged in `out` (and the others
    /// changed). In a write-protected window, writers that fault meanwhile
    /// are let go after each remap (see [`HeldWindow`]).
    fn remap_equal(
        &mut self,
        merges: &[(u32, Target)],
        range: std::ops::Range<usize>,
        out: &mut MergeOutcome,
        mut window: Option<&mut HeldWindow>,
    ) {
        let run = &merges[range.clone()];
        let equal: Vec<bool> = run
            .iter()
            .map(|&(page, target)| match target {
                Target::Zero => self.held_content(page as usize).iter().all(|&b| b == 0),
                Target::Frame(f) => self.held_content(page as usize) == self.store.page(f),
            })
            .collect();
        // A page a writer was let go on is no longer held: never remapped.
        let addrs: Vec<usize> = run.iter().map(|&(page, _)| self.ptr(page as usize) as usize).collect();
        let still_held = |window: &Option<&mut HeldWindow>, k: usize| {
            equal[k] && !window.as_ref().is_some_and(|w| w.let_go_on(addrs[k]))
        };
        let mut k = 0;
        while k < run.len() {
            if !still_held(&window, k) {
                out.changed[range.start + k] = true;
                k += 1;
                continue;
            }
            let n = (k..run.len()).take_while(|&i| still_held(&window, i)).count();
            match self.remap(run[k], n) {
                Ok(()) => {
                    out.merged[range.start + k..range.start + k + n].fill(true);
                    if let Some(w) = window.as_deref_mut() {
                        w.remapped.push((addrs[k], n));
                    }
                }
                Err(e) => out.error("remapping merged pages", e),
            }
            k += n;
            if let (Some(w), Hold::WriteProtect(uffd)) = (window.as_deref_mut(), &self.hold) {
                w.release_writers(uffd, out);
            }
        }
    }

    /// Maps `n` pages from `page` onto their target(s) in one mapping.
    fn remap(&mut self, (page, target): (u32, Target), n: usize) -> io::Result<()> {
        #[cfg(test)]
        if let Some(hook) = &mut self.before_remap {
            hook(page);
        }
        let (addr, len) = (self.ptr(page as usize), n * PAGE_SIZE);
        // SAFETY: the pages belong to the guest, and either their writers
        // are held off and they were just found equal to their target, or
        // the guest has not run and they hold nothing yet (`adopt`):
        // replacing the mapping loses nothing.
        unsafe {
            match target {
                Target::Zero => {
                    os::map_zero(addr, len)?;
                    os::no_huge_pages(addr, len);
                }
                Target::Frame(f) => os::map_private(addr, len, self.store.file(), StableStore::offset(f))?,
            }
        }
        // The new mapping is not registered for write-protection: a later
        // window that meets it registers it then (most merged pages are
        // never merged again).
        self.mappings_bound += 2;
        // A page merged after a discard is booked by this merge: its
        // discard must not be reported, or the engine would release the
        // frame it now maps.
        set_bits(&mut self.remapped, page as usize, n, true);
        set_bits(&mut self.discarded, page as usize, n, false);
        Ok(())
    }

    /// The guest gave the pages at `host..host + len` (its addresses in
    /// this process) back to the host (a balloon): their memory is freed,
    /// and the guest reads zeroes there until it writes them again.
    /// Pages on their memfd page are punched out of the memfd; merged
    /// pages and private copies get their memfd mapping back first (a hole
    /// now), so whatever they mapped is dropped with the mapping. The
    /// engine learns of them at the next status and releases their frames.
    ///
    /// Called between merges (the caller serializes the two); writers are
    /// not held off: the guest promised not to use these pages, and one
    /// that does anyway writes only its own memory.
    pub fn discard(&mut self, host: u64, len: u64) -> io::Result<()> {
        let runs = self
            .layout
            .pages_at(host, len)
            .ok_or_else(|| io::Error::other(format!("{len:#x} bytes at {host:#x} are not whole guest pages")))?;
        for (first, n) in runs {
            for (page, count) in set_runs(&self.remapped, first, n) {
                let (addr, bytes) = (self.ptr(page), count * PAGE_SIZE);
                // SAFETY: the guest's own pages, which it gave up: their
                // contents are not needed.
                unsafe { os::map_shared_at(addr, bytes, &self.memfd, self.layout.file_offset(page))? };
                self.mappings_bound += 2;
                set_bits(&mut self.remapped, page, count, false);
            }
            os::punch_hole(&self.memfd, self.layout.file_offset(first), (n * PAGE_SIZE) as u64)?;
            set_bits(&mut self.discarded, first, n, true);
        }
        Ok(())
    }

    /// Punches the memfd pages that merges replaced; what fails stays
    /// listed for the next call.
    fn free_merged(&mut self) -> io::Result<()> {
        let mut first_error = Ok(());
        let memfd = &self.memfd;
        self.unfreed.retain(|&(offset, len)| match os::punch_hole(memfd, offset, len) {
            Ok(()) => false,
            Err(e) => {
                if first_error.is_ok() {
                    first_error = Err(e);
                }
                true
            }
        });
        first_error
    }

    /// Pages written since the last call, and the mapping room.
    pub fn status(&mut self) -> io::Result<AgentStatus> {
        if let Err(e) = self.free_merged() {
            log::warn!("page sharing: freeing merged guest pages: {e} (tried again later)");
        }
        let dirty = self.dirty.as_ref().map(|d| d.take_dirty()).transpose()?;
        let (mappings, map_limit) = self.refresh_mappings();
        let discarded = set_runs(&self.discarded, 0, self.layout.pages());
        self.discarded.fill(0);
        let discarded = discarded.into_iter().map(|(page, n)| (page as u32, n as u32)).collect();
        Ok(AgentStatus { dirty, mappings, map_limit, discarded })
    }
}

/// One write-protected window while its merges are made. A writer blocked
/// on one of its pages waits only until the next remap is done, not for the
/// whole window: after each remap the agent reads the queued write faults
/// and lets each writer go. On a page already remapped it is woken (its
/// write lands in a private copy of the frame); on any other page that page
/// is unprotected, and it is never remapped in this window, since it is no
/// longer held (it is being written: it waits for a later pass).
struct HeldWindow {
    /// Address of the window's first page.
    start: usize,
    /// Per page: unprotected early, because a writer wanted it.
    let_go: Vec<bool>,
    /// (address, pages) of the runs remapped so far, in address order.
    remapped: Vec<(usize, usize)>,
    /// When the fault queue was last read: a writer found now faulted since.
    last_look: Instant,
    /// Writers let go so far.
    writers: usize,
}

impl HeldWindow {
    fn new(addr: *mut u8, len: usize, held: Instant) -> HeldWindow {
        HeldWindow {
            start: addr as usize,
            let_go: vec![false; len / PAGE_SIZE],
            remapped: Vec::new(),
            last_look: held,
            writers: 0,
        }
    }

    fn let_go_on(&self, addr: usize) -> bool {
        let index = addr.wrapping_sub(self.start) / PAGE_SIZE;
        self.let_go.get(index).copied().unwrap_or(false)
    }

    fn is_remapped(&self, addr: usize) -> bool {
        self.remapped.iter().any(|&(start, n)| (start..start + n * PAGE_SIZE).contains(&addr))
    }

    /// Lets go every writer queued since the last look, and records how
    /// long each may have waited: from the last look (it faulted after it)
    /// to its release.
    fn release_writers(&mut self, uffd: &Uffd, out: &mut MergeOutcome) {
        let looked = Instant::now();
        let faults = uffd.take_write_faults();
        for &addr in &faults {
            let page = addr & !(PAGE_SIZE - 1);
            if !self.is_remapped(page) {
                let index = page.wrapping_sub(self.start) / PAGE_SIZE;
                if let Some(flag) = self.let_go.get_mut(index) {
                    *flag = true;
                }
                // Also wakes it; a page outside the window (a fault left
                // over from an earlier one) was released already.
                let _ = uffd.unprotect(page as *const u8, PAGE_SIZE);
            }
            let _ = uffd.wake(page as *const u8, PAGE_SIZE);
        }
        let waited = self.last_look.elapsed();
        out.stalls.extend(std::iter::repeat_n(waited, faults.len()));
        self.writers += faults.len();
        self.last_look = looked;
    }
}

/// Last resort after a failed release: unprotects page by page (pages of
/// mappings that are not registered fail, harmlessly) and wakes everyone.
fn release_pages(uffd: &Uffd, addr: *mut u8, len: usize) {
    for offset in (0..len).step_by(PAGE_SIZE) {
        let _ = uffd.unprotect(addr.wrapping_add(offset), PAGE_SIZE);
    }
    let _ = uffd.wake(addr, len);
}

/// The agent called directly, for a guest whose memory this process maps
/// (tests; a VMM that runs guests in its own process).
impl GuestAgent for Agent {
    fn status(&mut self) -> io::Result<AgentStatus> {
        Agent::status(self)
    }

    fn watch(&mut self, pages: &[u64]) -> io::Result<()> {
        self.dirty.as_ref().map_or(Ok(()), |d| d.watch(pages))
    }

    fn merge(&mut self, merges: &[(u32, Target)]) -> io::Result<MergeOutcome> {
        Ok(Agent::merge(self, merges))
    }

    fn adopt(&mut self, pages: &[(u32, Target)]) -> io::Result<MergeOutcome> {
        Ok(Agent::adopt(self, pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct NoFreezer;
    impl Freezer for NoFreezer {
        fn freeze(&self) -> usize {
            0
        }
        fn thaw(&self) {}
    }

    struct SendPtr(*mut u8);
    // SAFETY: the test keeps the mapping alive until the thread is joined.
    unsafe impl Send for SendPtr {}

    /// A writer blocked on a page of a window is let go after the next
    /// remap, not at the window's end, and the page it then writes is not
    /// remapped, even though it was found equal before the write: the write
    /// survives.
    #[test]
    fn a_blocked_writer_is_let_go_early_and_its_page_is_not_merged() {
        if let Err(e) = Uffd::open() {
            assert!(
                std::env::var_os("VMM_TEST_NO_UFFD").is_some(),
                "no userfaultfd write-protection here ({e}): run as root on Linux >= 5.19, or set VMM_TEST_NO_UFFD=1"
            );
            return;
        }
        const PAGES: usize = 4;
        let memfd = os::memfd("agent-test").unwrap();
        memfd.set_len((PAGES * PAGE_SIZE) as u64).unwrap();
        let base = os::map_shared(&memfd, PAGES * PAGE_SIZE, 0).unwrap();
        let mut store = StableStore::new(0).unwrap();
        // Adjacent frames with contents 1, 2, 3, 4; the pages hold the same
        // but for page 1: one run of four, compared at once, remapped as
        // [0] and [2, 3].
        let mut merges = Vec::new();
        for p in 0..PAGES {
            let content = [p as u8 + 1; PAGE_SIZE];
            merges.push((p as u32, Target::Frame(store.insert(p as u64, &content).unwrap())));
            let fill = if p == 1 { 0x55 } else { p as u8 + 1 };
            // SAFETY: our own fresh mapping.
            unsafe { base.add(p * PAGE_SIZE).write_bytes(fill, PAGE_SIZE) };
        }
        let region = Region { host: base as u64, len: PAGES * PAGE_SIZE, file_offset: 0 };
        let mut agent = Agent::new(
            vec![region],
            memfd.try_clone().unwrap(),
            store.file().try_clone().unwrap(),
            ProtectMode::WriteProtect,
            Arc::new(NoFreezer),
            None,
        )
        .unwrap();
        assert_eq!(agent.layout.mapping_runs(&merges).len(), 1, "one run");
        let written = Arc::new(AtomicBool::new(false));
        let mut writer = None;
        let flag = written.clone();
        let mut page3 = Some(SendPtr(base.wrapping_add(3 * PAGE_SIZE)));
        agent.before_remap = Some(Box::new(move |page| match page {
            0 => {
                // Page 3 is protected now: this write blocks until let go.
                let (p, done) = (page3.take().unwrap(), flag.clone());
                writer = Some(std::thread::spawn(move || {
                    let p = p;
                    // SAFETY: the mapping outlives the thread (joined below).
                    unsafe { std::ptr::write_volatile(p.0, 9) };
                    done.store(true, Ordering::SeqCst);
                }));
                std::thread::sleep(Duration::from_millis(100));
                assert!(!flag.load(Ordering::SeqCst), "a write went through a write-protected page");
            }
            2 => {
                // Let go after page 0's remap: the write lands while page 2
                // is still held.
                let t = Instant::now();
                while !flag.load(Ordering::SeqCst) {
                    assert!(t.elapsed() < Duration::from_secs(5), "the writer was not let go after the first remap");
                    std::thread::sleep(Duration::from_millis(1));
                }
                writer.take().unwrap().join().unwrap();
            }
            _ => panic!("page {page} was remapped"),
        }));
        let out = agent.merge(&merges);
        assert!(written.load(Ordering::SeqCst));
        // SAFETY: reading our own mapping.
        let read = |p: usize| unsafe { std::ptr::read_volatile(base.add(p * PAGE_SIZE)) };
        assert_eq!(
            (0..PAGES).map(read).collect::<Vec<_>>(),
            [1, 0x55, 3, 9],
            "page 3 keeps the write it was let go for"
        );
        assert_eq!(out.merged, [true, false, true, false], "{:?}", out.first_error);
        assert_eq!(out.stalls.len(), 1, "one writer waited");
        drop(agent);
        // SAFETY: nothing uses the mapping any more.
        unsafe { os::unmap(base, PAGES * PAGE_SIZE) };
    }
}
