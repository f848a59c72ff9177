//! Counters, named as KSM names them where they mean the same.

use std::collections::VecDeque;
use std::time::Duration;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Stable frames in use.
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
    /// Bytes saved minus the engine's bookkeeping.
    pub general_profit: i64,
    /// Mappings (VMAs) this process has.
    pub mappings_used: u64,
    /// Merged pages the guest wrote since (copied on write).
    pub cow_breaks: u64,
    /// Whether merging stopped short of vm.max_map_count.
    pub map_limit_reached: bool,
    /// How long guests stayed stopped for merge batches.
    pub freeze: FreezeSummary,
    /// How long stopping them took (their vCPUs still ran meanwhile).
    pub park_wait: FreezeSummary,
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
    pub(crate) volatile_this_pass: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FreezeSummary {
    pub count: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// The most recent freeze durations, for percentiles.
#[derive(Default)]
pub struct FreezeTimes {
    recent: VecDeque<Duration>,
    count: u64,
    max: Duration,
}

const KEEP: usize = 4096;

impl FreezeTimes {
    pub fn record(&mut self, d: Duration) {
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(d);
        self.count += 1;
        self.max = self.max.max(d);
    }

    pub fn summary(&self) -> FreezeSummary {
        let mut v: Vec<Duration> = self.recent.iter().copied().collect();
        v.sort_unstable();
        let pct = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default();
        FreezeSummary { count: self.count, p50: pct(0.5), p99: pct(0.99), max: self.max }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut f = FreezeTimes::default();
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
