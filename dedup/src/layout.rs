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
