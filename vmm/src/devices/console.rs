//! Where a guest's console output goes: the terminal or a file. Cloneable;
//! every clone writes to the same place, and keeps a short tail in memory
//! for error messages and the control API.

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

#[cfg(test)]
mod tests {
    use super::*;

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
