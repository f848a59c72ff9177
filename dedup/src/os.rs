//! The few system calls page sharing is made of, each with its reason.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

pub const PAGE_SIZE: usize = 4096;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Maps `len` bytes of `file` at `offset` privately over `addr`: reads see the
/// file's pages, the first write to a page gets a private copy from the
/// kernel. Replaces whatever was mapped there.
///
/// # Safety
/// `addr..addr + len` must be page-aligned memory this process owns and
/// whose current contents nobody needs any more.
pub unsafe fn map_private(addr: *mut u8, len: usize, file: &File, offset: u64) -> io::Result<()> {
    // SAFETY: the caller owns the range; MAP_FIXED replaces it atomically.
    let p = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    debug_assert_eq!(p.cast(), addr);
    Ok(())
}

/// Maps fresh anonymous private memory over `addr`: reads see the kernel's
/// shared zero page, so a zero page costs no memory until it is written.
///
/// # Safety
/// As for [`map_private`].
pub unsafe fn map_zero(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: as above.
    let p = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps the pages of `addr..addr + len` in for reading, ahead of use. Best
/// effort: older kernels lack MADV_POPULATE_READ, and then nothing happens.
pub fn populate_read(addr: *mut u8, len: usize) {
    // SAFETY: madvise on our own mapping; populating changes no contents.
    unsafe { libc::madvise(addr.cast(), len, libc::MADV_POPULATE_READ) };
}

/// Frees the file's pages in `offset..offset + len` (they read back as zero).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain fallocate on a file descriptor we hold.
    check(unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
}

/// Creates an anonymous memory file (no name in any filesystem).
pub fn memfd(name: &str) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is fresh and owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Which pages of `addr..addr + len` have memory behind them (bit 0 of each
/// byte, one byte per page, into `out`), without touching them.
pub fn resident(addr: *const u8, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    out.resize(len.div_ceil(PAGE_SIZE), 0);
    // SAFETY: mincore only reads the page tables of our own mapping and
    // writes one byte per page into `out`, which is large enough.
    check(unsafe { libc::mincore(addr as *mut libc::c_void, len, out.as_mut_ptr()) })
}

/// One page's entry in /proc/self/pagemap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageMapEntry(pub u64);

impl PageMapEntry {
    pub fn present(self) -> bool {
        self.0 & (1 << 63) != 0
    }
    /// A page-cache page (or shared anonymous): still the file's frame.
    pub fn file_or_shared(self) -> bool {
        self.0 & (1 << 61) != 0
    }
    /// Mapped by this mapping alone.
    pub fn exclusive(self) -> bool {
        self.0 & (1 << 56) != 0
    }
}

/// Reads pagemap entries for the pages of this process from `addr` on.
pub struct PageMap {
    file: File,
}

impl PageMap {
    pub fn open() -> io::Result<Self> {
        Ok(PageMap { file: File::open("/proc/self/pagemap")? })
    }

    pub fn read(&mut self, addr: *const u8, out: &mut [PageMapEntry]) -> io::Result<()> {
        let offset = (addr as u64 / PAGE_SIZE as u64) * 8;
        self.file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; out.len() * 8];
        self.file.read_exact(&mut buf)?;
        for (entry, bytes) in out.iter_mut().zip(buf.chunks_exact(8)) {
            *entry = PageMapEntry(u64::from_le_bytes(bytes.try_into().unwrap()));
        }
        Ok(())
    }
}

/// How many mappings (VMAs) this process has: one line each in /proc/self/maps.
pub fn mapping_count() -> io::Result<usize> {
    let mut buf = Vec::with_capacity(1 << 20);
    File::open("/proc/self/maps")?.read_to_end(&mut buf)?;
    Ok(buf.iter().filter(|&&b| b == b'\n').count())
}

/// The kernel's limit on mappings per process (`vm.max_map_count`).
pub fn max_map_count() -> io::Result<usize> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")?.trim().parse().map_err(io::Error::other)
}

/// Raises `vm.max_map_count` (needs root); only when the user asked.
pub fn set_max_map_count(value: usize) -> io::Result<()> {
    std::fs::write("/proc/sys/vm/max_map_count", value.to_string())
}

/// Page-aligned anonymous shared memory for tests and the stable store's view.
pub fn map_shared(file: &File, len: usize, offset: u64) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping chosen by the kernel; no existing memory touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Unmaps a range mapped by [`map_shared`].
///
/// # Safety
/// Nothing may use the range afterwards.
pub unsafe fn unmap(addr: *mut u8, len: usize) {
    // SAFETY: per the contract, the range is ours and unused.
    unsafe { libc::munmap(addr.cast(), len) };
}
