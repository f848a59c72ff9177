//! Pages that keep changing (dedup/src/churn.rs): held back ever longer
//! while they churn, their dirty log left alone while held, merged again
//! once they settle, and the pages around them merged as before.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dedup::{Engine, ProtectMode};
use support::*;

/// A dirty log written by hand that behaves as KVM's with manual clearing:
/// a kept page's bit stays set, and it counts the re-arms of a page (each
/// would cost the guest a write-protect fault at its next write).
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
    fn take_dirty(&self, keep: &[u64]) -> std::io::Result<Vec<u64>> {
        let mut bits = self.bits.lock().unwrap();
        let taken = bits.clone();
        let mut rearmed = self.rearmed.lock().unwrap();
        for (i, w) in bits.iter_mut().enumerate() {
            let cleared = *w & !keep.get(i).copied().unwrap_or(0);
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
        Ok(taken)
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
fn pass(e: &mut Engine, look: Duration) {
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
        pass(&mut e, Duration::from_millis(500));
    }
    let held = e.guest_stats(id).unwrap().held;
    eprintln!("{held:?} rearmed {}", log.rearmed(0));
    assert!((2..=4).contains(&held.rewritten), "holds of 2, 8 and 32 s: {held:?}");
    assert_eq!(held.now, 1);
    assert!(log.rearmed(0) <= 10, "re-armed {} times in 40 passes", log.rearmed(0));
}
