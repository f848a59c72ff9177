//! The engine and the merge agent on plain memfd mappings, without KVM,
//! under both ways of holding writers off.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dedup::os::{self, PAGE_SIZE};
use dedup::{Config, Engine, ProtectMode};
use support::*;

const FREEZE: ProtectMode = ProtectMode::Freeze;

#[test]
fn identical_pages_merge_and_read_back() {
    for mode in modes() {
        let (a, b) = (TestGuest::new(64), TestGuest::new(64));
        for i in 0..64 {
            a.fill(i, if i < 32 { 1000 + i as u64 } else { 5000 + i as u64 });
            b.fill(i, if i < 32 { 1000 + i as u64 } else { 9000 + i as u64 });
        }
        let before = a.resident_bytes() + b.resident_bytes();
        let mut e = engine();
        a.add(&mut e, 0, mode);
        b.add(&mut e, 0, mode);
        settle(&mut e);
        let s = e.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (32, 32), "{mode:?}: {s:?}");
        for i in 0..64 {
            let (sa, sb) = if i < 32 { (1000 + i, 1000 + i) } else { (5000 + i, 9000 + i) };
            assert_eq!(a.read(i as usize), expected(sa as u64));
            assert_eq!(b.read(i as usize), expected(sb as u64));
        }
        let after = a.resident_bytes() + b.resident_bytes();
        assert_eq!(before - after, 64 * PAGE_SIZE as u64, "both guests' merged frames were punched out");
        match mode {
            ProtectMode::Freeze => assert!(s.merges_frozen >= 1 && a.gate.freezes.load(Ordering::SeqCst) >= 1),
            _ => assert!(s.merges_write_protected >= 1 && a.gate.freezes.load(Ordering::SeqCst) == 0, "{s:?}"),
        }
        assert_eq!(e.audit().leaked_frames, 0);
    }
}

#[test]
fn write_after_merge_makes_a_private_copy_and_spares_the_frame() {
    for mode in modes() {
        let (a, b) = (TestGuest::new(8), TestGuest::new(8));
        for i in 0..8 {
            a.fill(i, 77 + i as u64);
            b.fill(i, 77 + i as u64);
        }
        let mut e = engine();
        a.add(&mut e, 0, mode);
        b.add(&mut e, 0, mode);
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
}

/// A page copied on write lives in the guest's private memory, not in its
/// memfd: the engine reads it from there, and merges it again once it
/// matches something.
#[test]
fn pages_copied_on_write_merge_again() {
    for mode in modes() {
        let (a, b) = (TestGuest::new(4), TestGuest::new(4));
        for i in 0..4 {
            a.fill(i, 60 + i as u64);
            b.fill(i, 60 + i as u64);
        }
        let mut e = engine();
        a.add(&mut e, 0, mode);
        b.add(&mut e, 0, mode);
        settle(&mut e);
        a.fill(1, 999);
        b.fill(1, 999);
        scan_passes(&mut e, 1);
        assert_eq!(e.stats().cow_breaks, 2);
        // Broken right after their merge, they are held back a while
        // (dedup/src/churn.rs), then merge again.
        settle(&mut e);
        assert_eq!(e.stats().pages_sharing, 3, "{mode:?}: {:?}", e.stats());
        assert_eq!(e.stats().held.after_break, 2);
        e.advance_clock(Duration::from_secs(10));
        settle(&mut e);
        let s = e.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (4, 4), "{mode:?}: {s:?}");
        assert_eq!((a.read(1), b.read(1)), (expected(999), expected(999)));
        assert_eq!(e.audit().leaked_frames, 0);
    }
}

/// Pages a guest gives back (a balloon) read zero and cost nothing, in
/// whatever state they were: merged with another guest's, merged and
/// written since (a private copy), zero-mapped, or never merged. Their
/// frames are released with them, the other guest keeps its content, and
/// the pages merge again once the guest fills them again.
#[test]
fn given_back_pages_read_zero_and_release_their_frames() {
    for mode in modes() {
        let (a, b) = (TestGuest::new(16), TestGuest::new(16));
        for i in 0..16 {
            let seed = match i {
                0..8 => 300 + i as u64, // in both: merged
                8..12 => 0,             // zero
                _ => 700 + i as u64,    // a's own
            };
            a.fill(i, seed);
            b.fill(i, if i >= 12 { 900 + i as u64 } else { seed });
        }
        let mut e = engine();
        let agent = Arc::new(Mutex::new(a.agent(&mut e, 0, mode)));
        let id = e
            .add_guest(dedup::GuestMemory {
                memfd: a.memfd.try_clone().unwrap(),
                regions: a.regions(),
                group: 0,
                pid: std::process::id(),
                agent: Box::new(SharedAgent(agent.clone())),
            })
            .unwrap();
        b.add(&mut e, 0, mode);
        settle(&mut e);
        assert_eq!(e.stats().pages_sharing, 8, "{mode:?}: {:?}", e.stats());
        a.fill(1, 4242); // a private copy of a merged page
        scan_passes(&mut e, 1);
        assert_eq!(e.stats().cow_breaks, 1);

        agent.lock().unwrap().discard(a.base as u64, (16 * PAGE_SIZE) as u64).unwrap();
        // (Before reading them: a read of a memfd hole allocates a page.)
        assert_eq!(a.resident_bytes(), 0, "{mode:?}: given-back pages still hold memory");
        for i in 0..16 {
            assert_eq!(a.read(i), vec![0; PAGE_SIZE], "{mode:?}: page {i} given back does not read zero");
        }
        scan_passes(&mut e, 1);
        let g = e.guest_stats(id).unwrap();
        assert_eq!((g.merged_pages, g.zero_pages, g.discarded_pages), (0, 0, 16), "{mode:?}: {g:?}");
        assert_eq!(e.audit().leaked_frames, 0, "{mode:?}");
        for i in 0..16 {
            let seed = if i >= 12 {
                900 + i as u64
            } else if (8..12).contains(&i) {
                0
            } else {
                300 + i as u64
            };
            assert_eq!(b.read(i), expected(seed), "{mode:?}: the other guest's page {i} changed");
        }
        // Given back twice (a balloon inflated over pages it never took
        // back): nothing more to release.
        agent.lock().unwrap().discard(a.page(0) as u64, PAGE_SIZE as u64).unwrap();
        assert!(agent.lock().unwrap().discard(a.page(15) as u64, 2 * PAGE_SIZE as u64).is_err(), "past the guest");
        // Taken back and filled again, they merge again.
        for i in 0..8 {
            a.fill(i, 300 + i as u64);
        }
        // (Written since the last look: held back a while, crate churn.)
        e.advance_clock(Duration::from_secs(10));
        settle(&mut e);
        let g = e.guest_stats(id).unwrap();
        assert_eq!(g.merged_pages, 8, "{mode:?}: {g:?}");
        assert_eq!(e.audit().leaked_frames, 0, "{mode:?}");
        for i in 0..8 {
            assert_eq!(a.read(i), expected(300 + i as u64));
        }
    }
}

#[test]
fn frame_is_freed_with_its_last_user() {
    let (a, b) = (TestGuest::new(4), TestGuest::new(4));
    for i in 0..4 {
        a.fill(i, 10 + i as u64);
        b.fill(i, 10 + i as u64);
    }
    let mut e = engine();
    a.add(&mut e, 0, FREEZE);
    b.add(&mut e, 0, FREEZE);
    settle(&mut e);
    assert_eq!(e.stats().pages_shared, 4);
    a.fill(0, 1);
    b.fill(0, 2);
    scan_passes(&mut e, 1);
    let s = e.stats();
    assert_eq!(s.pages_shared, 3, "{s:?}");
    assert_eq!(s.cow_breaks, 2, "{s:?}");
    assert_eq!((a.read(0), b.read(0)), (expected(1), expected(2)));
    assert_eq!(e.audit(), dedup::Audit { live_frames: 3, referenced_frames: 3, leaked_frames: 0, store_pages: 3 });
}

#[test]
fn zero_runs_cost_nothing_and_stay_writable() {
    for mode in modes() {
        let a = TestGuest::new(128);
        for i in 0..128 {
            a.fill(i, if i % 4 == 0 { 300 + i as u64 } else { 0 });
        }
        let before = a.resident_bytes();
        let mut e = engine();
        a.add(&mut e, 0, mode);
        settle(&mut e);
        let s = e.stats();
        assert_eq!(s.zero_pages, 96, "{s:?}");
        assert_eq!(before - a.resident_bytes(), 96 * PAGE_SIZE as u64);
        assert_eq!(a.read(1), vec![0u8; PAGE_SIZE]);
        a.fill(1, 55);
        assert_eq!(a.read(1), expected(55));
        assert_eq!(a.read(2), vec![0u8; PAGE_SIZE]);
        scan_passes(&mut e, 1);
        assert_eq!(e.stats().zero_pages, 95, "{mode:?}");
        // khugepaged must never collapse the zero runs into private huge pages.
        assert!(vm_flags_at(a.page(2) as u64).contains(" nh"), "remapped ranges allow huge pages");
    }
}

/// The VmFlags line of the mapping holding `addr` in /proc/self/smaps.
fn vm_flags_at(addr: u64) -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                    inside = lo <= addr && addr < hi;
                    continue;
                }
            }
        }
        if inside && line.starts_with("VmFlags:") {
            return line.to_string();
        }
    }
    panic!("no mapping at {addr:#x}")
}

#[test]
fn merge_groups_never_share() {
    let (a, b) = (TestGuest::new(16), TestGuest::new(16));
    for i in 0..16 {
        a.fill(i, 500 + i as u64);
        b.fill(i, 500 + i as u64);
    }
    let mut e = engine();
    a.add(&mut e, 1, FREEZE);
    b.add(&mut e, 2, FREEZE);
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
    for mode in modes() {
        let (a, b) = (TestGuest::new(512), TestGuest::new(512));
        for i in 0..512 {
            // Every 8th page stays private: 64 runs of 7 merged pages per guest.
            a.fill(i, 1 + i as u64);
            b.fill(i, if i % 8 == 7 { 100_000 + i as u64 } else { 1 + i as u64 });
        }
        let mut e = engine();
        a.add(&mut e, 0, mode);
        b.add(&mut e, 0, mode);
        settle(&mut e);
        assert_eq!(e.stats().pages_sharing, 448);
        // One mapping per merged run and one per private page between runs.
        for g in [&a, &b] {
            assert_eq!(mappings_within(g), 128, "{mode:?}: merged runs were not mapped as one each");
        }
    }
}

/// Guests whose agents pretend vm.max_map_count leaves `room` mappings.
fn limited_guests(e: &mut Engine, guests: [&TestGuest; 2], room: u64) {
    let limit = os::mapping_count().unwrap() as u64 + dedup::agent::MAP_COUNT_MARGIN + room;
    for g in guests {
        let mut agent = g.agent(e, 0, FREEZE);
        agent.pretend_map_limit(limit);
        e.add_guest(g.memory(agent, 0)).unwrap();
    }
}

/// At the limit nothing is merged, and the guest is neither frozen nor
/// given new frames pass after pass.
#[test]
fn merging_stops_short_of_the_mapping_limit() {
    let (a, b) = (TestGuest::new(64), TestGuest::new(64));
    for i in 0..64 {
        a.fill(i, 1 + i as u64);
        b.fill(i, 1 + i as u64);
    }
    let mut e = engine();
    limited_guests(&mut e, [&a, &b], 0);
    scan_passes(&mut e, 6);
    let s = e.stats();
    assert!(s.map_limit_reached, "{s:?}");
    assert_eq!(s.pages_sharing + s.pages_shared, 0, "merged past the limit: {s:?}");
    assert_eq!(a.gate.freezes.load(Ordering::SeqCst) + b.gate.freezes.load(Ordering::SeqCst), 0, "froze for nothing");
    assert_eq!(e.audit().live_frames, 0, "frames made for guests that cannot map them");
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
    let mut e = engine();
    limited_guests(&mut e, [&a, &b], 2000);
    settle(&mut e);
    let s = e.stats();
    assert!(!s.map_limit_reached, "{s:?}");
    assert_eq!(s.pages_sharing, 4032, "{s:?}");
}

#[test]
fn the_freeze_fallback_maps_every_run() {
    let (a, b) = (TestGuest::new(512), TestGuest::new(512));
    for i in 0..512 {
        a.fill(i, 1 + i as u64);
        b.fill(i, if i % 8 == 7 { 100_000 + i as u64 } else { 1 + i as u64 });
    }
    let mut e = engine();
    a.add(&mut e, 0, FREEZE);
    b.add(&mut e, 0, FREEZE);
    settle(&mut e);
    let s = e.stats();
    assert_eq!(s.pages_sharing, 448, "every run merged: {s:?}");
    assert!(s.stall.count >= 2 && s.stall.max > Duration::ZERO, "freezes not measured: {s:?}");
    for i in 0..512 {
        assert_eq!(a.read(i), expected(1 + i as u64));
    }
}

#[test]
fn volatile_pages_are_not_merged() {
    let (a, b) = (TestGuest::new(4), TestGuest::new(4));
    let mut e = engine();
    a.add(&mut e, 0, FREEZE);
    b.add(&mut e, 0, FREEZE);
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
    let mut e = Engine::new(Config { max_page_sharing: 2, pages_to_scan: 1 << 20, ..Config::default() });
    for g in &guests {
        g.add(&mut e, 0, FREEZE);
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
    let ida = a.add(&mut e, 0, FREEZE);
    let idb = b.add(&mut e, 0, FREEZE);
    settle(&mut e);
    e.remove_guest(ida).unwrap();
    assert_eq!(e.stats().pages_shared, 8);
    e.remove_guest(idb).unwrap();
    assert_eq!(e.stats().pages_shared, 0);
    assert_eq!(e.audit().live_frames, 0);
}

/// A window of write-protected pages is released whole: pages that were
/// not merged (they differ), between and after merged ones, take writes at
/// once afterwards.
#[test]
fn no_page_stays_write_protected_after_a_merge() {
    let (a, b) = (TestGuest::new(64), TestGuest::new(64));
    for i in 0..64 {
        a.fill(i, 1 + i as u64);
        b.fill(i, if i % 3 == 1 { 5000 + i as u64 } else { 1 + i as u64 });
    }
    let mut e = engine();
    a.add(&mut e, 0, ProtectMode::WriteProtect);
    b.add(&mut e, 0, ProtectMode::WriteProtect);
    settle(&mut e);
    assert!(e.stats().pages_sharing > 30, "{:?}", e.stats());
    let (done, finished) = std::sync::mpsc::channel();
    let writer = {
        let b = Arc::new(b);
        let b2 = b.clone();
        std::thread::spawn(move || {
            for i in 0..64 {
                b2.fill(i, 9000 + i as u64);
            }
            done.send(()).unwrap();
            b2
        });
        b
    };
    assert!(finished.recv_timeout(Duration::from_secs(5)).is_ok(), "a write blocked on a page left write-protected");
    for i in 0..64 {
        assert_eq!(writer.read(i), expected(9000 + i as u64));
    }
}

/// Frames made for merges still queued are not shared yet: pages_shared
/// counts frames guest pages map, and pages_sharing never goes negative.
#[test]
fn queued_merges_do_not_count_as_shared() {
    let (a, b) = (TestGuest::new(16), TestGuest::new(16));
    for i in 0..16 {
        a.fill(i, 80 + i as u64);
        b.fill(i, 80 + i as u64);
    }
    let mut e = Engine::new(Config { pages_to_scan: 24, batch: 1 << 20, ..Config::default() });
    a.add(&mut e, 0, FREEZE);
    b.add(&mut e, 0, FREEZE);
    scan_passes(&mut e, 1);
    e.scan(); // twins found, frames made, merges queued, none made yet
    let s = e.stats();
    assert!(e.audit().live_frames > 0, "no frame was made: {s:?}");
    assert_eq!((s.pages_shared, s.pages_sharing), (0, 0), "{s:?}");
    scan_passes(&mut e, 1);
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (16, 16), "{s:?}");
}

/// A page copied on write and then swapped out is still a private copy:
/// the engine lets go of its frame.
#[test]
fn swapped_copies_are_copies() {
    use dedup::os::PageMapEntry;
    let present_anon = PageMapEntry(1 << 63 | 1 << 56);
    let present_file = PageMapEntry(1 << 63 | 1 << 61);
    let swapped = PageMapEntry(1 << 62);
    let uffd_marker = PageMapEntry(1 << 62 | 1 << 57);
    assert!(present_anon.private_copy() && swapped.private_copy());
    assert!(!present_file.private_copy() && !uffd_marker.private_copy() && !PageMapEntry(0).private_copy());
}

/// `merge_now` in the middle of a pass, with merges of the same guest
/// already queued, queues no page twice (frames and counters stay exact).
#[test]
fn merge_now_mid_pass_queues_nothing_twice() {
    let (a, b) = (TestGuest::new(16), TestGuest::new(16));
    for i in 0..16 {
        a.fill(i, 70 + i as u64);
        b.fill(i, 70 + i as u64);
    }
    let mut e = Engine::new(Config { pages_to_scan: 24, batch: 1 << 20, ..Config::default() });
    let ida = a.add(&mut e, 0, FREEZE);
    b.add(&mut e, 0, FREEZE);
    scan_passes(&mut e, 1);
    // Half way through the next pass: a's pages and half of b's are queued.
    e.scan();
    e.merge_now(ida).unwrap();
    scan_passes(&mut e, 2);
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (16, 16), "{s:?}");
    assert_eq!(e.guest_stats(ida).unwrap().merged_pages, 16);
    assert_eq!(e.audit().leaked_frames, 0);
}

/// Writers rewrite random pages with a few recurring contents (so there is
/// plenty to merge) while the engine merges as fast as it can. Afterwards
/// every page must hold exactly what its writer wrote last.
#[test]
fn concurrent_writes_are_never_lost() {
    for mode in modes() {
        race_writers_against_merges(mode);
    }
}

fn race_writers_against_merges(mode: ProtectMode) {
    const GUESTS: usize = 3;
    const PAGES: usize = 256;
    let guests: Arc<Vec<TestGuest>> = Arc::new((0..GUESTS).map(|_| TestGuest::new(PAGES)).collect());
    let shadow: Arc<Vec<AtomicU64>> = Arc::new((0..GUESTS * PAGES).map(|_| AtomicU64::new(0)).collect());
    for g in guests.iter() {
        for i in 0..PAGES {
            g.fill(i, 0);
        }
    }
    let mut e = Engine::new(Config { pages_to_scan: 97, batch: 16, ..Config::default() });
    for g in guests.iter() {
        g.add(&mut e, 0, mode);
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
                    // Write and record under one pass, as a vCPU would (the
                    // pass only matters under the freeze).
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
    // Merges on request take every page as it is, however recently
    // written or held back as churning; the scan notices breaks.
    let ids = e.guest_ids();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for &id in &ids {
            e.merge_now(id).unwrap();
        }
        e.scan();
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
    assert_eq!(bad, 0, "{mode:?}: {bad} pages lost a write ({writes} writes, {s:?})");
    assert!(writes > 10_000, "writers barely ran: {writes}");
    assert!(s.cow_breaks > 0 && s.pages_sharing + s.zero_pages > 0, "nothing merged or broken: {s:?}");
    assert_eq!(s.errors, 0, "{s:?}");
    assert_eq!(e.audit().leaked_frames, 0);
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
    a.add(&mut e, 0, FREEZE);
    b.add(&mut e, 0, FREEZE);
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

/// As KVM's with manual clearing: a bit stays set until it is watched again.
impl dedup::DirtyTracker for HandLog {
    fn take_dirty(&self) -> std::io::Result<Vec<u64>> {
        Ok(self.0.lock().unwrap().clone())
    }

    fn watch(&self, pages: &[u64]) -> std::io::Result<()> {
        for (w, p) in self.0.lock().unwrap().iter_mut().zip(pages) {
            *w &= !p;
        }
        Ok(())
    }
}

fn add_logged(e: &mut Engine, g: &TestGuest, log: &Arc<HandLog>) {
    let store = e.store_file(0).unwrap();
    let agent = dedup::Agent::new(
        g.regions(),
        g.memfd.try_clone().unwrap(),
        store,
        FREEZE,
        g.gate.clone(),
        Some(log.clone() as Arc<dyn dedup::DirtyTracker>),
    )
    .unwrap();
    e.add_guest(g.memory(agent, 0)).unwrap();
}

#[test]
fn remembered_hashes_pick_candidates_but_bytes_decide() {
    let (a, b) = (TestGuest::new(4), TestGuest::new(4));
    let (log_a, log_b) = (Arc::new(HandLog::default()), Arc::new(HandLog::default()));
    let mut e = engine();
    add_logged(&mut e, &a, &log_a);
    add_logged(&mut e, &b, &log_b);
    a.fill(0, 1);
    b.fill(0, 2);
    a.fill(2, 8);
    b.fill(2, 9);
    scan_passes(&mut e, 1);
    assert_eq!(e.stats().pages_sharing, 0);

    // A logged write: the page is skipped once, then hashed afresh and merged.
    a.fill(0, 2);
    log_a.mark(0);
    // A write the log misses leaves a stale hash in a.2 that matches b.2's
    // new content: the byte compare must refuse.
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

/// Mappings of this process that cover part of `len` bytes at `start`.
fn mappings_over(start: *mut u8, len: usize) -> usize {
    let (start, end) = (start as usize, start as usize + len);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .filter(|&(a, b)| a < end && b > start)
        .count()
}

/// A clone adopts a snapshot's pages laid out on new frames in page order:
/// every page is on a frame of its own at once (a short run of zero pages
/// on zero frames, holes in the store), a long zero run on the zero page,
/// in two mappings in all; its memfd stays empty, and its writes are copied
/// on write like any merged page's, reaching neither the frame nor a guest
/// merged onto the clone's frames.
#[test]
fn a_clone_adopts_a_snapshot_laid_out_in_page_order() {
    const PAGES: usize = 96;
    let (template, clone) = (TestGuest::new(PAGES), TestGuest::new(PAGES));
    // Pages 0..16 hold content but for every fourth (zero); 16..96 are zero.
    let snapshot: Vec<(usize, Vec<u8>)> =
        (0..16).map(|i| (i, if i % 4 == 3 { vec![0; PAGE_SIZE] } else { expected(300 + i as u64) })).collect();
    for (i, content) in &snapshot {
        if content.iter().any(|&b| b != 0) {
            template.fill(*i, 300 + *i as u64);
        }
    }
    let mut e = engine();
    template.add(&mut e, 0, ProtectMode::WriteProtect);
    let id = clone.add(&mut e, 0, ProtectMode::WriteProtect);
    // The last zero page of the first 16 and the rest are left out, as a
    // snapshot's holes are.
    assert_eq!(e.adopt(id, None, snapshot[..15].iter().cloned().map(Ok)).unwrap(), PAGES as u64);
    assert_eq!(clone.resident_bytes(), 0, "the clone's memfd holds nothing");
    for i in 0..PAGES {
        let want = snapshot.get(i).map_or(vec![0; PAGE_SIZE], |(_, c)| c.clone());
        assert_eq!(clone.read(i), want, "page {i}");
    }
    let s = e.guest_stats(id).unwrap();
    // Pages 3, 7 and 11 are zero frames; 15 starts the long zero run.
    assert_eq!((s.merged_pages, s.zero_pages), (15, 81), "short zero runs on frames, the long one on the zero page");
    assert_eq!(mappings_over(clone.page(0), PAGES * PAGE_SIZE), 2, "one mapping for the frames, one for zeros");
    settle(&mut e);
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (15, 12), "the template's pages joined the clone's frames: {s:?}");

    clone.fill(5, 4242);
    assert_eq!(clone.read(5), expected(4242));
    assert_eq!(template.read(5), expected(305), "a clone's write reached another guest");
    scan_passes(&mut e, 1);
    assert_eq!(e.stats().cow_breaks, 1);
    // A page already merged is not adopted twice; nothing leaked either way.
    assert!(e.adopt(id, None, [Ok((0, expected(300)))]).is_err());
    e.remove_guest(id).unwrap();
    assert_eq!(e.audit().leaked_frames, 0);
}

/// A second clone of the same snapshot takes the first one's placement
/// without reading the snapshot; once those frames have been freed and
/// their ids filled with other content, the placement is not trusted and
/// the snapshot is read again; a read that fails leaves nothing behind to
/// be trusted.
#[test]
fn clones_of_one_snapshot_reuse_its_placement_while_the_frames_hold() {
    let snapshot: Vec<(usize, Vec<u8>)> = (0..16).map(|i| (i, expected(500 + (i as u64 % 5)))).collect();
    let mut e = engine();
    let (first, second) = (TestGuest::new(16), TestGuest::new(16));
    let a = first.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(a, Some(7), read(&snapshot)).unwrap(), 16);
    let b = second.add(&mut e, 0, ProtectMode::WriteProtect);
    // No pages given: everything comes from the first clone's placement.
    assert_eq!(e.adopt(b, Some(7), unread()).unwrap(), 16);
    for (i, content) in &snapshot {
        assert_eq!(&second.read(*i), content, "page {i}");
    }
    assert_eq!(e.stats().pages_shared, 16, "both clones on the same 16 frames: {:?}", e.stats());
    assert_eq!(e.guest_stats(b).unwrap().merged_pages, 16);

    // Every user gone: the frames are freed; other content takes their ids.
    e.remove_guest(a).unwrap();
    e.remove_guest(b).unwrap();
    let other = TestGuest::new(16);
    let o = other.add(&mut e, 0, ProtectMode::WriteProtect);
    let others = snapshot_of(16, 900);
    assert_eq!(e.adopt(o, None, read(&others)).unwrap(), 16);
    let third = TestGuest::new(16);
    let c = third.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(c, Some(7), read(&snapshot)).unwrap(), 16);
    for (i, content) in &snapshot {
        assert_eq!(&third.read(*i), content, "page {i} of a clone after its frames were reused");
    }
    for i in 0..16 {
        assert_eq!(other.read(i), expected(900 + i as u64));
    }

    // A read that fails half way fails the clone, and is not remembered:
    // the next clone of that snapshot, given nothing to read, gets zeros.
    let fourth = TestGuest::new(16);
    let d = fourth.add(&mut e, 0, ProtectMode::WriteProtect);
    let mut broken = read(&snapshot[..8]);
    broken.push(Err(std::io::Error::other("disk on fire")));
    assert!(e.adopt(d, Some(8), broken).is_err());
    let fifth = TestGuest::new(16);
    let f = fifth.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(f, Some(8), unread()).unwrap(), 16);
    assert_eq!(fifth.read(0), vec![0; PAGE_SIZE], "a failed adoption's placement was trusted");
    for id in [c, d, f, o] {
        e.remove_guest(id).unwrap();
    }
    assert_eq!(e.audit().leaked_frames, 0);
}

/// A kept placement pins its frames: clones writing their pages (copy on
/// write) do not free them, so later clones still take the placement; once
/// its frames have no room for another user, the snapshot is laid out
/// again on a new block. With the group's last guest gone, nothing stays.
#[test]
fn a_kept_placement_survives_the_clones_writes_and_full_frames() {
    let mut e = Engine::new(Config { pages_to_scan: 1 << 20, max_page_sharing: 3, ..Config::default() });
    let snapshot = snapshot_of(16, 77);
    let first = TestGuest::new(16);
    let a = first.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(a, Some(3), read(&snapshot)).unwrap(), 16);
    for i in 0..16 {
        first.fill(i, 1000 + i as u64);
    }
    scan_passes(&mut e, 2);
    assert_eq!(e.guest_stats(a).unwrap().merged_pages, 0, "the first clone wrote every page");
    // The pin and one clone on each frame leave room for one more (3 users).
    let (second, third) = (TestGuest::new(16), TestGuest::new(16));
    let b = second.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(b, Some(3), unread()).unwrap(), 16, "the placement outlived the writes");
    let c = third.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(c, Some(3), unread()).unwrap(), 16);
    assert_eq!(e.stats().pages_shared, 16, "{:?}", e.stats());
    // Full: the next clone reads the snapshot onto a block of its own.
    let fourth = TestGuest::new(16);
    let d = fourth.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(d, Some(3), read(&snapshot)).unwrap(), 16);
    assert_eq!(e.stats().pages_shared, 32, "{:?}", e.stats());
    assert_eq!(mappings_over(fourth.page(0), 16 * PAGE_SIZE), 1, "the new block is one mapping");
    for i in 0..16 {
        for clone in [&second, &third, &fourth] {
            assert_eq!(clone.read(i), expected(77 + i as u64));
        }
        assert_eq!(first.read(i), expected(1000 + i as u64));
    }
    assert_eq!(e.audit().leaked_frames, 0, "{:?}", e.audit());
    for id in [a, b, c, d] {
        e.remove_guest(id).unwrap();
    }
    let audit = e.audit();
    assert_eq!((audit.live_frames, audit.leaked_frames), (0, 0), "{audit:?}");
}

/// A snapshot laid out before any clone of it (`lay_out`): the first clone
/// takes the placement without reading the snapshot, in one mapping;
/// laying it out again does nothing; a lay-out whose read fails keeps
/// nothing and leaves no frame behind.
#[test]
fn a_snapshot_laid_out_ahead_serves_its_first_clone() {
    let snapshot = snapshot_of(16, 600);
    let mut e = engine();
    e.lay_out(11, 0, 16, read(&snapshot)).unwrap();
    assert_eq!(e.audit().live_frames, 16, "{:?}", e.audit());
    e.lay_out(11, 0, 16, read(&snapshot)).unwrap();
    assert_eq!(e.audit().live_frames, 16, "laid out twice: {:?}", e.audit());

    let clone = TestGuest::new(16);
    let id = clone.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(id, Some(11), unread()).unwrap(), 16, "the first clone read the snapshot");
    for (i, content) in &snapshot {
        assert_eq!(&clone.read(*i), content, "page {i}");
    }
    assert_eq!(mappings_over(clone.page(0), 16 * PAGE_SIZE), 1);

    let mut broken: Vec<_> = snapshot[..8].iter().cloned().map(Ok).collect();
    broken.push(Err(std::io::Error::other("disk on fire")));
    assert!(e.lay_out(12, 0, 16, broken).is_err());
    assert_eq!(e.audit().live_frames, 16, "a failed lay-out kept frames: {:?}", e.audit());
    e.remove_guest(id).unwrap();
    let audit = e.audit();
    assert_eq!((audit.live_frames, audit.leaked_frames), (0, 0), "{audit:?}");
}

/// Laying out a snapshot whose kept placement has no room for another
/// clone lays it out anew, ahead of the clone that needs it.
#[test]
fn a_full_placement_is_laid_out_again_ahead() {
    let mut e = Engine::new(Config { pages_to_scan: 1 << 20, max_page_sharing: 2, ..Config::default() });
    let snapshot = snapshot_of(16, 700);
    e.lay_out(5, 0, 16, read(&snapshot)).unwrap();
    let first = TestGuest::new(16);
    let a = first.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(a, Some(5), unread()).unwrap(), 16);
    // The pin and one clone fill every frame: the next lay-out is a new block.
    e.lay_out(5, 0, 16, read(&snapshot)).unwrap();
    assert_eq!(e.audit().live_frames, 32, "{:?}", e.audit());
    let second = TestGuest::new(16);
    let b = second.add(&mut e, 0, ProtectMode::WriteProtect);
    assert_eq!(e.adopt(b, Some(5), unread()).unwrap(), 16, "the second clone read the snapshot");
    for i in 0..16 {
        assert_eq!(first.read(i), expected(700 + i as u64));
        assert_eq!(second.read(i), expected(700 + i as u64));
    }
    for id in [a, b] {
        e.remove_guest(id).unwrap();
    }
    let audit = e.audit();
    assert_eq!((audit.live_frames, audit.leaked_frames), (0, 0), "{audit:?}");
}

/// A step that is asked to give way ends after one stretch of pages, and
/// the next step goes on where it stopped: a pass still covers every page.
#[test]
fn a_step_gives_way_after_a_stretch_and_loses_no_page() {
    use dedup::engine::SCAN_STRETCH;
    let pages = 3 * SCAN_STRETCH;
    let (a, b) = (TestGuest::new(pages), TestGuest::new(pages));
    for i in 0..pages {
        a.fill(i, 5000 + i as u64);
        b.fill(i, 5000 + i as u64);
    }
    let mut e = Engine::new(Config { pages_to_scan: 4 * pages, batch: 1 << 20, ..Config::default() });
    a.add(&mut e, 0, FREEZE);
    b.add(&mut e, 0, FREEZE);
    assert_eq!(e.scan_giving_way(&|| true), SCAN_STRETCH, "a step asked to give way");
    assert_eq!(e.scan_giving_way(&|| false), 2 * pages - SCAN_STRETCH, "the rest of the pass, in one step");
    settle(&mut e);
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (pages as u64, pages as u64), "{s:?}");
    assert_eq!(e.audit().leaked_frames, 0);
}
