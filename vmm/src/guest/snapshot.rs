//! A guest's machine state in a snapshot, written and read by its guest
//! process: KVM's state (every vCPU, the irqchip, PIT and clock), our
//! devices' and the guest's RAM. The format's outline and the files are
//! `crate::snapshot`'s.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::GuestConfig;
use crate::error::{Error, Result};
use crate::guest::devices::doorbell::DoorbellState;
use crate::guest::devices::power::PmState;
use crate::guest::devices::serial::SerialSnapshot;
use crate::guest::devices::virtio::{self, SavedDevice};
use crate::guest::vstate::state::{VcpuState, VmState};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::snapshot::{MemoryPages, SavedState, SnapshotFiles, CHUNK, FORMAT, VERSION};

/// A guest's whole state, but for its memory.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    format: String,
    version: u32,
    /// The guest as it was created (kernel and command line for the record;
    /// memory size and vCPU count for the clones).
    pub config: GuestConfig,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub doorbell: DoorbellState,
    /// The ACPI PM registers (absent from snapshots before they were kept:
    /// such clones' timers count the host's clock).
    #[serde(default)]
    pub power: Option<PmState>,
    /// Its virtio devices, in slot order (a disk's overlay is
    /// [`OVERLAY_FILE`]).
    pub devices: Vec<SavedDevice>,
}

impl SnapshotState {
    pub fn new(
        config: GuestConfig,
        vm: VmState,
        vcpus: Vec<VcpuState>,
        serial: SerialSnapshot,
        doorbell: DoorbellState,
        power: PmState,
        devices: Vec<SavedDevice>,
    ) -> Self {
        let power = Some(power);
        SnapshotState { format: FORMAT.into(), version: VERSION, config, vm, vcpus, serial, doorbell, power, devices }
    }

    /// The saved state of the device called `name`.
    pub fn device(&self, name: &str) -> Option<&SavedDevice> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Parses the state the supervisor read from the snapshot in `dir`
    /// and checks it fits its guest: a vCPU state for each vCPU, a device
    /// state for each device, each device's state its own.
    pub fn parse(saved: &SavedState, dir: &Path) -> Result<SnapshotState> {
        let name = dir.display();
        let state: SnapshotState = serde_json::from_str(&saved.0)
            .map_err(|e| Error::bad_input(format!("snapshot {name}: a damaged snapshot state: {e}")))?;
        if state.vcpus.len() as u64 != state.config.vcpus || state.doorbell.vcpus() != state.vcpus.len() {
            return Err(Error::bad_input(format!(
                "snapshot {name} has state for {} vCPUs but its guest has {}",
                state.vcpus.len(),
                state.config.vcpus
            )));
        }
        virtio::check_saved(&state.config, &state.devices, dir)
            .map_err(|e| Error::bad_input(format!("snapshot {name}: {e}")))?;
        Ok(state)
    }
}

/// Short: the vCPU and device state is no one's to read in a log.
impl std::fmt::Debug for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotState")
            .field("version", &self.version)
            .field("config", &self.config)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// Writes `state` and the memory of `ram` into `files`. The guest must be
/// paused. Returns the pages written.
pub fn write(files: &SnapshotFiles, state: &SnapshotState, ram: &GuestRam) -> io::Result<u64> {
    use std::io::Write;
    files.memory.set_len(state.config.memory_bytes())?;
    let pages = write_memory(ram, &files.memory)?;
    files.memory.sync_all()?;
    (&files.state).write_all(&serde_json::to_vec(state).map_err(io::Error::other)?)?;
    files.state.sync_all()?;
    Ok(pages)
}

/// Copies guest RAM into `out` at the memfd's offsets, leaving zero pages
/// as holes. Each page is read where it lives: pages still in the memfd
/// from the memfd (a `pread` of a hole reads zeros without allocating the
/// page, which a read through the mapping would), pages page sharing has
/// remapped (stable-store frames, the zero page, copy-on-write copies)
/// through this process's mapping.
fn write_memory(ram: &GuestRam, out: &File) -> io::Result<u64> {
    let memfd_inode = match ram.memfd() {
        Some(f) => Some(f.metadata()?.ino()),
        None => None,
    };
    let maps = MappedFiles::read()?;
    let mut pages = 0;
    let mut buf = vec![0u8; CHUNK];
    for region in ram.memory().iter() {
        let host = region.as_ptr() as u64;
        let file_offset = region.file_offset().map_or(0, |f| f.start());
        let len = region.len();
        let mut done = 0;
        while done < len {
            let addr = host + done;
            // The run of this chunk that one mapping covers.
            let (inode, vma_end) = maps.at(addr);
            let n = (len - done).min(CHUNK as u64).min(vma_end.saturating_sub(addr).max(PAGE_SIZE)) as usize;
            let chunk = &mut buf[..n];
            match (ram.memfd(), memfd_inode) {
                (Some(memfd), Some(ino)) if inode == Some(ino) => memfd.read_exact_at(chunk, file_offset + done)?,
                _ => {
                    // SAFETY: [addr, addr + n) lies inside this region's live
                    // mapping; the guest is paused, so nothing writes it.
                    let src = unsafe { std::slice::from_raw_parts(addr as *const u8, n) };
                    chunk.copy_from_slice(src);
                }
            }
            pages += write_nonzero_pages(out, chunk, file_offset + done)?;
            done += n as u64;
        }
    }
    Ok(pages)
}

/// Writes the pages of `chunk` that are not all zero at `offset` on; runs
/// of them in one write. Returns how many pages it wrote.
fn write_nonzero_pages(out: &File, chunk: &[u8], offset: u64) -> io::Result<u64> {
    let page = PAGE_SIZE as usize;
    let mut written = 0;
    let mut run_start = None;
    for i in 0..=chunk.len() / page {
        let nonzero = i < chunk.len() / page && chunk[i * page..(i + 1) * page].iter().any(|&b| b != 0);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                out.write_all_at(&chunk[s * page..i * page], offset + (s * page) as u64)?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// This process's file mappings: (start, end, inode), sorted.
struct MappedFiles(Vec<(u64, u64, Option<u64>)>);

impl MappedFiles {
    fn read() -> io::Result<MappedFiles> {
        let text = dedup::os::self_maps()?;
        let text = String::from_utf8_lossy(&text);
        let mut maps = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(range), Some(inode)) = (fields.next(), fields.nth(3)) else { continue };
            let Some((start, end)) = range.split_once('-') else { continue };
            let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
                continue;
            };
            let inode = inode.parse::<u64>().ok().filter(|&i| i != 0);
            maps.push((start, end, inode));
        }
        Ok(MappedFiles(maps))
    }

    /// The inode mapped at `addr` (None: anonymous or unmapped) and where
    /// that mapping ends.
    fn at(&self, addr: u64) -> (Option<u64>, u64) {
        let i = self.0.partition_point(|&(_, end, _)| end <= addr);
        match self.0.get(i) {
            Some(&(start, end, inode)) if start <= addr => (inode, end),
            Some(&(start, _, _)) => (None, start),
            None => (None, u64::MAX),
        }
    }
}

/// Fills fresh guest RAM from the snapshot's memory file: only its data
/// (holes stay holes, so a restored guest costs what it had written).
pub fn load_memory(dir: &Path, ram: &GuestRam) -> io::Result<u64> {
    let mut loaded = 0;
    for read in MemoryPages::open(dir)? {
        let (page, content) = read?;
        let offset = page as u64 * PAGE_SIZE;
        match ram.memfd() {
            Some(memfd) => memfd.write_all_at(&content, offset)?,
            None => {
                let host = host_address(ram, offset).ok_or_else(|| {
                    io::Error::other(format!("page {page} of the snapshot is beyond the guest's RAM"))
                })?;
                // SAFETY: a whole page inside one region's mapping, of a
                // guest not yet running.
                unsafe { std::ptr::copy_nonoverlapping(content.as_ptr(), host as *mut u8, content.len()) }
            }
        }
        loaded += 1;
    }
    Ok(loaded)
}

/// Where the page at `offset` of the memory file (laid out as the memfd:
/// regions in guest-address order) is mapped.
fn host_address(ram: &GuestRam, offset: u64) -> Option<u64> {
    let mut start = 0;
    for region in ram.memory().iter() {
        if offset + PAGE_SIZE <= start + region.len() {
            return (offset >= start).then(|| region.as_ptr() as u64 + (offset - start));
        }
        start += region.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{guest_memfd, MIB};
    use crate::snapshot::MEMORY_FILE;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn nonzero_pages_are_written_in_runs_and_zeros_stay_holes() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-pages-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("m")).unwrap();
        out.set_len(8 * PAGE_SIZE).unwrap();
        let mut chunk = vec![0u8; 6 * PAGE_SIZE as usize];
        for p in [1usize, 2, 5] {
            chunk[p * PAGE_SIZE as usize + 7] = p as u8;
        }
        assert_eq!(write_nonzero_pages(&out, &chunk, PAGE_SIZE).unwrap(), 3);
        let mut back = vec![0u8; 8 * PAGE_SIZE as usize];
        out.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[PAGE_SIZE as usize..7 * PAGE_SIZE as usize], &chunk[..]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// RAM written, saved, loaded into fresh RAM: the same bytes, and only
    /// the written pages cost anything.
    #[test]
    fn memory_survives_a_round_trip() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ram = GuestRam::new(16 * MIB, Some(guest_memfd("t", 16 * MIB).unwrap())).unwrap();
        for (i, addr) in [0x1000u64, 0x2000, 0x7f_f000, 0xff_f000].iter().enumerate() {
            ram.memory().write_obj(0xdead_0000_u64 + i as u64, GuestAddress(*addr)).unwrap();
        }
        let memory = File::create(dir.join(MEMORY_FILE)).unwrap();
        memory.set_len(16 * MIB).unwrap();
        assert_eq!(write_memory(&ram, &memory).unwrap(), 4);
        assert!(memory.metadata().unwrap().blocks() * 512 < MIB, "zero pages were written");

        for memfd in [Some(guest_memfd("u", 16 * MIB).unwrap()), None] {
            let fresh = GuestRam::new(16 * MIB, memfd).unwrap();
            assert_eq!(load_memory(&dir, &fresh).unwrap(), 4);
            for (i, addr) in [0x1000u64, 0x2000, 0x7f_f000, 0xff_f000].iter().enumerate() {
                assert_eq!(fresh.memory().read_obj::<u64>(GuestAddress(*addr)).unwrap(), 0xdead_0000 + i as u64);
            }
            assert_eq!(fresh.memory().read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
