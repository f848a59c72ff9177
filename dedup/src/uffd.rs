//! userfaultfd write-protection: how a merge holds off writers to the few
//! pages it is remapping, instead of stopping the whole guest.
//!
//! A write to a write-protected page blocks the writing thread inside the
//! kernel (a vCPU inside `KVM_RUN`, whose writable EPT/NPT entry the
//! protection dropped through KVM's MMU notifier; a device thread in its
//! store) until the range is unprotected or woken; then the write is retried
//! against whatever is mapped there by then. Shared memory (memfd) needs
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19). docs/host-quirks.md has
//! what was measured with KVM.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};

use crate::os::faults::{check as may_fail, Op};

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_MSG_SIZE: usize = 32;

const fn ioc(dir: u64, nr: u64, size: u64) -> libc::c_ulong {
    ((dir << 30) | (size << 16) | (0xaa << 8) | nr) as libc::c_ulong
}
const READ: u64 = 2;
const READ_WRITE: u64 = 3;
const UFFDIO_API: libc::c_ulong = ioc(READ_WRITE, 0x3f, 24);
const UFFDIO_REGISTER: libc::c_ulong = ioc(READ_WRITE, 0x00, 32);
const UFFDIO_WAKE: libc::c_ulong = ioc(READ, 0x02, 16);
const UFFDIO_WRITEPROTECT: libc::c_ulong = ioc(READ_WRITE, 0x06, 24);
/// `/dev/userfaultfd`'s ioctl for a new descriptor (where the syscall is
/// refused to unprivileged users but the device is accessible).
const USERFAULTFD_IOC_NEW: libc::c_ulong = (0xaa << 8) as libc::c_ulong;

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct WriteProtect {
    range: Range,
    mode: u64,
}

/// A userfaultfd set up for write-protection of anonymous and shared memory.
pub struct Uffd {
    file: File,
}

impl Uffd {
    /// A descriptor with the write-protect features page sharing needs, or
    /// why there is none (old kernel, or not allowed: the caller then falls
    /// back to freezing the guest).
    pub fn open() -> io::Result<Uffd> {
        may_fail(Op::Uffd)?;
        let wanted = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let uffd = Self::new_fd()?;
        // Without UFFD_USER_MODE_ONLY: KVM's faults happen in kernel mode.
        let mut api = Api { api: UFFD_API, features: wanted, ..Default::default() };
        uffd.ioctl(UFFDIO_API, &mut api).map_err(|e| {
            io::Error::new(e.kind(), format!("userfaultfd lacks write-protection of shared memory: {e}"))
        })?;
        Ok(uffd)
    }

    fn new_fd() -> io::Result<Uffd> {
        // SAFETY: a plain syscall returning a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) } as i32;
        if fd >= 0 {
            // SAFETY: the descriptor is fresh and ours.
            return Ok(Uffd { file: unsafe { File::from_raw_fd(fd) } });
        }
        let syscall_error = io::Error::last_os_error();
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd").map_err(|_| {
            io::Error::new(syscall_error.kind(), format!("userfaultfd: {syscall_error} (and no /dev/userfaultfd)"))
        })?;
        // SAFETY: the ioctl takes the flags by value and returns a new descriptor.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        Ok(Uffd { file: unsafe { File::from_raw_fd(fd) } })
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        may_fail(Op::Uffd)?;
        loop {
            // SAFETY: `arg` is the repr(C) struct this request expects.
            let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), request, arg as *mut T) };
            if ret >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            // EAGAIN: the address space is changing under us; try again.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
        }
    }

    /// Lets `addr..addr + len` be write-protected. Every mapping in a range
    /// to be protected must be registered; a new mapping made over a
    /// registered range is not, so remapped ranges are registered again.
    pub fn register(&self, addr: *const u8, len: usize) -> io::Result<()> {
        let mut r =
            Register { range: Range { start: addr as u64, len: len as u64 }, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        self.ioctl(UFFDIO_REGISTER, &mut r)
    }

    /// Write-protects the range: once this returns, no thread of this
    /// process and no vCPU can write it until [`Uffd::unprotect`].
    pub fn protect(&self, addr: *const u8, len: usize) -> io::Result<()> {
        self.write_protect(addr, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Ends the protection and wakes every writer blocked in the range (they
    /// retry against what is mapped there now).
    pub fn unprotect(&self, addr: *const u8, len: usize) -> io::Result<()> {
        self.write_protect(addr, len, 0)
    }

    fn write_protect(&self, addr: *const u8, len: usize, mode: u64) -> io::Result<()> {
        let mut wp = WriteProtect { range: Range { start: addr as u64, len: len as u64 }, mode };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Wakes the writers blocked in the range without changing protection.
    pub fn wake(&self, addr: *const u8, len: usize) -> io::Result<()> {
        let mut r = Range { start: addr as u64, len: len as u64 };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    /// Takes the write faults queued so far, without waiting: the address
    /// each blocked writer faulted on. Reading them wakes nobody; it tells
    /// the caller whom to release first, and lets it count them.
    pub fn take_write_faults(&self) -> Vec<usize> {
        let mut msgs = [0u8; UFFD_MSG_SIZE * 64];
        let mut faults = Vec::new();
        loop {
            match (&self.file).read(&mut msgs) {
                Ok(n) if n > 0 => {
                    let events = msgs[..n].chunks_exact(UFFD_MSG_SIZE).filter(|m| m[0] == UFFD_EVENT_PAGEFAULT);
                    // struct uffd_msg: event at 0; pagefault.flags at 8, .address at 16.
                    faults.extend(events.map(|m| u64::from_ne_bytes(m[16..24].try_into().unwrap()) as usize));
                    if n < msgs.len() {
                        return faults;
                    }
                }
                _ => return faults,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::{self, PAGE_SIZE};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn ioctl_numbers_match_linux() {
        // From <linux/userfaultfd.h> on x86_64.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }

    struct SendPtr(*mut u8);
    // SAFETY: the test keeps the mapping alive until the writer is joined.
    unsafe impl Send for SendPtr {}

    /// A thread writing a protected memfd page waits until it is unprotected,
    /// then its write lands.
    #[test]
    fn a_write_to_a_protected_page_waits_for_the_unprotect() {
        let Ok(uffd) = Uffd::open() else {
            eprintln!("no userfaultfd write-protection here; the freeze covers this host");
            return;
        };
        let f = os::memfd("uffd-test").unwrap();
        f.set_len(2 * PAGE_SIZE as u64).unwrap();
        let base = os::map_shared(&f, 2 * PAGE_SIZE, 0).unwrap();
        // SAFETY: our own fresh mapping.
        unsafe { base.write_bytes(1, 2 * PAGE_SIZE) };
        uffd.register(base, 2 * PAGE_SIZE).unwrap();
        uffd.protect(base, PAGE_SIZE).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (p, done) = (SendPtr(base), done.clone());
            std::thread::spawn(move || {
                let p = p;
                // SAFETY: the mapping lives until after the join.
                unsafe { std::ptr::write_volatile(p.0, 9) };
                done.store(true, Ordering::SeqCst);
            })
        };
        let t = Instant::now();
        let mut faults = Vec::new();
        while faults.is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
            faults = uffd.take_write_faults();
        }
        assert_eq!(faults, [base as usize], "the writer's fault, at the page it wrote");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!done.load(Ordering::SeqCst), "the write went through a protected page");
        // SAFETY: the unprotected second page is ours to write.
        unsafe { std::ptr::write_volatile(base.add(PAGE_SIZE), 3) };
        uffd.unprotect(base, PAGE_SIZE).unwrap();
        writer.join().unwrap();
        // SAFETY: reading our own mapping.
        assert_eq!(unsafe { std::ptr::read_volatile(base) }, 9);
        // SAFETY: nothing uses the mapping any more.
        unsafe { os::unmap(base, 2 * PAGE_SIZE) };
    }
}
