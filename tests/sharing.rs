//! Page sharing on real guests: memtest guests verify all their memory every
//! round while the scanner merges their pages under them.

mod common;

use common::*;

/// What memtest's consoles say it holds: (pages it tests, shared pages,
/// zero pages) of guest `id`, from its lines
/// `memtest: guest G, V vCPUs, P pages (...` and
/// `memtest: ideal mergeable pages N (shared S, zero Z)`.
fn memtest_plan(dir: &std::path::Path, id: usize) -> (u64, u64, u64) {
    let log = std::fs::read_to_string(dir.join(format!("guest-{id}.log"))).unwrap();
    let after = |key: &str| -> u64 {
        let at = log.find(key).unwrap_or_else(|| panic!("no '{key}' in guest {id}'s console:\n{log}"));
        log[at + key.len()..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    let tested = log.lines().find(|l| l.contains(" pages (")).and_then(|l| {
        let before = &l[..l.find(" pages (")?];
        before.rsplit(' ').next()?.parse().ok()
    });
    (tested.expect("no page count in the console"), after("(shared "), after(", zero "))
}

/// The pages sharing can save at best among `guests` guests of one seed:
/// (guests - 1) x shared + guests x zero. Also returns the pages memtest
/// does not test (its image, low memory), which may merge too.
fn ideal_saved(dir: &std::path::Path, guests: usize, memory_mib: u64) -> (u64, u64) {
    let plans: Vec<_> = (0..guests).map(|id| memtest_plan(dir, id)).collect();
    let shared = plans[0].1;
    let zero: u64 = plans.iter().map(|p| p.2).sum();
    let untested: u64 = plans.iter().map(|p| memory_mib * 256 - p.0).sum();
    ((guests as u64 - 1) * shared + zero, untested)
}

/// The peak pages saved that vmm reports at exit.
fn reported_saved(stderr: &str) -> u64 {
    let line = stderr.lines().find(|l| l.contains("page sharing:")).expect("no page sharing report");
    let rest = &line[line.find("MiB saved (").unwrap() + "MiB saved (".len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Runs `guests` x 64 MiB memtest guests with a fast scanner; returns the
/// outcome and the console directory.
fn shared_run(name: &str, guests: &str, cmdline: &str, extra: &[&str]) -> (Outcome, std::path::PathBuf) {
    let dir = scratch_dir(name);
    let mut args = vec!["--guests", guests, "--memory", "64", "--console-dir", dir.to_str().unwrap()];
    args.extend_from_slice(&["--scan-pages", "16384", "--scan-sleep-ms", "5", "--cmdline", cmdline]);
    args.extend_from_slice(extra);
    (run_memtest(&args), dir)
}

#[test]
fn memtest_guests_share_pages_and_verify_clean() {
    let (out, dir) = shared_run("sharing-4", "4", "rounds=40 seed=7 share=0.8 zero=0.1 volatile=64", &[]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(out.stderr.matches("memtest passed").count(), 4, "{}", out.describe());
    let ((ideal, untested), saved) = (ideal_saved(&dir, 4, 64), reported_saved(&out.stderr));
    assert!(ideal > 0);
    assert!(saved * 100 >= ideal * 90, "saved {saved} of an ideal {ideal} pages\n{}", out.describe());
    assert!(saved <= ideal + untested, "saved {saved}, more than the ideal {ideal} + {untested}: counting is off");
    for id in 0..4 {
        assert!(out.stderr.contains(&format!("vmm: guest {id} sharing: ")), "{}", out.describe());
    }
}

fn two_guests(name: &str, extra: &[&str]) -> (Outcome, std::path::PathBuf) {
    shared_run(name, "2", "rounds=30 seed=7 share=0.8 zero=0 volatile=0", extra)
}

#[test]
fn separate_merge_groups_share_nothing_between_guests() {
    // memtest's pages all differ within one guest (zero=0), so what merges
    // in one group are the pages shared across guests.
    let (together, dir) = two_guests("groups-one", &[]);
    assert_eq!(together.code, Some(0), "{}", together.describe());
    let (shared, untested) = (memtest_plan(&dir, 0).1, ideal_saved(&dir, 2, 64).1);
    assert!(reported_saved(&together.stderr) >= shared * 9 / 10, "{}", together.describe());

    let (apart, _) = two_guests("groups-two", &["--merge-group", "per-guest"]);
    assert_eq!(apart.code, Some(0), "{}", apart.describe());
    // Apart, only each guest's own untested memory (low memory, zeros) can merge.
    assert!(apart.stderr.contains("vmm: merge group 1 (1 guests)"), "{}", apart.describe());
    let saved = reported_saved(&apart.stderr);
    assert!(saved <= untested, "saved {saved} pages across merge groups\n{}", apart.describe());
}

#[test]
fn two_tiny_linux_guests_share_their_kernel_pages() {
    let out = run_tiny_linux("2", &scratch_dir("sharing-linux"), &[]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // The kernel image alone is thousands of identical pages (zero pages go
    // to the kernel's zero page and are counted apart).
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("vmm: guest 1 sharing: "))
        .unwrap_or_else(|| panic!("{}", out.describe()));
    let on_frames: u64 = line["vmm: guest 1 sharing: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(on_frames >= 1000, "only {on_frames} pages of guest 1 shared\n{}", out.describe());
}
