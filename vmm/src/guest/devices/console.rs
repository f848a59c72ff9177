//! Where a guest's console output goes: the terminal or a file. Cloneable;
//! every clone writes to the same place, and keeps a short tail in memory
//! for error messages and the control API. A file is capped
//! ([`CappedFile`]): a guest that writes for ever fills no disk.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

const TAIL_BYTES: usize = 16 * 1024;

#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    sink: Box<dyn Write + Send>,
    tail: VecDeque<u8>,
}

impl Console {
    pub fn stdout() -> Self {
        Self::with_sink(Box::new(io::stdout()))
    }

    pub fn file(path: &Path) -> io::Result<Self> {
        Ok(Self::with_sink(Box::new(File::create(path)?)))
    }

    pub fn with_sink(sink: Box<dyn Write + Send>) -> Self {
        Console { inner: Arc::new(Mutex::new(Inner { sink, tail: VecDeque::new() })) }
    }

    /// The last bytes written, lossily decoded.
    pub fn tail(&self) -> String {
        let inner = self.inner.lock().unwrap();
        let (a, b) = inner.tail.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.inner.lock().unwrap();
        inner.tail.extend(buf);
        let excess = inner.tail.len().saturating_sub(TAIL_BYTES);
        inner.tail.drain(..excess);
        inner.sink.write_all(buf)?;
        // Console output is line oriented and rare enough to flush at once,
        // so a crash or a kill never hides the guest's last words.
        if buf.contains(&b'\n') {
            inner.sink.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.lock().unwrap().sink.flush()
    }
}

/// A console file that never grows past its cap: when a write would take
/// it there, its newest half is moved to its start, under a line saying
/// that older output was dropped. Written at offsets of its own, so the
/// descriptor's position and flags do not matter.
pub struct CappedFile {
    file: File,
    cap: u64,
    len: u64,
}

/// What a capped console file starts with once it has dropped output.
pub const DROPPED: &[u8] = b"[vmm: older console output dropped]\n";

impl CappedFile {
    /// `file` must be open for reading and writing.
    pub fn new(file: File, cap: u64) -> io::Result<CappedFile> {
        let len = file.metadata()?.len();
        Ok(CappedFile { file, cap: cap.max(2 * DROPPED.len() as u64 + 2), len })
    }

    fn drop_oldest(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let keep = (self.cap / 2).min(self.len) as usize - DROPPED.len();
        let mut newest = vec![0; keep];
        self.file.read_exact_at(&mut newest, self.len - keep as u64)?;
        self.file.write_all_at(DROPPED, 0)?;
        self.file.write_all_at(&newest, DROPPED.len() as u64)?;
        self.len = (DROPPED.len() + keep) as u64;
        self.file.set_len(self.len)
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        // At most what fits in the half kept, so one write never overruns.
        let buf = &buf[..buf.len().min((self.cap / 2) as usize - DROPPED.len())];
        if self.len + buf.len() as u64 > self.cap {
            self.drop_oldest()?;
        }
        self.file.write_all_at(buf, self.len)?;
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_file_keeps_its_newest_output_under_its_cap() {
        let path = std::env::temp_dir().join(format!("vmm-console-cap-{}", std::process::id()));
        let create = || File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let file = create();
        let mut c = Console::with_sink(Box::new(CappedFile::new(file, 4096).unwrap()));
        for i in 0..2000 {
            writeln!(c, "line {i}").unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.starts_with(std::str::from_utf8(DROPPED).unwrap()), "{text}");
        assert!(text.ends_with("line 1999\n"), "{text}");
        assert!(text.len() > 2048 - 100, "it keeps about half its cap: {}", text.len());
        // What it kept is whole and in order after the first (cut) line.
        let kept: Vec<u32> = text.lines().skip(2).map(|l| l.strip_prefix("line ").unwrap().parse().unwrap()).collect();
        assert!(kept.windows(2).all(|w| w[1] == w[0] + 1));
        // A write larger than the cap is cut, not a failure.
        let file = create();
        let mut big = CappedFile::new(file, 4096).unwrap();
        assert!(big.write(&[b'x'; 10_000]).unwrap() < 4096);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut c = Console::with_sink(Box::new(io::sink()));
        for i in 0..5000 {
            writeln!(c, "line {i}").unwrap();
        }
        let tail = c.tail();
        assert!(tail.len() <= TAIL_BYTES);
        assert!(tail.ends_with("line 4999\n"));
        assert!(!tail.contains("line 1\n"));
    }
}
