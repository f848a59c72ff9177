//! The supervisor's part of the jail (`guest::jail` is the guest
//! process's): whether this host can jail guest processes at all, and the
//! fresh PID namespace each one is forked into.

use std::io;

/// Puts the next process this thread forks into a PID namespace of its
/// own, as its process 1: it sees no other process, and no other process
/// of the host can be named from it. Only for this thread (the spawner);
/// each call makes a fresh namespace, since one whose first process has
/// ended takes no more.
pub fn new_pid_namespace() -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // The kernel makes a new one only for a thread whose children would
    // go where it is itself: back there first (after the last call).
    let own = std::fs::File::open("/proc/self/ns/pid")?;
    // SAFETY: setns and unshare on a descriptor we hold and constant
    // flags; they touch no memory of ours.
    unsafe {
        if libc::setns(own.as_raw_fd(), libc::CLONE_NEWPID) != 0 || libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why this host cannot jail guest processes, if it cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("jailing guests needs root (each guest process gets a user id of its own)".into());
    }
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        if std::fs::symlink_metadata(format!("/proc/self/ns/{ns}")).is_err() {
            return Some(format!("this kernel has no {ns} namespaces"));
        }
    }
    None
}
