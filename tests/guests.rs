//! Guests that run: memtest verifies its own memory, tiny Linux boots, and
//! Ctrl-C stops everything cleanly.

mod common;

use common::*;
use std::time::Duration;

fn assert_all_passed(out: &Outcome, guests: usize) {
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let passed = out.stderr.matches("memtest passed").count();
    assert_eq!(passed, guests, "{}", out.describe());
    assert!(!out.stderr.contains("FAILED"), "{}", out.describe());
}

#[test]
fn memtest_one_guest_verifies_its_memory() {
    let out = run_memtest(&["--memory", "128", "--cmdline", "rounds=2 volatile=64"]);
    assert_all_passed(&out, 1);
    assert!(out.stderr.contains("2 rounds verified"), "{}", out.describe());
    // One guest: its console is the terminal.
    assert!(out.stdout.contains("memtest"), "{}", out.describe());
}

#[test]
fn memtest_four_guests_two_vcpus_each() {
    let dir = scratch_dir("memtest-4x2");
    let out = run_memtest(&[
        "--guests",
        "4",
        "--vcpus",
        "2",
        "--memory",
        "128",
        "--console-dir",
        dir.to_str().unwrap(),
        "--cmdline",
        "rounds=3 share=0.5 volatile=64",
    ]);
    assert_all_passed(&out, 4);
    for id in 0..4 {
        let log = std::fs::read_to_string(dir.join(format!("guest-{id}.log"))).unwrap();
        assert!(log.contains("ideal mergeable pages"), "guest {id} console:\n{log}");
    }
}

#[test]
fn memtest_guest_above_4g_verifies_memory_on_both_sides_of_the_hole() {
    let out = run_memtest(&["--memory", "4608", "--cmdline", "rounds=1 volatile=0"]);
    assert_all_passed(&out, 1);
}

#[test]
fn sigint_stops_every_guest_and_exits_cleanly() {
    require_kvm();
    let memtest = image("memtest");
    let dir = scratch_dir("sigint");
    let child = vmm(&[
        "run",
        "--guests",
        "3",
        "--memory",
        "64",
        "--kernel",
        memtest.to_str().unwrap(),
        "--console-dir",
        dir.to_str().unwrap(),
        "--cmdline",
        "rounds=0",
    ])
    .spawn()
    .unwrap();
    // Let the guests get going (each console shows memtest started).
    let started = std::time::Instant::now();
    while (0..3).any(|id| {
        let log = std::fs::read_to_string(dir.join(format!("guest-{id}.log"))).unwrap_or_default();
        !log.contains("ideal mergeable pages")
    }) {
        assert!(started.elapsed() < Duration::from_secs(60), "guests did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = wait_with_limit(child, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let stopped = out.stderr.lines().filter(|l| l.starts_with("vmm: guest ") && l.ends_with(": stopped")).count();
    assert_eq!(stopped, 3, "{}", out.describe());
}
