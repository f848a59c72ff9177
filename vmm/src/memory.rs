//! Guest RAM: the host memory that backs it and where it sits in the guest.
//!
//! Each guest's RAM is one memfd (the default), made by the supervisor,
//! which keeps it to read the guest's pages, and mapped `MAP_SHARED` by the
//! guest's process, where page sharing replaces pages inside the mapping and
//! punches the old frames out of the file. The anonymous `MAP_PRIVATE`
//! backend exists so kernel KSM (`MADV_MERGEABLE`) can be compared against it.
//!
//! The mapping keeps a dirty bitmap of what the VMM itself writes (device
//! emulation, through vm-memory): KVM's dirty log sees only the vCPUs'
//! writes, and page sharing needs both.
//!
//! Guest-physical layout (x86): RAM from 0 up to the 32-bit MMIO hole at
//! 3 GiB, the rest from 4 GiB up. The hole holds the IOAPIC, the LAPIC and the
//! VMM's own MMIO devices.

use std::fs::File;
use std::io;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

/// Guest memory as the VMM maps it: vm-memory regions with a dirty bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const MIB: u64 = 1 << 20;
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole: no RAM between here and 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// The smallest guest we build: room for the boot structures and a kernel.
pub const MIN_MEMORY_MIB: u64 = 8;

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Maps `size` bytes (a multiple of the page size) of guest RAM: the
    /// memfd `memfd` (at least `size` long) or, without one, fresh
    /// anonymous memory.
    pub fn new(size: u64, memfd: Option<File>) -> io::Result<Self> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::other(format!("guest RAM size {size} must be whole pages")));
        }
        if let Some(file) = &memfd {
            if file.metadata()?.len() < size {
                return Err(io::Error::other("the guest memory file is smaller than the guest's RAM"));
            }
        }
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (base, len) in ram_ranges(size) {
            let builder = MmapRegionBuilder::new_with_bitmap(len as usize, AtomicBitmap::with_len(len as usize))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
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

    /// The RAM as page sharing sees it: each region's address in this
    /// process, length and offset in the memfd.
    pub fn regions(&self) -> Vec<dedup::Region> {
        self.memory
            .iter()
            .map(|r| dedup::Region {
                host: r.as_ptr() as u64,
                len: r.len() as usize,
                file_offset: r.file_offset().map_or(0, |f| f.start()),
            })
            .collect()
    }

    /// Pages the VMM itself wrote since the last call (see [`take_device_writes`]).
    pub fn take_device_writes(&self) -> Vec<u64> {
        take_device_writes(&self.memory)
    }

    /// Lets kernel KSM merge this RAM (anonymous backend).
    pub fn mark_mergeable(&self) -> io::Result<()> {
        for r in self.memory.iter() {
            // SAFETY: madvise on a mapping we own; MADV_MERGEABLE changes no contents.
            if unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_MERGEABLE) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Pages the VMM itself wrote in `memory` since the last call (one bitmap
/// over all regions in order, a bit per page), and forgets them.
pub fn take_device_writes(memory: &GuestMemoryMmap) -> Vec<u64> {
    memory.iter().flat_map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset()).collect()
}

/// A fresh memfd of `size` bytes for a guest's RAM (not yet allocated:
/// pages come as the guest writes them), sealed at that size: the
/// supervisor maps every guest's RAM, and a guest process that could
/// shrink its memfd would turn the supervisor's next read of it into
/// SIGBUS.
pub fn guest_memfd(name: &str, size: u64) -> io::Result<File> {
    let file = dedup::os::memfd(&format!("vmm-{name}"))?;
    file.set_len(size)?;
    dedup::os::seal(&file, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)?;
    Ok(file)
}

/// Reads `MemAvailable` from /proc/meminfo, in bytes.
pub fn host_available_memory() -> io::Result<u64> {
    meminfo("MemAvailable")
}

/// Reads `MemTotal` from /proc/meminfo, in bytes.
pub fn host_total_memory() -> io::Result<u64> {
    meminfo("MemTotal")
}

/// Time tasks on this host spent stalled on memory (reclaim, refaults,
/// waiting at a cgroup limit) since boot, from PSI; None where the kernel
/// has no /proc/pressure/memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStall {
    /// Time at least one task stalled, in microseconds.
    pub some_us: u64,
    /// Time every runnable task stalled at once.
    pub full_us: u64,
}

pub fn host_memory_stall() -> Option<MemoryStall> {
    parse_pressure(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
}

/// `some avg10=.. total=N` and `full ... total=N` lines.
fn parse_pressure(text: &str) -> Option<MemoryStall> {
    let total = |kind: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(kind))?
            .split_whitespace()
            .find_map(|f| f.strip_prefix("total="))?
            .parse()
            .ok()
    };
    Some(MemoryStall { some_us: total("some")?, full_us: total("full").unwrap_or(0) })
}

fn meminfo(key: &str) -> io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other(format!("no {key} in /proc/meminfo")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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
        let ram = GuestRam::new(16 * MIB, Some(guest_memfd("test", 16 * MIB).unwrap())).unwrap();
        ram.memory().write_obj(0xabcd_u32, GuestAddress(0x3000)).unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().unwrap().read_exact_at(&mut buf, 0x3000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
        assert_eq!(ram.memory().last_addr(), GuestAddress(16 * MIB - 1));
    }

    #[test]
    fn anon_ram_has_no_file() {
        let ram = GuestRam::new(8 * MIB, None).unwrap();
        assert!(ram.memfd().is_none());
        assert_eq!(ram.memory().read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
    }

    /// What the VMM writes shows in the bitmap page sharing reads, once.
    #[test]
    fn device_writes_are_recorded() {
        let ram = GuestRam::new(16 * MIB, Some(guest_memfd("test", 16 * MIB).unwrap())).unwrap();
        ram.take_device_writes();
        ram.memory().write_slice(&[1u8; 5000], GuestAddress(0x3ff0)).unwrap();
        let bits = ram.take_device_writes();
        let written: Vec<usize> = (0..bits.len() * 64).filter(|&p| bits[p / 64] & (1 << (p % 64)) != 0).collect();
        assert_eq!(written, vec![3, 4, 5]);
        assert!(ram.take_device_writes().iter().all(|&w| w == 0));
    }

    #[test]
    fn a_short_memory_file_is_refused() {
        assert!(GuestRam::new(16 * MIB, Some(guest_memfd("test", 8 * MIB).unwrap())).is_err());
    }

    #[test]
    fn memory_pressure_totals_are_read() {
        let text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=3749459\nfull avg10=1.50 avg60=0.00 avg300=0.00 total=1562582\n";
        assert_eq!(parse_pressure(text), Some(MemoryStall { some_us: 3749459, full_us: 1562582 }));
        // No full line counts none; a file without totals is no reading.
        assert_eq!(parse_pressure("some avg10=0.00 total=7\n"), Some(MemoryStall { some_us: 7, full_us: 0 }));
        assert_eq!(parse_pressure("some avg10=0.00\n"), None);
        assert_eq!(parse_pressure(""), None);
    }
}
