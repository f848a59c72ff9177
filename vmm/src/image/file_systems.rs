//! The file systems a `/boot` may be on, read-only and as hostile input:
//! ext2/ext4 (the `ext4-view` crate) and FAT (the `fatfs` crate: an EFI
//! system partition or an XBOOTLDR partition holding Boot Loader
//! Specification entries and their kernels). Both are reached through one
//! small interface, [`BootFs`], with every read bounded and a parser's
//! panic on a damaged file system turned into "no file system here".

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ext4_view::{Ext4, Ext4Read};

use super::partitions::Partition;
use super::BaseImage;

/// The most entries read from one directory.
const MAX_DIR_ENTRIES: usize = 1024;

/// What boot entry discovery needs of a file system. Paths are absolute
/// (`/boot/loader/entries`).
pub trait BootFs {
    /// The names of the regular files in directory `path` (None: no such
    /// directory).
    fn files_in(&self, path: &str) -> Option<Vec<String>>;
    /// The size of regular file `path`, if it is one.
    fn file_len(&self, path: &str) -> Option<u64>;
    /// The contents of regular file `path`, if it is at most `limit` bytes.
    fn read(&self, path: &str, limit: u64) -> Result<Vec<u8>, String>;
}

/// The file system on `part` of `image`, if it holds one we read.
pub fn open(image: &BaseImage, part: Partition) -> Option<Box<dyn BootFs>> {
    let file = image.file.try_clone().ok()?;
    let guarded = |f: &dyn Fn() -> Option<Box<dyn BootFs>>| catch_unwind(AssertUnwindSafe(f)).ok().flatten();
    guarded(&|| {
        let reader = PartitionIo { file: file.try_clone().ok()?, part, at: 0 };
        Ext4::load(Box::new(reader)).ok().map(|fs| Box::new(Ext4Fs(fs)) as Box<dyn BootFs>)
    })
    .or_else(|| {
        guarded(&|| {
            let reader = PartitionIo { file: file.try_clone().ok()?, part, at: 0 };
            let fs = fatfs::FileSystem::new(reader, fatfs::FsOptions::new().update_accessed_date(false)).ok()?;
            Some(Box::new(FatFs(fs)) as Box<dyn BootFs>)
        })
    })
}

/// A partition of the image as a parser reads it: nothing outside the
/// partition, and writes go nowhere (the image is read-only; fatfs may
/// want to clear a dirty flag when it is done).
struct PartitionIo {
    file: std::fs::File,
    part: Partition,
    at: u64,
}

impl PartitionIo {
    fn read_at(&self, at: u64, dst: &mut [u8]) -> io::Result<()> {
        let inside = at.checked_add(dst.len() as u64).is_some_and(|end| end <= self.part.len);
        if !inside {
            let number = self.part.number;
            return Err(io::Error::other(format!("a read at {at} past the end of partition {number}")));
        }
        self.file.read_exact_at(dst, self.part.start + at)
    }
}

impl Ext4Read for PartitionIo {
    fn read(&mut self, at: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.read_at(at, dst)?)
    }
}

impl Read for PartitionIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.part.len.saturating_sub(self.at)) as usize;
        self.read_at(self.at, &mut buf[..n])?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Write for PartitionIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.at += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for PartitionIo {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let at = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.part.len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.at.checked_add_signed(delta),
        };
        self.at = at.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a seek outside the partition"))?;
        Ok(self.at)
    }
}

struct Ext4Fs(Ext4);

impl BootFs for Ext4Fs {
    fn files_in(&self, path: &str) -> Option<Vec<String>> {
        let entries = self.0.read_dir(path).ok()?;
        let names = entries
            .take(MAX_DIR_ENTRIES)
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_regular_file()))
            .filter_map(|e| e.file_name().as_str().ok().map(str::to_string))
            .collect();
        Some(names)
    }

    fn file_len(&self, path: &str) -> Option<u64> {
        self.0.metadata(path).ok().filter(|m| m.file_type().is_regular_file()).map(|m| m.len())
    }

    fn read(&self, path: &str, limit: u64) -> Result<Vec<u8>, String> {
        let len = self.file_len(path).ok_or(format!("{path} is not a file"))?;
        if len > limit {
            return Err(format!("{path} is {len} bytes, more than {limit}"));
        }
        self.0.read(path).map_err(|e| format!("{path}: {e}"))
    }
}

struct FatFs(fatfs::FileSystem<PartitionIo>);

impl FatFs {
    /// `path` as fatfs names it (relative to the root); None for the root.
    fn relative(path: &str) -> Option<&str> {
        Some(path.trim_start_matches('/')).filter(|p| !p.is_empty())
    }

    fn dir(&self, path: &str) -> Option<fatfs::Dir<'_, PartitionIo>> {
        let root = self.0.root_dir();
        match Self::relative(path) {
            None => Some(root),
            Some(rel) => root.open_dir(rel).ok(),
        }
    }
}

impl BootFs for FatFs {
    fn files_in(&self, path: &str) -> Option<Vec<String>> {
        let dir = self.dir(path)?;
        let entries = dir.iter().take(MAX_DIR_ENTRIES).filter_map(Result::ok);
        Some(entries.filter(|e| e.is_file()).map(|e| e.file_name()).collect())
    }

    fn file_len(&self, path: &str) -> Option<u64> {
        let (parent, name) = path.rsplit_once('/')?;
        let dir = self.dir(parent)?;
        let mut entries = dir.iter().take(MAX_DIR_ENTRIES).filter_map(Result::ok);
        entries.find(|e| e.is_file() && e.file_name().eq_ignore_ascii_case(name)).map(|e| e.len())
    }

    fn read(&self, path: &str, limit: u64) -> Result<Vec<u8>, String> {
        let len = self.file_len(path).ok_or(format!("{path} is not a file"))?;
        if len > limit {
            return Err(format!("{path} is {len} bytes, more than {limit}"));
        }
        let rel = Self::relative(path).ok_or(format!("{path} is not a file"))?;
        let mut file = self.0.root_dir().open_file(rel).map_err(|e| format!("{path}: {e}"))?;
        let mut bytes = Vec::with_capacity(len as usize);
        Read::by_ref(&mut file).take(len).read_to_end(&mut bytes).map_err(|e| format!("{path}: {e}"))?;
        Ok(bytes)
    }
}
