//! The engine on plain memfd mappings, without KVM: the same memory layout a
//! guest has, with threads standing in for vCPUs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use dedup::os::{self, PAGE_SIZE};
use dedup::{Config, Engine, Freezer, GuestMemory, Region};

/// Stands in for a guest's vCPUs: writers hold a pass while writing, and a
/// freeze waits until no writer holds one and admits none until the thaw.
#[derive(Default)]
struct WriterGate {
    state: Mutex<(bool, usize)>, // (frozen, writers inside)
    changed: Condvar,
}

impl WriterGate {
    fn write<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut s = self.state.lock().unwrap();
        while s.0 {
            s = self.changed.wait(s).unwrap();
        }
        s.1 += 1;
        drop(s);
        let r = f();
        self.state.lock().unwrap().1 -= 1;
        self.changed.notify_all();
        r
    }
}

impl Freezer for WriterGate {
    fn freeze(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        while s.1 > 0 {
            s = self.changed.wait(s).unwrap();
        }
    }
    fn thaw(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }
}

/// A guest's RAM as the VMM maps it: a memfd, mapped MAP_SHARED.
struct TestGuest {
    memfd: File,
    base: *mut u8,
    pages: usize,
    gate: Arc<WriterGate>,
}

unsafe impl Send for TestGuest {}
unsafe impl Sync for TestGuest {}

impl TestGuest {
    fn new(pages: usize) -> Self {
        let memfd = os::memfd("test-guest").unwrap();
        memfd.set_len((pages * PAGE_SIZE) as u64).unwrap();
        let base = os::map_shared(&memfd, pages * PAGE_SIZE, 0).unwrap();
        TestGuest { memfd, base, pages, gate: Arc::new(WriterGate::default()) }
    }

    fn memory(&self, group: u32) -> GuestMemory {
        GuestMemory {
            memfd: self.memfd.try_clone().unwrap(),
            regions: vec![Region { host: self.base, len: self.pages * PAGE_SIZE, file_offset: 0 }],
            group,
            freezer: self.gate.clone(),
            dirty: None,
        }
    }

    fn page(&self, i: usize) -> *mut u8 {
        assert!(i < self.pages);
        unsafe { self.base.add(i * PAGE_SIZE) }
    }

    fn fill(&self, i: usize, seed: u64) {
        let words = fill_words(seed);
        self.gate
            .write(|| unsafe { std::ptr::copy_nonoverlapping(words.as_ptr().cast::<u8>(), self.page(i), PAGE_SIZE) });
    }

    fn read(&self, i: usize) -> Vec<u8> {
        let mut v = vec![0u8; PAGE_SIZE];
        unsafe { std::ptr::copy_nonoverlapping(self.page(i), v.as_mut_ptr(), PAGE_SIZE) };
        v
    }

    /// Bytes of memfd memory still allocated (punched pages are gone).
    fn resident_bytes(&self) -> u64 {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(self.memfd.as_raw_fd(), &mut st) }, 0);
        st.st_blocks as u64 * 512
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        unsafe { os::unmap(self.base, self.pages * PAGE_SIZE) };
    }
}

/// Page content from a seed (seed 0 gives a zero page).
fn fill_words(seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..PAGE_SIZE / 8)
        .map(|i| {
            if seed == 0 {
                return 0;
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407 ^ i as u64);
            x ^ (x >> 29)
        })
        .collect()
}

fn expected(seed: u64) -> Vec<u8> {
    fill_words(seed).iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Merges what is there: the first pass only records each page, the second
/// merges the pages that stayed unchanged.
fn settle(e: &mut Engine) {
    scan_passes(e, 2);
}

fn engine() -> Engine {
    Engine::new(Config { pages_to_scan: 1 << 20, ..Config::default() }).unwrap()
}

/// Runs `passes` full passes.
fn scan_passes(e: &mut Engine, passes: u64) {
    let start = e.stats().full_scans;
    while e.stats().full_scans < start + passes {
        e.scan().unwrap();
    }
}

#[test]
fn identical_pages_merge_and_read_back() {
    let (a, b) = (TestGuest::new(64), TestGuest::new(64));
    for i in 0..64 {
        a.fill(i, if i < 32 { 1000 + i as u64 } else { 5000 + i as u64 });
        b.fill(i, if i < 32 { 1000 + i as u64 } else { 9000 + i as u64 });
    }
    let before = a.resident_bytes() + b.resident_bytes();
    let mut e = engine();
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    let s = e.stats();
    assert_eq!(s.pages_shared, 32, "{s:?}");
    assert_eq!(s.pages_sharing, 32, "{s:?}");
    for i in 0..64 {
        let (sa, sb) = if i < 32 { (1000 + i, 1000 + i) } else { (5000 + i, 9000 + i) };
        assert_eq!(a.read(i as usize), expected(sa as u64));
        assert_eq!(b.read(i as usize), expected(sb as u64));
    }
    let after = a.resident_bytes() + b.resident_bytes();
    assert_eq!(before - after, 64 * PAGE_SIZE as u64, "both guests' merged frames were punched out");
    assert!(s.freeze.count >= 1);
}

#[test]
fn write_after_merge_makes_a_private_copy_and_spares_the_frame() {
    let (a, b) = (TestGuest::new(8), TestGuest::new(8));
    for i in 0..8 {
        a.fill(i, 77 + i as u64);
        b.fill(i, 77 + i as u64);
    }
    let mut e = engine();
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    assert_eq!(e.stats().pages_sharing, 8);

    a.fill(3, 4242);
    assert_eq!(a.read(3), expected(4242));
    assert_eq!(b.read(3), expected(77 + 3), "a write in one guest reached the other");
    scan_passes(&mut e, 1);
    let s = e.stats();
    assert_eq!(s.cow_breaks, 1, "{s:?}");
    assert_eq!(s.pages_shared, 8, "frame 3 still has guest b");
    assert_eq!(s.pages_sharing, 7, "{s:?}");
}

#[test]
fn frame_is_freed_with_its_last_user() {
    let (a, b) = (TestGuest::new(4), TestGuest::new(4));
    for i in 0..4 {
        a.fill(i, 10 + i as u64);
        b.fill(i, 10 + i as u64);
    }
    let mut e = engine();
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    assert_eq!(e.stats().pages_shared, 4);
    a.fill(0, 1);
    b.fill(0, 2);
    scan_passes(&mut e, 1);
    let s = e.stats();
    assert_eq!(s.pages_shared, 3, "{s:?}");
    assert_eq!(s.cow_breaks, 2, "{s:?}");
    assert_eq!((a.read(0), b.read(0)), (expected(1), expected(2)));
}

#[test]
fn zero_runs_cost_nothing_and_stay_writable() {
    let a = TestGuest::new(128);
    for i in 0..128 {
        a.fill(i, if i % 4 == 0 { 300 + i as u64 } else { 0 });
    }
    let before = a.resident_bytes();
    let mut e = engine();
    e.add_guest(a.memory(0));
    settle(&mut e);
    let s = e.stats();
    assert_eq!(s.zero_pages, 96, "{s:?}");
    assert_eq!(before - a.resident_bytes(), 96 * PAGE_SIZE as u64);
    assert_eq!(a.read(1), vec![0u8; PAGE_SIZE]);
    a.fill(1, 55);
    assert_eq!(a.read(1), expected(55));
    assert_eq!(a.read(2), vec![0u8; PAGE_SIZE]);
    scan_passes(&mut e, 1);
    assert_eq!(e.stats().zero_pages, 95);
}

#[test]
fn merge_groups_never_share() {
    let (a, b) = (TestGuest::new(16), TestGuest::new(16));
    for i in 0..16 {
        a.fill(i, 500 + i as u64);
        b.fill(i, 500 + i as u64);
    }
    let mut e = engine();
    e.add_guest(a.memory(1));
    e.add_guest(b.memory(2));
    scan_passes(&mut e, 2);
    assert_eq!(e.stats().pages_shared, 0);
    assert_eq!(e.stats().pages_sharing, 0);
}

/// Mappings (lines of /proc/self/maps) inside a guest's RAM. Other tests
/// run in this process at the same time, so count only these.
fn mappings_within(g: &TestGuest) -> usize {
    let (lo, hi) = (g.base as u64, g.base as u64 + (g.pages * PAGE_SIZE) as u64);
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let (start, end) = l.split_whitespace().next().unwrap().split_once('-').unwrap();
            let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
            start >= lo && end <= hi
        })
        .count()
}

#[test]
fn adjacent_merged_pages_share_one_mapping() {
    let (a, b) = (TestGuest::new(512), TestGuest::new(512));
    for i in 0..512 {
        // Every 8th page stays private: 64 runs of 7 merged pages per guest.
        a.fill(i, 1 + i as u64);
        b.fill(i, if i % 8 == 7 { 100_000 + i as u64 } else { 1 + i as u64 });
    }
    let mut e = engine();
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    assert_eq!(e.stats().pages_sharing, 448);
    // One mapping per merged run and one per private page between runs.
    for g in [&a, &b] {
        assert_eq!(mappings_within(g), 128, "merged runs were not mapped as one each");
    }
}

/// An engine allowed `room` more mappings than the process has now, below
/// `vm.max_map_count`.
fn engine_with_mapping_room(room: usize) -> Engine {
    let limit = os::max_map_count().unwrap();
    let margin = limit.saturating_sub(os::mapping_count().unwrap() + room);
    Engine::new(Config { pages_to_scan: 1 << 20, map_count_margin: margin, ..Config::default() }).unwrap()
}

#[test]
fn merging_stops_short_of_the_mapping_limit() {
    let (a, b) = (TestGuest::new(64), TestGuest::new(64));
    for i in 0..64 {
        a.fill(i, 1 + i as u64);
        b.fill(i, 1 + i as u64);
    }
    let mut e = engine_with_mapping_room(0);
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    let s = e.stats();
    assert!(s.map_limit_reached, "{s:?}");
    assert_eq!(s.pages_sharing + s.pages_shared, 0, "merged past the limit: {s:?}");
    for i in 0..64 {
        assert_eq!(a.read(i), expected(1 + i as u64));
        assert_eq!(b.read(i), expected(1 + i as u64));
    }
}

#[test]
fn the_mapping_limit_counts_mappings_not_pages() {
    // 64 runs of 63 merged pages per guest: 128 new mappings per guest at
    // most, where counting pages would ask for 8,064 and refuse. The room
    // leaves slack for the mappings of tests running beside this one.
    let (a, b) = (TestGuest::new(4096), TestGuest::new(4096));
    for i in 0..4096 {
        a.fill(i, 1 + i as u64);
        b.fill(i, if i % 64 == 63 { 100_000 + i as u64 } else { 1 + i as u64 });
    }
    let mut e = engine_with_mapping_room(2000);
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    let s = e.stats();
    assert!(!s.map_limit_reached, "{s:?}");
    assert_eq!(s.pages_sharing, 4032, "{s:?}");
}

#[test]
fn the_freeze_budget_splits_a_batch_into_short_freezes() {
    let (a, b) = (TestGuest::new(512), TestGuest::new(512));
    for i in 0..512 {
        a.fill(i, 1 + i as u64);
        b.fill(i, if i % 8 == 7 { 100_000 + i as u64 } else { 1 + i as u64 });
    }
    let config = Config { pages_to_scan: 1 << 20, freeze_budget: std::time::Duration::ZERO, ..Config::default() };
    let mut e = Engine::new(config).unwrap();
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    let s = e.stats();
    // With no budget each freeze maps one run: 64 runs in each guest.
    assert_eq!(s.freeze.count, 128, "{s:?}");
    assert_eq!(s.pages_sharing, 448, "every run still merged: {s:?}");
    for i in 0..512 {
        assert_eq!(a.read(i), expected(1 + i as u64));
    }
}

#[test]
fn volatile_pages_are_not_merged() {
    let (a, b) = (TestGuest::new(4), TestGuest::new(4));
    let mut e = engine();
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    scan_passes(&mut e, 1);
    // Page 0 changes between every look; the rest are written once and
    // then settle to twins.
    for i in 1..4 {
        a.fill(i, 7 * i as u64);
        b.fill(i, 7 * i as u64);
    }
    for round in 0..3u64 {
        a.fill(0, 100 + round);
        b.fill(0, 100 + round);
        scan_passes(&mut e, 1);
    }
    let s = e.stats();
    assert_eq!(s.pages_sharing, 3, "{s:?}");
    assert!(s.pages_volatile >= 2, "{s:?}");
}

#[test]
fn max_page_sharing_caps_users_per_frame() {
    let guests: Vec<TestGuest> = (0..5).map(|_| TestGuest::new(1)).collect();
    for g in &guests {
        g.fill(0, 31337);
    }
    let mut e = Engine::new(Config { max_page_sharing: 2, pages_to_scan: 1 << 20, ..Config::default() }).unwrap();
    for g in &guests {
        e.add_guest(g.memory(0));
    }
    scan_passes(&mut e, 3);
    let s = e.stats();
    assert_eq!(s.pages_shared, 2, "5 users at 2 per frame: two full frames, one page left over: {s:?}");
    assert_eq!(s.pages_sharing, 2, "{s:?}");
}

#[test]
fn removing_a_guest_releases_its_frames() {
    let (a, b) = (TestGuest::new(8), TestGuest::new(8));
    for i in 0..8 {
        a.fill(i, 40 + i as u64);
        b.fill(i, 40 + i as u64);
    }
    let mut e = engine();
    let ida = e.add_guest(a.memory(0));
    let idb = e.add_guest(b.memory(0));
    settle(&mut e);
    e.remove_guest(ida).unwrap();
    assert_eq!(e.stats().pages_shared, 8);
    e.remove_guest(idb).unwrap();
    assert_eq!(e.stats().pages_shared, 0);
}

/// Writers rewrite random pages with a few recurring contents (so there is
/// plenty to merge) while the engine merges as fast as it can. Afterwards
/// every page must hold exactly what its writer wrote last.
#[test]
fn concurrent_writes_are_never_lost() {
    const GUESTS: usize = 3;
    const PAGES: usize = 256;
    let guests: Arc<Vec<TestGuest>> = Arc::new((0..GUESTS).map(|_| TestGuest::new(PAGES)).collect());
    let shadow: Arc<Vec<AtomicU64>> = Arc::new((0..GUESTS * PAGES).map(|_| AtomicU64::new(0)).collect());
    for g in guests.iter() {
        for i in 0..PAGES {
            g.fill(i, 0);
        }
    }
    let mut e = Engine::new(Config { pages_to_scan: 97, batch: 16, ..Config::default() }).unwrap();
    for g in guests.iter() {
        e.add_guest(g.memory(0));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..GUESTS)
        .map(|gi| {
            let (guests, shadow, stop) = (guests.clone(), shadow.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e3779b97f4a7c15u64.wrapping_mul(gi as u64 + 1);
                let mut writes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = (x % PAGES as u64) as usize;
                    let seed = (x >> 32) % 6; // 0 = zero page, else one of five contents
                    let g = &guests[gi];
                    // Write and record under one pass, as a vCPU would.
                    g.gate.write(|| {
                        let words = fill_words(seed);
                        unsafe { std::ptr::copy_nonoverlapping(words.as_ptr().cast::<u8>(), g.page(page), PAGE_SIZE) };
                        shadow[gi * PAGES + page].store(seed, Ordering::SeqCst);
                    });
                    writes += 1;
                    if writes.is_multiple_of(64) {
                        std::thread::yield_now();
                    }
                }
                writes
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        e.scan().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    scan_passes(&mut e, 2); // merge the final state too, then check it
    let s = e.stats();
    let mut bad = 0;
    for (gi, g) in guests.iter().enumerate() {
        for i in 0..PAGES {
            if g.read(i) != expected(shadow[gi * PAGES + i].load(Ordering::SeqCst)) {
                bad += 1;
            }
        }
    }
    assert_eq!(bad, 0, "{bad} pages lost a write ({writes} writes, {s:?})");
    assert!(writes > 10_000, "writers barely ran: {writes}");
    assert!(s.cow_breaks > 0 && s.pages_sharing + s.zero_pages > 0, "nothing merged or broken: {s:?}");
}

#[test]
fn never_written_pages_stay_unallocated() {
    let (a, b) = (TestGuest::new(256), TestGuest::new(256));
    for i in 0..8 {
        a.fill(i, 900 + i as u64);
        b.fill(i, 900 + i as u64);
    }
    let before = a.resident_bytes() + b.resident_bytes();
    let mut e = engine();
    e.add_guest(a.memory(0));
    e.add_guest(b.memory(0));
    settle(&mut e);
    scan_passes(&mut e, 2);
    // Scanning read no hole (which would allocate it): only the merged
    // pages' frames left the guests.
    assert_eq!(e.stats().pages_sharing, 8);
    assert_eq!(before - (a.resident_bytes() + b.resident_bytes()), 16 * PAGE_SIZE as u64);
    assert_eq!(e.stats().zero_pages, 0, "holes were read and merged as zero pages");
}

/// A dirty log the test writes by hand: pages it marks read as written.
#[derive(Default)]
struct HandLog(Mutex<Vec<u64>>);

impl HandLog {
    fn mark(&self, page: usize) {
        let mut bits = self.0.lock().unwrap();
        if bits.len() <= page / 64 {
            bits.resize(page / 64 + 1, 0);
        }
        bits[page / 64] |= 1 << (page % 64);
    }
}

impl dedup::DirtyTracker for HandLog {
    fn take_dirty(&self) -> std::io::Result<Vec<u64>> {
        Ok(std::mem::take(&mut *self.0.lock().unwrap()))
    }
}

#[test]
fn remembered_hashes_pick_candidates_but_bytes_decide() {
    let (a, b) = (TestGuest::new(4), TestGuest::new(4));
    let (log_a, log_b) = (Arc::new(HandLog::default()), Arc::new(HandLog::default()));
    let mut e = engine();
    e.add_guest(GuestMemory { dirty: Some(log_a.clone()), ..a.memory(0) });
    e.add_guest(GuestMemory { dirty: Some(log_b.clone()), ..b.memory(0) });
    a.fill(0, 1);
    b.fill(0, 2);
    a.fill(2, 8);
    b.fill(2, 9);
    scan_passes(&mut e, 1);
    assert_eq!(e.stats().pages_sharing, 0);

    // A logged write: the page is skipped once, then hashed afresh and merged.
    a.fill(0, 2);
    log_a.mark(0);
    // A write the log misses (as a device's could) leaves a stale hash in
    // a.2 that matches b.2's new content: the byte compare must refuse.
    a.fill(2, 11);
    b.fill(2, 8);
    log_b.mark(2);
    scan_passes(&mut e, 3);

    assert_eq!(e.stats().pages_sharing, 1, "{:?}", e.stats());
    assert_eq!(a.read(0), expected(2));
    assert_eq!(b.read(0), expected(2));
    assert_eq!(a.read(2), expected(11), "a stale hash merged different bytes");
    assert_eq!(b.read(2), expected(8));
}
