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
//! This file is the format and what both sides need of it; the supervisor
//! checks what a snapshot says it is and which guest it holds
//! ([`Snapshot::open`]), and the guest process, which alone parses the
//! machine's state, writes and loads the rest (`guest::snapshot`). The
//! supervisor makes and finishes the directory (`supervisor::snapshot_dir`).
//!
//! A restored guest is built like a booted one, except that its RAM is read
//! from `memory` instead of loading a kernel, and its vCPUs, VM and devices
//! take the saved state before they first run. What a clone gets from
//! itself rather than from the snapshot: its guest id (the doorbell's
//! `GUEST_ID`), its console and its page-sharing identity. Everything in
//! guest memory is the snapshot's, including any random seed the guest
//! kernel drew before it (docs/snapshots.md).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::GuestConfig;
use crate::error::{Error, Result};
use crate::memory::PAGE_SIZE;

/// What `state.json` says it is.
pub const FORMAT: &str = "vmm-snapshot";
/// Bumped whenever the state's layout changes: another version is refused.
pub const VERSION: u32 = 2;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";
/// The clusters the guest's disk overlay held.
pub const OVERLAY_FILE: &str = "overlay";
pub const PARTIAL_STATE_FILE: &str = "state.json.partial";
/// The largest `state.json` read: vCPU and device state is kilobytes, a
/// large disk's cluster bitmap a few megabytes (about 400 GiB of disk
/// fills this). It travels whole to the guest process in one frame.
const MAX_STATE_BYTES: u64 = 32 << 20;
/// Memory is copied in chunks of this many bytes.
pub const CHUNK: usize = 1 << 20;

/// Only the fields every version has: read first, so another version gets
/// a clear error and not a parse error.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// The part of a state the supervisor reads: the guest it holds.
#[derive(Deserialize)]
struct Outline {
    config: GuestConfig,
}

/// A snapshot as the supervisor sees it: the guest it holds, and its
/// state as read, which only the guest process restoring it parses whole.
pub struct Snapshot {
    pub config: GuestConfig,
    pub state: SavedState,
}

/// The text of a snapshot's `state.json`, passed to the guest process as
/// read (checked for its format and version only).
#[derive(Clone, Serialize, Deserialize)]
pub struct SavedState(pub String);

/// Short: the state is no one's to read in a log.
impl std::fmt::Debug for SavedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SavedState({} bytes)", self.0.len())
    }
}

/// What writing a snapshot took.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Written {
    /// Pages written to the memory file (not zero).
    pub pages: u64,
    /// How long the guest was held for it, in microseconds.
    pub micros: u64,
}

impl Snapshot {
    /// Reads and checks the snapshot in `dir`: its version, its guest's
    /// configuration, that its memory file is there and as large as its
    /// guest's RAM. The machine's state in it is checked where it is used.
    pub fn open(dir: &Path) -> Result<Snapshot> {
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
        let outline: Outline = serde_json::from_str(&text)
            .map_err(|e| Error::bad_input(format!("{}: a damaged snapshot state: {e}", path.display())))?;
        let config = outline.config;
        config.validate(crate::config::Source::Api)?;
        let memory = dir.join(MEMORY_FILE);
        let size = open_file(&memory)
            .and_then(|f| f.metadata())
            .map_err(|e| Error::bad_input(format!("snapshot {name} has no readable memory file: {e}")))?
            .len();
        if size != config.memory_bytes() {
            return Err(Error::bad_input(format!(
                "snapshot {name}: its memory file holds {size} bytes, its guest has {} MiB of RAM (truncated?)",
                config.memory_mib
            )));
        }
        Ok(Snapshot { config, state: SavedState(text) })
    }

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

/// Snapshots read and checked for clones, each once while its files stay as
/// they were (the same files, sizes and change times): a clone of a
/// snapshot open already costs two opens and `fstat`s, not a read of its
/// state and two parses. The last [`KEPT_SNAPSHOTS`] are kept.
#[derive(Default)]
pub struct OpenSnapshots(Mutex<VecDeque<KeptSnapshot>>);

/// A snapshot's directory, its files' stamps (state, memory) when read, and
/// what was read.
type KeptSnapshot = (PathBuf, [FileStamp; 2], Arc<Snapshot>);

pub const KEPT_SNAPSHOTS: usize = 4;

/// What tells a file changed: which file it is, its size and its times.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(path: &Path) -> io::Result<FileStamp> {
        FileStamp::of_file(&open_file(path)?)
    }

    fn of_file(file: &File) -> io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

impl OpenSnapshots {
    /// The snapshot in `dir`, as [`Snapshot::open`] reads and checks it.
    pub fn open(&self, dir: &Path) -> Result<Arc<Snapshot>> {
        // Stamped before the read: a file changed during it is read again.
        let Ok(stamps) =
            [STATE_FILE, MEMORY_FILE].map(|f| FileStamp::of(&dir.join(f))).into_iter().collect::<io::Result<Vec<_>>>()
        else {
            // Open says what is wrong.
            return Snapshot::open(dir).map(Arc::new);
        };
        let stamps = [stamps[0], stamps[1]];
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = kept.iter().position(|(d, s, _)| d == dir && *s == stamps) {
            let hit = kept.remove(at).expect("found");
            let snapshot = hit.2.clone();
            kept.push_front(hit);
            return Ok(snapshot);
        }
        let snapshot = Arc::new(Snapshot::open(dir)?);
        kept.retain(|(d, _, _)| d != dir);
        kept.push_front((dir.to_path_buf(), stamps, snapshot.clone()));
        kept.truncate(KEPT_SNAPSHOTS);
        Ok(snapshot)
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

/// The files a snapshot is written into. The supervisor makes them in the
/// snapshot's directory and hands them to the guest process, which writes
/// them through these descriptors: it names no path (its jail has none).
pub struct SnapshotFiles {
    pub memory: File,
    /// The state, under a temporary name until the supervisor finishes it.
    pub state: File,
    /// The disk's overlay clusters (a guest with a disk).
    pub overlay: Option<File>,
}

impl SnapshotFiles {
    /// Makes them in `dir` (from `supervisor::snapshot_dir::prepare`): new files only, never
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

    /// The guest's size in pages (the file holds all of its RAM, holes
    /// included).
    pub fn guest_pages(&self) -> usize {
        (self.len / PAGE_SIZE) as usize
    }

    /// Names this memory file as it is now: the same file unchanged has the
    /// same identity; any write to it, or another file put in its place,
    /// gives another. (Page sharing places a snapshot's pages once, and
    /// each further clone of the same identity the same way.)
    pub fn identity(&self) -> io::Result<u64> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        FileStamp::of_file(&self.file)?.hash(&mut h);
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

    #[test]
    fn a_missing_or_foreign_snapshot_is_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let err = |dir: &Path| Snapshot::open(dir).err().unwrap().to_string();
        assert!(err(&dir).contains("no state.json"), "{}", err(&dir));
        std::fs::write(dir.join(STATE_FILE), r#"{"format": "vmm-snapshot", "version": 99}"#).unwrap();
        assert!(err(&dir).contains("version 99"), "{}", err(&dir));
        std::fs::write(dir.join(STATE_FILE), r#"{"format": "vmm-snapsh"#).unwrap();
        assert!(err(&dir).contains("truncated"), "{}", err(&dir));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A snapshot is read once while its files stay the same, again once
    /// one changes, and a damaged one is refused every time (never kept).
    #[test]
    fn a_snapshot_is_read_once_while_its_files_stay_the_same() {
        let dir = std::env::temp_dir().join(format!("vmm-snap-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = |mib: u64| {
            let config = format!(r#"{{"kernel": "/proc/self/exe", "memory_mib": {mib}}}"#);
            std::fs::write(
                dir.join(STATE_FILE),
                format!(r#"{{"format": "{FORMAT}", "version": {VERSION}, "config": {config}}}"#),
            )
            .unwrap();
            File::create(dir.join(MEMORY_FILE)).unwrap().set_len(mib << 20).unwrap();
        };
        state(16);
        let kept = OpenSnapshots::default();
        let first = kept.open(&dir).unwrap();
        assert!(Arc::ptr_eq(&first, &kept.open(&dir).unwrap()), "read again though unchanged");
        state(32);
        let second = kept.open(&dir).unwrap();
        assert_eq!(second.config.memory_mib, 32, "the changed snapshot was not read again");
        std::fs::write(dir.join(STATE_FILE), "{").unwrap();
        for _ in 0..2 {
            let e = kept.open(&dir).err().expect("a damaged state was taken");
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        state(16);
        std::fs::remove_file(dir.join(MEMORY_FILE)).unwrap();
        let e = kept.open(&dir).err().expect("a snapshot without memory was taken");
        assert!(e.to_string().contains("memory file"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
