//! The doorbell: a page of MMIO through which our own test guests (memtest)
//! talk to the VMM. It is MMIO rather than port I/O because guests running at
//! CPL 3 cannot use port I/O on PVM hosts, while their MMIO accesses exit to
//! the VMM on every kind of host. The protocol is in docs/memtest.md.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// The register offset of `addr`, if it is in the doorbell page.
pub fn offset(addr: u64) -> Option<u64> {
    (DOORBELL_BASE..DOORBELL_BASE + DOORBELL_SIZE).contains(&addr).then(|| addr - DOORBELL_BASE)
}

pub struct Doorbell {
    guest_id: u64,
    vcpus: u8,
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
}

impl Doorbell {
    pub fn new(guest_id: u64, vcpus: u8) -> Self {
        Doorbell {
            guest_id,
            vcpus,
            state: Mutex::new(State {
                started: Instant::now(),
                progress: vec![None; vcpus as usize],
                fill_done: None,
                last_round_done: None,
                finished_vcpus: 0,
                mismatches: 0,
                reported_mismatches: 0,
                fault_rip: 0,
            }),
        }
    }

    /// Restarts the clock: call when the guest's vCPUs start.
    pub fn mark_start(&self) {
        self.state.lock().unwrap().started = Instant::now();
    }

    pub fn read(&self, _vcpu: u8, offset: u64) -> u64 {
        match offset {
            GUEST_ID => self.guest_id,
            VCPU_COUNT => u64::from(self.vcpus),
            _ => 0,
        }
    }

    /// Corrupted pages the guest has reported so far.
    pub fn reported_mismatches(&self) -> u64 {
        self.state.lock().unwrap().reported_mismatches
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
                state.reported_mismatches += 1;
                log::error!(
                    "guest {}: memtest vCPU {vcpu} found a corrupted page at guest address {value:#x}",
                    self.guest_id
                );
            }
            DONE => {
                state.finished_vcpus += 1;
                state.mismatches += value;
                if state.finished_vcpus < self.vcpus {
                    return Action::VcpuFinished;
                }
                return Action::EndGuest(state.verdict());
            }
            FAULT_RIP => state.fault_rip = value,
            IDLE => return Action::Idle(Duration::from_millis(value).min(MAX_IDLE)),
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
                (Some(fill), Some(last)) if rounds > 0 => Some((last - fill) / rounds as u32),
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

    #[test]
    fn console_bytes_reach_the_console() {
        let d = Doorbell::new(0, 1);
        let c = console();
        for b in b"hi\n" {
            d.write(0, CONSOLE, u64::from(*b), &c);
        }
        assert_eq!(c.tail(), "hi\n");
        assert_eq!(offset(DOORBELL_BASE + 0x18), Some(DONE));
        assert_eq!(offset(DOORBELL_BASE + DOORBELL_SIZE), None);
    }
}
