//! Pages that keep changing (dedup/src/churn.rs): held back ever longer
//! while they churn, their dirty log left alone while held, merged again
//! once they settle, and the pages around them merged as before.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dedup::{Engine, ProtectMode};
use support::*;

/// A dirty log written by hand that behaves as KVM's with manual clearing:
/// a bit stays set until the page is watched again, and each time it is
/// (a write-protect fault for the guest at its next write) is counted.
#[derive(Default)]
struct Log {
    bits: Mutex<Vec<u64>>,
    rearmed: Mutex<Vec<u64>>,
}

impl Log {
    fn mark(&self, page: usize) {
        let mut bits = self.bits.lock().unwrap();
        if bits.len() <= page / 64 {
            bits.resize(page / 64 + 1, 0);
        }
        bits[page / 64] |= 1 << (page % 64);
    }

    fn rearmed(&self, page: usize) -> u64 {
        self.rearmed.lock().unwrap().get(page).copied().unwrap_or(0)
    }
}

impl dedup::DirtyTracker for Log {
    fn take_dirty(&self) -> std::io::Result<Vec<u64>> {
        Ok(self.bits.lock().unwrap().clone())
    }

    fn watch(&self, pages: &[u64]) -> std::io::Result<()> {
        let mut bits = self.bits.lock().unwrap();
        let mut rearmed = self.rearmed.lock().unwrap();
        for (i, w) in bits.iter_mut().enumerate() {
            let cleared = *w & pages.get(i).copied().unwrap_or(0);
            for b in 0..64 {
                if cleared & (1 << b) != 0 {
                    let page = i * 64 + b;
                    if rearmed.len() <= page {
                        rearmed.resize(page + 1, 0);
                    }
                    rearmed[page] += 1;
                }
            }
            *w &= !cleared;
        }
        Ok(())
    }
}

fn add_logged(e: &mut Engine, g: &TestGuest, log: &Arc<Log>) -> dedup::GuestId {
    let store = e.store_file(0).unwrap();
    let agent = dedup::Agent::new(
        g.regions(),
        g.memfd.try_clone().unwrap(),
        store,
        ProtectMode::Freeze,
        g.gate.clone(),
        Some(log.clone() as Arc<dyn dedup::DirtyTracker>),
    )
    .unwrap();
    e.add_guest(g.memory(agent, 0)).unwrap()
}

/// One pass, `look` after the last.
fn pass_after(e: &mut Engine, look: Duration) {
    e.advance_clock(look);
    scan_passes(e, 1);
}

#[test]
fn a_page_rewritten_every_pass_is_held_ever_longer_and_its_log_left_alone() {
    let g = TestGuest::new(4);
    let log = Arc::new(Log::default());
    let mut e = engine();
    let id = add_logged(&mut e, &g, &log);
    g.fill(1, 7);
    // 20 s of passes half a second apart, page 0 written before each.
    for round in 0..40 {
        g.fill(0, 100 + round);
        log.mark(0);
        pass_after(&mut e, Duration::from_millis(500));
    }
    let held = e.guest_stats(id).unwrap().held;
    assert!((2..=4).contains(&held.rewritten), "holds of 2, 8 and 32 s: {held:?}");
    assert_eq!(held.now, 1);
    // Once per hold: watched again when it ends, seen written, held again.
    assert!(log.rearmed(0) <= held.rewritten + 1, "watched again {} times in 40 passes", log.rearmed(0));
    assert_eq!(log.rearmed(1), 0, "a page written once before the first look is watched once: {}", log.rearmed(1));
}

/// Two guests whose page 0 takes the same new content in both every third
/// pass (every 1.5 s): between two writes it looks quiet, merges, and the
/// next write breaks it. Held after its first breaks, it is broken a few
/// times in 150 s, not 100; the pages beside it stay merged throughout.
#[test]
fn churning_pages_are_broken_a_few_times_not_every_round() {
    for mode in modes() {
        let (a, b) = (TestGuest::new(8), TestGuest::new(8));
        for i in 0..8 {
            a.fill(i, 50 + i as u64);
            b.fill(i, 50 + i as u64);
        }
        let mut e = engine();
        a.add(&mut e, 0, mode);
        b.add(&mut e, 0, mode);
        for pass in 0..300u64 {
            if pass % 3 == 0 {
                a.fill(0, 1000 + pass);
                b.fill(0, 1000 + pass);
            }
            pass_after(&mut e, Duration::from_millis(500));
            assert_eq!((a.read(0), b.read(0)), (expected(1000 + pass / 3 * 3), expected(1000 + pass / 3 * 3)));
        }
        let s = e.stats();
        assert!(s.cow_breaks <= 2 * 5, "{mode:?}: {} breaks of 2 churning pages in 100 rounds: {s:?}", s.cow_breaks);
        assert!(s.held.holds() >= 2, "{mode:?}: {s:?}");
        assert_eq!(s.pages_sharing, 7, "{mode:?}: the other pages stay merged: {s:?}");
        for i in 1..8 {
            assert_eq!((a.read(i), b.read(i)), (expected(50 + i as u64), expected(50 + i as u64)));
        }
        assert_eq!(e.audit().leaked_frames, 0);
    }
}

/// A page that churned and then settles merges again once its hold is
/// over, and a merge on request takes a held page at once.
#[test]
fn a_page_that_settles_merges_again_and_a_merge_on_request_takes_held_pages() {
    let (a, b) = (TestGuest::new(2), TestGuest::new(2));
    let mut e = engine();
    let ida = a.add(&mut e, 0, ProtectMode::Freeze);
    let idb = b.add(&mut e, 0, ProtectMode::Freeze);
    let mut content = 0;
    for round in 0..6u64 {
        content = 70 + round;
        a.fill(0, content);
        b.fill(0, content);
        // Quiet for two looks (checksums: a page must keep its hash a pass).
        pass_after(&mut e, Duration::from_millis(500));
        pass_after(&mut e, Duration::from_millis(500));
        pass_after(&mut e, Duration::from_millis(500));
    }
    let held = e.guest_stats(ida).unwrap().held;
    assert!(held.now == 1 && held.after_break >= 2, "{held:?}");
    assert_eq!(e.stats().pages_sharing, 0, "held, not merged");
    // Merges on request take it anyway (the second finds the first's twin).
    e.merge_now(ida).unwrap();
    e.merge_now(idb).unwrap();
    pass_after(&mut e, Duration::from_millis(500));
    assert_eq!(e.stats().pages_sharing, 1, "{:?}", e.stats());
    assert_eq!((a.read(0), b.read(0)), (expected(content), expected(content)));
    // Unmerged by a write, then quiet for ten minutes: merged by the scan.
    a.fill(0, content);
    pass_after(&mut e, Duration::from_millis(500));
    assert_eq!(e.stats().pages_sharing, 0);
    pass_after(&mut e, Duration::from_secs(600));
    pass_after(&mut e, Duration::from_millis(500));
    pass_after(&mut e, Duration::from_millis(500));
    assert_eq!(e.stats().pages_sharing, 1, "settled down, merged again: {:?}", e.stats());
}
