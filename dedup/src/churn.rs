//! Pages that keep changing: which pages page sharing leaves alone, and for
//! how long.
//!
//! A page written again soon after its merge costs its guest a copy-on-write
//! fault, the merge a remap and the scanner a read and a hash, and saves
//! nothing for long. KSM avoids most of that by merging only pages whose
//! checksum held over a whole scan (minutes on a big host). Our scanner
//! looks at every page about once a second, so a page rewritten every
//! second or two looks quiet between its writes: measured before this
//! module, churning pages were merged and broken again every round, and
//! their guests ran tens of times slower.
//!
//! So every page has a *heat level*. Three events say a page is changing:
//! a copy-on-write break of its merge, a change found while merging it (its
//! compare failed, or a writer hit it under write-protection), and being
//! written between two looks in a row (the dirty log, or without one its
//! content hash). An event that comes soon after the page's last event or
//! merge makes it one level hotter; one after a long quiet cools it, a
//! level for each fourfold of quiet beyond its hold. A page at level L > 0
//! is *held* for 4^(L-1) units after each event: not looked at, not merged,
//! and its dirty log not re-armed (so the guest takes no write-protect fault
//! on it either). A page that keeps churning is held 1, 4, 16, 64 and at
//! most 256 units at a time, so over a long run it is broken a handful of
//! times instead of once a round; a page that settles down (or only ever
//! changed once, as a guest filling its memory does) is not held at all.
//!
//! The unit is the engine's idea of "soon": at least [`MIN_UNIT`], and at
//! least two look intervals (the time between the ends of two passes), since
//! an event is only seen at a look, and a break right after a merge may show
//! up to two passes later.

use std::time::Duration;

/// Engine time, in tenths of a second since the engine started, plus
/// [`LONG_AGO`]: stamps start at 0, which thus reads as an hour before the
/// engine started (a page that never changed has been quiet for long). A
/// u32 lasts 13 years.
pub type Tick = u32;

pub const TICKS_PER_SECOND: u32 = 10;
const LONG_AGO: Tick = 3600 * TICKS_PER_SECOND;
/// The shortest unit: what "soon" means when passes are short.
pub const MIN_UNIT: Duration = Duration::from_secs(2);
/// The hottest level: held 4^(MAX_LEVEL-1) = 256 units.
pub const MAX_LEVEL: u8 = 5;

/// The engine's clock reading for `elapsed` since it started.
pub fn tick(elapsed: Duration) -> Tick {
    let t = elapsed.as_millis() / (1000 / TICKS_PER_SECOND as u128) + LONG_AGO as u128;
    t.min(Tick::MAX as u128) as Tick
}

/// The unit for a look interval of `look`.
pub fn unit(look: Tick) -> Tick {
    let min = MIN_UNIT.as_secs() as Tick * TICKS_PER_SECOND;
    look.saturating_mul(2).max(min)
}

/// How long a page at `level` is held after an event, in units.
fn hold_units(level: u8) -> u32 {
    match level {
        0 => 0,
        l => 1 << (2 * (l - 1)),
    }
}

/// Why a page was held back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Its merge was broken (copy-on-write) soon after it was made; a page
    /// going back and forth between zero and data is one of these.
    BrokenSoon,
    /// It changed while being merged: its compare failed, or a writer hit
    /// it while it was write-protected.
    ChangedInMerge,
    /// It was written between two looks in a row.
    Rewritten,
}

/// Every page's heat level and its stamp: while the page is held, when the
/// hold ends; otherwise when it was last merged or last changed (or when
/// its hold ended). Five bytes a page.
pub struct Heat {
    level: Vec<u8>,
    stamp: Vec<Tick>,
}

impl Heat {
    pub fn new(pages: usize) -> Heat {
        Heat { level: vec![0; pages], stamp: vec![0; pages] }
    }

    pub fn is_held(&self, page: usize, now: Tick) -> bool {
        self.stamp[page] > now
    }

    pub fn level(&self, page: usize) -> u8 {
        self.level[page]
    }

    /// The page was merged now: a break is measured from here.
    pub fn merged(&mut self, page: usize, now: Tick) {
        self.stamp[page] = now;
    }

    /// The page changed now (see the module documentation): updates its
    /// level and returns how long it is held (0: not held).
    pub fn changed(&mut self, page: usize, now: Tick, unit: Tick) -> Tick {
        let quiet = now.saturating_sub(self.stamp[page]);
        let mut level = self.level[page];
        let hold = |level: u8| hold_units(level).saturating_mul(unit);
        if quiet <= hold(level).saturating_add(unit) {
            level = (level + 1).min(MAX_LEVEL);
        } else {
            // Quiet for more than four times the hold: a level cooler for
            // each fourfold.
            let mut bar = hold(level).saturating_mul(4).saturating_add(unit);
            while level > 0 && quiet > bar {
                level -= 1;
                bar = bar.saturating_mul(4);
            }
        }
        self.level[page] = level;
        let held = hold(level);
        self.stamp[page] = now.saturating_add(held);
        held
    }

    /// A bitmap (bit i of word i / 64) of the pages held at `now`, and how
    /// many there are.
    pub fn held_bitmap(&self, now: Tick) -> (Vec<u64>, u64) {
        let mut bits = vec![0u64; self.stamp.len().div_ceil(64)];
        let mut n = 0;
        for (i, &until) in self.stamp.iter().enumerate() {
            if until > now {
                bits[i / 64] |= 1 << (i % 64);
                n += 1;
            }
        }
        (bits, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: Tick = 20;

    #[test]
    fn a_page_that_changes_once_is_never_held() {
        let mut h = Heat::new(1);
        let now = tick(Duration::from_secs(1));
        assert_eq!(h.changed(0, now, U), 0, "a first change after a long quiet holds nothing");
        assert!(!h.is_held(0, now));
        assert_eq!(h.level(0), 0);
    }

    #[test]
    fn holds_grow_fourfold_while_a_page_keeps_changing_and_stop_at_the_top() {
        let mut h = Heat::new(1);
        let mut now = tick(Duration::from_secs(5));
        h.merged(0, now);
        let mut holds = Vec::new();
        for _ in 0..8 {
            // Broken (or rewritten) one tick after it became eligible again.
            now += 1;
            let held = h.changed(0, now, U);
            assert!(h.is_held(0, now + held - 1) && !h.is_held(0, now + held));
            holds.push(held / U);
            now += held;
        }
        assert_eq!(holds, [1, 4, 16, 64, 256, 256, 256, 256]);
    }

    #[test]
    fn a_long_quiet_cools_a_page_a_level_per_fourfold() {
        let mut h = Heat::new(1);
        let mut now = tick(Duration::from_secs(5));
        h.merged(0, now);
        for _ in 0..3 {
            now += 1;
            now += h.changed(0, now, U);
        }
        assert_eq!(h.level(0), 3, "held 16 units now");
        h.merged(0, now);
        // Quiet for 20 units: past the hold and its unit, short of 4x the hold.
        now += 20 * U;
        assert_eq!(h.changed(0, now, U), 16 * U, "neither hotter nor cooler");
        now += 16 * U;
        h.merged(0, now);
        // Quiet for 100 units: more than 4 x 16 + 1, less than 16 x 16: one level cooler.
        now += 100 * U;
        assert_eq!(h.changed(0, now, U), 4 * U);
        assert_eq!(h.level(0), 2);
        now += 4 * U;
        h.merged(0, now);
        now += 10_000 * U;
        assert_eq!(h.changed(0, now, U), 0, "quiet for ages: cold again");
        assert_eq!(h.level(0), 0);
    }

    #[test]
    fn the_unit_is_two_looks_and_at_least_the_minimum() {
        assert_eq!(unit(1), 20);
        assert_eq!(unit(15), 30);
        assert_eq!(tick(Duration::ZERO), LONG_AGO);
        assert_eq!(tick(Duration::from_millis(1234)), LONG_AGO + 12);
    }

    #[test]
    fn the_held_bitmap_marks_held_pages_only() {
        let mut h = Heat::new(130);
        let now = tick(Duration::from_secs(5));
        for p in [3, 64, 129] {
            h.merged(p, now);
            h.changed(p, now + 1, U);
        }
        h.changed(7, now, U); // once, after a long quiet: not held
        let (bits, n) = h.held_bitmap(now + 2);
        assert_eq!(n, 3);
        assert_eq!(bits, vec![1 << 3, 1, 1 << 1]);
        assert_eq!(h.held_bitmap(now + 2 + U).1, 0, "holds of one unit are over");
    }
}
