//! How much host memory one bench run uses.
//!
//! Preferred: a memory cgroup of its own (v1 `memory.usage_in_bytes` or v2
//! `memory.current`) that the `vmm run` child joins before it execs, so
//! every page it ever allocates is charged there: guest RAM (memfd or
//! anonymous), the stable store, KSM pages, page tables, the page cache of
//! the kernel files it read. Where no cgroup can be made (not root, v2
//! without a delegated memory controller) it falls back to the child's
//! proportional set size (Pss), which counts each mapped page once but
//! misses unmapped memfd pages and kernel memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub enum Meter {
    Cgroup(MemoryCgroup),
    Pss,
}

impl Meter {
    /// A cgroup named `name` under ours if we can make one, else Pss.
    pub fn new(name: &str) -> Meter {
        match MemoryCgroup::create(name) {
            Ok(cg) => Meter::Cgroup(cg),
            Err(e) => {
                log::warn!("bench: no memory cgroup ({e}); measuring the child's Pss instead");
                Meter::Pss
            }
        }
    }

    /// Makes the child `command` will start join the cgroup before it runs.
    pub fn enroll(&self, command: &mut Command) {
        if let Meter::Cgroup(cg) = self {
            let fd = cg.procs.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and
            // only calls write(2), which is async-signal-safe, on an fd the
            // parent keeps open until the child has started.
            unsafe {
                command.pre_exec(move || {
                    // "0" moves the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }

    /// Bytes in use by the child `pid`.
    pub fn bytes(&self, pid: u32) -> Option<u64> {
        match self {
            Meter::Cgroup(cg) => cg.usage(),
            Meter::Pss => crate::proc::pss_bytes(pid),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Meter::Cgroup(cg) => {
                format!("a memory cgroup per run ({})", cg.usage_file.file_name().unwrap_or_default().to_string_lossy())
            }
            Meter::Pss => "Pss of the vmm process (/proc/PID/smaps_rollup)".into(),
        }
    }
}

pub struct MemoryCgroup {
    dir: PathBuf,
    procs: File,
    usage_file: PathBuf,
}

impl MemoryCgroup {
    fn create(name: &str) -> io::Result<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let (parent, usage) = memory_cgroup_of(&own)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no memory cgroup in /proc/self/cgroup"))?;
        let dir = parent.join(name);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other.map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", dir.display())))?,
        }
        let usage_file = dir.join(usage);
        if !usage_file.exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the memory controller is not delegated here"));
        }
        let procs = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
        Ok(MemoryCgroup { dir, procs, usage_file })
    }

    fn usage(&self) -> Option<u64> {
        std::fs::read_to_string(&self.usage_file).ok()?.trim().parse().ok()
    }
}

impl Drop for MemoryCgroup {
    /// The child has exited by now; its leftover charges (page cache) move
    /// to the parent when the directory goes.
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        log::warn!("bench: cannot remove cgroup {}", self.dir.display());
    }
}

/// Our memory cgroup directory and its usage file, from /proc/self/cgroup:
/// a v1 `N:memory:/path` line, else the v2 `0::/path` one.
fn memory_cgroup_of(proc_self_cgroup: &str) -> Option<(PathBuf, &'static str)> {
    let root = Path::new("/sys/fs/cgroup");
    let mut v2 = None;
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some((root.join("memory").join(path), "memory.usage_in_bytes"));
        }
        if controllers.is_empty() {
            v2 = Some((root.join(path), "memory.current"));
        }
    }
    v2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v1_memory_controller_before_v2() {
        let text = "4:memory:/process_api/abc\n3:cpuset:/\n0::/\n";
        assert_eq!(
            memory_cgroup_of(text),
            Some((PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"), "memory.usage_in_bytes"))
        );
        assert_eq!(
            memory_cgroup_of("0::/user.slice/x.scope\n"),
            Some((PathBuf::from("/sys/fs/cgroup/user.slice/x.scope"), "memory.current"))
        );
        assert_eq!(memory_cgroup_of(""), None);
    }
}
