//! Guests made of plain memfd mappings in the test process, without KVM:
//! the same memory layout a guest has, with threads standing in for vCPUs.
//! The test process plays both sides: the engine's and the guest's.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use dedup::os::{self, PAGE_SIZE};
use dedup::{Agent, Engine, Freezer, GuestId, GuestMemory, ProtectMode, Region};

/// Stands in for a guest's vCPUs under the freeze: writers hold a pass
/// while writing, and a freeze waits until no writer holds one and admits
/// none until the thaw. (Under write-protection nobody freezes it and the
/// kernel holds writers off.)
#[derive(Default)]
pub struct WriterGate {
    state: Mutex<(bool, usize)>, // (frozen, writers inside)
    changed: Condvar,
    pub freezes: AtomicU64,
}

impl WriterGate {
    pub fn write<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut s = self.state.lock().unwrap();
        while s.0 {
            s = self.changed.wait(s).unwrap();
        }
        s.1 += 1;
        drop(s);
        let r = f();
        self.state.lock().unwrap().1 -= 1;
        self.changed.notify_all();
        r
    }
}

impl Freezer for WriterGate {
    fn freeze(&self) -> usize {
        self.freezes.fetch_add(1, Ordering::SeqCst);
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        while s.1 > 0 {
            s = self.changed.wait(s).unwrap();
        }
        1
    }
    fn thaw(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }
}

/// A guest's RAM as the VMM maps it: a memfd, mapped MAP_SHARED.
pub struct TestGuest {
    pub memfd: File,
    pub base: *mut u8,
    pub pages: usize,
    pub gate: Arc<WriterGate>,
}

unsafe impl Send for TestGuest {}
unsafe impl Sync for TestGuest {}

impl TestGuest {
    pub fn new(pages: usize) -> Self {
        let memfd = os::memfd("test-guest").unwrap();
        memfd.set_len((pages * PAGE_SIZE) as u64).unwrap();
        let base = os::map_shared(&memfd, pages * PAGE_SIZE, 0).unwrap();
        TestGuest { memfd, base, pages, gate: Arc::new(WriterGate::default()) }
    }

    pub fn regions(&self) -> Vec<Region> {
        vec![Region { host: self.base as u64, len: self.pages * PAGE_SIZE, file_offset: 0 }]
    }

    /// The agent a guest process would run for this memory.
    pub fn agent(&self, e: &mut Engine, group: u32, mode: ProtectMode) -> Agent {
        let store = e.store_file(group).unwrap();
        Agent::new(self.regions(), self.memfd.try_clone().unwrap(), store, mode, self.gate.clone(), None).unwrap()
    }

    pub fn memory(&self, agent: Agent, group: u32) -> GuestMemory {
        GuestMemory {
            memfd: self.memfd.try_clone().unwrap(),
            regions: self.regions(),
            group,
            pid: std::process::id(),
            agent: Box::new(agent),
        }
    }

    /// Registers this guest with the engine, merging under `mode`.
    pub fn add(&self, e: &mut Engine, group: u32, mode: ProtectMode) -> GuestId {
        let agent = self.agent(e, group, mode);
        e.add_guest(self.memory(agent, group)).unwrap()
    }

    pub fn page(&self, i: usize) -> *mut u8 {
        assert!(i < self.pages);
        unsafe { self.base.add(i * PAGE_SIZE) }
    }

    pub fn fill(&self, i: usize, seed: u64) {
        let words = fill_words(seed);
        self.gate
            .write(|| unsafe { std::ptr::copy_nonoverlapping(words.as_ptr().cast::<u8>(), self.page(i), PAGE_SIZE) });
    }

    pub fn read(&self, i: usize) -> Vec<u8> {
        let mut v = vec![0u8; PAGE_SIZE];
        unsafe { std::ptr::copy_nonoverlapping(self.page(i), v.as_mut_ptr(), PAGE_SIZE) };
        v
    }

    /// Bytes of memfd memory still allocated (punched pages are gone).
    pub fn resident_bytes(&self) -> u64 {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(self.memfd.as_raw_fd(), &mut st) }, 0);
        st.st_blocks as u64 * 512
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        unsafe { os::unmap(self.base, self.pages * PAGE_SIZE) };
    }
}

/// An agent the test also calls directly (a balloon's discards), as a
/// guest process shares its agent: each call holds it alone.
pub struct SharedAgent(pub Arc<Mutex<Agent>>);

impl dedup::GuestAgent for SharedAgent {
    fn status(&mut self) -> std::io::Result<dedup::AgentStatus> {
        self.0.lock().unwrap().status()
    }

    fn watch(&mut self, pages: &[u64]) -> std::io::Result<()> {
        dedup::GuestAgent::watch(&mut *self.0.lock().unwrap(), pages)
    }

    fn merge(&mut self, merges: &[(u32, dedup::Target)]) -> std::io::Result<dedup::MergeOutcome> {
        Ok(self.0.lock().unwrap().merge(merges))
    }

    fn adopt(&mut self, pages: &[(u32, dedup::Target)]) -> std::io::Result<dedup::MergeOutcome> {
        Ok(self.0.lock().unwrap().adopt(pages))
    }
}

/// Page content from a seed (seed 0 gives a zero page).
pub fn fill_words(seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..PAGE_SIZE / 8)
        .map(|i| {
            if seed == 0 {
                return 0;
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407 ^ i as u64);
            x ^ (x >> 29)
        })
        .collect()
}

pub fn expected(seed: u64) -> Vec<u8> {
    fill_words(seed).iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A page of a snapshot as an adoption reads it: (page, content).
pub type SnapshotPage = std::io::Result<(usize, Vec<u8>)>;

/// A snapshot of `pages` pages, page `i` holding `expected(seed + i)`.
pub fn snapshot_of(pages: usize, seed: u64) -> Vec<(usize, Vec<u8>)> {
    (0..pages).map(|i| (i, expected(seed + i as u64))).collect()
}

/// `pages` read without a failure.
pub fn read(pages: &[(usize, Vec<u8>)]) -> Vec<SnapshotPage> {
    pages.iter().cloned().map(Ok).collect()
}

/// No page read: what a clone that takes a kept placement is given.
pub fn unread() -> Vec<SnapshotPage> {
    Vec::new()
}

pub fn engine() -> Engine {
    Engine::new(dedup::Config { pages_to_scan: 1 << 20, ..dedup::Config::default() })
}

/// Runs `passes` full passes.
pub fn scan_passes(e: &mut Engine, passes: u64) {
    let start = e.stats().full_scans;
    while e.stats().full_scans < start + passes {
        e.scan();
    }
}

/// Merges what is there: the first pass only records each page, the second
/// merges the pages that stayed unchanged.
pub fn settle(e: &mut Engine) {
    scan_passes(e, 2);
}

/// Both ways of holding writers off. A host without userfaultfd
/// write-protection fails the tests that need it, unless
/// VMM_TEST_NO_UFFD=1 says to test the freeze alone (README).
pub fn modes() -> Vec<ProtectMode> {
    match dedup::uffd::Uffd::open() {
        Ok(_) => vec![ProtectMode::Freeze, ProtectMode::WriteProtect],
        Err(_) if std::env::var_os("VMM_TEST_NO_UFFD").is_some() => vec![ProtectMode::Freeze],
        Err(e) => panic!(
            "no userfaultfd write-protection here ({e}): run as root on Linux >= 5.19, or set VMM_TEST_NO_UFFD=1"
        ),
    }
}
