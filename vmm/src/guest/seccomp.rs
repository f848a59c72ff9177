//! seccomp-bpf filters for a jailed guest process: every system call a
//! guest process may make after its jail, by thread role, with the reason
//! for each. This file is the list.
//!
//! Filters stack: a call must pass every filter its thread has.
//!
//! - [`PROCESS`]: installed by the jail on the one thread there is then, so
//!   every later thread inherits it. What any thread of a guest process
//!   may do; the main thread (requests, merges, snapshots) lives by it.
//! - [`VCPU`]: each vCPU thread adds it before it first enters the guest:
//!   `KVM_RUN` and what handling an exit does (devices' registers, waking
//!   other threads, the kick signal).
//! - [`IO`]: the I/O thread adds it before it serves devices: queues,
//!   TAP, sockets, disk files, timers.
//!
//! Two calls are checked by argument, where that is cheap: `clone` only
//! with `CLONE_THREAD` (threads, never a new process) and `prctl` only to
//! name a thread or set `no_new_privs`. `seccomp` is allowed by the process
//! filter alone, for threads adding their own (a filter only narrows).
//!
//! A few calls are refused with an error rather than ending the process
//! ([`REFUSED_QUIETLY`]): `clone3`, whose flags sit in memory a filter
//! cannot read (the C library then makes threads with `clone`), and
//! `openat`, which the C library tries and copes without.
//!
//! A call outside the filters raises SIGSYS. The handler writes
//! `vmm-guest seccomp violation: NAME` to stderr and ends the process at
//! once; the supervisor reports the guest ended by "seccomp violation:
//! NAME". No filter is installed with `--no-jail`.

use std::collections::BTreeMap;

use crate::protocol::VIOLATION;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// A thread's part in a guest process, for its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Process,
    Vcpu,
    Io,
}

/// Calls any thread makes to run at all: memory, waiting, time, signals,
/// starting and ending threads, and reporting a panic.
const EVERY_THREAD: &[(i64, &str)] = &[
    (libc::SYS_futex, "locks, condition variables, thread joins"),
    (libc::SYS_mmap, "the allocator; merges map frames over guest pages (main)"),
    (libc::SYS_munmap, "the allocator, thread stacks"),
    (libc::SYS_mprotect, "the allocator, thread stack guards"),
    (libc::SYS_madvise, "the allocator returns memory; merges drop pages (main)"),
    (libc::SYS_brk, "the allocator"),
    (libc::SYS_mremap, "the allocator grows large buffers"),
    (libc::SYS_read, "descriptors: requests, eventfds, TAP, sockets, timers"),
    (libc::SYS_write, "descriptors, eventfds (waking threads), stderr"),
    (libc::SYS_close, "descriptors it is done with"),
    (libc::SYS_clock_gettime, "time, where the vDSO falls back to the kernel"),
    (libc::SYS_gettimeofday, "time, as above"),
    (libc::SYS_clock_nanosleep, "sleeps"),
    (libc::SYS_nanosleep, "sleeps"),
    (libc::SYS_sched_yield, "spinning waits yield"),
    (libc::SYS_sched_getaffinity, "thread start (stack and CPU count)"),
    (libc::SYS_rt_sigprocmask, "signal masks: the kick signal, thread start, abort"),
    (libc::SYS_rt_sigreturn, "returning from the kick signal's handler"),
    (libc::SYS_rt_sigaction, "abort on panic resets SIGABRT"),
    (libc::SYS_sigaltstack, "thread start and end (stack overflow handler)"),
    (libc::SYS_getpid, "abort on panic; the freeze signals its own threads"),
    (libc::SYS_gettid, "abort on panic; thread start"),
    (libc::SYS_tgkill, "abort on panic; the freeze and the kick signal threads of this process"),
    (libc::SYS_set_robust_list, "thread start"),
    (libc::SYS_rseq, "thread start"),
    (libc::SYS_getrandom, "hash maps' seeds"),
    (libc::SYS_exit, "a thread ends"),
    (libc::SYS_exit_group, "the process ends"),
];

/// The main thread and any thread but vCPUs and I/O: requests, merges,
/// snapshots, and starting the others.
const PROCESS: &[(i64, &str)] = &[
    (libc::SYS_ioctl, "KVM (dirty log, vCPU state for snapshots), userfaultfd (write-protect, wake)"),
    (libc::SYS_poll, "waiting for a request or the vCPUs' end"),
    (libc::SYS_ppoll, "as poll"),
    (libc::SYS_sendto, "replies and events to the supervisor"),
    (libc::SYS_recvfrom, "requests from the supervisor"),
    (libc::SYS_sendmsg, "replies and events to the supervisor"),
    (libc::SYS_recvmsg, "requests, and a snapshot's file descriptors"),
    (libc::SYS_pread64, "snapshots read guest memory from its memfd; /proc files kept open"),
    (libc::SYS_pwrite64, "snapshots write memory and overlay files"),
    (libc::SYS_lseek, "rereading /proc files kept open"),
    (libc::SYS_ftruncate, "snapshots size their memory and overlay files"),
    (libc::SYS_fsync, "snapshots are durable before they are reported"),
    (libc::SYS_fdatasync, "as fsync"),
    (libc::SYS_fallocate, "merges punch the guest's replaced pages out of its memfd"),
    (libc::SYS_fstat, "file sizes and inodes (snapshots)"),
    (libc::SYS_newfstatat, "as fstat"),
    (libc::SYS_statx, "as fstat"),
    (libc::SYS_fcntl, "descriptor flags"),
    (libc::SYS_mincore, "merges: which pages have memory behind them"),
    (libc::SYS_epoll_create1, "the I/O thread's event loop is made on Start"),
    (libc::SYS_epoll_ctl, "the I/O thread's event loop is made on Start"),
    (libc::SYS_eventfd2, "wake-ups made on Start"),
];

/// vCPU threads: entering the guest and handling its exits.
const VCPU: &[(i64, &str)] = &[
    (libc::SYS_ioctl, "KVM_RUN, interrupt lines; a device's activation (TAP offloads, ioeventfds, irqfds)"),
    (libc::SYS_epoll_ctl, "a device's activation registers host descriptors"),
    (libc::SYS_recvfrom, "none expected; a device reset drains a socket"),
    (libc::SYS_pwrite64, "console bytes, written at the file's end (devices/console.rs)"),
    (libc::SYS_pread64, "a console file at its cap keeps its newest half"),
    (libc::SYS_ftruncate, "a console file at its cap keeps its newest half"),
];

/// The I/O thread: queues, TAP, sockets, disk, timers.
const IO: &[(i64, &str)] = &[
    (libc::SYS_epoll_wait, "waiting for kicks and host descriptors"),
    (libc::SYS_epoll_pwait, "as epoll_wait"),
    (libc::SYS_epoll_ctl, "vsock connections come and go"),
    (libc::SYS_ioctl, "FIONBIO on sockets; TAP offloads"),
    (libc::SYS_readv, "TAP frames, sockets"),
    (libc::SYS_writev, "TAP frames, sockets"),
    (libc::SYS_recvfrom, "vsock streams"),
    (libc::SYS_sendto, "vsock streams; asking the supervisor to dial a host socket"),
    (libc::SYS_recvmsg, "the supervisor's dialled socket comes as a descriptor"),
    (libc::SYS_sendmsg, "vsock streams"),
    (libc::SYS_accept4, "host programs connect to the guest's vsock socket"),
    (libc::SYS_shutdown, "vsock streams end one way"),
    (libc::SYS_pread64, "disk reads (base image, overlays)"),
    (libc::SYS_pwrite64, "disk writes (overlay)"),
    (libc::SYS_preadv, "disk reads"),
    (libc::SYS_pwritev, "disk writes"),
    (libc::SYS_fsync, "disk flushes"),
    (libc::SYS_fdatasync, "disk flushes"),
    (libc::SYS_ftruncate, "an overlay grows"),
    (libc::SYS_fallocate, "an overlay's space"),
    (libc::SYS_timerfd_settime, "rate limiters wait for their buckets"),
    (libc::SYS_timerfd_gettime, "rate limiters"),
    (libc::SYS_fcntl, "descriptor flags"),
    (libc::SYS_getsockopt, "a socket's error"),
];

/// Calls answered with an error (the errno given) by a filter of their
/// own, under every role: whatever tries them copes.
const REFUSED_QUIETLY: &[(i64, i32, &str)] = &[
    (
        libc::SYS_clone3,
        libc::ENOSYS,
        "its flags sit in memory a filter cannot read: the C library then makes threads with clone, checked above",
    ),
    (
        libc::SYS_openat,
        libc::ENOENT,
        "the C library looks for /sys and /proc files (CPU counts for its allocator); the jail's root has none",
    ),
];

/// The calls `role`'s own filter allows (the process filter for
/// [`Role::Process`]), each with its reason.
pub fn allowed(role: Role) -> impl Iterator<Item = &'static (i64, &'static str)> {
    let own = match role {
        Role::Process => PROCESS,
        Role::Vcpu => VCPU,
        Role::Io => IO,
    };
    let vcpu_and_io = match role {
        // The process filter is stacked under the others: it lets through
        // what they allow, which they narrow per thread.
        Role::Process => [VCPU, IO],
        _ => [&[][..], &[][..]],
    };
    EVERY_THREAD.iter().chain(own).chain(vcpu_and_io.into_iter().flatten())
}

fn rules(role: Role) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let err = |e: seccompiler::BackendError| e.to_string();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(role).map(|&(nr, _)| (nr, Vec::new())).collect();
    // Threads only: CLONE_THREAD set in the flags (argument 0).
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(err)?;
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![thread]).map_err(err)?]);
    // Naming threads, and setting no_new_privs (again) before a thread adds
    // its own filter; nothing else.
    let prctl = |option: libc::c_int| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, option as u64)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(err)
    };
    rules.insert(libc::SYS_prctl, vec![prctl(libc::PR_SET_NAME)?, prctl(libc::PR_SET_NO_NEW_PRIVS)?]);
    // Adding a filter only narrows what a thread may do.
    if role == Role::Process {
        rules.insert(libc::SYS_seccomp, Vec::new());
    }
    // Let through here, to be answered by their own filter.
    for &(nr, _, _) in REFUSED_QUIETLY {
        rules.insert(nr, Vec::new());
    }
    Ok(rules)
}

/// `role`'s filter, compiled.
pub fn filter(role: Role) -> Result<BpfProgram, String> {
    compile(rules(role)?, SeccompAction::Trap, SeccompAction::Allow)
}

/// A filter answering `errno` to [`REFUSED_QUIETLY`]'s calls with it, and
/// letting everything else through (to the other filters).
fn refused_quietly(errno: i32) -> Result<BpfProgram, String> {
    let rules = REFUSED_QUIETLY.iter().filter(|r| r.1 == errno).map(|r| (r.0, Vec::new())).collect();
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32))
}

/// A filter for this machine: `on_match` for the calls `rules` match,
/// `otherwise` for the rest.
fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    otherwise: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, String> {
    let arch = std::env::consts::ARCH.try_into().map_err(|e: seccompiler::BackendError| e.to_string())?;
    let filter = SeccompFilter::new(rules, otherwise, on_match, arch).map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// Set once the process filter is installed: threads then add their own.
static PROCESS_FILTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs `role`'s filter on the calling thread (and, for
/// [`Role::Process`], the SIGSYS handler and the filters refusing quietly: every
/// thread made later inherits them). Needs `no_new_privs` (the jail sets it).
pub fn install(role: Role) -> Result<(), String> {
    if role == Role::Process {
        install_violation_handler()?;
        let mut errnos: Vec<i32> = REFUSED_QUIETLY.iter().map(|r| r.1).collect();
        errnos.dedup();
        for errno in errnos {
            seccompiler::apply_filter(&refused_quietly(errno)?).map_err(|e| format!("seccomp: {e}"))?;
        }
    }
    seccompiler::apply_filter(&filter(role)?).map_err(|e| format!("seccomp: {e}"))?;
    if role == Role::Process {
        PROCESS_FILTERED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(())
}

/// A thread of `role` starts: it adds its filter if the process has one
/// (a jailed guest process), else does nothing.
pub fn install_for_thread(role: Role) -> Result<(), String> {
    match PROCESS_FILTERED.load(std::sync::atomic::Ordering::SeqCst) {
        true => install(role),
        false => Ok(()),
    }
}

fn install_violation_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is valid.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler for SIGSYS; `action` outlives the call.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(format!("SIGSYS handler: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Names the call and ends the process, with async-signal-safe calls only
/// (write and exit_group on a stack buffer).
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // The SIGSYS fields of siginfo: the call's address at byte 16, its
    // number at 24 (`si_syscall`).
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { *info.cast::<u8>().add(24).cast::<libc::c_int>() };
    let mut words = super::last_words::LastWords::new(VIOLATION);
    match super::syscall_names::name(nr.into()) {
        Some(name) => words.put(name.as_bytes()),
        None => {
            words.put(b"system call ");
            words.put_decimal(nr.unsigned_abs().into());
        }
    }
    words.say_and_exit(31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_gives_a_reason_for_each_call() {
        for role in [Role::Process, Role::Vcpu, Role::Io] {
            assert!(filter(role).is_ok(), "{role:?}");
            for (nr, why) in allowed(role) {
                assert!(!why.is_empty() && super::super::syscall_names::name(*nr).is_some(), "{nr}");
            }
        }
        // Narrower roles stay inside the process filter they stack on.
        let process: Vec<_> = allowed(Role::Process).map(|(nr, _)| nr).collect();
        for role in [Role::Vcpu, Role::Io] {
            for (nr, _) in allowed(role) {
                assert!(process.contains(&nr), "{role:?} allows {nr}, which the process filter refuses");
            }
        }
        for forbidden in [libc::SYS_execve, libc::SYS_socket, libc::SYS_open, libc::SYS_ptrace, libc::SYS_kill] {
            assert!(!process.contains(&&forbidden), "{forbidden}");
        }
    }

    /// In a child process of its own: the filters let a thread be made
    /// and named, and a forbidden call ends the process with its name.
    #[test]
    fn a_forbidden_call_ends_the_process_naming_the_call() {
        use std::io::Read;
        let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: fork in a test; the child calls only what follows and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            use std::os::fd::AsRawFd;
            // SAFETY: the child's stderr becomes the socket.
            unsafe { libc::dup2(writer.as_raw_fd(), 2) };
            // SAFETY: prctl on an integer.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if let Err(e) = install(Role::Process) {
                eprintln!("install: {e}");
                // SAFETY: ends the child.
                unsafe { libc::_exit(1) };
            }
            let named = std::thread::Builder::new().name("seccomp-test".into()).spawn(|| 7).unwrap().join();
            // Refused quietly: an error, not the end.
            let opened = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            if named.ok() != Some(7) || opened.err() != Some(Some(libc::ENOENT)) {
                // SAFETY: ends the child.
                unsafe { libc::_exit(2) };
            }
            // SAFETY: a forbidden call: the filter stops it.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            // SAFETY: ends the child.
            unsafe { libc::_exit(3) };
        }
        drop(writer);
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let mut said = String::new();
        reader.read_to_string(&mut said).unwrap();
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 31, "status {status:#x}: {said}");
        assert_eq!(said, format!("{VIOLATION}socket\n"));
    }
}
