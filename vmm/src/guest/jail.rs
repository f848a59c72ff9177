//! The jail a guest process enters once it has built its guest, before it
//! answers the supervisor and long before the guest runs.
//!
//! Everything a guest process needs from the host is open by then: KVM,
//! its RAM, its store, kernel and disk files, the TAP and the vsock
//! listener, all descriptors. So the jail takes away what is left: root
//! (a user and group of its own, no supplementary groups, no capabilities
//! in any set, none to gain back through `execve`), the host's network,
//! IPC and host name (new namespaces), and its own inspection (not
//! dumpable, so other processes of its user id cannot read its memory or
//! reopen its descriptors). What it still asks of the host, such as a
//! vsock connection to a host socket, it asks the supervisor for.
//!
//! It is entered while the process has one thread: namespaces and
//! `no_new_privs` are per thread, and every thread made later inherits
//! them. Its PID namespace is the one thing made before it runs: a process
//! cannot move itself into one, so the supervisor's spawner thread makes a
//! fresh one for each guest process it forks (`supervisor::jailer`), whose
//! first and only process the guest process is.

use std::io;

use crate::protocol::{Jail, FATAL_SIGNAL};

impl Jail {
    /// Enters the jail. The process must have one thread.
    /// `supervisor_alive` says whether the supervisor is still there (its
    /// parent is not visible from its own PID namespace).
    pub fn enter(&self, supervisor_alive: impl Fn() -> bool) -> Result<(), String> {
        let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
        if threads != 1 {
            return Err(format!("{threads} threads are running; the jail must be entered before any"));
        }
        let last_cap = last_capability();
        let namespaces = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        // SAFETY: plain syscalls on integers and constant strings; each
        // result is checked.
        unsafe {
            check(libc::unshare(namespaces), "new mount, network, IPC and UTS namespaces")?;
            let name = b"vmm-guest";
            check(libc::sethostname(name.as_ptr().cast(), name.len()), "its host name")?;
            empty_root()?;
            // The bounding set first: dropping it needs CAP_SETPCAP, gone
            // once the user id changes.
            for cap in 0..=last_cap {
                check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0), "dropping the capability bounding set")?;
            }
            check(
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
                "clearing ambient capabilities",
            )?;
            check(libc::setgroups(0, std::ptr::null()), "dropping supplementary groups")?;
            check(libc::setresgid(self.gid, self.gid, self.gid), "its group id")?;
            // A change of user id away from 0 clears the permitted and
            // effective capabilities (no SECBIT_KEEP_CAPS is set).
            check(libc::setresuid(self.uid, self.uid, self.uid), "its user id")?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")?;
            check(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0), "not dumpable")?;
            // A change of credentials clears the parent-death signal: set
            // it again, and make sure the supervisor did not go meanwhile.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0), "the parent-death signal")?;
            if !supervisor_alive() {
                return Err("the supervisor is gone".into());
            }
        }
        match capabilities_left(last_cap) {
            None => Ok(()),
            Some(left) => Err(format!("capabilities are left after the change of user: {left}")),
        }
    }
}

/// Makes the root of this (new, private) mount namespace an empty,
/// read-only tmpfs, and lets go of the host's tree altogether.
///
/// # Safety
/// Changes the process's root and working directory.
unsafe fn empty_root() -> Result<(), String> {
    check(
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ),
        "making its mounts private",
    )?;
    // /proc is a directory on every host this runs on (it read /proc to
    // get here); the tmpfs goes over it in this namespace alone.
    let at = c"/proc";
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    check(
        libc::mount(
            c"vmm-jail".as_ptr(),
            at.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            c"size=4k,nr_inodes=2,mode=0555".as_ptr().cast(),
        ),
        "mounting its empty root",
    )?;
    check(libc::chdir(at.as_ptr()), "entering its empty root")?;
    // The new root stacks the old one on top of it; unmounting that
    // leaves the new root alone (pivot_root(2)).
    check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int, "pivot_root")?;
    check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH), "letting go of the host's tree")?;
    check(libc::chdir(c"/".as_ptr()), "entering its root")?;
    check(
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
            std::ptr::null(),
        ),
        "making its root read-only",
    )
}

fn check(ret: libc::c_int, what: &str) -> Result<(), String> {
    match ret {
        0 => Ok(()),
        _ => Err(format!("{what}: {}", io::Error::last_os_error())),
    }
}

/// The highest capability number this kernel knows.
fn last_capability() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

/// A capability this process still has in some set, if any (no /proc
/// needed: the jail has none).
fn capabilities_left(last_cap: libc::c_ulong) -> Option<String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes two Data for a version 3 header, which we pass.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Some(format!("capget: {}", io::Error::last_os_error()));
    }
    if let Some(d) = data.iter().find(|d| d.effective | d.permitted | d.inheritable != 0) {
        return Some(format!(
            "effective {:#x}, permitted {:#x}, inheritable {:#x}",
            d.effective, d.permitted, d.inheritable
        ));
    }
    (0..=last_cap).find_map(|cap| {
        // SAFETY: prctl reads on an integer.
        let bounding = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        // SAFETY: as above.
        let ambient = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap, 0, 0) };
        (bounding > 0 || ambient > 0).then(|| format!("capability {cap} (bounding {bounding}, ambient {ambient})"))
    })
}

/// Signals that end a process by default and that an operator or the
/// C library (abort) sends; the faults (SIGSEGV, SIGBUS, ...) a crash
/// raises are delivered by force and need nothing.
const ENDING_SIGNALS: [libc::c_int; 5] = [libc::SIGABRT, libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Makes [`ENDING_SIGNALS`] end this process as they would any other.
pub fn handle_ending_signals() -> io::Result<()> {
    for signal in ENDING_SIGNALS {
        // SAFETY: a zeroed sigaction with a plain handler is valid.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_ending_signal as *const () as usize;
        // SAFETY: installs a handler that only writes and exits.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_ending_signal(signal: libc::c_int) {
    let mut words = super::last_words::LastWords::new(FATAL_SIGNAL);
    words.put_decimal(signal.unsigned_abs().into());
    words.say_and_exit(128 + signal)
}
