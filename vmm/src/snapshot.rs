//! A running `vmm run`'s state as JSON, rewritten twice a second with
//! `--stats-file`: what `vmm bench` (another process) samples.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How often the runner rewrites the file.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    /// Seconds since the guests started.
    pub elapsed_s: f64,
    pub guests: usize,
    pub guests_running: usize,
    /// Guests that ended other than cleanly, or reported corrupted pages.
    pub guests_failed: usize,
    /// Corrupted pages memtest guests reported, over all guests.
    pub corrupted_pages: u64,
    /// In-process page sharing; `None` when it is not on.
    pub sharing: Option<SharingSnapshot>,
    /// Set in the last snapshot, written after every guest ended.
    pub finished: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SharingSnapshot {
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub zero_pages: u64,
    /// pages_sharing + zero_pages: host pages no longer needed.
    pub pages_saved: u64,
    pub full_scans: u64,
    pub cow_breaks: u64,
    pub scanner_cpu_s: f64,
    pub freeze_p50_us: u64,
    pub freeze_p99_us: u64,
    /// Merging stopped short of vm.max_map_count.
    pub map_limit_reached: bool,
}

impl SharingSnapshot {
    pub fn new(stats: &dedup::Stats, scanner_cpu: std::time::Duration) -> Self {
        SharingSnapshot {
            pages_shared: stats.pages_shared,
            pages_sharing: stats.pages_sharing,
            zero_pages: stats.zero_pages,
            pages_saved: stats.pages_saved(),
            full_scans: stats.full_scans,
            cow_breaks: stats.cow_breaks,
            scanner_cpu_s: scanner_cpu.as_secs_f64(),
            freeze_p50_us: stats.freeze.p50.as_micros() as u64,
            freeze_p99_us: stats.freeze.p99.as_micros() as u64,
            map_limit_reached: stats.map_limit_reached,
        }
    }
}

impl RunSnapshot {
    /// Replaces `path` in one step (write a sibling, then rename), so a
    /// reader never sees half a file.
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }

    pub fn read_from(path: &Path) -> io::Result<RunSnapshot> {
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() {
        let path = std::env::temp_dir().join(format!("vmm-snapshot-test-{}", std::process::id()));
        let snap = RunSnapshot {
            elapsed_s: 1.5,
            guests: 2,
            guests_running: 1,
            guests_failed: 1,
            corrupted_pages: 3,
            sharing: Some(SharingSnapshot { pages_saved: 7, ..Default::default() }),
            finished: false,
        };
        snap.write_to(&path).unwrap();
        assert_eq!(RunSnapshot::read_from(&path).unwrap(), snap);
        std::fs::write(&path, "{").unwrap();
        assert_eq!(RunSnapshot::read_from(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        std::fs::remove_file(path).unwrap();
    }
}
