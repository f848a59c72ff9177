//! What a supervisor that was killed (`kill -9`, a crash) left behind, and
//! the next one removes: its memory cgroups and its temporary console and
//! overlay directories. Each carries the supervisor's pid in its name
//! (`vmm-<pid>`, `vmm-bench-<pid>-<mode>`, `vmm-consoles-<pid>-XXXXXX`,
//! `vmm-overlays-<pid>-XXXXXX`); what belongs to a pid that no longer runs
//! is stale. (Its guest processes ended with it: they die with their
//! parent.) A pid that was reused keeps its leftovers until it too is gone.

use std::path::{Path, PathBuf};

/// Temporary directories a supervisor makes, by prefix (`<prefix>-<pid>-`).
pub const TEMP_PREFIXES: [&str; 2] = ["vmm-consoles", "vmm-overlays"];

/// Removes what supervisors that no longer run left in the temporary
/// directory and beside our memory cgroup; returns what it removed.
pub fn remove_stale() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = TEMP_PREFIXES.iter().find_map(|p| owner(name.to_str()?, p)) else { continue };
        if !running(pid) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    if let Some(parent) = crate::supervisor::cgroup::own_memory_cgroup_dir() {
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = ["vmm", "vmm-bench"].iter().find_map(|p| owner(name.to_str()?, p)) else { continue };
            if !running(pid) && entry.path().is_dir() && remove_cgroup(&entry.path()) {
                removed.push(entry.path());
            }
        }
    }
    removed
}

/// The pid in `name` if it is `<prefix>-<pid>` or `<prefix>-<pid>-<rest>`.
fn owner(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let digits = rest.split('-').next()?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

fn running(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes a cgroup and the cgroups under it (their files go with each
/// directory; a cgroup that still holds a process stays).
fn remove_cgroup(dir: &Path) -> bool {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path());
        }
    }
    std::fs::remove_dir(dir).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_with_a_pid_belong_to_a_supervisor() {
        assert_eq!(owner("vmm-123", "vmm"), Some(123));
        assert_eq!(owner("vmm-bench-77-inprocess", "vmm-bench"), Some(77));
        assert_eq!(owner("vmm-consoles-9-AbC123", "vmm-consoles"), Some(9));
        assert_eq!(owner("vmm-bench-77-inprocess", "vmm"), None);
        assert_eq!(owner("vmm-consoles-AbC123", "vmm-consoles"), None, "an old name without a pid");
        assert_eq!(owner("vmmx-12", "vmm"), None);
        assert_eq!(owner("vmm-", "vmm"), None);
    }

    #[test]
    fn a_dead_supervisors_temp_dirs_go_and_a_live_ones_stay() {
        // A pid above pid_max's largest value never runs.
        let dead = std::env::temp_dir().join("vmm-consoles-4194305-test");
        let live = std::env::temp_dir().join(format!("vmm-consoles-{}-test", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir_all(d.join("inside")).unwrap();
        }
        let removed = remove_stale();
        assert!(removed.contains(&dead) && !dead.exists(), "{removed:?}");
        assert!(live.exists());
        std::fs::remove_dir_all(live).unwrap();
    }
}
