//! What `vmm bench` measured, the figures derived from it, and the table.

use dedup::stats::nearest_rank;
use serde::Serialize;

use super::{BenchConfig, Mode, STEADY};
use crate::stats_file::RunStats;

/// One measurement, every 0.5 s.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the mode's `vmm run` started.
    pub t: f64,
    /// Host memory the run uses.
    pub memory_mib: f64,
    /// Memory the sharing mode says it saves.
    pub saved_mib: f64,
    /// CPU seconds the scanner (our thread, or ksmd) has used.
    pub cpu_s: f64,
    /// Guests that have verified a round of their memory since they started.
    pub verified: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModeResult {
    pub mode: Mode,
    /// Mean host memory over the last 5 s.
    pub steady_memory_mib: f64,
    /// The run's Pss at the end, a cross-check of the memory measurement.
    pub pss_at_end_mib: Option<f64>,
    /// Guest RAM configured / steady host memory.
    pub overcommit_ratio: f64,
    /// Savings at the end, as the mode counts them.
    pub saved_mib: f64,
    /// When savings first reached 95% of `saved_mib`.
    pub time_to_95_s: Option<f64>,
    pub cpu_s: f64,
    /// False when savings still grew over the last 5 s (the run ended
    /// before sharing converged).
    pub settled: bool,
    pub guests_failed: usize,
    pub corrupted_pages: u64,
    /// ksmd's pages_to_scan at the end (KSM modes).
    pub ksm_pages_to_scan: Option<u64>,
    /// The guests ended before the run's time was up.
    pub ended_early: bool,
    /// In-process merging stopped short of vm.max_map_count.
    pub map_limit_reached: bool,
    /// Times page sharing held a guest's vCPU or device thread, and how
    /// long (in-process only; p50, p99, max in microseconds).
    pub stalls: u64,
    pub stall_p50_us: u64,
    pub stall_p99_us: u64,
    pub stall_max_us: u64,
    /// How long the guests' pages took, as they felt it (memtest's gaps):
    /// p99, p99.9 and the longest, in microseconds.
    pub gap_pages: u64,
    pub gap_p99_us: f64,
    pub gap_p999_us: f64,
    pub gap_max_us: f64,
    /// Rounds the guests verified over the run: what they got done.
    pub rounds_verified: u64,
    /// Page faults KVM handled for the guests, and TLB flushes.
    pub kvm_page_faults: u64,
    pub kvm_tlb_flushes: u64,
    /// In-process: merged pages written since, pages held back as they
    /// keep changing (at the end) and the holds begun, by why.
    pub cow_breaks: u64,
    pub pages_held: u64,
    pub held_after_break: u64,
    pub held_changed_in_merge: u64,
    pub held_rewritten: u64,
    /// When every guest had verified a round (all running), and the host
    /// memory then.
    pub all_verified_s: Option<f64>,
    pub memory_all_verified_mib: Option<f64>,
    /// How long making a guest took (booting: set-up; cloning: restore and
    /// adoption), p50 and p99, and the first's.
    pub create_p50_ms: Option<f64>,
    pub create_p99_ms: Option<f64>,
    pub create_first_ms: Option<f64>,
    /// From each guest's request to its first instruction and to its first
    /// verified round: p50, p99 and max over the guests.
    pub first_instruction_ms: Option<[f64; 3]>,
    pub first_round_ms: Option<[f64; 3]>,
    /// Host memory of a guest's process right after it was made, before
    /// it ran (median over the guests).
    pub memory_at_create_mib: Option<f64>,
    /// The most host memory the run used at a sample.
    pub peak_memory_mib: f64,
    /// Processes of the run the kernel's OOM killer killed, as the run's
    /// cgroup counts them, and guests whose processes a SIGKILL from
    /// outside the VMM ended (the OOM killer's kills of a guest are not
    /// always counted in that cgroup).
    pub oom_kills: u64,
    pub guests_killed: usize,
    /// The memory governor: guests it ended, and time it held guests.
    pub guests_ended_for_memory: usize,
    /// Memory the guests' balloons gave back (inflated or reported), and
    /// the governor's balloon requests.
    pub balloon_mib: f64,
    pub balloon_reclaims: u64,
    pub throttled_s: f64,
    /// Time tasks on the host stalled on memory during the run (PSI
    /// "some"; reclaim at the run's limit shows here), where the host has it.
    pub memory_stall_s: Option<f64>,
    /// Time guests waited to start (the governor's waves).
    pub waited_s: f64,
    pub samples: Vec<Sample>,
}

/// p50 / p99 / max, or "-".
fn spread(v: Option<[f64; 3]>) -> String {
    v.map_or("-".into(), |[p50, p99, max]| format!("{p50:.0} / {p99:.0} / {max:.0}"))
}

impl ModeResult {
    pub fn new(
        mode: Mode,
        config: &BenchConfig,
        samples: Vec<Sample>,
        pss_at_end_mib: Option<f64>,
        last: &RunStats,
        ksm_pages_to_scan: Option<u64>,
        ended_early: bool,
    ) -> ModeResult {
        let end = samples.last().map_or(0.0, |s| s.t);
        let steady: Vec<&Sample> = samples.iter().filter(|s| s.t >= end - STEADY.as_secs_f64()).collect();
        let steady_memory_mib = steady.iter().map(|s| s.memory_mib).sum::<f64>() / steady.len().max(1) as f64;
        let saved_mib = samples.last().map_or(0.0, |s| s.saved_mib);
        let time_to_95_s =
            (saved_mib > 0.0).then(|| samples.iter().find(|s| s.saved_mib >= 0.95 * saved_mib).map(|s| s.t)).flatten();
        let saved_at_steady_start = steady.first().map_or(0.0, |s| s.saved_mib);
        let configured = (config.guests as u64 * config.memory_mib) as f64;
        let sharing = last.sharing.clone().unwrap_or_default();
        let us = |ns: u64| ns as f64 / 1000.0;
        let all_verified = samples.iter().find(|s| s.verified >= config.guests);
        let mut create_ms: Vec<f64> = last.created.iter().map(|c| c.ms).collect();
        create_ms.sort_by(f64::total_cmp);
        let mut at_create: Vec<f64> =
            last.created.iter().filter_map(|c| c.memory_bytes).map(|b| b as f64 / (1 << 20) as f64).collect();
        at_create.sort_by(f64::total_cmp);
        ModeResult {
            mode,
            steady_memory_mib,
            pss_at_end_mib,
            overcommit_ratio: if steady_memory_mib > 0.0 { configured / steady_memory_mib } else { 0.0 },
            saved_mib,
            time_to_95_s,
            cpu_s: samples.last().map_or(0.0, |s| s.cpu_s),
            settled: saved_mib <= saved_at_steady_start * 1.02 + 1.0,
            guests_failed: last.guests_failed,
            corrupted_pages: last.corrupted_pages,
            ksm_pages_to_scan,
            ended_early,
            map_limit_reached: sharing.map_limit_reached,
            stalls: sharing.stalls,
            stall_p50_us: sharing.stall_p50_us,
            stall_p99_us: sharing.stall_p99_us,
            stall_max_us: sharing.stall_max_us,
            gap_pages: last.gaps.count(),
            gap_p99_us: us(last.gaps.quantile_ns(0.99)),
            gap_p999_us: us(last.gaps.quantile_ns(0.999)),
            gap_max_us: us(last.gaps.max_ns()),
            rounds_verified: last.rounds_verified,
            kvm_page_faults: last.kvm.page_faults,
            kvm_tlb_flushes: last.kvm.tlb_flushes,
            cow_breaks: sharing.cow_breaks,
            pages_held: sharing.pages_held,
            held_after_break: sharing.held_after_break,
            held_changed_in_merge: sharing.held_changed_in_merge,
            held_rewritten: sharing.held_rewritten,
            all_verified_s: all_verified.map(|s| s.t),
            memory_all_verified_mib: all_verified.map(|s| s.memory_mib),
            create_p50_ms: nearest_rank(&create_ms, 0.5),
            create_p99_ms: nearest_rank(&create_ms, 0.99),
            create_first_ms: last.created.first().map(|c| c.ms),
            first_instruction_ms: last.spread(|t| t.first_instruction_ms).map(|d| [d.p50, d.p99, d.max]),
            first_round_ms: last.spread(|t| t.first_round_ms).map(|d| [d.p50, d.p99, d.max]),
            memory_at_create_mib: nearest_rank(&at_create, 0.5),
            peak_memory_mib: samples.iter().map(|s| s.memory_mib).fold(0.0, f64::max),
            oom_kills: 0,
            guests_killed: last.guests_killed,
            guests_ended_for_memory: last.guests_ended_for_memory,
            balloon_mib: last.balloon_given_mib,
            balloon_reclaims: last.balloon_reclaims,
            throttled_s: last.throttled_s,
            waited_s: last.waited_s(),
            memory_stall_s: None,
            samples,
        }
    }

    /// CPU-seconds per second the scanner spent until it reached 95%.
    pub fn converging_cpu_rate(&self) -> Option<f64> {
        let t95 = self.time_to_95_s?;
        let at = self.samples.iter().find(|s| s.t >= t95)?;
        (at.t > 0.0 && at.cpu_s > 0.0).then(|| at.cpu_s / at.t)
    }
}

/// Clones against booted guests (inprocess), in the same bench: each
/// figure is how many times better cloning does.
#[derive(Clone, Debug, Serialize)]
pub struct CloneRatios {
    /// Booted's time until all verified a round / the clones'.
    pub all_verified: Option<f64>,
    /// Booted's host memory then / the clones'.
    pub memory_then: Option<f64>,
    /// Booted's guest memory when made / a clone's.
    pub memory_at_create: Option<f64>,
}

/// In-process against one KSM mode: each figure is how many times better
/// in-process does (above 1: in-process wins).
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    pub versus: Mode,
    /// KSM's time to 95% / ours.
    pub time_to_95: Option<f64>,
    /// Our final savings / KSM's.
    pub savings: Option<f64>,
    /// KSM's CPU-seconds / ours, over the same length of run.
    pub cpu: Option<f64>,
    /// Our overcommit ratio / KSM's.
    pub overcommit: Option<f64>,
}

/// What a mode's guests felt against `off` in the same run: each gap
/// figure is the mode's gap / off's (1.0: no worse than no sharing at all),
/// `rounds` the rounds its guests verified / off's (1.0: as fast).
#[derive(Clone, Debug, Serialize)]
pub struct GapRatios {
    pub mode: Mode,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub rounds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub host: String,
    pub guests: usize,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub image: String,
    pub cmdline: String,
    pub duration_s: f64,
    pub memory_measure: String,
    /// Each run's memory cgroup limit, if one was set.
    pub host_memory_mib: Option<u64>,
    pub modes: Vec<ModeResult>,
    pub ratios: Vec<Ratios>,
    pub gap_ratios: Vec<GapRatios>,
    /// The snapshot the cloned mode restored.
    pub template: Option<super::template::Template>,
    pub clone_ratios: Option<CloneRatios>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl BenchReport {
    pub fn new(
        config: &BenchConfig,
        memory_measure: String,
        template: Option<super::template::Template>,
        modes: Vec<ModeResult>,
    ) -> BenchReport {
        let ours = modes.iter().find(|m| m.mode == Mode::Inprocess);
        let ratios = match ours {
            None => Vec::new(),
            Some(ours) => modes
                .iter()
                .filter(|m| matches!(m.mode, Mode::KsmMatched | Mode::KsmDefault))
                .map(|ksm| Ratios {
                    versus: ksm.mode,
                    time_to_95: ratio(ksm.time_to_95_s, ours.time_to_95_s),
                    savings: ratio(Some(ours.saved_mib), Some(ksm.saved_mib)),
                    cpu: ratio(Some(ksm.cpu_s), Some(ours.cpu_s)),
                    overcommit: ratio(Some(ours.overcommit_ratio), Some(ksm.overcommit_ratio)),
                })
                .collect(),
        };
        let off = modes.iter().find(|m| m.mode == Mode::Off && m.gap_pages > 0);
        let gap_ratios = match off {
            None => Vec::new(),
            Some(off) => modes
                .iter()
                .filter(|m| m.mode != Mode::Off && m.gap_pages > 0)
                .map(|m| GapRatios {
                    mode: m.mode,
                    p99: ratio(Some(m.gap_p99_us), Some(off.gap_p99_us)),
                    p999: ratio(Some(m.gap_p999_us), Some(off.gap_p999_us)),
                    rounds: ratio(Some(m.rounds_verified as f64), Some(off.rounds_verified as f64)),
                })
                .collect(),
        };
        let cloned = modes.iter().find(|m| m.mode == Mode::Cloned);
        let clone_ratios = ours.zip(cloned).map(|(booted, cloned)| CloneRatios {
            all_verified: ratio(booted.all_verified_s, cloned.all_verified_s),
            memory_then: ratio(booted.memory_all_verified_mib, cloned.memory_all_verified_mib),
            memory_at_create: ratio(booted.memory_at_create_mib, cloned.memory_at_create_mib),
        });
        BenchReport {
            host: format!("{:?}", crate::host::HostKind::detect()),
            guests: config.guests,
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            image: config.image.clone(),
            cmdline: config.cmdline.clone(),
            duration_s: config.duration.as_secs_f64(),
            memory_measure,
            host_memory_mib: config.host_memory_mib,
            modes,
            ratios,
            gap_ratios,
            template,
            clone_ratios,
        }
    }

    /// Guests that failed or corrupted pages, over every mode (with a host
    /// memory limit, what the limit did to a mode is a result, not a
    /// failure: only corrupted pages count).
    pub fn failures(&self) -> usize {
        match self.host_memory_mib {
            Some(_) => self.modes.iter().filter(|m| m.corrupted_pages > 0).count(),
            None => self.modes.iter().map(|m| m.guests_failed).sum(),
        }
    }

    /// The result table and the ratios, for the terminal.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} guests x {} MiB ({}), {} s per mode, host memory from {}\n\n",
            self.guests, self.memory_mib, self.image, self.duration_s, self.memory_measure
        );
        out += "| mode | host memory (MiB) | overcommit | saved (MiB) | time to 95% (s) | scanner CPU (s) | failed guests |\n";
        out += "|---|---:|---:|---:|---:|---:|---:|\n";
        for m in &self.modes {
            let t95 = match (m.mode, m.time_to_95_s) {
                (Mode::Off, _) | (_, None) => "-".to_string(),
                (_, Some(t)) if !m.settled => format!("{t:.1} (not settled)"),
                (_, Some(t)) => format!("{t:.1}"),
            };
            out += &format!(
                "| {} | {:.0} | {:.2}x | {:.0} | {} | {:.2} | {} |\n",
                m.mode.name(),
                m.steady_memory_mib,
                m.overcommit_ratio,
                m.saved_mib,
                t95,
                m.cpu_s,
                m.guests_failed
            );
        }
        if self.modes.iter().any(|m| m.map_limit_reached) {
            out += "\ninprocess stopped merging at vm.max_map_count: pass --raise-max-map-count to go further\n";
        }
        out += "\n| mode | sharing held a guest thread | p50 (us) | p99 (us) | max (us) | guest page gap p99 (us) | p99.9 (us) | max (us) | rounds verified | KVM page faults | TLB flushes |\n";
        out += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for m in &self.modes {
            out += &format!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |\n",
                m.mode.name(),
                m.stalls,
                m.stall_p50_us,
                m.stall_p99_us,
                m.stall_max_us,
                m.gap_p99_us,
                m.gap_p999_us,
                m.gap_max_us,
                m.rounds_verified,
                m.kvm_page_faults,
                m.kvm_tlb_flushes
            );
        }
        out += &self.churn_table();
        out += &self.start_up_table();
        out += &self.limit_table();
        for g in &self.gap_ratios {
            let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
            out += &format!(
                "\n{} vs off, guest page gaps: p99 {}, p99.9 {}; rounds verified {}",
                g.mode.name(),
                x(g.p99),
                x(g.p999),
                x(g.rounds)
            );
        }
        for r in &self.ratios {
            let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
            out += &format!(
                "\ninprocess vs {}: time to 95% {} faster, savings {}, CPU {} less, overcommit {}",
                r.versus.name(),
                x(r.time_to_95),
                x(r.savings),
                x(r.cpu),
                x(r.overcommit)
            );
        }
        if let Some(r) = &self.clone_ratios {
            let x = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
            out += &format!(
                "\ncloned vs inprocess (booted): all verified {} sooner, host memory then {} less, \
                 a guest's memory when made {} less",
                x(r.all_verified),
                x(r.memory_then),
                x(r.memory_at_create)
            );
        }
        out + "\n"
    }

    /// Our modes: what pages that keep changing cost, and how many were
    /// held back.
    fn churn_table(&self) -> String {
        let mut out =
            "\n| mode | copy-on-write breaks | pages held at the end | held after a break | changed in a merge \
                       | rewritten |\n|---|---:|---:|---:|---:|---:|\n"
                .to_string();
        let ours: Vec<&ModeResult> = self.modes.iter().filter(|m| m.mode.is_ours()).collect();
        for m in &ours {
            out += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                m.mode.name(),
                m.cow_breaks,
                m.pages_held,
                m.held_after_break,
                m.held_changed_in_merge,
                m.held_rewritten
            );
        }
        if ours.is_empty() {
            String::new()
        } else {
            out
        }
    }

    /// With a host memory limit: which modes' guests all made it.
    fn limit_table(&self) -> String {
        let Some(limit) = self.host_memory_mib else { return String::new() };
        let mut out = format!(
            "\nIn {limit} MiB ({:.2}x overcommitted):\n\n| mode | every guest verified and alive | OOM kills | \
             guests killed | ended for memory | throttled (s) | waited to start (s) | all verified a round (s) | peak memory (MiB) | \
             host memory stall (s) | saved by sharing (MiB) | given back by balloons (MiB) | balloon requests |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            (self.guests as u64 * self.memory_mib) as f64 / limit as f64
        );
        for m in &self.modes {
            let survived = m.guests_failed == 0 && m.oom_kills == 0 && m.all_verified_s.is_some();
            out += &format!(
                "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.0} | {} | {:.0} | {:.0} | {} |\n",
                m.mode.name(),
                if survived { "yes" } else { "no" },
                m.oom_kills,
                m.guests_killed,
                m.guests_ended_for_memory,
                m.throttled_s,
                m.waited_s,
                m.all_verified_s.map_or("-".into(), |t| format!("{t:.1}")),
                m.peak_memory_mib,
                m.memory_stall_s.map_or("-".into(), |t| format!("{t:.2}")),
                m.saved_mib,
                m.balloon_mib,
                m.balloon_reclaims
            );
        }
        out
    }

    /// How the guests came up: when all ran, what making each cost.
    fn start_up_table(&self) -> String {
        let f = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        let mut out = format!(
            "\n| mode | all {} verified a round (s) | host memory then (MiB) | make a guest p50 (ms) | p99 (ms) | \
             first (ms) | guest memory when made (MiB) | first instruction p50 / p99 / max (ms) | \
             first round p50 / p99 / max (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.guests
        );
        for m in &self.modes {
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                m.mode.name(),
                f(m.all_verified_s, 1),
                f(m.memory_all_verified_mib, 0),
                f(m.create_p50_ms, 0),
                f(m.create_p99_ms, 0),
                f(m.create_first_ms, 0),
                f(m.memory_at_create_mib, 1),
                spread(m.first_instruction_ms),
                spread(m.first_round_ms)
            );
        }
        if let Some(t) = &self.template {
            out += &format!(
                "\ncloned restores {}: its guest verified a round {:.1} s after its run started; the snapshot \
                 ({} pages) held it {:.0} ms\n",
                t.dir.display(),
                t.boot_s,
                t.pages,
                t.held_ms
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats_file::Created;
    use std::time::Duration;

    fn config() -> BenchConfig {
        BenchConfig {
            guests: 4,
            memory_mib: 100,
            vcpus: 1,
            image: "memtest".into(),
            kernel: "k".into(),
            initrd_parts: vec![],
            cmdline: String::new(),
            modes: vec![Mode::Inprocess],
            duration: Duration::from_secs(10),
            json: None,
            plot: None,
            work_dir: None,
            raise_max_map_count: None,
            scan_flags: vec![],
            host_memory_mib: None,
            no_jail: false,
            balloon: false,
            pool: None,
        }
    }

    /// Savings ramp from 0 at 1 s to 100 MiB at 3 s; memory falls to 200.
    fn ramp() -> Vec<Sample> {
        (0..=20)
            .map(|i| {
                let t = i as f64 * 0.5;
                let saved = ((t - 1.0) * 50.0).clamp(0.0, 100.0);
                Sample {
                    t,
                    memory_mib: 300.0 - saved,
                    saved_mib: saved,
                    cpu_s: t.min(3.0) * 0.5,
                    verified: (t >= 2.0) as usize * 4,
                }
            })
            .collect()
    }

    #[test]
    fn figures_from_samples() {
        let r = ModeResult::new(Mode::Inprocess, &config(), ramp(), None, &RunStats::default(), None, false);
        assert_eq!(r.saved_mib, 100.0);
        assert_eq!(r.time_to_95_s, Some(3.0)); // 95 at 2.9 s: the first sample at or above is 3.0
        assert_eq!(r.steady_memory_mib, 200.0);
        assert_eq!(r.overcommit_ratio, 2.0);
        assert!(r.settled);
        assert_eq!(r.converging_cpu_rate(), Some(0.5));
        // All 4 guests verified from 2 s on, when 50 MiB were saved.
        assert_eq!((r.all_verified_s, r.memory_all_verified_mib), (Some(2.0), Some(250.0)));
        assert_eq!(r.create_p50_ms, None);
    }

    #[test]
    fn start_up_figures_and_clone_ratios() {
        let made = |ms: &[f64], mib: u64| RunStats {
            created: ms.iter().map(|&ms| Created { ms, memory_bytes: Some(mib << 20), waited_ms: 0.0 }).collect(),
            ..Default::default()
        };
        let booted = ModeResult::new(
            Mode::Inprocess,
            &config(),
            ramp(),
            None,
            &made(&[40.0, 10.0, 20.0, 30.0], 64),
            None,
            false,
        );
        assert_eq!(
            (booted.create_p50_ms, booted.create_p99_ms, booted.create_first_ms),
            (Some(30.0), Some(40.0), Some(40.0))
        );
        assert_eq!(booted.memory_at_create_mib, Some(64.0));
        let late: Vec<Sample> = ramp()
            .into_iter()
            .map(|s| Sample { verified: (s.t >= 1.0) as usize * 4, memory_mib: 100.0, ..s })
            .collect();
        let cloned = ModeResult::new(Mode::Cloned, &config(), late, None, &made(&[5.0], 2), None, false);
        let report = BenchReport::new(&config(), "test".into(), None, vec![booted, cloned]);
        let r = report.clone_ratios.as_ref().unwrap();
        assert_eq!((r.all_verified, r.memory_then, r.memory_at_create), (Some(2.0), Some(2.5), Some(32.0)));
        let table = report.table();
        assert!(table.contains("| cloned | 1.0 | 100 | 5 | 5 | 5 | 2.0 |"), "{table}");
        assert!(table.contains("all verified 2.00x sooner"), "{table}");
    }

    #[test]
    fn still_growing_is_not_settled_and_ratios_compare() {
        let growing: Vec<Sample> = (0..=20)
            .map(|i| Sample {
                t: i as f64 * 0.5,
                memory_mib: 300.0,
                saved_mib: i as f64 * 5.0,
                cpu_s: 1.0,
                verified: 0,
            })
            .collect();
        let snap = RunStats::default();
        let ksm = ModeResult::new(Mode::KsmDefault, &config(), growing, None, &snap, Some(100), false);
        assert!(!ksm.settled);
        let ours = ModeResult::new(Mode::Inprocess, &config(), ramp(), None, &snap, None, false);
        let report = BenchReport::new(&config(), "test".into(), None, vec![ours, ksm]);
        let r = &report.ratios[0];
        assert_eq!(r.versus, Mode::KsmDefault);
        assert_eq!(r.savings, Some(1.0));
        assert_eq!(r.cpu, Some(1.0 / 1.5));
        assert_eq!(r.time_to_95, Some(9.5 / 3.0));
        let table = report.table();
        assert!(table.contains("| ksm-default |") && table.contains("not settled"), "{table}");
    }
}
