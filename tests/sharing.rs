//! Page sharing on real guests: memtest guests verify all their memory every
//! round while the scanner merges their pages under them.

mod common;

use common::*;
use std::time::Duration;

/// Sums `memtest: ideal mergeable pages N (shared S, zero Z)` over the
/// guests' consoles: the pages sharing can save at best is
/// (guests - 1) x S + guests x Z when every guest has the same seed.
fn ideal_saved(dir: &std::path::Path, guests: usize) -> u64 {
    let mut shared = 0;
    let mut zero = 0;
    for id in 0..guests {
        let log = std::fs::read_to_string(dir.join(format!("guest-{id}.log"))).unwrap();
        let line = log.lines().find(|l| l.contains("ideal mergeable pages")).unwrap_or_else(|| panic!("{log}"));
        let num = |key: &str| -> u64 {
            let rest = &line[line.find(key).unwrap() + key.len()..];
            rest.trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        shared = num("(shared ");
        zero += num("zero ");
    }
    (guests as u64 - 1) * shared + zero
}

/// The peak pages saved that vmm reports at exit.
fn reported_saved(stderr: &str) -> u64 {
    let line = stderr.lines().find(|l| l.contains("page sharing:")).expect("no page sharing report");
    let rest = &line[line.find("MiB saved (").unwrap() + "MiB saved (".len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn memtest_guests_share_pages_and_verify_clean() {
    require_kvm();
    let memtest = image("memtest");
    let dir = scratch_dir("sharing-4");
    let out = run_vmm(
        &[
            "run",
            "--guests",
            "4",
            "--memory",
            "64",
            "--kernel",
            memtest.to_str().unwrap(),
            "--console-dir",
            dir.to_str().unwrap(),
            "--scan-pages",
            "16384",
            "--scan-sleep-ms",
            "5",
            "--cmdline",
            "rounds=40 seed=7 share=0.8 zero=0.1 volatile=64",
        ],
        Duration::from_secs(300),
    );
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(out.stderr.matches("memtest passed").count(), 4, "{}", out.describe());
    let (ideal, saved) = (ideal_saved(&dir, 4), reported_saved(&out.stderr));
    assert!(ideal > 0);
    assert!(saved * 100 >= ideal * 90, "saved {saved} of an ideal {ideal} pages\n{}", out.describe());
    assert!(saved <= ideal + 64 * 4, "saved {saved}, more than the ideal {ideal}: counting is off");
}

#[test]
fn separate_merge_groups_share_nothing_between_guests() {
    require_kvm();
    let memtest = image("memtest");
    let dir = scratch_dir("sharing-groups");
    let out = run_vmm(
        &[
            "run",
            "--guests",
            "2",
            "--memory",
            "64",
            "--kernel",
            memtest.to_str().unwrap(),
            "--console-dir",
            dir.to_str().unwrap(),
            "--scan-pages",
            "16384",
            "--scan-sleep-ms",
            "5",
            "--merge-group",
            "per-guest",
            "--no-zero-pages",
            "--cmdline",
            "rounds=30 seed=7 share=0.8 zero=0 volatile=0",
        ],
        Duration::from_secs(300),
    );
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // No zero pages, and no twins across groups: memtest's pages all differ
    // within one guest, so nothing may merge.
    assert_eq!(reported_saved(&out.stderr), 0, "{}", out.describe());
}
