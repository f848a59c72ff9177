//! The doorbell: a page of MMIO through which our own test guests (memtest)
//! talk to the VMM. It is MMIO rather than port I/O because guests running at
//! CPL 3 cannot use port I/O on PVM hosts, while their MMIO accesses exit to
//! the VMM on every kind of host. The protocol is in docs/memtest.md.
//!
//! Every value comes from the guest, so none is trusted: counts saturate,
//! times never go backwards, indexes are checked. A guest that writes
//! nonsense gets nonsense back, never a VMM panic. And what it claims is
//! checked against what it was asked (its command line's `rounds=`): each
//! vCPU's progress goes 0, 1, 2, ... one round at a time up to that many,
//! and a vCPU is done once, after its last round. Anything else ends the
//! guest with a protocol violation, never "passed".

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::console::Console;
use super::Action;
use crate::gaps::GAP_BUCKETS;
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

/// The rounds memtest runs for `cmdline` as memtest reads it (the last
/// `rounds=` word; 3 without one); 0 runs until stopped.
pub fn memtest_rounds(cmdline: &str) -> u64 {
    cmdline.split_whitespace().rev().find_map(|w| w.strip_prefix("rounds=")).map_or(3, parse_uint)
}

/// memtest's number parsing: leading digits, saturating; none is 0.
fn parse_uint(s: &str) -> u64 {
    s.bytes().take_while(u8::is_ascii_digit).fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')))
}

pub struct Doorbell {
    guest_id: u64,
    vcpus: u8,
    /// The rounds it was asked for (0: until stopped).
    rounds: u64,
    tsc_khz: u32,
    /// Whether its page is on the guest's MMIO bus: only for guests that
    /// ask for it (our own test guests), so no other guest can reach it.
    mapped: bool,
    state: Mutex<State>,
}

struct State {
    started: Instant,
    /// Rounds completed per vCPU, `None` until its fill is done.
    progress: Vec<Option<u64>>,
    /// Which vCPUs have said they are done.
    done: Vec<bool>,
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
    #[serde(default)]
    done: Vec<bool>,
    finished_vcpus: u8,
    mismatches: u64,
    reported_mismatches: u64,
    fill_micros: Option<u64>,
    /// Snapshots from before this was kept had it on every guest.
    #[serde(default = "mapped_before")]
    mapped: bool,
}

fn mapped_before() -> bool {
    true
}

impl DoorbellState {
    pub fn vcpus(&self) -> usize {
        self.progress.len()
    }
}

impl Doorbell {
    /// The doorbell of a guest restored from `state`, as guest `guest_id`.
    pub fn restore(guest_id: u64, rounds: u64, state: &DoorbellState) -> Self {
        let doorbell = Doorbell { mapped: state.mapped, ..Doorbell::new(guest_id, state.progress.len() as u8, rounds) };
        {
            let mut s = doorbell.state.lock().unwrap();
            s.progress = state.progress.clone();
            let mut done = state.done.clone();
            done.resize(state.progress.len(), false);
            s.done = done;
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
            done: s.done.clone(),
            finished_vcpus: s.finished_vcpus,
            mismatches: s.mismatches,
            reported_mismatches: s.reported_mismatches,
            fill_micros: s.fill_done.map(|d| d.as_micros() as u64),
            mapped: self.mapped,
        }
    }

    /// A doorbell for `vcpus` vCPUs of a memtest asked for `rounds` rounds
    /// (0: until stopped; see [`memtest_rounds`]).
    pub fn new(guest_id: u64, vcpus: u8, rounds: u64) -> Self {
        Doorbell {
            guest_id,
            vcpus,
            rounds,
            tsc_khz: 0,
            mapped: true,
            state: Mutex::new(State {
                started: Instant::now(),
                progress: vec![None; vcpus as usize],
                done: vec![false; vcpus as usize],
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

    /// Keeps its page off the guest's bus: a guest that did not ask for it.
    pub fn unmapped(self) -> Self {
        Doorbell { mapped: false, ..self }
    }

    pub fn is_mapped(&self) -> bool {
        self.mapped
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
            PROGRESS => {
                if let Err(why) = state.record_progress(vcpu, value, self.rounds) {
                    return self.violation(&state, why);
                }
            }
            MISMATCH => {
                state.reported_mismatches = state.reported_mismatches.saturating_add(1);
                log::error!(
                    "guest {}: memtest vCPU {vcpu} found a corrupted page at guest address {value:#x}",
                    self.guest_id
                );
            }
            DONE => {
                if let Err(why) = state.record_done(vcpu, self.rounds) {
                    return self.violation(&state, why);
                }
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

/// A vCPU's progress in words.
fn said(progress: Option<u64>) -> String {
    match progress {
        None => "nothing (no fill yet)".into(),
        Some(0) => "its fill".into(),
        Some(r) => format!("round {r}"),
    }
}

impl Doorbell {
    /// Ends a guest that broke the protocol; corrupted pages it reported
    /// still make it a failed memtest (that is the worse news).
    fn violation(&self, state: &State, why: String) -> Action {
        log::warn!("guest {}: memtest protocol violation: {why}", self.guest_id);
        Action::EndGuest(match state.reported_mismatches {
            0 => GuestEnd::ProtocolViolation(why),
            _ => state.verdict(),
        })
    }
}

impl State {
    /// vCPU `vcpu` says it has verified `round` rounds (0: filled).
    fn record_progress(&mut self, vcpu: u8, round: u64, rounds: u64) -> Result<(), String> {
        let Some(&last) = self.progress.get(vcpu as usize) else {
            return Err(format!("progress from vCPU {vcpu}, which it does not have"));
        };
        let expected = last.map_or(0, |r| r.saturating_add(1));
        if round != expected {
            return Err(format!("vCPU {vcpu} claimed round {round} after {}", said(last)));
        }
        if rounds != 0 && round > rounds {
            return Err(format!("vCPU {vcpu} claimed round {round} of the {rounds} it was asked for"));
        }
        if self.done[vcpu as usize] {
            return Err(format!("vCPU {vcpu} went on after saying it was done"));
        }
        let before = self.min_progress();
        self.progress[vcpu as usize] = Some(round);
        let after = self.min_progress();
        if after != before {
            let now = self.started.elapsed();
            match after {
                Some(0) => self.fill_done = Some(now),
                Some(_) => self.last_round_done = Some(now),
                None => {}
            }
        }
        Ok(())
    }

    /// vCPU `vcpu` says it is done: only once, after its last round.
    fn record_done(&mut self, vcpu: u8, rounds: u64) -> Result<(), String> {
        let Some(&progress) = self.progress.get(vcpu as usize) else {
            return Err(format!("done from vCPU {vcpu}, which it does not have"));
        };
        if self.done[vcpu as usize] {
            return Err(format!("vCPU {vcpu} said it was done twice"));
        }
        if rounds == 0 {
            return Err(format!("vCPU {vcpu} said it was done, but it was asked to run until stopped"));
        }
        if progress != Some(rounds) {
            return Err(format!("vCPU {vcpu} said it was done after {} of its {rounds} rounds", said(progress)));
        }
        self.done[vcpu as usize] = true;
        Ok(())
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
    use crate::gaps::gap_ticks;

    fn console() -> Console {
        Console::with_sink(Box::new(std::io::sink()))
    }

    #[test]
    fn guest_passes_when_every_vcpu_reports_zero() {
        let d = Doorbell::new(3, 2, 1);
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
        let d = Doorbell::new(0, 2, 1);
        let c = console();
        for v in 0..2 {
            d.write(v, PROGRESS, 0, &c);
            d.write(v, PROGRESS, 1, &c);
        }
        d.write(0, MISMATCH, 0x20_0000, &c);
        d.write(0, DONE, 1, &c);
        assert!(matches!(d.write(1, DONE, 0, &c), Action::EndGuest(GuestEnd::MemtestFailed { mismatches: 1, .. })));
    }

    #[test]
    fn a_stopped_guest_that_saw_corruption_failed() {
        let d = Doorbell::new(0, 1, 3);
        assert_eq!(d.judge_stop(GuestEnd::Stopped), GuestEnd::Stopped);
        d.write(0, MISMATCH, 0x20_0000, &console());
        assert_eq!(d.reported_mismatches(), 1);
        assert!(matches!(d.judge_stop(GuestEnd::Stopped), GuestEnd::MemtestFailed { mismatches: 1, .. }));
        assert_eq!(d.judge_stop(GuestEnd::Reset), GuestEnd::Reset);
    }

    #[test]
    fn idle_is_capped() {
        let d = Doorbell::new(0, 1, 3);
        assert_eq!(d.write(0, IDLE, 5, &console()), Action::Idle(Duration::from_millis(5)));
        assert_eq!(d.write(0, IDLE, u64::MAX, &console()), Action::Idle(MAX_IDLE));
        assert_eq!(d.write(0, WAIT, 250, &console()), Action::WaitForDevice(Duration::from_micros(250)));
        assert_eq!(d.write(0, WAIT, u64::MAX, &console()), Action::WaitForDevice(MAX_IDLE));
    }

    #[test]
    fn fault_ends_the_guest_with_its_rip() {
        let d = Doorbell::new(0, 1, 3);
        let c = console();
        d.write(0, FAULT_RIP, 0x10_1234, &c);
        assert_eq!(
            d.write(0, FAULT, 14, &c),
            Action::EndGuest(GuestEnd::GuestException { vector: 14, rip: 0x10_1234 })
        );
    }

    /// The values that used to take the VMM down (progress 0, then 2^32
    /// rounds, then done) end the guest with a protocol violation, as does
    /// every other claim its command line rules out.
    #[test]
    fn claims_its_command_line_rules_out_are_violations() {
        let c = console();
        let violation = |a: Action| match a {
            Action::EndGuest(GuestEnd::ProtocolViolation(why)) => why,
            other => panic!("not a violation: {other:?}"),
        };
        let d = Doorbell::new(0, 1, 0);
        assert_eq!(d.write(0, PROGRESS, 0, &c), Action::Continue);
        let why = violation(d.write(0, PROGRESS, 1 << 32, &c));
        assert!(why.contains("round 4294967296 after its fill"), "{why}");
        // Done, for a guest asked to run until stopped.
        let d = Doorbell::new(0, 1, 0);
        d.write(0, PROGRESS, 0, &c);
        assert!(violation(d.write(0, DONE, 0, &c)).contains("run until stopped"));
        // Done before the last round; a round past the last; going back.
        let d = Doorbell::new(0, 2, 3);
        d.write(0, PROGRESS, 0, &c);
        d.write(0, PROGRESS, 1, &c);
        assert!(violation(d.write(0, DONE, 0, &c)).contains("after round 1 of its 3 rounds"));
        let d = Doorbell::new(0, 1, 1);
        d.write(0, PROGRESS, 0, &c);
        d.write(0, PROGRESS, 1, &c);
        assert!(violation(d.write(0, PROGRESS, 2, &c)).contains("round 2 of the 1"));
        let d = Doorbell::new(0, 1, 5);
        d.write(0, PROGRESS, 0, &c);
        d.write(0, PROGRESS, 1, &c);
        assert!(violation(d.write(0, PROGRESS, 0, &c)).contains("round 0 after round 1"));
        // Done twice, and from a vCPU it does not have.
        let d = Doorbell::new(0, 2, 1);
        for v in 0..2 {
            d.write(v, PROGRESS, 0, &c);
            d.write(v, PROGRESS, 1, &c);
        }
        assert_eq!(d.write(0, DONE, 0, &c), Action::VcpuFinished);
        assert!(violation(d.write(0, DONE, 0, &c)).contains("twice"));
        assert!(violation(d.write(7, DONE, 0, &c)).contains("does not have"));
        // A violation after reporting corruption is still a failed memtest.
        let d = Doorbell::new(0, 1, 0);
        d.write(0, MISMATCH, 0x1000, &c);
        assert!(matches!(d.write(0, DONE, 0, &c), Action::EndGuest(GuestEnd::MemtestFailed { .. })));
    }

    #[test]
    fn rounds_are_read_as_memtest_reads_them() {
        assert_eq!(memtest_rounds(""), 3);
        assert_eq!(memtest_rounds("rounds=0 idle=50"), 0);
        assert_eq!(memtest_rounds("rounds=7 x rounds=2"), 2, "the last word wins");
        assert_eq!(memtest_rounds("rounds=12abc"), 12);
        assert_eq!(memtest_rounds("rounds=99999999999999999999999"), u64::MAX);
        assert_eq!(memtest_rounds("xrounds=5"), 3);
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
            let d = Doorbell::new(next(), vcpus, next() % 4);
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
        let d = Doorbell::new(0, 1, 3);
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
        let d = Doorbell::new(0, 1, 3);
        let c = console();
        for b in b"hi\n" {
            d.write(0, CONSOLE, u64::from(*b), &c);
        }
        assert_eq!(c.tail(), "hi\n");
    }
}
