//! Guest pages given back to the host (a balloon's inflations and free
//! page reports, `devices::virtio::balloon`): their memory is freed and
//! the guest reads zeroes there until it writes them again.
//!
//! With page sharing the merge agent does it (`dedup::Agent::discard`),
//! under its lock, so a discard never meets a merge half way and the
//! engine learns which merged pages went; without, the memfd's pages are
//! punched out (or, for anonymous memory, dropped).

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::guest::devices::virtio::balloon::GiveBack;
use crate::memory::{GuestMemoryMmap, GuestRam};

pub struct GuestPages {
    memory: GuestMemoryMmap,
    memfd: Option<File>,
    /// The merge agent, once it exists, and whether a discard may wait
    /// for it (see [`GuestPages::share_with`]); weak, so the agent still
    /// goes before the memory it maps when the guest ends.
    agent: OnceLock<(Weak<Mutex<dedup::Agent>>, bool)>,
}

impl GuestPages {
    pub fn new(ram: &GuestRam) -> io::Result<GuestPages> {
        let memfd = ram.memfd().map(File::try_clone).transpose()?;
        Ok(GuestPages { memory: ram.memory().clone(), memfd, agent: OnceLock::new() })
    }

    /// From now on discards go through the merge agent. Under the freeze
    /// a discard never waits for it: the device thread that discards holds
    /// its device, a vCPU may wait for that device, and a frozen merge
    /// (which holds the agent) waits for every vCPU. There a discard that
    /// meets a merge frees nothing and says so ([`io::ErrorKind::WouldBlock`]):
    /// the balloon keeps that buffer and tries again.
    pub fn share_with(&self, agent: &Arc<Mutex<dedup::Agent>>) {
        let may_wait = agent.lock().unwrap_or_else(|e| e.into_inner()).protection() == dedup::Protection::WriteProtect;
        let _ = self.agent.set((Arc::downgrade(agent), may_wait));
    }
}

impl GiveBack for GuestPages {
    fn discard(&self, gpa: u64, len: u64) -> io::Result<()> {
        let bad = || io::Error::other(format!("{len:#x} bytes at {gpa:#x} are not whole pages of guest RAM"));
        let page = crate::memory::PAGE_SIZE;
        if len == 0 || !gpa.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(bad());
        }
        let region = self.memory.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(bad());
        }
        let host = region.get_host_address(MemoryRegionAddress(offset)).map_err(|_| bad())? as u64;
        if let Some((agent, may_wait)) = self.agent.get().and_then(|(a, w)| Some((a.upgrade()?, *w))) {
            let mut agent = match (may_wait, agent.try_lock()) {
                (_, Ok(agent)) => agent,
                (_, Err(std::sync::TryLockError::Poisoned(e))) => e.into_inner(),
                (true, Err(std::sync::TryLockError::WouldBlock)) => agent.lock().unwrap_or_else(|e| e.into_inner()),
                (false, Err(std::sync::TryLockError::WouldBlock)) => {
                    return Err(io::Error::new(io::ErrorKind::WouldBlock, "page sharing is merging the guest"))
                }
            };
            return agent.discard(host, len);
        }
        match (&self.memfd, region.file_offset()) {
            (Some(memfd), Some(file)) => dedup::os::punch_hole(memfd, file.start() + offset, len),
            // SAFETY: guest pages the guest gave up; dropping them loses
            // nothing it needs (they read as zero afterwards).
            _ => match unsafe { libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// Without page sharing, given-back pages read zero and their memfd
    /// pages are gone; ranges that are not guest RAM are refused.
    #[test]
    fn given_back_pages_read_zero_and_free_their_memory() {
        let memfd = dedup::os::memfd("reclaim-test").unwrap();
        memfd.set_len(1 << 20).unwrap();
        let ram = GuestRam::new(1 << 20, Some(memfd.try_clone().unwrap())).unwrap();
        ram.memory().write_slice(&[7u8; 0x3000], GuestAddress(0x1000)).unwrap();
        let blocks = |f: &File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().blocks() * 512
        };
        assert_eq!(blocks(&memfd), 0x3000);
        let pages = GuestPages::new(&ram).unwrap();
        pages.discard(0x1000, 0x2000).unwrap();
        assert_eq!(blocks(&memfd), 0x1000, "the given-back pages still hold memory");
        let mut back = [1u8; 0x3000];
        ram.memory().read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert!(back[..0x2000].iter().all(|&b| b == 0) && back[0x2000..].iter().all(|&b| b == 7));
        for (gpa, len) in [(0xff000, 0x2000), (0x1800, 0x1000), (0x1000, 0), (1 << 30, 0x1000), (0x1000, 0x800)] {
            assert!(pages.discard(gpa, len).is_err(), "{gpa:#x}+{len:#x} was taken");
        }
        // Through a merge agent under the freeze: never waits for it.
        struct NoFreezer;
        impl dedup::Freezer for NoFreezer {
            fn freeze(&self) -> usize {
                0
            }
            fn thaw(&self) {}
        }
        let store = dedup::store::StableStore::new(0).unwrap();
        let agent = dedup::Agent::new(
            ram.regions(),
            memfd.try_clone().unwrap(),
            store.file().try_clone().unwrap(),
            dedup::ProtectMode::Freeze,
            Arc::new(NoFreezer),
            None,
        )
        .unwrap();
        let agent = Arc::new(Mutex::new(agent));
        pages.share_with(&agent);
        ram.memory().write_slice(&[7u8; 0x1000], GuestAddress(0x8000)).unwrap();
        let merging = agent.lock().unwrap();
        let busy = pages.discard(0x8000, 0x1000).unwrap_err();
        assert_eq!(busy.kind(), io::ErrorKind::WouldBlock, "{busy}");
        drop(merging);
        pages.discard(0x8000, 0x1000).unwrap();
        let mut page = [1u8; 0x1000];
        ram.memory().read_slice(&mut page, GuestAddress(0x8000)).unwrap();
        assert_eq!(page, [0u8; 0x1000]);
        let status = agent.lock().unwrap().status().unwrap();
        assert_eq!(status.discarded, vec![(8, 1)], "the engine hears of it");

        let anon = GuestRam::new(1 << 20, None).unwrap();
        anon.memory().write_slice(&[7u8; 0x1000], GuestAddress(0x5000)).unwrap();
        GuestPages::new(&anon).unwrap().discard(0x5000, 0x1000).unwrap();
        let mut page = [1u8; 0x1000];
        anon.memory().read_slice(&mut page, GuestAddress(0x5000)).unwrap();
        assert_eq!(page, [0u8; 0x1000]);
    }
}
