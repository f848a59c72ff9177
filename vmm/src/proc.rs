//! Reading /proc: CPU time of a task, proportional memory of a process.

use std::path::Path;
use std::time::Duration;

/// User plus system CPU time from a `/proc/.../stat` file.
pub fn cpu_time(stat: &Path) -> Option<Duration> {
    parse_cpu_time(&std::fs::read_to_string(stat).ok()?)
}

fn parse_cpu_time(stat: &str) -> Option<Duration> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Fields after the ")" that ends the command name (which may hold
    // spaces): utime and stime are the 12th and 13th.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    Some(Duration::from_secs_f64((utime + stime) / ticks))
}

/// CPU time of this process's thread named `name`.
pub fn thread_cpu_time(name: &str) -> Option<Duration> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        if std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name) {
            return cpu_time(&task.path().join("stat"));
        }
    }
    None
}

/// Whether process `pid` is stopped: by a signal (`T`) or a tracer (`t`).
pub fn is_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which may hold anything but ends
    // at the last ')'.
    let Some(end) = stat.iter().rposition(|&b| b == b')') else { return false };
    matches!(stat.get(end + 2), Some(b'T' | b't'))
}

/// The host's monotonic clock in nanoseconds: the same in every process
/// (and PID namespace), so a guest process's moment and the supervisor's
/// compare.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Anonymous memory process `pid` holds (`RssAnon`), in bytes: its heap
/// and, for a guest process, its private copies of merged pages.
pub fn anon_bytes(pid: u32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), "RssAnon:")
}

/// The `key   N kB` line of a /proc file, in bytes.
fn kib_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of memory a file holds (a memfd's pages; holes hold none).
pub fn file_bytes(file: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| m.blocks() * 512)
}

/// Proportional set size of process `pid` in bytes: each page it maps
/// counted once, divided among the mappings that share it.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// Pss of process `pid` and every process under it (a supervisor and its
/// guest processes).
pub fn pss_tree_bytes(pid: u32) -> Option<u64> {
    let mut total = pss_bytes(pid)?;
    for child in children(pid) {
        total += pss_tree_bytes(child).unwrap_or(0);
    }
    Some(total)
}

/// The children of process `pid`, from each of its threads.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces() {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let stat = format!("42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 {} {} 0 0", 3 * hz, hz);
        assert_eq!(parse_cpu_time(&stat), Some(Duration::from_secs(4)));
        assert_eq!(parse_cpu_time("garbage"), None);
    }

    #[test]
    fn own_process_has_cpu_time_and_pss() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time(Path::new("/proc/self/stat")).is_some());
        assert!(pss_bytes(std::process::id()).unwrap() > 0);
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let with_child = pss_tree_bytes(std::process::id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(children(std::process::id()).is_empty() || with_child > 0);
        assert!(with_child > pss_bytes(child.id()).unwrap_or(0));
    }
}
