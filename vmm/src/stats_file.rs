//! A running `vmm run`'s state as JSON, rewritten twice a second with
//! `--stats-file`: what `vmm bench` (another process) samples. The API's
//! `GET /dedup/stats` shows the same sharing figures.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How often the runner rewrites the file.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    /// Seconds since the guests started.
    pub elapsed_s: f64,
    pub guests: usize,
    pub guests_running: usize,
    /// Guests that ended other than cleanly, or reported corrupted pages.
    pub guests_failed: usize,
    /// Corrupted pages memtest guests reported, over all guests.
    pub corrupted_pages: u64,
    /// Guests that have verified at least one round of memtest since they
    /// started.
    #[serde(default)]
    pub guests_verified: usize,
    /// Rounds memtest guests verified, over all guests: what the guests
    /// got done.
    #[serde(default)]
    pub rounds_verified: u64,
    /// What the guests cost KVM (page faults, TLB flushes, exits), over
    /// all guests.
    #[serde(default)]
    pub kvm: crate::protocol::KvmCounters,
    /// How long each guest took to make (booted or restored), and what its
    /// process held then, before it ran: in the order they were made.
    #[serde(default)]
    pub created: Vec<Created>,
    /// The memory governor (supervisor/pressure.rs): time guests were held, guests
    /// held at some point, guests ended because sharing could not make room.
    #[serde(default)]
    pub throttled_s: f64,
    #[serde(default)]
    pub guests_throttled: usize,
    /// Seconds each guest it held was held, by guest id.
    #[serde(default)]
    pub throttled_s_per_guest: std::collections::BTreeMap<usize, f64>,
    #[serde(default)]
    pub guests_ended_for_memory: usize,
    /// Guests whose processes a SIGKILL from outside the VMM ended (the
    /// kernel's OOM killer, under a memory limit).
    #[serde(default)]
    pub guests_killed: usize,
    /// Memory the guests' balloons gave back (inflated or reported free)
    /// so far, and balloon requests the governor made to reclaim it.
    #[serde(default)]
    pub balloon_given_mib: f64,
    #[serde(default)]
    pub balloon_reclaims: u64,
    /// In-process page sharing; `None` when it is not on.
    pub sharing: Option<SharingStats>,
    /// How long memtest guests' pages took, in nanosecond buckets.
    #[serde(default)]
    pub gaps: crate::gaps::Gaps,
    /// Each guest's timings from the request that made it.
    #[serde(default)]
    pub timings: Vec<GuestTimings>,
    /// Set in the last snapshot, written after every guest ended.
    pub finished: bool,
}

/// Milliseconds from the request that made a guest (`POST /guests`, or
/// `vmm run` making it) to each step; `null` until it happens.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GuestTimings {
    /// Its process ready to start it (booted: the kernel loaded; a clone:
    /// its state restored and its memory mapped): what `POST /guests`
    /// answers after.
    pub made_ms: Option<f64>,
    /// A vCPU first entered the guest (after its start).
    pub first_instruction_ms: Option<f64>,
    /// memtest's first verified round on every vCPU since it was made.
    pub first_round_ms: Option<f64>,
}

/// One step of [`GuestTimings`].
pub type TimingStep = fn(&GuestTimings) -> Option<f64>;

impl GuestTimings {
    /// Each step, named as reports name it.
    pub const STEPS: [(&'static str, TimingStep); 3] = [
        ("made", |t| t.made_ms),
        ("first instruction", |t| t.first_instruction_ms),
        ("first verified round", |t| t.first_round_ms),
    ];
}

/// p50, p99 and max of one step's time over the guests that reached it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub guests: usize,
}

impl RunStats {
    /// The spread of `step` (see `GuestTimings`) over the guests, if any
    /// reached it.
    pub fn spread(&self, step: TimingStep) -> Option<Spread> {
        let mut ms: Vec<f64> = self.timings.iter().filter_map(step).collect();
        ms.sort_by(f64::total_cmp);
        Some(Spread {
            p50: dedup::stats::nearest_rank(&ms, 0.5)?,
            p99: dedup::stats::nearest_rank(&ms, 0.99)?,
            max: *ms.last()?,
            guests: ms.len(),
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub ms: f64,
    /// How long it waited for room before it was made (waves).
    #[serde(default)]
    pub waited_ms: f64,
    /// Its memory cgroup (or Pss) right after it was made; None where
    /// neither can be read.
    pub memory_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SharingStats {
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub zero_pages: u64,
    /// pages_sharing + zero_pages: host pages no longer needed.
    pub pages_saved: u64,
    pub full_scans: u64,
    pub cow_breaks: u64,
    pub scanner_cpu_s: f64,
    /// Intervals page sharing held a guest's vCPU or device thread: how
    /// many, and p50, p99 and the longest, in microseconds.
    pub stalls: u64,
    pub stall_p50_us: u64,
    pub stall_p99_us: u64,
    pub stall_max_us: u64,
    /// Merge calls made under write-protection and under a freeze.
    pub merges_write_protected: u64,
    pub merges_frozen: u64,
    pub mappings: u64,
    /// Some guest's merging stopped short of vm.max_map_count.
    pub map_limit_reached: bool,
    /// Failures page sharing counted (and went on after).
    pub errors: u64,
    pub general_profit: i64,
    /// Pages held back because they keep changing, at each guest's last
    /// look, and the holds begun, by why (docs/dedup.md, "Pages that keep
    /// changing").
    pub pages_held: u64,
    pub held_after_break: u64,
    pub held_changed_in_merge: u64,
    pub held_rewritten: u64,
}

impl SharingStats {
    pub fn new(published: &dedup::Published) -> Self {
        let stats = &published.stats;
        SharingStats {
            pages_shared: stats.pages_shared,
            pages_sharing: stats.pages_sharing,
            zero_pages: stats.zero_pages,
            pages_saved: stats.pages_saved(),
            full_scans: stats.full_scans,
            cow_breaks: stats.cow_breaks,
            scanner_cpu_s: published.cpu.as_secs_f64(),
            stalls: stats.stall.count,
            stall_p50_us: stats.stall.p50.as_micros() as u64,
            stall_p99_us: stats.stall.p99.as_micros() as u64,
            stall_max_us: stats.stall.max.as_micros() as u64,
            merges_write_protected: stats.merges_write_protected,
            merges_frozen: stats.merges_frozen,
            mappings: stats.mappings_used,
            map_limit_reached: stats.map_limit_reached,
            errors: stats.errors,
            general_profit: stats.general_profit,
            pages_held: stats.held.now,
            held_after_break: stats.held.after_break,
            held_changed_in_merge: stats.held.changed_in_merge,
            held_rewritten: stats.held.rewritten,
        }
    }
}

impl RunStats {
    /// Seconds guests waited to start, over all guests (the governor's
    /// waves).
    pub fn waited_s(&self) -> f64 {
        self.created.iter().map(|c| c.waited_ms).sum::<f64>() / 1000.0
    }

    /// Replaces `path` in one step (write a sibling, then rename), so a
    /// reader never sees half a file.
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }

    pub fn read_from(path: &Path) -> io::Result<RunStats> {
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() {
        let path = std::env::temp_dir().join(format!("vmm-snapshot-test-{}", std::process::id()));
        let snap = RunStats {
            elapsed_s: 1.5,
            guests: 2,
            guests_running: 1,
            guests_failed: 1,
            corrupted_pages: 3,
            guests_verified: 1,
            rounds_verified: 12,
            kvm: crate::protocol::KvmCounters { page_faults: 5, tlb_flushes: 6, exits: 7 },
            created: vec![Created { ms: 2.5, memory_bytes: Some(4096), waited_ms: 1.0 }],
            throttled_s: 0.5,
            guests_throttled: 1,
            throttled_s_per_guest: [(3, 0.5)].into(),
            guests_ended_for_memory: 1,
            guests_killed: 1,
            balloon_given_mib: 64.0,
            balloon_reclaims: 2,
            sharing: Some(SharingStats { pages_saved: 7, ..Default::default() }),
            gaps: Default::default(),
            timings: vec![GuestTimings { made_ms: Some(2.0), first_instruction_ms: Some(3.0), first_round_ms: None }],
            finished: false,
        };
        snap.write_to(&path).unwrap();
        assert_eq!(RunStats::read_from(&path).unwrap(), snap);
        std::fs::write(&path, "{").unwrap();
        assert_eq!(RunStats::read_from(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        std::fs::remove_file(path).unwrap();
    }
}
