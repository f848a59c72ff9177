//! Fault injection: each system call page sharing makes fails on demand,
//! and after every failure the engine is consistent, nothing leaks, the
//! failure is counted, and scanning goes on to merge everything once the
//! calls work again. One test function: failures are injected process-wide.

mod support;

use dedup::os::faults::{self, Op};
use dedup::os::PAGE_SIZE;
use dedup::{Engine, ProtectMode};
use support::*;

const PAGES: usize = 64;

/// Failures are injected process-wide: the tests here take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Two guests with 48 identical pages, 8 zero pages and 8 private ones.
fn guests() -> (TestGuest, TestGuest) {
    let (a, b) = (TestGuest::new(PAGES), TestGuest::new(PAGES));
    for i in 0..PAGES {
        let (sa, sb) = match i {
            0..48 => (10 + i as u64, 10 + i as u64),
            48..56 => (0, 0),
            _ => (5000 + i as u64, 9000 + i as u64),
        };
        a.fill(i, sa);
        b.fill(i, sb);
    }
    (a, b)
}

fn check_contents(a: &TestGuest, b: &TestGuest, why: &str) {
    for i in 0..PAGES {
        let (sa, sb) = match i {
            0..48 => (10 + i as u64, 10 + i as u64),
            48..56 => (0, 0),
            _ => (5000 + i as u64, 9000 + i as u64),
        };
        assert_eq!(a.read(i), expected(sa), "{why}: guest a page {i}");
        assert_eq!(b.read(i), expected(sb), "{why}: guest b page {i}");
    }
}

fn run_with_failures(op: Op, count: u32, mode: ProtectMode) {
    let why = format!("{op:?} x{count} under {mode:?}");
    let (a, b) = guests();
    let mut e = engine();
    a.add(&mut e, 0, mode);
    b.add(&mut e, 0, mode);
    scan_passes(&mut e, 1);
    let injected_before = faults::injected(op);
    faults::fail(op, count);
    scan_passes(&mut e, 2);
    faults::fail(op, 0);
    let injected = faults::injected(op) - injected_before;
    assert!(injected > 0, "{why}: no call failed (the test injects nothing)");
    let s = e.stats();
    assert!(s.errors > 0, "{why}: {injected} failures not counted: {s:?}");
    let audit = e.audit();
    assert_eq!(audit.leaked_frames, 0, "{why}: {audit:?}");
    check_contents(&a, &b, &why);
    // Scanning goes on: once the calls work, everything merges.
    scan_passes(&mut e, 3);
    let s = e.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.zero_pages), (48, 48, 16), "{why}: {s:?}");
    assert_eq!(s.guests_lost, 0, "{why}: {s:?}");
    check_contents(&a, &b, &why);
    let audit = e.audit();
    assert_eq!((audit.leaked_frames, audit.live_frames), (0, 48), "{why}: {audit:?}");
    // The stores hold no more memory than their live frames.
    assert!(audit.store_pages <= audit.live_frames, "{why}: {audit:?}");
    assert!(b.resident_bytes() <= (8 * PAGE_SIZE) as u64, "{why}: merged pages left in b's memfd");
}

#[test]
fn every_failure_leaves_the_engine_consistent() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let modes = modes();
    for mode in &modes {
        // A frame cannot be written; remaps fail (the pages stay as they
        // were); freeing the old memory fails (it is freed later or never,
        // never wrongly); page maps cannot be read (breaks are seen later).
        for (op, count) in [(Op::Pwrite, 5), (Op::Mmap, 3), (Op::Mmap, 1000), (Op::Punch, 4), (Op::PageMap, 2)] {
            run_with_failures(op, count, *mode);
        }
    }
    if modes.contains(&ProtectMode::WriteProtect) {
        // Write-protection fails: the window is not merged.
        run_with_failures(Op::Uffd, 3, ProtectMode::WriteProtect);
    }
    // Reading a page copied on write from the guest's process fails.
    let (a, b) = guests();
    let mut e = engine();
    a.add(&mut e, 0, ProtectMode::Freeze);
    b.add(&mut e, 0, ProtectMode::Freeze);
    settle(&mut e);
    a.fill(0, 77);
    b.fill(0, 77);
    scan_passes(&mut e, 1);
    // Broken right after their merge, they are held back a while
    // (dedup/src/churn.rs): let that pass, so they are read again.
    e.advance_clock(std::time::Duration::from_secs(10));
    faults::fail(Op::ReadRemote, 2);
    scan_passes(&mut e, 2);
    faults::fail(Op::ReadRemote, 0);
    assert!(e.stats().errors > 0);
    settle(&mut e);
    assert_eq!(e.stats().pages_shared, 48, "{:?}", e.stats());
    assert_eq!(e.audit().leaked_frames, 0);
    assert_eq!((a.read(0), b.read(0)), (expected(77), expected(77)));
}

/// A store can run out of room only if frames really pile up: ids are
/// reused, so twin frames that never get merged cost nothing for ever.
#[test]
fn unmerged_twins_do_not_grow_the_store() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut e: Engine = engine();
    let (a, b) = guests();
    a.add(&mut e, 0, ProtectMode::Freeze);
    b.add(&mut e, 0, ProtectMode::Freeze);
    settle(&mut e);
    for round in 0..50u64 {
        // Page 60 of both guests becomes a twin pair that is merged, then broken.
        a.fill(60, 100_000 + round);
        b.fill(60, 100_000 + round);
        // Each pair lives ten minutes: not churning, so never held back.
        e.advance_clock(std::time::Duration::from_secs(600));
        scan_passes(&mut e, 2);
    }
    // Without a dirty log a page merges once its hash held a pass: every other round here.
    assert!(e.stats().cow_breaks >= 2 * 24, "the twins were not merged: {:?}", e.stats());
    let audit = e.audit();
    assert_eq!(audit.leaked_frames, 0, "{audit:?}");
    assert!(audit.store_pages <= 50, "{audit:?}");
}
