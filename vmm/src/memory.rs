//! Guest RAM: the host memory that backs it and where it sits in the guest.
//!
//! Each guest's RAM is one memfd mapped `MAP_SHARED` (the default), so that
//! page sharing can later replace single pages inside the mapping and punch
//! the old frames out of the file. The anonymous `MAP_PRIVATE` backend exists
//! so kernel KSM (`MADV_MERGEABLE`) can be compared against it.
//!
//! Guest-physical layout (x86): RAM from 0 up to the 32-bit MMIO hole at
//! 3 GiB, the rest from 4 GiB up. The hole holds the IOAPIC, the LAPIC and the
//! VMM's own MMIO devices.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

pub const MIB: u64 = 1 << 20;
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole: no RAM between here and 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// The smallest guest we build: room for the boot structures and a kernel.
pub const MIN_MEMORY_MIB: u64 = 8;

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryBackend {
    /// A memfd mapped `MAP_SHARED`: pages can be remapped and punched out.
    Memfd,
    /// Anonymous `MAP_PRIVATE` memory: what kernel KSM can merge.
    Anon,
}

/// The guest-physical ranges of RAM for a guest with `size` bytes of it.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![(GuestAddress(0), MMIO_HOLE_START), (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START)]
    }
}

/// A guest's RAM, mapped into this process.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    /// The memfd behind a `Memfd` guest; file offsets follow guest ranges in order.
    memfd: Option<File>,
}

impl GuestRam {
    /// Maps `size` bytes (a multiple of the page size) of fresh, zeroed RAM.
    pub fn new(name: &str, size: u64, backend: MemoryBackend) -> io::Result<Self> {
        assert!(size > 0 && size.is_multiple_of(PAGE_SIZE), "guest RAM size {size} must be whole pages");
        let memfd = match backend {
            MemoryBackend::Memfd => Some(create_memfd(name, size)?),
            MemoryBackend::Anon => None,
        };
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (base, len) in ram_ranges(size) {
            let builder = MmapRegionBuilder::new(len as usize).with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            let builder = match &memfd {
                Some(file) => builder
                    .with_file_offset(FileOffset::new(file.try_clone()?, file_offset))
                    .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE),
                None => builder.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            };
            let mapping = builder.build().map_err(io::Error::other)?;
            regions.push(
                GuestRegionMmap::new(mapping, base)
                    .ok_or_else(|| io::Error::other(format!("guest RAM range at {:#x} overflows", base.0)))?,
            );
            file_offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(io::Error::other)?;
        Ok(GuestRam { memory, memfd })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }
}

impl GuestRam {
    /// This RAM as the page-sharing engine sees it (memfd backend only).
    pub fn sharing_view(
        &self,
        group: u32,
        freezer: std::sync::Arc<dyn dedup::Freezer>,
        dirty: Option<std::sync::Arc<dyn dedup::DirtyTracker>>,
    ) -> Result<dedup::GuestMemory, String> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let memfd = self.memfd.as_ref().ok_or("in-process page sharing needs memfd-backed guest RAM")?;
        let regions = self
            .memory
            .iter()
            .map(|r| dedup::Region {
                host: r.as_ptr(),
                len: r.len() as usize,
                file_offset: r.file_offset().map_or(0, |f| f.start()),
            })
            .collect();
        Ok(dedup::GuestMemory {
            memfd: memfd.try_clone().map_err(|e| format!("cannot share guest memory: {e}"))?,
            regions,
            group,
            freezer,
            dirty,
        })
    }

    /// Lets kernel KSM merge this RAM (anonymous backend).
    pub fn mark_mergeable(&self) -> io::Result<()> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for r in self.memory.iter() {
            // SAFETY: madvise on a mapping we own; MADV_MERGEABLE changes no contents.
            if unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_MERGEABLE) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn create_memfd(name: &str, size: u64) -> io::Result<File> {
    let cname = std::ffi::CString::new(format!("vmm-{name}")).map_err(io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string; the flags are plain constants.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Reads `MemAvailable` from /proc/meminfo, in bytes.
pub fn host_available_memory() -> io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other("no MemAvailable in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_guest_is_one_range_below_the_hole() {
        assert_eq!(ram_ranges(256 * MIB), vec![(GuestAddress(0), 256 * MIB)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(GuestAddress(0), MMIO_HOLE_START)]);
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let r = ram_ranges(4096 * MIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_HOLE_END));
        assert_eq!(r[0].1 + r[1].1, 4096 * MIB);
    }

    #[test]
    fn memfd_ram_is_shared_with_its_file() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new("test", 16 * MIB, MemoryBackend::Memfd).unwrap();
        ram.memory().write_obj(0xabcd_u32, GuestAddress(0x3000)).unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().unwrap().read_exact_at(&mut buf, 0x3000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
        assert_eq!(ram.memory().last_addr(), GuestAddress(16 * MIB - 1));
    }

    #[test]
    fn anon_ram_has_no_file() {
        let ram = GuestRam::new("test", 8 * MIB, MemoryBackend::Anon).unwrap();
        assert!(ram.memfd().is_none());
        assert_eq!(ram.memory().read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
    }
}
