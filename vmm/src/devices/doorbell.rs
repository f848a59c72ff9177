//! The doorbell: a page of MMIO through which our own test guests (memtest)
//! talk to the VMM. It is MMIO rather than port I/O because guests running at
//! CPL 3 cannot use port I/O on PVM hosts, while their MMIO accesses exit to
//! the VMM on every kind of host. The protocol is in docs/memtest.md.
//!
//! Every value comes from the guest, so none is trusted: counts saturate,
//! times never go backwards, indexes are checked. A guest that writes
//! nonsense gets nonsense back, never a VMM panic.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::console::Console;
use super::Action;
use crate::outcome::{GuestEnd, MemtestReport};

pub const DOORBELL_BASE: u64 = 0xD000_0000;
pub const DOORBELL_SIZE: u64 = 0x1000;

pub const CONSOLE: u64 = 0x00;
pub const PROGRESS: u64 = 0x08;
pub const MISMATCH: u64 = 0x10;
pub const DONE: u64 = 0x18;
pub const FAULT: u64 = 0x20;
pub const FAULT_RIP: u64 = 0x28;
pub const GUEST_ID: u64 = 0x30;
pub const VCPU_COUNT: u64 = 0x38;
/// Write: idle this vCPU for that many milliseconds, as a guest with
/// nothing to do would halt (memtest's `idle=`, between rounds).
pub const IDLE: u64 = 0x40;
/// The longest idle one write asks for.
pub const MAX_IDLE: Duration = Duration::from_secs(10);
/// Write: gap histogram counts, `bucket << 48 | count` (see [`gap_ticks`]).
pub const GAP: u64 = 0x48;
/// Write: wait this vCPU for that many microseconds (at most [`MAX_IDLE`])
/// or until one of the guest's devices raises an interrupt, whichever
/// comes first: a halt for a guest that polls its devices from CPL 3.
pub const WAIT: u64 = 0x50;
/// Read: the vCPUs' TSC rate in kHz (0 if KVM did not say), so a guest
/// can keep time with `rdtsc` at CPL 3.
pub const TSC_KHZ: u64 = 0x58;
/// Gap buckets: 8 per power of two of TSC ticks.
pub const GAP_BUCKETS: usize = 512;

/// The fewest TSC ticks a gap in `bucket` took (memtest's bucketing: the
/// ticks below 8 one bucket each, then 8 buckets per power of two).
pub fn gap_ticks(bucket: usize) -> u64 {
    if bucket < 8 {
        return bucket as u64;
    }
    let (top, sub) = (bucket / 8 + 2, (bucket % 8) as u128);
    u64::try_from((8 + sub) << (top - 3).min(100)).unwrap_or(u64::MAX)
}

pub struct Doorbell {
    guest_id: u64,
    vcpus: u8,
    tsc_khz: u32,
    state: Mutex<State>,
}

struct State {
    started: Instant,
    /// Rounds completed per vCPU, `None` until its fill is done.
    progress: Vec<Option<u64>>,
    /// When every vCPU had finished filling, then each later round.
    fill_done: Option<Duration>,
    last_round_done: Option<Duration>,
    finished_vcpus: u8,
    mismatches: u64,
    reported_mismatches: u64,
    fault_rip: u64,
    /// Pages by how long they took, summed over vCPUs and rounds.
    gaps: Vec<u64>,
}

/// What a snapshot keeps of a doorbell: the memtest's progress and what it
/// reported, so a restored memtest goes on counting (its gap histogram is
/// a measurement of the run, and starts afresh).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DoorbellState {
    progress: Vec<Option<u64>>,
    finished_vcpus: u8,
    mismatches: u64,
    reported_mismatches: u64,
    fill_micros: Option<u64>,
}

impl DoorbellState {
    pub fn vcpus(&self) -> usize {
        self.progress.len()
    }
}

impl Doorbell {
    /// The doorbell of a guest restored from `state`, as guest `guest_id`.
    pub fn restore(guest_id: u64, state: &DoorbellState) -> Self {
        let doorbell = Doorbell::new(guest_id, state.progress.len() as u8);
        {
            let mut s = doorbell.state.lock().unwrap();
            s.progress = state.progress.clone();
            s.finished_vcpus = state.finished_vcpus;
            s.mismatches = state.mismatches;
            s.reported_mismatches = state.reported_mismatches;
            s.fill_done = state.fill_micros.map(Duration::from_micros);
        }
        doorbell
    }

    pub fn save(&self) -> DoorbellState {
        let s = self.state.lock().unwrap();
        DoorbellState {
            progress: s.progress.clone(),
            finished_vcpus: s.finished_vcpus,
            mismatches: s.mismatches,
            reported_mismatches: s.reported_mismatches,
            fill_micros: s.fill_done.map(|d| d.as_micros() as u64),
        }
    }

    pub fn new(guest_id: u64, vcpus: u8) -> Self {
        Doorbell {
            guest_id,
            vcpus,
            tsc_khz: 0,
            state: Mutex::new(State {
                started: Instant::now(),
                progress: vec![None; vcpus as usize],
                fill_done: None,
                last_round_done: None,
                finished_vcpus: 0,
                mismatches: 0,
                reported_mismatches: 0,
                fault_rip: 0,
                gaps: vec![0; GAP_BUCKETS],
            }),
        }
    }

    /// Tells the guest its TSC rate (the [`TSC_KHZ`] register).
    pub fn with_tsc_khz(self, tsc_khz: Option<u32>) -> Self {
        Doorbell { tsc_khz: tsc_khz.unwrap_or(0), ..self }
    }

    /// Restarts the clock: call when the guest's vCPUs start.
    pub fn mark_start(&self) {
        self.state.lock().unwrap().started = Instant::now();
    }

    pub fn read(&self, _vcpu: u8, offset: u64) -> u64 {
        match offset {
            GUEST_ID => self.guest_id,
            VCPU_COUNT => u64::from(self.vcpus),
            TSC_KHZ => u64::from(self.tsc_khz),
            _ => 0,
        }
    }

    /// Corrupted pages the guest has reported so far.
    pub fn reported_mismatches(&self) -> u64 {
        self.state.lock().unwrap().reported_mismatches
    }

    /// Rounds every vCPU has verified, once all have filled (as the guest
    /// says: any number).
    pub fn rounds(&self) -> Option<u64> {
        self.state.lock().unwrap().min_progress()
    }

    /// The gap histogram so far (counts per bucket).
    pub fn gaps(&self) -> Vec<u64> {
        self.state.lock().unwrap().gaps.clone()
    }

    /// How a guest stopped from outside really ended: a memtest that had
    /// reported corrupted pages failed, whatever stopped it.
    pub fn judge_stop(&self, end: GuestEnd) -> GuestEnd {
        let state = self.state.lock().unwrap();
        match end {
            GuestEnd::Stopped | GuestEnd::TimedOut(_) if state.reported_mismatches > 0 => state.verdict(),
            end => end,
        }
    }

    pub fn write(&self, vcpu: u8, offset: u64, value: u64, console: &Console) -> Action {
        let mut state = self.state.lock().unwrap();
        match offset {
            CONSOLE => {
                let _ = console.clone().write_all(&[value as u8]);
            }
            PROGRESS => state.record_progress(vcpu, value),
            MISMATCH => {
                state.reported_mismatches = state.reported_mismatches.saturating_add(1);
                log::error!(
                    "guest {}: memtest vCPU {vcpu} found a corrupted page at guest address {value:#x}",
                    self.guest_id
                );
            }
            DONE => {
                state.finished_vcpus = state.finished_vcpus.saturating_add(1);
                state.mismatches = state.mismatches.saturating_add(value);
                if state.finished_vcpus < self.vcpus {
                    return Action::VcpuFinished;
                }
                return Action::EndGuest(state.verdict());
            }
            FAULT_RIP => state.fault_rip = value,
            GAP => {
                let (bucket, count) = ((value >> 48) as usize, value & ((1 << 48) - 1));
                if let Some(slot) = state.gaps.get_mut(bucket) {
                    *slot = slot.saturating_add(count);
                }
            }
            IDLE => return Action::Idle(Duration::from_millis(value).min(MAX_IDLE)),
            WAIT => return Action::WaitForDevice(Duration::from_micros(value).min(MAX_IDLE)),
            FAULT => return Action::EndGuest(GuestEnd::GuestException { vector: value, rip: state.fault_rip }),
            _ => log::warn!("guest {}: write to unknown doorbell register {offset:#x}", self.guest_id),
        }
        Action::Continue
    }
}

impl State {
    fn record_progress(&mut self, vcpu: u8, rounds: u64) {
        let before = self.min_progress();
        if let Some(slot) = self.progress.get_mut(vcpu as usize) {
            *slot = Some(rounds);
        }
        let after = self.min_progress();
        if after != before {
            let now = self.started.elapsed();
            match after {
                Some(0) => self.fill_done = Some(now),
                Some(_) => self.last_round_done = Some(now),
                None => {}
            }
        }
    }

    /// The rounds every vCPU has completed, once all have filled.
    fn min_progress(&self) -> Option<u64> {
        self.progress.iter().copied().min().flatten()
    }

    fn verdict(&self) -> GuestEnd {
        let rounds = self.min_progress().unwrap_or(0);
        let report = MemtestReport {
            rounds,
            fill_time: self.fill_done,
            verify_time_per_round: match (self.fill_done, self.last_round_done) {
                // The guest says how many rounds: any number, in any order.
                (Some(fill), Some(last)) => {
                    u32::try_from(rounds).ok().and_then(|r| last.checked_sub(fill)?.checked_div(r))
                }
                _ => None,
            },
        };
        if self.mismatches == 0 && self.reported_mismatches == 0 {
            GuestEnd::MemtestPassed(report)
        } else {
            GuestEnd::MemtestFailed { mismatches: self.mismatches.max(self.reported_mismatches), report }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Console {
        Console::with_sink(Box::new(std::io::sink()))
    }

    #[test]
    fn guest_passes_when_every_vcpu_reports_zero() {
        let d = Doorbell::new(3, 2);
        let c = console();
        assert_eq!(d.read(0, GUEST_ID), 3);
        assert_eq!(d.read(1, VCPU_COUNT), 2);
        for v in 0..2 {
            d.write(v, PROGRESS, 0, &c);
            d.write(v, PROGRESS, 1, &c);
        }
        assert_eq!(d.write(0, DONE, 0, &c), Action::VcpuFinished);
        match d.write(1, DONE, 0, &c) {
            Action::EndGuest(GuestEnd::MemtestPassed(r)) => {
                assert_eq!(r.rounds, 1);
                assert!(r.fill_time.is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn any_mismatch_fails_the_guest() {
        let d = Doorbell::new(0, 2);
        let c = console();
        d.write(0, MISMATCH, 0x20_0000, &c);
        d.write(0, DONE, 1, &c);
        assert!(matches!(d.write(1, DONE, 0, &c), Action::EndGuest(GuestEnd::MemtestFailed { mismatches: 1, .. })));
    }

    #[test]
    fn a_stopped_guest_that_saw_corruption_failed() {
        let d = Doorbell::new(0, 1);
        assert_eq!(d.judge_stop(GuestEnd::Stopped), GuestEnd::Stopped);
        d.write(0, MISMATCH, 0x20_0000, &console());
        assert_eq!(d.reported_mismatches(), 1);
        assert!(matches!(d.judge_stop(GuestEnd::Stopped), GuestEnd::MemtestFailed { mismatches: 1, .. }));
        assert_eq!(d.judge_stop(GuestEnd::Reset), GuestEnd::Reset);
    }

    #[test]
    fn idle_is_capped() {
        let d = Doorbell::new(0, 1);
        assert_eq!(d.write(0, IDLE, 5, &console()), Action::Idle(Duration::from_millis(5)));
        assert_eq!(d.write(0, IDLE, u64::MAX, &console()), Action::Idle(MAX_IDLE));
        assert_eq!(d.write(0, WAIT, 250, &console()), Action::WaitForDevice(Duration::from_micros(250)));
        assert_eq!(d.write(0, WAIT, u64::MAX, &console()), Action::WaitForDevice(MAX_IDLE));
    }

    #[test]
    fn fault_ends_the_guest_with_its_rip() {
        let d = Doorbell::new(0, 1);
        let c = console();
        d.write(0, FAULT_RIP, 0x10_1234, &c);
        assert_eq!(
            d.write(0, FAULT, 14, &c),
            Action::EndGuest(GuestEnd::GuestException { vector: 14, rip: 0x10_1234 })
        );
    }

    /// The values that used to take the VMM down: progress 0, then 2^32
    /// rounds, then done (a division by zero computing time per round).
    #[test]
    fn absurd_progress_is_survived() {
        let d = Doorbell::new(0, 1);
        let c = console();
        d.write(0, PROGRESS, 0, &c);
        d.write(0, PROGRESS, 1 << 32, &c);
        match d.write(0, DONE, 0, &c) {
            Action::EndGuest(GuestEnd::MemtestPassed(r)) => {
                assert_eq!(r.rounds, 1 << 32);
                assert_eq!(r.verify_time_per_round, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Progress going backwards, and done more often than there are vCPUs.
        let d = Doorbell::new(0, 2);
        d.write(1, PROGRESS, 5, &c);
        d.write(0, PROGRESS, 9, &c);
        d.write(1, PROGRESS, 0, &c);
        for _ in 0..300 {
            d.write(0, DONE, u64::MAX, &c);
        }
        assert!(matches!(d.judge_stop(GuestEnd::Stopped), GuestEnd::Stopped | GuestEnd::MemtestFailed { .. }));
    }

    /// Random registers, values and vCPU numbers, in bulk: nothing panics,
    /// and every answer is one the protocol allows.
    #[test]
    fn fuzzed_doorbell_writes_and_reads() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for vcpus in [1u8, 2, 32] {
            let d = Doorbell::new(next(), vcpus);
            let c = console();
            for _ in 0..20_000 {
                let offset = match next() % 4 {
                    0 => next() % DOORBELL_SIZE,
                    _ => (next() % 10) * 8,
                };
                let value = match next() % 3 {
                    0 => next(),
                    1 => next() % 4,
                    _ => u64::MAX - next() % 2,
                };
                let vcpu = (next() % 40) as u8;
                match d.write(vcpu, offset, value, &c) {
                    Action::Idle(t) | Action::WaitForDevice(t) => assert!(t <= MAX_IDLE),
                    Action::Continue | Action::VcpuFinished | Action::EndGuest(_) => {}
                }
                let _ = d.read(vcpu, next() % DOORBELL_SIZE);
                if next() % 1000 == 0 {
                    let _ = d.judge_stop(GuestEnd::Stopped).to_string();
                }
            }
        }
    }

    #[test]
    fn gaps_are_summed_per_bucket() {
        let d = Doorbell::new(0, 1);
        let c = console();
        d.write(0, GAP, 9 << 48 | 5, &c);
        d.write(0, GAP, 9 << 48 | 2, &c);
        d.write(0, GAP, 4000 << 48 | 1, &c);
        let g = d.gaps();
        assert_eq!((g[9], g.iter().sum::<u64>()), (7, 7), "an out-of-range bucket counts nowhere");
        // memtest's buckets: 8 per power of two from 8 ticks up.
        assert_eq!((gap_ticks(3), gap_ticks(8), gap_ticks(15), gap_ticks(16), gap_ticks(17)), (3, 8, 15, 16, 18));
        assert_eq!(gap_ticks(8 * 60), 8 << 59);
        assert_eq!(gap_ticks(GAP_BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn console_bytes_reach_the_console() {
        let d = Doorbell::new(0, 1);
        let c = console();
        for b in b"hi\n" {
            d.write(0, CONSOLE, u64::from(*b), &c);
        }
        assert_eq!(c.tail(), "hi\n");
    }
}
