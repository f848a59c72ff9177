//! A guest process's last line from a signal handler: built on the stack
//! and written with `write(2)` before `_exit(2)`, the only calls a handler
//! may make (no allocation, no locks). The supervisor reads the line from
//! its stderr to say how the process ended (`handle::Exit::reason`).

/// A line of at most 96 bytes; what does not fit is cut.
pub struct LastWords {
    line: [u8; 96],
    len: usize,
}

impl LastWords {
    pub fn new(prefix: &str) -> LastWords {
        let mut words = LastWords { line: [0; 96], len: 0 };
        words.put(prefix.as_bytes());
        words
    }

    pub fn put(&mut self, bytes: &[u8]) {
        let take = bytes.len().min(self.line.len() - self.len);
        self.line[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
    }

    pub fn put_decimal(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }

    /// Writes the line (and a newline) to stderr and ends the process.
    pub fn say_and_exit(mut self, code: libc::c_int) -> ! {
        self.put(b"\n");
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer
        // is ours.
        unsafe {
            libc::write(2, self.line.as_ptr().cast(), self.len);
            libc::_exit(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_cuts() {
        let mut w = LastWords::new("x ");
        w.put_decimal(0);
        w.put(b" ");
        w.put_decimal(u64::MAX);
        assert_eq!(&w.line[..w.len], b"x 0 18446744073709551615");
        w.put(&[b'y'; 200]);
        assert_eq!(w.len, 96);
    }
}
