//! Counters, named as KSM names them where they mean the same.

use std::collections::VecDeque;
use std::time::Duration;

use crate::churn::Why;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Stable frames that guest pages map.
    pub pages_shared: u64,
    /// Guest pages mapping a frame, beyond the first per frame: pages saved.
    pub pages_sharing: u64,
    /// Pages seen once in the last pass with no twin yet.
    pub pages_unshared: u64,
    /// Pages that changed between two looks in the last pass.
    pub pages_volatile: u64,
    pub pages_scanned: u64,
    /// Pages read and hashed (the rest of those scanned kept a known hash
    /// or were merged already).
    pub pages_hashed: u64,
    pub full_scans: u64,
    /// Guest pages mapped to the kernel's zero page: each saves a page.
    pub zero_pages: u64,
    /// Bytes saved minus the engine's bookkeeping and the kernel memory of
    /// the mappings merging made.
    pub general_profit: i64,
    /// Mappings (VMAs) the guests' processes have, summed.
    pub mappings_used: u64,
    /// Merged pages the guest wrote since (copied on write).
    pub cow_breaks: u64,
    /// Whether some guest's merging stopped short of vm.max_map_count.
    pub map_limit_reached: bool,
    /// Every interval page sharing held a guest's vCPU or device thread.
    pub stall: StallSummary,
    /// Merge calls made under write-protection and under a freeze.
    pub merges_write_protected: u64,
    pub merges_frozen: u64,
    /// Failed system calls or guest replies (each left the engine
    /// consistent; scanning went on), and the last one.
    pub errors: u64,
    pub last_error: Option<String>,
    /// Guests whose merge agent stopped answering: no longer scanned.
    pub guests_lost: u64,
    /// Pages held back because they keep changing.
    pub held: HeldPages,
}

impl Stats {
    /// Host pages no longer needed thanks to sharing.
    pub fn pages_saved(&self) -> u64 {
        self.pages_sharing + self.zero_pages
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestStats {
    pub group: u32,
    /// Pages of this guest that map a stable frame.
    pub merged_pages: u64,
    pub zero_pages: u64,
    pub cow_breaks: u64,
    /// Mappings its process has (an upper bound) and its limit.
    pub mappings: u64,
    pub map_limit: u64,
    pub map_limit_reached: bool,
    /// Why the engine gave up on this guest, if it did.
    pub lost: Option<String>,
    /// Passes that went by it: its agent could not answer (stopped).
    pub passes_skipped: u64,
    /// Pages it gave back to the host (a balloon), each released from
    /// whatever it was merged with.
    pub discarded_pages: u64,
    pub held: HeldPages,
    pub(crate) volatile_this_pass: u64,
}

/// Pages page sharing leaves alone for a while because they keep changing
/// (crate::churn): merging them would only be undone.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeldPages {
    /// Pages held at the guest's last look.
    pub now: u64,
    /// Holds begun, by why: a copy-on-write break soon after the merge
    /// (zero and data in turn counts here too), a change found while
    /// merging, written between two looks in a row.
    pub after_break: u64,
    pub changed_in_merge: u64,
    pub rewritten: u64,
}

impl HeldPages {
    pub fn count(&mut self, why: Why) {
        match why {
            Why::BrokenSoon => self.after_break += 1,
            Why::ChangedInMerge => self.changed_in_merge += 1,
            Why::Rewritten => self.rewritten += 1,
        }
    }

    /// Holds begun for any reason.
    pub fn holds(&self) -> u64 {
        self.after_break + self.changed_in_merge + self.rewritten
    }

    pub fn add(&mut self, other: &HeldPages) {
        self.now += other.now;
        self.after_break += other.after_break;
        self.changed_in_merge += other.changed_in_merge;
        self.rewritten += other.rewritten;
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StallSummary {
    pub count: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// The most recent stall durations, for percentiles.
#[derive(Default)]
pub struct StallTimes {
    recent: VecDeque<Duration>,
    count: u64,
    max: Duration,
}

const KEEP: usize = 16384;

impl StallTimes {
    pub fn record(&mut self, d: Duration) {
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(d);
        self.count += 1;
        self.max = self.max.max(d);
    }

    pub fn summary(&self) -> StallSummary {
        let mut v: Vec<Duration> = self.recent.iter().copied().collect();
        v.sort_unstable();
        let pct = |p: f64| nearest_rank(&v, p).unwrap_or_default();
        StallSummary { count: self.count, p50: pct(0.5), p99: pct(0.99), max: self.max }
    }
}

/// The value at `q` (0..=1) of `sorted`, by nearest rank; None when empty.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get(((last as f64 * q).round() as usize).min(last)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut f = StallTimes::default();
        for us in 1..=100 {
            f.record(Duration::from_micros(us));
        }
        let s = f.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.max, Duration::from_micros(100));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert!(s.p50 >= Duration::from_micros(50) && s.p50 <= Duration::from_micros(51));
    }
}
