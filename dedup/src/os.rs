//! The few system calls page sharing is made of, each with its reason.
//!
//! Every call that can fail goes through [`faults`]: tests make chosen calls
//! fail on demand and check that the engine stays consistent.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

pub const PAGE_SIZE: usize = 4096;

/// Failure injection for tests: `faults::fail(Op::Mmap, 3)` makes the next
/// three mmap calls of this process fail with EIO.
pub mod faults {
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Op {
        Mmap,
        Punch,
        Pwrite,
        PageMap,
        Uffd,
        ReadRemote,
    }

    const OPS: usize = 6;
    static PENDING: [AtomicU32; OPS] = [const { AtomicU32::new(0) }; OPS];
    static INJECTED: [AtomicU32; OPS] = [const { AtomicU32::new(0) }; OPS];

    /// Makes the next `count` calls of kind `op` fail.
    pub fn fail(op: Op, count: u32) {
        PENDING[op as usize].store(count, Ordering::SeqCst);
    }

    /// How many failures of kind `op` were injected so far.
    pub fn injected(op: Op) -> u32 {
        INJECTED[op as usize].load(Ordering::SeqCst)
    }

    pub(crate) fn check(op: Op) -> io::Result<()> {
        let slot = &PENDING[op as usize];
        if slot.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        if slot.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            INJECTED[op as usize].fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other(format!("injected {op:?} failure")));
        }
        Ok(())
    }
}

use faults::{check as may_fail, Op};

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_mmap(p: *mut libc::c_void) -> io::Result<*mut u8> {
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
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
    // SAFETY: as the caller promised.
    unsafe { map_fixed(addr, len, libc::MAP_PRIVATE, file.as_raw_fd(), offset) }
}

/// Maps `file` from `offset` over `addr` again, shared: a page given back
/// to the host returns to the guest's memfd (`Agent::discard`).
///
/// # Safety
/// As for [`map_private`].
pub unsafe fn map_shared_at(addr: *mut u8, len: usize, file: &File, offset: u64) -> io::Result<()> {
    // SAFETY: as the caller promised.
    unsafe { map_fixed(addr, len, libc::MAP_SHARED, file.as_raw_fd(), offset) }
}

/// Maps fresh anonymous private memory over `addr`: reads see the kernel's
/// shared zero page, so a zero page costs no memory until it is written.
///
/// # Safety
/// As for [`map_private`].
pub unsafe fn map_zero(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: as the caller promised.
    unsafe { map_fixed(addr, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) }
}

/// A read-write mapping over `addr..addr + len` with `flags` (plus
/// MAP_FIXED and MAP_NORESERVE), replacing what was there.
///
/// # Safety
/// As for [`map_private`].
unsafe fn map_fixed(addr: *mut u8, len: usize, flags: libc::c_int, fd: libc::c_int, offset: u64) -> io::Result<()> {
    may_fail(Op::Mmap)?;
    // SAFETY: the caller owns the range; MAP_FIXED replaces it.
    check_mmap(unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
            fd,
            offset as libc::off_t,
        )
    })
    .map(drop)
}

/// Maps the pages of `addr..addr + len` in for reading, ahead of use. Best
/// effort: older kernels lack MADV_POPULATE_READ, and then nothing happens.
pub fn populate_read(addr: *mut u8, len: usize) {
    // SAFETY: madvise on our own mapping; populating changes no contents.
    unsafe { libc::madvise(addr.cast(), len, libc::MADV_POPULATE_READ) };
}

/// Keeps transparent huge pages out of a remapped range: khugepaged would
/// otherwise collapse a run of zero-mapped pages into one private 2 MiB page,
/// which reads as copy-on-write breaks and undoes the sharing. Best effort.
pub fn no_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: madvise on our own mapping; the advice changes no contents.
    unsafe { libc::madvise(addr.cast(), len, libc::MADV_NOHUGEPAGE) };
}

/// The size the kernel maps huge pages at (x86-64).
const PMD_SIZE: usize = 2 << 20;

/// Cuts the mapping `addr..addr + len` into pieces that each end in the
/// middle of a 2 MiB block, before the guest runs, so no remap later
/// splits a piece around a whole 2 MiB block. Why: when a mapping is split
/// inside a 2 MiB block that lies wholly within it, the kernel tells the
/// MMU notifier the whole block is being unmapped, in case a huge page maps
/// it (Linux 6.x, `__split_huge_pmd`), and KVM drops its entries for all
/// 512 pages: a remap of one page would cost the guest 512 faults. With
/// the cuts made while KVM has nothing mapped, they cost nothing.
///
/// The pieces stay apart because every other one is marked `MADV_DONTFORK`
/// (the guest's process never forks; the mark only keeps the kernel from
/// merging them back). Skipped (returns false) where a 2 MiB shmem huge page
/// could back the memory (the cuts would forbid it), or when it would take
/// more than `max_pieces` mappings.
pub fn cut_at_half_blocks(addr: *mut u8, len: usize, max_pieces: usize) -> bool {
    if shmem_huge_pages_possible() || len / PMD_SIZE > max_pieces {
        return false;
    }
    let (start, end) = (addr as usize, addr as usize + len);
    // The first address past `start` halfway into a 2 MiB block.
    let mut cut = (start & !(PMD_SIZE - 1)) + PMD_SIZE / 2;
    if cut <= start {
        cut += PMD_SIZE;
    }
    while cut + PMD_SIZE <= end {
        // SAFETY: madvise on a mapping the caller owns; the advice changes
        // no contents.
        unsafe { libc::madvise(cut as *mut libc::c_void, PMD_SIZE, libc::MADV_DONTFORK) };
        cut += 2 * PMD_SIZE;
    }
    true
}

/// Whether the kernel may back shared memory with 2 MiB huge pages.
fn shmem_huge_pages_possible() -> bool {
    let setting = |path: &str| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // The chosen value is in brackets: "always [never] ...".
        text.split_whitespace().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).to_string())
    };
    const TOP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    const PMD: &str = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled";
    let possible = |v: Option<String>| !matches!(v.as_deref(), None | Some("never" | "deny"));
    match setting(PMD).as_deref() {
        Some("inherit") | None => possible(setting(TOP)),
        other => possible(other.map(String::from)),
    }
}

/// Frees the file's pages in `offset..offset + len` (they read back as zero).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    may_fail(Op::Punch)?;
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

/// Writes a whole page into a file (a fresh frame: no fault, no clearing).
pub fn write_page(file: &File, content: &[u8], offset: u64) -> io::Result<()> {
    may_fail(Op::Pwrite)?;
    file.write_all_at(content, offset)
}

/// Creates an anonymous memory file (no name in any filesystem) that takes
/// seals ([`seal`]).
pub fn memfd(name: &str) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is fresh and owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Adds `seals` (`F_SEAL_*`) to a memfd made by [`memfd`]: for good, through
/// every descriptor of it, whoever holds them.
pub fn seal(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold, with an integer argument.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) })
}

/// A read-only descriptor of the same file: whoever holds it can map and
/// read the file, never write, grow or punch it.
pub fn reopen_read_only(file: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Which pages of `addr..addr + len` have memory behind them (bit 0 of each
/// byte, one byte per page, into `out`), without touching them. For a
/// mapping of a file this is the file's page cache, whoever else maps it.
pub fn resident(addr: *const u8, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    out.resize(len.div_ceil(PAGE_SIZE), 0);
    // SAFETY: mincore only reads the page tables of our own mapping and
    // writes one byte per page into `out`, which is large enough.
    check(unsafe { libc::mincore(addr as *mut libc::c_void, len, out.as_mut_ptr()) })
}

/// Copies a page that another thread or process may be writing meanwhile,
/// 16 bytes at a time with volatile loads: the copy may be torn, never
/// undefined.
///
/// # Safety
/// `src` must point to a readable, mapped, 16-byte aligned page.
pub unsafe fn copy_page_racy(src: *const u8, out: &mut [u8]) {
    use std::arch::x86_64::__m128i;
    assert_eq!(out.len(), PAGE_SIZE);
    let (src, dst) = (src.cast::<__m128i>(), out.as_mut_ptr().cast::<__m128i>());
    for i in 0..PAGE_SIZE / 16 {
        // SAFETY: both pages are in bounds; `out` is ours, `src` the
        // caller's and aligned.
        unsafe { dst.add(i).write_unaligned(std::ptr::read_volatile(src.add(i))) };
    }
}

/// Reads `out.len()` bytes at `addr` in process `pid`'s memory.
pub fn read_remote(pid: u32, addr: u64, out: &mut [u8]) -> io::Result<()> {
    may_fail(Op::ReadRemote)?;
    let local = libc::iovec { iov_base: out.as_mut_ptr().cast(), iov_len: out.len() };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: out.len() };
    // SAFETY: `local` describes our own buffer; the kernel checks `remote`
    // against the other process's mappings.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != out.len() {
        return Err(io::Error::other(format!("short read of process {pid}'s memory at {addr:#x}")));
    }
    Ok(())
}

/// One page's entry in /proc/PID/pagemap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageMapEntry(pub u64);

impl PageMapEntry {
    pub fn present(self) -> bool {
        self.0 & (1 << 63) != 0
    }
    /// Swapped out (or a swap-like marker, see `uffd_wp`).
    pub fn swapped(self) -> bool {
        self.0 & (1 << 62) != 0
    }
    /// A page-cache page (or shared anonymous): still the file's frame.
    pub fn file_or_shared(self) -> bool {
        self.0 & (1 << 61) != 0
    }
    /// Write-protected by userfaultfd (a marker is reported as swapped).
    pub fn uffd_wp(self) -> bool {
        self.0 & (1 << 57) != 0
    }
    /// Mapped by this mapping alone.
    pub fn exclusive(self) -> bool {
        self.0 & (1 << 56) != 0
    }
    /// A private copy the process made: present and no longer a file page,
    /// or swapped out (only anonymous pages are swap entries in page tables).
    pub fn private_copy(self) -> bool {
        (self.present() && !self.file_or_shared()) || (self.swapped() && !self.uffd_wp())
    }
}

/// Reads pagemap entries of one process. Opened once: the open file keeps
/// referring to that process's memory, whatever happens to its pid.
pub struct PageMap {
    file: File,
    buf: Vec<u8>,
}

impl PageMap {
    pub fn open(pid: u32) -> io::Result<Self> {
        let path = if pid == std::process::id() { "/proc/self/pagemap".into() } else { format!("/proc/{pid}/pagemap") };
        Ok(PageMap { file: File::open(path)?, buf: Vec::new() })
    }

    pub fn read(&mut self, addr: u64, out: &mut [PageMapEntry]) -> io::Result<()> {
        may_fail(Op::PageMap)?;
        let offset = (addr / PAGE_SIZE as u64) * 8;
        self.buf.resize(out.len() * 8, 0);
        self.file.read_exact_at(&mut self.buf, offset)?;
        for (entry, bytes) in out.iter_mut().zip(self.buf.chunks_exact(8)) {
            *entry = PageMapEntry(u64::from_le_bytes(bytes.try_into().unwrap()));
        }
        Ok(())
    }
}

/// Files under /proc this process reads again and again. A jailed guest
/// process has no /proc: it opens them before it enters its jail
/// ([`keep_proc_files`]) and reads each again from its start.
struct KeptProcFiles {
    maps: std::sync::Mutex<File>,
    max_map_count: std::sync::Mutex<File>,
}

static KEPT: std::sync::OnceLock<KeptProcFiles> = std::sync::OnceLock::new();

const SELF_MAPS: &str = "/proc/self/maps";
const MAX_MAP_COUNT: &str = "/proc/sys/vm/max_map_count";

/// Opens the /proc files this process will read, to keep for good.
pub fn keep_proc_files() -> io::Result<()> {
    let kept = KeptProcFiles { maps: File::open(SELF_MAPS)?.into(), max_map_count: File::open(MAX_MAP_COUNT)?.into() };
    let _ = KEPT.set(kept);
    Ok(())
}

fn read_proc(path: &str, kept: fn(&KeptProcFiles) -> &std::sync::Mutex<File>) -> io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut buf = Vec::with_capacity(64 << 10);
    match KEPT.get() {
        Some(k) => {
            let mut file = kept(k).lock().unwrap_or_else(|e| e.into_inner());
            file.seek(SeekFrom::Start(0))?;
            file.read_to_end(&mut buf)?;
        }
        None => {
            File::open(path)?.read_to_end(&mut buf)?;
        }
    }
    Ok(buf)
}

/// This process's mappings, as /proc/self/maps lists them.
pub fn self_maps() -> io::Result<Vec<u8>> {
    read_proc(SELF_MAPS, |k| &k.maps)
}

/// How many mappings (VMAs) this process has: one line each in /proc/self/maps.
pub fn mapping_count() -> io::Result<usize> {
    Ok(self_maps()?.iter().filter(|&&b| b == b'\n').count())
}

/// The kernel's limit on mappings per process (`vm.max_map_count`).
pub fn max_map_count() -> io::Result<usize> {
    let text = read_proc(MAX_MAP_COUNT, |k| &k.max_map_count)?;
    String::from_utf8_lossy(&text).trim().parse().map_err(io::Error::other)
}

/// Raises `vm.max_map_count` (needs root).
pub fn set_max_map_count(value: usize) -> io::Result<()> {
    std::fs::write("/proc/sys/vm/max_map_count", value.to_string())
}

/// A fresh `MAP_SHARED` mapping of `file` chosen by the kernel (readable
/// and, unless `read_only`, writable). The length may exceed the file: it
/// only reserves address space.
pub fn map_file(file: &File, len: usize, offset: u64, read_only: bool) -> io::Result<*mut u8> {
    let prot = if read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
    // SAFETY: a fresh mapping chosen by the kernel; no existing memory touched.
    check_mmap(unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    })
}

/// A writable `MAP_SHARED` mapping of `file` (tests, and guest RAM).
pub fn map_shared(file: &File, len: usize, offset: u64) -> io::Result<*mut u8> {
    map_file(file, len, offset, false)
}

/// Sets the calling thread's nice value; without the privilege for it, says
/// so (naming `who`) and goes on at the default priority.
pub fn set_thread_nice(nice: i32, who: &str) {
    // SAFETY: gettid and setpriority on our own thread id; no memory involved.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if ret != 0 {
        log::warn!("page sharing: cannot set {who}'s nice value to {nice}: {}", io::Error::last_os_error());
    }
}

/// Gives the calling thread the lowest real-time priority (SCHED_FIFO 1)
/// where allowed, else the nice value `nice`. For a thread that holds other
/// threads up while it works (the merge agent, with pages write-protected):
/// under the normal scheduler it can wait whole ticks for a core behind the
/// very vCPUs it holds up. Its work is short and bounded, and the kernel's
/// real-time throttling keeps a core for everyone else whatever happens.
pub fn prioritize_thread(nice: i32, who: &str) {
    let param = libc::sched_param { sched_priority: 1 };
    // Threads this one starts (a guest's vCPUs) must not inherit it.
    let policy = libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK;
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        return;
    }
    log::info!("{who} runs without real-time priority ({}); nice {nice} instead", io::Error::last_os_error());
    set_thread_nice(nice, who);
}

/// Lends a real-time caller's priority (SCHED_FIFO 1) to thread `tid`,
/// which holds something the caller waits for: under the normal scheduler
/// it could wait a long time for a core. Whether it was lent (the caller
/// runs real-time and `tid` is a thread); give it back with
/// [`take_priority_back`].
pub fn lend_priority(tid: i32) -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_getscheduler on the calling thread and
    // sched_setscheduler on a thread id with a valid parameter.
    tid > 0
        && unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK == libc::SCHED_FIFO
        && unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param) } == 0
}

/// Puts thread `tid` back under the normal scheduler, at its nice value.
pub fn take_priority_back(tid: i32) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in lend_priority.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
}

/// The calling thread's nice value (kept while it runs real-time).
pub fn thread_nice() -> i32 {
    // SAFETY: getpriority on our own thread id; no memory involved. -1 is
    // a nice value too: errno tells (it cannot fail for our own thread).
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

/// Runs `f` on the calling thread at real-time priority (SCHED_FIFO 1)
/// where allowed, then puts the thread back as it was: for short, bounded
/// work that must not queue for a core behind busy threads of the normal
/// scheduler. Threads `f` starts run under the normal scheduler at the
/// default nice value (reset on fork; [`spawn_keeping_nice`] keeps its
/// caller's).
pub fn ahead_of_others<T>(f: impl FnOnce() -> T) -> T {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_getscheduler and sched_setscheduler on the calling
    // thread (0) with a valid parameter.
    let raised = unsafe {
        libc::sched_getscheduler(0) == libc::SCHED_OTHER
            && libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param) == 0
    };
    let out = f();
    if raised {
        let normal = libc::sched_param { sched_priority: 0 };
        // SAFETY: as above; the thread keeps its nice value throughout.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) };
    }
    out
}

/// Runs `f` under the normal scheduler at the thread's nice value, even if
/// the caller runs real-time ([`ahead_of_others`]), then puts the thread
/// back: for work too long to hold a core from everyone else.
pub fn behind_others<T>(f: impl FnOnce() -> T) -> T {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getscheduler and sched_getparam on the calling thread
    // into a parameter of our own.
    let policy = unsafe { libc::sched_getscheduler(0) };
    let lowered = policy & !libc::SCHED_RESET_ON_FORK != libc::SCHED_OTHER && {
        let normal = libc::sched_param { sched_priority: 0 };
        // SAFETY: as above, with valid parameters.
        unsafe {
            libc::sched_getparam(0, &mut param) == 0 && libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) == 0
        }
    };
    let out = f();
    if lowered {
        // SAFETY: the policy and parameter it had (with its reset-on-fork flag).
        unsafe { libc::sched_setscheduler(0, policy, &param) };
    }
    out
}

/// Starts a thread named `name` at the calling thread's nice value, even
/// while the caller runs real-time ([`ahead_of_others`] would leave it at
/// the default).
pub fn spawn_keeping_nice<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    let nice = thread_nice();
    std::thread::Builder::new().name(name).spawn(move || {
        if nice < 0 && thread_nice() != nice {
            set_thread_nice(nice, "a supervisor thread");
        }
        f()
    })
}

/// Puts the calling thread back under the normal scheduler at the default
/// nice value (after [`prioritize_thread`]); it can always go down.
pub fn normal_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler and setpriority on the calling thread with
    // valid arguments; no memory but `param` involved.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 0);
    }
}

/// Unmaps a range mapped by [`map_file`].
///
/// # Safety
/// Nothing may use the range afterwards.
pub unsafe fn unmap(addr: *mut u8, len: usize) {
    // SAFETY: per the contract, the range is ours and unused.
    unsafe { libc::munmap(addr.cast(), len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real-time thread lends its priority to another and takes it back;
    /// the other keeps its nice value. A thread under the normal scheduler
    /// lends nothing. (Needs the right to run real-time: root here.)
    #[test]
    fn priority_is_lent_by_a_real_time_thread_only() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            set_thread_nice(3, "the test's holder");
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        // SAFETY: sched_getscheduler on a thread id; no memory involved.
        let policy = || unsafe { libc::sched_getscheduler(tid) } & !libc::SCHED_RESET_ON_FORK;
        assert!(!lend_priority(tid), "lent by a thread of the normal scheduler");
        let lent = ahead_of_others(|| {
            let lent = lend_priority(tid);
            (lent, policy())
        });
        assert_eq!(lent, (true, libc::SCHED_FIFO), "not lent by a real-time thread (is this root?)");
        take_priority_back(tid);
        assert_eq!(policy(), libc::SCHED_OTHER);
        // SAFETY: getpriority on a thread id; no memory involved.
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }, 3, "its nice value");
        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }

    #[test]
    fn injected_failures_are_counted_and_run_out() {
        let f = memfd("faults").unwrap();
        f.set_len(PAGE_SIZE as u64).unwrap();
        faults::fail(Op::Punch, 2);
        assert!(punch_hole(&f, 0, PAGE_SIZE as u64).is_err());
        assert!(punch_hole(&f, 0, PAGE_SIZE as u64).is_err());
        punch_hole(&f, 0, PAGE_SIZE as u64).unwrap();
        assert!(faults::injected(Op::Punch) >= 2);
    }

    #[test]
    fn a_read_only_reopen_cannot_write() {
        let f = memfd("ro").unwrap();
        f.set_len(PAGE_SIZE as u64).unwrap();
        write_page(&f, &[7u8; PAGE_SIZE], 0).unwrap();
        let ro = reopen_read_only(&f).unwrap();
        let mut b = [0u8; 4];
        ro.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 4]);
        assert!(ro.write_all_at(&[1], 0).is_err());
        assert!(map_file(&ro, PAGE_SIZE, 0, false).is_err(), "a writable shared mapping of a read-only fd");
        assert!(punch_hole(&ro, 0, PAGE_SIZE as u64).is_err());
    }

    #[test]
    fn remote_reads_of_our_own_memory() {
        let data = vec![0x5au8; PAGE_SIZE];
        let mut out = vec![0u8; PAGE_SIZE];
        read_remote(std::process::id(), data.as_ptr() as u64, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
