//! Snapshots: a paused guest written to a directory, and guests started
//! from one (restored, or cloned N times).
//!
//! A snapshot directory holds two files:
//!
//! - `state.json`: the format name and version, the guest's configuration,
//!   KVM's state (every vCPU, the irqchip, PIT and clock: `vstate::state`)
//!   and the state of our devices (the serial port, the doorbell). Written
//!   last, through a temporary name, so a directory with a `state.json` is a
//!   whole snapshot.
//! - `memory`: the guest's RAM as one sparse file, laid out as the guest's
//!   memfd (RAM ranges in guest-address order). Zero pages are holes, so a
//!   256 MiB guest that touched 100 MiB writes 100 MiB.
//!
//! The guest's process writes both (it alone sees all of its memory: pages
//! merged by page sharing live in the stable store, mapped into its RAM),
//! while the guest is paused, so nothing changes under it; a guest with a
//! disk also gets its virtio transport and queue saved, and the clusters its
//! overlay holds copied to `overlay`, while its I/O thread is held.
//!
//! A restored guest is built like a booted one, except that its RAM is read
//! from `memory` instead of loading a kernel, and its vCPUs, VM and devices
//! take the saved state before they first run. What a clone gets from
//! itself rather than from the snapshot: its guest id (the doorbell's
//! `GUEST_ID`), its console and its page-sharing identity. Everything in
//! guest memory is the snapshot's, including any random seed the guest
//! kernel drew before it (docs/snapshots.md).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::GuestConfig;
use crate::devices::doorbell::DoorbellState;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::{self, SavedDevice};
use crate::error::{Error, Result};
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::vstate::state::{VcpuState, VmState};

/// What `state.json` says it is.
const FORMAT: &str = "vmm-snapshot";
/// Bumped whenever the state's layout changes: another version is refused.
pub const VERSION: u32 = 2;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";
/// The clusters the guest's disk overlay held.
pub const OVERLAY_FILE: &str = "overlay";
const PARTIAL_STATE_FILE: &str = "state.json.partial";
/// The largest `state.json` read: vCPU and device state is kilobytes, a
/// large disk's cluster bitmap a few megabytes.
const MAX_STATE_BYTES: u64 = 64 << 20;
/// Memory is copied in chunks of this many bytes.
const CHUNK: usize = 1 << 20;

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
    /// Its virtio devices, in slot order (a disk's overlay is
    /// [`OVERLAY_FILE`]).
    pub devices: Vec<SavedDevice>,
}

/// Only the fields every version has: read first, so another version gets
/// a clear error and not a parse error.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// What writing a snapshot took.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Written {
    /// Pages written to the memory file (not zero).
    pub pages: u64,
    /// How long the guest was held for it, in microseconds.
    pub micros: u64,
}

impl SnapshotState {
    pub fn new(
        config: GuestConfig,
        vm: VmState,
        vcpus: Vec<VcpuState>,
        serial: SerialSnapshot,
        doorbell: DoorbellState,
        devices: Vec<SavedDevice>,
    ) -> Self {
        SnapshotState { format: FORMAT.into(), version: VERSION, config, vm, vcpus, serial, doorbell, devices }
    }

    /// The saved state of the device called `name`.
    pub fn device(&self, name: &str) -> Option<&SavedDevice> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Reads and checks the snapshot in `dir`: its version, that its memory
    /// file is there and as large as its guest's RAM, that its state fits
    /// its configuration.
    pub fn open(dir: &Path) -> Result<SnapshotState> {
        let name = dir.display();
        let path = dir.join(STATE_FILE);
        let text = open_file(&path)
            .and_then(|file| {
                let len = file.metadata()?.len();
                if len > MAX_STATE_BYTES {
                    return Err(io::Error::other(format!(
                        "it is {len} bytes, more than a state is ({MAX_STATE_BYTES})"
                    )));
                }
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_STATE_BYTES), &mut text)?;
                Ok(text)
            })
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => Error::bad_input(format!("{name} is not a snapshot: no {STATE_FILE} in it")),
                _ => Error::bad_input(format!("cannot read {}: {e}", path.display())),
            })?;
        let header: Header = serde_json::from_str(&text).map_err(|e| {
            Error::bad_input(format!("{} is not a vmm snapshot state (truncated?): {e}", path.display()))
        })?;
        if header.format != FORMAT {
            return Err(Error::bad_input(format!("{} is not a vmm snapshot state", path.display())));
        }
        if header.version != VERSION {
            return Err(Error::bad_input(format!(
                "snapshot {name} is version {} of the format; this vmm reads version {VERSION} only",
                header.version
            )));
        }
        let state: SnapshotState = serde_json::from_str(&text)
            .map_err(|e| Error::bad_input(format!("{}: a damaged snapshot state: {e}", path.display())))?;
        state.config.validate(crate::config::Source::Api)?;
        if state.vcpus.len() as u64 != state.config.vcpus || state.doorbell.vcpus() != state.vcpus.len() {
            return Err(Error::bad_input(format!(
                "snapshot {name} has state for {} vCPUs but its guest has {}",
                state.vcpus.len(),
                state.config.vcpus
            )));
        }
        virtio::check_saved(&state.config, &state.devices, dir)
            .map_err(|e| Error::bad_input(format!("snapshot {name}: {e}")))?;
        let memory = dir.join(MEMORY_FILE);
        let size = open_file(&memory)
            .and_then(|f| f.metadata())
            .map_err(|e| Error::bad_input(format!("snapshot {name} has no readable memory file: {e}")))?
            .len();
        if size != state.config.memory_bytes() {
            return Err(Error::bad_input(format!(
                "snapshot {name}: its memory file holds {size} bytes, its guest has {} MiB of RAM (truncated?)",
                state.config.memory_mib
            )));
        }
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

impl SnapshotState {
    /// The configuration of a guest restored from this snapshot (in
    /// `dir`) as `asked`: the snapshot's guest, with the merge group and
    /// opt-out asked for, and the directory made absolute.
    pub fn clone_config(&self, asked: &GuestConfig, dir: &Path) -> Result<GuestConfig> {
        let dir = std::path::absolute(dir).map_err(|e| Error::bad_input(format!("{}: {e}", dir.display())))?;
        // A clone on a bridge or in a namespace gets a TAP (and namespace)
        // of its own, with the template's MAC and address (they are in its
        // kernel).
        let net = self.config.net.clone().map(|n| match n.bridge.is_some() || n.netns {
            true => crate::config::NetConfig { tap: None, namespace: None, ..n },
            false => n,
        });
        // A clone's vsock socket sits beside its template's (the directory
        // form: guest-<id>.sock), unless it asks for its own.
        let vsock = asked.vsock.clone().or_else(|| {
            let template = self.config.vsock.clone()?;
            let beside = template.socket.parent().map(Path::to_path_buf).unwrap_or_default();
            Some(crate::config::VsockConfig { socket: beside, ..template })
        });
        Ok(GuestConfig {
            restore: Some(dir),
            merge_group: asked.merge_group,
            dedup_opt_out: asked.dedup_opt_out,
            net,
            vsock,
            ..self.config.clone()
        })
    }
}

/// Opens a file of a snapshot to read, as hostile input: never through a
/// symlink, never waiting (a FIFO), and only a regular file (not a device
/// such as /dev/zero, not a directory).
pub fn open_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => io::Error::other("it is a symlink; snapshot files must be the files themselves"),
                _ => e,
            },
        )?;
    let kind = file.metadata()?.file_type();
    let what = match () {
        _ if kind.is_file() => return Ok(file),
        _ if kind.is_dir() => "a directory",
        _ if kind.is_fifo() => "a FIFO",
        _ if kind.is_char_device() || kind.is_block_device() => "a device",
        _ if kind.is_socket() => "a socket",
        _ => "not a regular file",
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, format!("it is {what}, not a regular file")))
}

/// Where to write a snapshot: `dir` must not exist yet (it is made here,
/// 0700), or be an empty directory of this user's (made 0700); never a
/// symlink or another user's directory. Returns it absolute.
pub fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.as_os_str().is_empty() {
        return Err(Error::bad_input("the snapshot directory must be named"));
    }
    let dir = std::path::absolute(dir).map_err(|e| Error::bad_input(format!("{}: {e}", dir.display())))?;
    let shown = dir.display();
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            std::fs::DirBuilder::new()
                .recursive(!parent.exists())
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::bad_input(format!("cannot make {shown}: {e}")))?;
        }
        Err(e) => return Err(Error::bad_input(format!("{shown}: {e}"))),
        Ok(m) if !m.is_dir() => {
            return Err(Error::bad_input(format!("{shown} is not a directory: snapshots go to a new directory")))
        }
        // SAFETY: geteuid has no arguments and cannot fail.
        Ok(m) if m.uid() != unsafe { libc::geteuid() } => {
            return Err(Error::bad_input(format!(
                "{shown} belongs to user {}: snapshots go to a new directory, or an empty one of this user's",
                m.uid()
            )))
        }
        Ok(_) => {
            let mut entries = std::fs::read_dir(&dir).map_err(|e| Error::bad_input(format!("{shown}: {e}")))?;
            if entries.next().is_some() {
                return Err(Error::conflict(format!("{shown} is not empty: snapshots go to a new directory")));
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::bad_input(format!("{shown}: {e}")))?;
        }
    }
    Ok(dir)
}

/// Removes what a failed snapshot left in `dir`, and `dir` itself if that
/// leaves it empty.
pub fn discard(dir: &Path) {
    for name in [STATE_FILE, MEMORY_FILE, OVERLAY_FILE, PARTIAL_STATE_FILE] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

/// The files a snapshot is written into. The supervisor makes them in the
/// snapshot's directory and hands them to the guest process, which writes
/// them through these descriptors: it names no path (its jail has none).
pub struct SnapshotFiles {
    pub memory: File,
    /// The state, under a temporary name until [`finish`].
    pub state: File,
    /// The disk's overlay clusters (a guest with a disk).
    pub overlay: Option<File>,
}

impl SnapshotFiles {
    /// Makes them in `dir` (from [`prepare_dir`]): new files only, never
    /// through a symlink, readable and writable by this user alone.
    pub fn create(dir: &Path, with_overlay: bool) -> io::Result<SnapshotFiles> {
        use std::os::unix::fs::OpenOptionsExt;
        let make = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dir.join(name))
        };
        Ok(SnapshotFiles {
            memory: make(MEMORY_FILE)?,
            state: make(PARTIAL_STATE_FILE)?,
            overlay: with_overlay.then(|| make(OVERLAY_FILE)).transpose()?,
        })
    }

    /// The descriptors, in the order [`SnapshotFiles::from_files`] takes them.
    pub fn descriptors(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        [Some(&self.memory), Some(&self.state), self.overlay.as_ref()]
            .into_iter()
            .flatten()
            .map(|f| f.as_raw_fd())
            .collect()
    }

    /// The files back from their descriptors, as the guest process gets them.
    pub fn from_files(files: Vec<File>) -> io::Result<SnapshotFiles> {
        let mut files = files.into_iter();
        match (files.next(), files.next(), files.next(), files.next()) {
            (Some(memory), Some(state), overlay, None) => Ok(SnapshotFiles { memory, state, overlay }),
            _ => Err(io::Error::other("a snapshot needs two or three files")),
        }
    }
}

/// Makes the state the guest process wrote the snapshot's: until this, a
/// crash leaves no `state.json`, so nothing half-written is ever restored.
/// An overlay nobody wrote (a read-only disk's) goes.
pub fn finish(dir: &Path) -> io::Result<()> {
    let overlay = dir.join(OVERLAY_FILE);
    if std::fs::symlink_metadata(&overlay).is_ok_and(|m| m.is_file() && m.len() == 0) {
        std::fs::remove_file(&overlay)?;
    }
    std::fs::rename(dir.join(PARTIAL_STATE_FILE), dir.join(STATE_FILE))?;
    File::open(dir)?.sync_all()
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

/// The pages of the snapshot's memory that are not zero, as (page number,
/// content) in order, read a chunk at a time: what page sharing adopts for
/// a clone. A read that fails is the last item.
pub struct MemoryPages {
    file: File,
    len: u64,
    offset: u64,
    chunk: std::vec::IntoIter<(usize, Vec<u8>)>,
    failed: bool,
}

impl MemoryPages {
    pub fn open(dir: &Path) -> io::Result<MemoryPages> {
        let file = open_file(&dir.join(MEMORY_FILE))?;
        let len = file.metadata()?.len();
        Ok(MemoryPages { file, len, offset: 0, chunk: Vec::new().into_iter(), failed: false })
    }

    /// Names this memory file as it is now: the same file unchanged has the
    /// same identity; any write to it, or another file put in its place,
    /// gives another. (Page sharing places a snapshot's pages once, and
    /// each further clone of the same identity the same way.)
    pub fn identity(&self) -> io::Result<u64> {
        use std::hash::{Hash, Hasher};
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        let mut h = std::hash::DefaultHasher::new();
        (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()).hash(&mut h);
        Ok(h.finish())
    }
}

impl Iterator for MemoryPages {
    type Item = io::Result<(usize, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(page) = self.chunk.next() {
                return Some(Ok(page));
            }
            if self.failed {
                return None;
            }
            self.offset = seek_data(&self.file, self.offset).unwrap_or(self.offset);
            if self.offset >= self.len {
                return None;
            }
            let n = (self.len - self.offset).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; n];
            if let Err(e) = self.file.read_exact_at(&mut buf, self.offset) {
                self.failed = true;
                return Some(Err(e));
            }
            let first = (self.offset / PAGE_SIZE) as usize;
            self.chunk = buf
                .chunks(PAGE_SIZE as usize)
                .enumerate()
                .filter(|(_, p)| p.iter().any(|&b| b != 0))
                .map(|(i, p)| (first + i, p.to_vec()))
                .collect::<Vec<_>>()
                .into_iter();
            self.offset += n as u64;
        }
    }
}

/// The first offset at or after `from` that holds data; None where the
/// file system cannot tell (then everything counts as data).
fn seek_data(file: &File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we own; it does not touch memory.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if at >= 0 {
        return Some(at as u64);
    }
    // ENXIO: no data after `from`.
    (io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)).then_some(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{guest_memfd, MIB};
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
        let dir = prepare_dir(&dir).unwrap();
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
        // A non-empty directory is refused.
        assert!(prepare_dir(&dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_or_foreign_snapshot_is_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let err = |dir: &Path| SnapshotState::open(dir).err().unwrap().to_string();
        assert!(err(&dir).contains("no state.json"), "{}", err(&dir));
        std::fs::write(dir.join(STATE_FILE), r#"{"format": "vmm-snapshot", "version": 99}"#).unwrap();
        assert!(err(&dir).contains("version 99"), "{}", err(&dir));
        std::fs::write(dir.join(STATE_FILE), r#"{"format": "vmm-snapsh"#).unwrap();
        assert!(err(&dir).contains("truncated"), "{}", err(&dir));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
