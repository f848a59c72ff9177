//! Memory cgroups: one per guest process (what it uses, whether the OOM
//! killer took it), and one per `vmm bench` run (limited with
//! `--host-memory`). v1 (`memory` controller) or v2 (unified); each is made
//! under the cgroup this process is in, so whatever measures or limits us
//! includes them. [`OwnCgroup`] reads the limits and use of that cgroup and
//! its ancestors: one side of the wall the memory governor (pressure.rs)
//! keeps guests from.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

pub struct MemoryCgroup {
    dir: PathBuf,
    procs: File,
    version: Version,
}

/// Where new cgroups go: one of ours, named without holding it open.
#[derive(Clone, Debug)]
pub struct CgroupPlace {
    dir: PathBuf,
    version: Version,
}

impl CgroupPlace {
    /// A new cgroup named `name` here.
    pub fn create(&self, name: &str) -> io::Result<MemoryCgroup> {
        MemoryCgroup::create_in(self.dir.clone(), self.version, name, false)
    }
}

impl MemoryCgroup {
    /// A cgroup named `name` under ours (or under `parent`, one of ours).
    pub fn create(name: &str, parent: Option<&MemoryCgroup>) -> io::Result<MemoryCgroup> {
        let (base, version) = match parent {
            Some(p) => (p.dir.clone(), p.version),
            None => own_memory_cgroup()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no memory cgroup in /proc/self/cgroup"))?,
        };
        Self::create_in(base, version, name, parent.is_none())
    }

    /// Where cgroups under this one are made.
    pub fn place(&self) -> CgroupPlace {
        CgroupPlace { dir: self.dir.clone(), version: self.version }
    }

    /// Gives it a new name under the same parent (a cgroup made ahead of
    /// its use: renaming is cheap, where moving a process between cgroups
    /// waits for the kernel's RCU). cgroup v2 does not rename: there it
    /// keeps its name.
    pub fn rename(&mut self, name: &str) -> io::Result<()> {
        let to = self.dir.with_file_name(name);
        std::fs::rename(&self.dir, &to)?;
        self.dir = to;
        Ok(())
    }

    fn create_in(base: PathBuf, version: Version, name: &str, top: bool) -> io::Result<MemoryCgroup> {
        let dir = base.join(name);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => other.map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", dir.display())))?,
        }
        if version == Version::V2 && top {
            // Children of this one need the memory controller enabled here.
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+memory");
        }
        if !dir.join(usage_file(version)).exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the memory controller is not delegated here"));
        }
        let procs = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
        Ok(MemoryCgroup { dir, procs, version })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the child `command` will start join this cgroup before it runs.
    pub fn enroll(&self, command: &mut Command) {
        let fd = self.procs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls write(2), which is async-signal-safe, on an fd the parent
        // keeps open until the child has started.
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

    /// Bytes charged to the cgroup now, as the kernel's counter has them:
    /// cheap to read (the governor reads it every tick), but on v1 up to a
    /// batch of pages per CPU ahead of what is used (charges are taken in
    /// batches).
    pub fn charged(&self) -> Option<u64> {
        read_number(&self.dir.join(usage_file(self.version)))
    }

    /// What the cgroup's processes hold, to the page (what the API and the
    /// bench report): v1's counter is not exact, as the kernel's docs say,
    /// so there it is memory.stat's rss, cache and swap plus kernel memory;
    /// v2's `memory.current`.
    pub fn usage(&self) -> Option<u64> {
        match self.version {
            Version::V1 => v1_usage(&self.dir),
            Version::V2 => self.charged(),
        }
    }

    /// Caps what it may hold (v1 `memory.limit_in_bytes`, v2 `memory.max`).
    pub fn set_limit(&self, bytes: u64) -> io::Result<()> {
        std::fs::write(self.dir.join(limit_file(self.version)), bytes.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot limit {}: {e}", self.dir.display())))
    }

    /// Processes of this cgroup the kernel's OOM killer has killed.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|text| text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
            .unwrap_or(0)
    }
}

/// The memory cgroup this process runs in and its ancestors up to the
/// controller's root, read but never made, changed or removed here. A limit
/// anywhere on that chain is a wall: a parent's counts its other children
/// too.
pub struct OwnCgroup {
    /// Own directory first, then each parent's.
    chain: Vec<PathBuf>,
    version: Version,
}

/// Limits at or above this are "no limit" (v1 writes 2^63 rounded down to
/// a page).
const NO_LIMIT: u64 = 1 << 62;

impl OwnCgroup {
    pub fn find() -> Option<OwnCgroup> {
        let (dir, version) = own_memory_cgroup()?;
        dir.join(usage_file(version)).exists().then(|| OwnCgroup::at(&hierarchy_root(version), &dir, version))
    }

    /// `dir` and its parents up to `root`.
    fn at(root: &Path, dir: &Path, version: Version) -> OwnCgroup {
        let chain = dir.ancestors().take_while(|d| d.starts_with(root)).map(Path::to_path_buf).collect();
        OwnCgroup { chain, version }
    }

    fn limit_of(&self, dir: &Path) -> Option<u64> {
        // v2 writes "max" for none, which does not parse; its root has no file.
        read_number(&dir.join(limit_file(self.version))).filter(|&l| l < NO_LIMIT)
    }

    /// The tightest limit on the chain, if any level has one.
    pub fn limit(&self) -> Option<u64> {
        self.chain.iter().filter_map(|d| self.limit_of(d)).min()
    }

    /// Bytes that may still be charged before some level's limit: the least,
    /// over the limited levels, of the limit less that level's working set.
    pub fn room(&self) -> Option<u64> {
        let room = |d: &PathBuf| Some(self.limit_of(d)?.saturating_sub(self.working_set(d)?));
        self.chain.iter().filter_map(room).min()
    }

    /// What a level holds that the kernel cannot simply drop: its use less
    /// inactive file pages (page cache it would reclaim before failing).
    fn working_set(&self, dir: &Path) -> Option<u64> {
        let usage = read_number(&dir.join(usage_file(self.version)))?;
        let key = match self.version {
            Version::V1 => "total_inactive_file ",
            Version::V2 => "inactive_file ",
        };
        let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
        Some(usage.saturating_sub(stat_field(&stat, key).unwrap_or(0)))
    }
}

impl Drop for MemoryCgroup {
    /// Its processes have exited by now; leftover charges (page cache) move
    /// to the parent when the directory goes.
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        log::warn!("cannot remove cgroup {}", self.dir.display());
    }
}

/// The directory of the memory cgroup this process runs in, if any.
pub fn own_memory_cgroup_dir() -> Option<PathBuf> {
    own_memory_cgroup().map(|(dir, _)| dir)
}

/// The memory cgroup this process runs in, and its hierarchy's version.
fn own_memory_cgroup() -> Option<(PathBuf, Version)> {
    memory_cgroup_of(&std::fs::read_to_string("/proc/self/cgroup").ok()?)
}

/// Where the hierarchy holding the memory controller is mounted.
fn hierarchy_root(version: Version) -> PathBuf {
    let all = Path::new("/sys/fs/cgroup");
    match version {
        Version::V1 => all.join("memory"),
        Version::V2 => all.to_path_buf(),
    }
}

fn usage_file(version: Version) -> &'static str {
    match version {
        Version::V1 => "memory.usage_in_bytes",
        Version::V2 => "memory.current",
    }
}

fn limit_file(version: Version) -> &'static str {
    match version {
        Version::V1 => "memory.limit_in_bytes",
        Version::V2 => "memory.max",
    }
}

/// A v1 cgroup's memory to the page: anonymous, page cache and swap (its
/// descendants' included) and kernel memory.
fn v1_usage(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    let user: u64 = ["total_rss ", "total_cache ", "total_swap "].iter().filter_map(|k| stat_field(&stat, k)).sum();
    Some(user + read_number(&dir.join("memory.kmem.usage_in_bytes")).unwrap_or(0))
}

/// The number after `key` (with its trailing space) in a memory.stat text.
fn stat_field(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Our memory cgroup directory, from /proc/self/cgroup: a v1
/// `N:memory:/path` line, else the v2 `0::/path` one.
fn memory_cgroup_of(proc_self_cgroup: &str) -> Option<(PathBuf, Version)> {
    let mut v2 = None;
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            return Some((hierarchy_root(Version::V1).join(path), Version::V1));
        }
        if controllers.is_empty() {
            v2 = Some((hierarchy_root(Version::V2).join(path), Version::V2));
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
        assert_eq!(memory_cgroup_of(text), Some((PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"), Version::V1)));
        assert_eq!(
            memory_cgroup_of("0::/user.slice/x.scope\n"),
            Some((PathBuf::from("/sys/fs/cgroup/user.slice/x.scope"), Version::V2))
        );
        assert_eq!(memory_cgroup_of(""), None);
    }

    /// Writes a fake v1 level: limit (None: unlimited), usage, inactive file pages.
    fn level(dir: &Path, limit: Option<u64>, usage: u64, inactive: u64) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.unwrap_or(9223372036854771712).to_string()).unwrap();
        std::fs::write(dir.join("memory.usage_in_bytes"), usage.to_string()).unwrap();
        std::fs::write(dir.join("memory.stat"), format!("cache 1\ntotal_inactive_file {inactive}\n")).unwrap();
    }

    #[test]
    fn v1_usage_is_counted_to_the_page() {
        let dir = std::env::temp_dir().join(format!("vmm-cgroup-usage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.usage_in_bytes"), "2424832").unwrap();
        let stat = "cache 4096\nrss 8192\ntotal_cache 40960\ntotal_rss 458752\ntotal_rss_huge 0\ntotal_swap 4096\n";
        std::fs::write(dir.join("memory.stat"), stat).unwrap();
        std::fs::write(dir.join("memory.kmem.usage_in_bytes"), "1466368").unwrap();
        assert_eq!(v1_usage(&dir), Some(40960 + 458752 + 4096 + 1466368), "not the batched counter");
        std::fs::remove_file(dir.join("memory.kmem.usage_in_bytes")).unwrap();
        assert_eq!(v1_usage(&dir), Some(40960 + 458752 + 4096), "no kernel memory counter: user memory only");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A parent's limit counts when it is the tighter room, though our own
    /// limit is larger: its other children use it too.
    #[test]
    fn the_tightest_level_of_the_chain_is_the_wall() {
        let root = std::env::temp_dir().join(format!("vmm-cgroup-test-{}", std::process::id()));
        let (parent, own) = (root.join("machine"), root.join("machine/vmm"));
        level(&root, None, 50 << 30, 0);
        level(&parent, Some(8 << 30), 7 << 30, 1 << 30);
        level(&own, Some(4 << 30), 1 << 30, 0);
        let cgroup = OwnCgroup::at(&root, &own, Version::V1);
        assert_eq!(cgroup.chain, [own.clone(), parent.clone(), root.clone()]);
        assert_eq!(cgroup.limit(), Some(4 << 30), "the smallest limit");
        assert_eq!(cgroup.room(), Some(2 << 30), "the parent's 8 GiB less its 6 GiB working set");
        level(&parent, None, 7 << 30, 0);
        assert_eq!(cgroup.room(), Some(3 << 30), "our own limit, once the parent has none");
        level(&own, None, 1 << 30, 0);
        assert_eq!((cgroup.limit(), cgroup.room()), (None, None), "no limit anywhere");
        std::fs::remove_dir_all(root).unwrap();
    }
}
