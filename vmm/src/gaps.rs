//! How long guests' pages took, as the guests felt it: memtest times every
//! page it checks with the TSC and reports a histogram (the doorbell's GAP
//! register); here those are turned into nanoseconds and summed over
//! guests, and percentiles are read off. A long gap is the vCPU being held:
//! by the host scheduler, a fault, or page sharing. `vmm bench` compares the
//! distributions of each mode in one run.
//!
//! Buckets, in TSC ticks from the guest and in nanoseconds here, are 8 per
//! power of two (about 9% wide), as [`gap_ticks`]
//! describes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Gap buckets: 8 per power of two of TSC ticks.
pub const GAP_BUCKETS: usize = 512;

/// The fewest TSC ticks a gap in `bucket` took (memtest's bucketing: the
/// ticks below 8 one bucket each, then 8 buckets per power of two).
pub fn gap_ticks(bucket: usize) -> u64 {
    if bucket < 8 {
        return bucket as u64;
    }
    let (top, sub) = (bucket / 8 + 2, (bucket % 8) as u128);
    u64::try_from((8 + sub) << (top - 3).min(100)).unwrap_or(u64::MAX)
}

/// Pages by how long they took, in nanosecond buckets (sparse).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Gaps {
    /// bucket -> pages
    pub buckets: BTreeMap<u16, u64>,
}

/// The bucket of a value (ticks or nanoseconds): the inverse of `gap_ticks`.
pub fn bucket_of(value: u64) -> usize {
    if value < 8 {
        return value as usize;
    }
    let top = 63 - value.leading_zeros() as usize;
    8 * (top - 2) + ((value >> (top - 3)) & 7) as usize
}

impl Gaps {
    /// A guest's histogram in TSC ticks, at `tsc_khz`, in nanoseconds.
    pub fn from_ticks(counts: &[u64], tsc_khz: u32) -> Gaps {
        let mut g = Gaps::default();
        for (b, &n) in counts.iter().enumerate().filter(|(_, &n)| n > 0) {
            let ns = (u128::from(gap_ticks(b)) * 1_000_000 / u128::from(tsc_khz.max(1))) as u64;
            *g.buckets.entry(bucket_of(ns).min(GAP_BUCKETS - 1) as u16).or_default() += n;
        }
        g
    }

    pub fn add(&mut self, other: &Gaps) {
        for (&b, &n) in &other.buckets {
            *self.buckets.entry(b).or_default() += n;
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    /// The gap at fraction `q` (0.5, 0.999...) of all pages, in
    /// nanoseconds (the lower edge of its bucket); 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (&b, &n) in &self.buckets {
            seen += n;
            if seen >= want {
                return gap_ticks(b as usize);
            }
        }
        0
    }

    /// The longest gap's bucket, in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.buckets.keys().next_back().map_or(0, |&b| gap_ticks(b as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_invert_and_ticks_become_nanoseconds() {
        for v in [0, 7, 8, 15, 16, 1000, 123_456_789, u64::MAX / 3] {
            let b = bucket_of(v);
            assert!(gap_ticks(b) <= v && (b + 1 == GAP_BUCKETS || gap_ticks(b + 1) > v), "{v}");
        }
        // 3,000 ticks at 3 GHz is 1 us.
        let g = Gaps::from_ticks(
            &{
                let mut c = vec![0; GAP_BUCKETS];
                c[bucket_of(3000)] = 10;
                c
            },
            3_000_000,
        );
        assert_eq!(g.count(), 10);
        let ns = g.max_ns();
        // Two roundings down to a bucket edge, each under 12.5%.
        assert!((780..=1000).contains(&ns), "{ns}");
    }

    #[test]
    fn quantiles_walk_the_buckets() {
        let mut g = Gaps::default();
        g.buckets.insert(bucket_of(1000) as u16, 998);
        g.buckets.insert(bucket_of(1_000_000) as u16, 2);
        assert!(g.quantile_ns(0.5) <= 1000 && g.quantile_ns(0.5) > 900);
        assert!(g.quantile_ns(0.999) > 900_000);
        assert_eq!(Gaps::default().quantile_ns(0.99), 0);
        let mut h = g.clone();
        h.add(&g);
        assert_eq!(h.count(), 2000);
    }
}
