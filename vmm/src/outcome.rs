//! How a guest ended, and whether that counts as clean.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What memtest measured, from the doorbell's point of view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemtestReport {
    pub rounds: u64,
    /// From the start of the vCPUs until every vCPU had filled its pages.
    pub fill_time: Option<Duration>,
    pub verify_time_per_round: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GuestEnd {
    /// memtest verified every page in every round.
    MemtestPassed(MemtestReport),
    /// memtest found pages whose contents were not what it wrote.
    MemtestFailed { mismatches: u64, report: MemtestReport },
    /// Our test guest took an exception it did not expect.
    GuestException { vector: u64, rip: u64 },
    /// The guest asked for a reset (i8042 or KVM system event): it is over.
    Reset,
    /// The guest powered itself off (ACPI soft-off).
    PowerOff,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault,
    /// KVM could not emulate something (e.g. an instruction PVM lacks).
    InternalError { suberror: u32, rip: u64 },
    /// KVM_EXIT_FAIL_ENTRY: the CPU refused the guest state.
    FailEntry { reason: u64 },
    /// Stopped by the user (Ctrl-C, SIGTERM).
    Stopped,
    /// Stopped because `--timeout` ran out.
    TimedOut(Duration),
    /// The VMM failed while running this guest.
    VmmError(String),
    /// Ended by the memory governor: page sharing could not make room.
    OutOfMemory(String),
    /// Our test guest broke its protocol: it claimed what its own command
    /// line rules out (rounds it was not asked for, done too early).
    ProtocolViolation(String),
    /// The guest's process ended without reporting an end (a panic, a
    /// signal, the OOM killer), or was ended by the supervisor.
    ProcessEnded(String),
}

impl GuestEnd {
    /// Clean ends leave the process exit code at 0.
    pub fn is_clean(&self) -> bool {
        matches!(self, GuestEnd::MemtestPassed(_) | GuestEnd::Reset | GuestEnd::PowerOff | GuestEnd::Stopped)
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64()))
}

impl fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            GuestEnd::MemtestPassed(r) => write!(
                f,
                "memtest passed: {} rounds verified, fill {}, verify {} per round",
                r.rounds,
                secs(r.fill_time),
                secs(r.verify_time_per_round)
            ),
            GuestEnd::MemtestFailed { mismatches, report } => {
                write!(f, "memtest FAILED: {mismatches} corrupted pages after {} rounds", report.rounds)
            }
            GuestEnd::GuestException { vector, rip } => {
                write!(f, "guest exception: vector {vector} at rip {rip:#x}")
            }
            GuestEnd::Reset => write!(f, "guest reset (reboot request)"),
            GuestEnd::PowerOff => write!(f, "guest powered off (ACPI)"),
            GuestEnd::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN)"),
            GuestEnd::InternalError { suberror, rip } => write!(
                f,
                "KVM internal error: suberror {suberror} at rip {rip:#x} (an instruction this host cannot run?)"
            ),
            GuestEnd::FailEntry { reason } => {
                write!(f, "KVM could not enter the guest: hardware reason {reason:#x}")
            }
            GuestEnd::Stopped => write!(f, "stopped"),
            GuestEnd::TimedOut(d) => write!(f, "timed out after {} s", d.as_secs()),
            GuestEnd::VmmError(e) => write!(f, "VMM error: {e}"),
            GuestEnd::OutOfMemory(why) => write!(f, "ended for memory: {why}"),
            GuestEnd::ProtocolViolation(why) => write!(f, "memtest protocol violation: {why}"),
            GuestEnd::ProcessEnded(why) => write!(f, "failed: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pass_reset_and_stop_are_clean() {
        let report = MemtestReport { rounds: 1, fill_time: None, verify_time_per_round: None };
        assert!(GuestEnd::MemtestPassed(report.clone()).is_clean());
        assert!(GuestEnd::Reset.is_clean());
        assert!(GuestEnd::PowerOff.is_clean());
        assert!(GuestEnd::Stopped.is_clean());
        assert!(!GuestEnd::MemtestFailed { mismatches: 1, report }.is_clean());
        assert!(!GuestEnd::TripleFault.is_clean());
        assert!(!GuestEnd::InternalError { suberror: 1, rip: 0 }.is_clean());
        assert!(!GuestEnd::TimedOut(Duration::from_secs(1)).is_clean());
        assert!(!GuestEnd::OutOfMemory("not enough memory".into()).is_clean());
        assert!(!GuestEnd::ProtocolViolation("done too early".into()).is_clean());
    }

    #[test]
    fn internal_error_names_suberror_and_rip() {
        let s = GuestEnd::InternalError { suberror: 1, rip: 0xffff_ffff_8100_0000 }.to_string();
        assert!(s.contains("suberror 1") && s.contains("0xffffffff81000000"), "{s}");
    }
}
