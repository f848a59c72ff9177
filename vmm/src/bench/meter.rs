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

use std::process::Command;

use crate::supervisor::cgroup::MemoryCgroup;

pub enum Meter {
    Cgroup(MemoryCgroup),
    Pss,
}

impl Meter {
    /// A cgroup named `name` under ours if we can make one, else Pss.
    pub fn new(name: &str) -> Meter {
        match MemoryCgroup::create(name, None) {
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
            cg.enroll(command);
        }
    }

    /// Caps what the run may use (`--host-memory`): needs the cgroup.
    pub fn limit(&self, bytes: u64) -> Result<(), String> {
        match self {
            Meter::Cgroup(cg) => cg.set_limit(bytes).map_err(|e| e.to_string()),
            Meter::Pss => Err("--host-memory needs a memory cgroup per run, and none can be made here".into()),
        }
    }

    /// Processes of the run the kernel's OOM killer killed.
    pub fn oom_kills(&self) -> u64 {
        match self {
            Meter::Cgroup(cg) => cg.oom_kills(),
            Meter::Pss => 0,
        }
    }

    /// Bytes in use by the child `pid`.
    pub fn bytes(&self, pid: u32) -> Option<u64> {
        match self {
            Meter::Cgroup(cg) => cg.usage(),
            Meter::Pss => crate::proc::pss_tree_bytes(pid),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Meter::Cgroup(cg) => format!("a memory cgroup per run ({})", cg.dir().display()),
            Meter::Pss => "Pss of the vmm process and its guest processes (/proc/PID/smaps_rollup)".into(),
        }
    }
}
