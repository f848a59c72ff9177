//! A disk image as the user names it: the read-only base every guest of
//! it shares, opened and checked as hostile input, its partitions
//! ([`partitions`]) and the Linux it boots ([`boot_entry`]). Both sides use
//! it: the supervisor to refuse a bad image and to find what it boots
//! before it makes a guest, the guest process to serve the disk
//! (`guest::disk`) and to load the kernel from it.

pub mod boot_entry;
pub mod file_systems;
pub mod partitions;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SECTOR_SIZE: u64 = 512;
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

#[derive(Debug)]
pub enum DiskError {
    Open(PathBuf, io::Error),
    NotAFile(PathBuf),
    BadSize(PathBuf, u64),
    Qcow2(PathBuf),
    Overlay(PathBuf, io::Error),
    Changed(PathBuf),
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            DiskError::Open(p, e) => write!(f, "cannot open disk image {}: {e}", p.display()),
            DiskError::NotAFile(p) => write!(f, "disk image {} is not a regular file", p.display()),
            DiskError::BadSize(p, n) => {
                write!(f, "disk image {} is {n} bytes, not a multiple of the 512-byte sector", p.display())
            }
            DiskError::Qcow2(p) => write!(
                f,
                "disk image {} is qcow2, which vmm does not read yet; convert it with \
                 `qemu-img convert -O raw IN OUT`",
                p.display()
            ),
            DiskError::Overlay(p, e) => write!(f, "cannot create overlay {}: {e}", p.display()),
            DiskError::Changed(p) => {
                write!(f, "disk {} changed since the snapshot was taken (size or modification time)", p.display())
            }
        }
    }
}

/// The shared, read-only base image.
#[derive(Debug)]
pub struct BaseImage {
    pub(crate) file: File,
    pub(crate) len: u64,
    pub(crate) path: PathBuf,
}

impl BaseImage {
    /// Opens and checks `path`; every error names the file and the problem.
    pub fn open(path: &Path) -> Result<Arc<BaseImage>, DiskError> {
        // Hostile input: never wait on a FIFO, never follow a link the
        // user did not name (the last component may be one: it is theirs).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| DiskError::Open(path.into(), e))?;
        let meta = file.metadata().map_err(|e| DiskError::Open(path.into(), e))?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile(path.into()));
        }
        let len = meta.len();
        let mut magic = [0u8; 4];
        if file.read_exact_at(&mut magic, 0).is_ok() && &magic == QCOW2_MAGIC {
            return Err(DiskError::Qcow2(path.into()));
        }
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(DiskError::BadSize(path.into(), len));
        }
        Ok(Arc::new(BaseImage { file, len, path: path.into() }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.len
    }

    /// What tells this image from a changed one: its path, size and
    /// modification time.
    pub(crate) fn identity(&self) -> io::Result<BaseIdentity> {
        let modified = self.file.metadata()?.modified()?;
        let modified_ns = modified.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Ok(BaseIdentity { path: self.path.clone(), len: self.len, modified_ns })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseIdentity {
    path: PathBuf,
    len: u64,
    modified_ns: u64,
}
