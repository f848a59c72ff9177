//! Where a guest's pages are: its RAM regions, page numbering, and the
//! merges the engine asks for, as both sides of a merge see them.

use crate::os::PAGE_SIZE;
use crate::store::FrameId;

/// A contiguous piece of guest RAM: a `MAP_SHARED` mapping of the guest's
/// memfd at `file_offset`, `len` bytes long at address `host` in the
/// process that runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub host: u64,
    pub len: usize,
    pub file_offset: u64,
}

/// What a merged page maps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// The kernel's zero page (anonymous memory).
    Zero,
    /// A frame of the guest's merge group's stable store.
    Frame(FrameId),
}

/// Guest pages numbered 0.. over its regions in order.
#[derive(Clone, Debug)]
pub struct Layout {
    pub regions: Vec<Region>,
    /// Page index at which each region starts.
    starts: Vec<usize>,
    pages: usize,
}

impl Layout {
    /// Fails for regions that are not whole pages (a guest's claim the
    /// engine does not take on trust).
    pub fn new(regions: Vec<Region>) -> Result<Layout, String> {
        let mut starts = Vec::with_capacity(regions.len());
        let mut pages = 0usize;
        for r in &regions {
            if !r.host.is_multiple_of(PAGE_SIZE as u64)
                || !r.len.is_multiple_of(PAGE_SIZE)
                || !r.file_offset.is_multiple_of(PAGE_SIZE as u64)
                || r.len == 0
            {
                return Err(format!("guest region {r:?} is not whole pages"));
            }
            starts.push(pages);
            pages = pages.checked_add(r.len / PAGE_SIZE).ok_or("guest too large")?;
        }
        if pages >= u32::MAX as usize / 2 {
            return Err(format!("guest of {pages} pages is too large to share"));
        }
        Ok(Layout { regions, starts, pages })
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// (region, page within it) of page `page`.
    pub fn locate(&self, page: usize) -> (usize, usize) {
        let r = self.starts.partition_point(|&s| s <= page) - 1;
        (r, page - self.starts[r])
    }

    /// The pages from `page` to the end of its region (at most `max`).
    pub fn pages_left_in_region(&self, page: usize, max: usize) -> usize {
        let (r, off) = self.locate(page);
        (self.regions[r].len / PAGE_SIZE - off).min(max)
    }

    /// The page's address in the guest's process.
    pub fn host(&self, page: usize) -> u64 {
        let (r, off) = self.locate(page);
        self.regions[r].host + (off * PAGE_SIZE) as u64
    }

    pub fn file_offset(&self, page: usize) -> u64 {
        let (r, off) = self.locate(page);
        self.regions[r].file_offset + (off * PAGE_SIZE) as u64
    }

    /// The pages `host..host + len` of this process are, as runs within
    /// one region each: `None` unless they are whole pages of the guest.
    pub fn pages_at(&self, host: u64, len: u64) -> Option<Vec<(usize, usize)>> {
        let page = PAGE_SIZE as u64;
        if !host.is_multiple_of(page) || !len.is_multiple_of(page) {
            return None;
        }
        let mut runs = Vec::new();
        let (mut at, end) = (host, host.checked_add(len)?);
        while at < end {
            let r = self.regions.iter().position(|r| (r.host..r.host + r.len as u64).contains(&at))?;
            let region = &self.regions[r];
            let n = (end.min(region.host + region.len as u64) - at) / page;
            runs.push((self.starts[r] + ((at - region.host) / page) as usize, n as usize));
            at += n * page;
        }
        Some(runs)
    }

    /// One past the highest memfd offset any region uses.
    pub fn file_len(&self) -> u64 {
        self.regions.iter().map(|r| r.file_offset + r.len as u64).max().unwrap_or(0)
    }

    /// Splits merges (sorted by page) into the runs one mapping can cover:
    /// consecutive guest pages in one region with consecutive frames (or
    /// all zero). Returns (index of the run's first entry, entries in it).
    pub fn mapping_runs(&self, merges: &[(u32, Target)]) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < merges.len() {
            let (first, target) = merges[i];
            let region = self.locate(first as usize).0;
            let mut n = 1;
            while let Some(&(p, t)) = merges.get(i + n) {
                let next = match (target, t) {
                    (Target::Zero, Target::Zero) => true,
                    (Target::Frame(a), Target::Frame(b)) => b as usize == a as usize + n,
                    _ => false,
                };
                if p as usize != first as usize + n || !next || self.locate(p as usize).0 != region {
                    break;
                }
                n += 1;
            }
            runs.push((i, n));
            i += n;
        }
        runs
    }
}

/// Consecutive page indexes within one region, as (first, count) runs.
pub fn page_runs(layout: &Layout, pages: impl Iterator<Item = usize>) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == p && layout.locate(*start).0 == layout.locate(p).0 => *len += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// Sets (or clears) bits `start..start + n` of a bitmap (bit i of word i / 64).
pub fn set_bits(bitmap: &mut [u64], start: usize, n: usize, on: bool) {
    for i in start..start + n {
        if on {
            bitmap[i / 64] |= 1 << (i % 64);
        } else {
            bitmap[i / 64] &= !(1 << (i % 64));
        }
    }
}

/// Whether bit `i` of a bitmap is set (bits past its end are not).
pub fn bit(bitmap: &[u64], i: usize) -> bool {
    bitmap.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// The runs (first, count) of set bits in `start..start + n`.
pub fn set_runs(bitmap: &[u64], start: usize, n: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = start;
    while i < start + n {
        // Whole words of clear bits are skipped at once.
        if i.is_multiple_of(64) && bitmap.get(i / 64).is_none_or(|&w| w == 0) {
            i += 64;
            continue;
        }
        if bit(bitmap, i) {
            match runs.last_mut() {
                Some((first, len)) if *first + *len == i => *len += 1,
                _ => runs.push((i, 1)),
            }
        }
        i += 1;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> Layout {
        Layout::new(vec![
            Region { host: 0x10_0000, len: 4 * PAGE_SIZE, file_offset: 0 },
            Region { host: 0x90_0000, len: 4 * PAGE_SIZE, file_offset: 4 * PAGE_SIZE as u64 },
        ])
        .unwrap()
    }

    #[test]
    fn pages_are_numbered_over_regions() {
        let l = two_regions();
        assert_eq!(l.pages(), 8);
        assert_eq!(l.locate(5), (1, 1));
        assert_eq!(l.host(5), 0x90_0000 + PAGE_SIZE as u64);
        assert_eq!(l.file_offset(5), 5 * PAGE_SIZE as u64);
        assert_eq!(l.pages_left_in_region(2, 100), 2);
        assert_eq!(l.file_len(), 8 * PAGE_SIZE as u64);
        assert_eq!(l.pages_at(0x10_2000, 0x2000), Some(vec![(2, 2)]));
        assert_eq!(l.pages_at(0x90_0000, 0x1000), Some(vec![(4, 1)]));
        assert_eq!(l.pages_at(0x10_3000, 0x2000), None, "runs past its region into no region");
        assert_eq!(l.pages_at(0x10_0800, 0x1000), None, "not whole pages");
    }

    #[test]
    fn bitmap_runs() {
        let mut b = vec![0u64; 2];
        set_bits(&mut b, 62, 4, true);
        set_bits(&mut b, 63, 1, false);
        assert_eq!(set_runs(&b, 0, 128), vec![(62, 1), (64, 2)]);
        assert!(bit(&b, 65) && !bit(&b, 66) && !bit(&b, 1000));
    }

    /// A run never crosses from one region into the next, even where page
    /// numbers continue (the regions are far apart in memory).
    #[test]
    fn runs_stop_at_region_boundaries() {
        let l = two_regions();
        assert_eq!(page_runs(&l, [2, 3, 4, 5].into_iter()), vec![(2, 2), (4, 2)]);
        let merges = [(3, Target::Zero), (4, Target::Zero), (6, Target::Frame(1)), (7, Target::Frame(2))];
        assert_eq!(l.mapping_runs(&merges), vec![(0, 1), (1, 1), (2, 2)]);
    }

    #[test]
    fn odd_regions_are_refused() {
        assert!(Layout::new(vec![Region { host: 0x1001, len: PAGE_SIZE, file_offset: 0 }]).is_err());
        assert!(Layout::new(vec![Region { host: 0x1000, len: 100, file_offset: 0 }]).is_err());
    }
}
