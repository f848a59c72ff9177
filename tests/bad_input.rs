//! Bad input gets a clear error naming the problem, the right exit code, and
//! never a hang.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const EXIT_GUEST_FAILED: i32 = 1;
const EXIT_SETUP_FAILED: i32 = 2;

#[test]
fn missing_kernel_file() {
    require_kvm();
    let out = run_vmm(&["run", "--kernel", "/nonexistent/vmlinux", "--memory", "64"], LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("cannot open kernel /nonexistent/vmlinux"), "{}", out.describe());
}

#[test]
fn file_that_is_not_a_kernel() {
    require_kvm();
    let dir = scratch_dir("not-a-kernel");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "just some text, not a kernel\n".repeat(100)).unwrap();
    let out = run_vmm(&["run", "--kernel", path.to_str().unwrap(), "--memory", "64"], LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("is not a kernel"), "{}", out.describe());
    // A directory is not a kernel either.
    let out = run_vmm(&["run", "--kernel", dir.to_str().unwrap(), "--memory", "64"], LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("is not a kernel"), "{}", out.describe());
}

#[test]
fn zero_memory() {
    let out = run_vmm(&["run", "--kernel", "/any", "--memory", "0"], LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("--memory must be at least"), "{}", out.describe());
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = run_vmm(&["run", "--kernel", "/any", "--memroy", "64"], LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("--memroy"), "{}", out.describe());
}

#[test]
fn triple_fault_ends_the_guest_with_its_reason() {
    require_kvm();
    let kernel = resource("triple-fault.elf");
    let out = run_vmm(&["run", "--kernel", kernel.to_str().unwrap(), "--memory", "64"], LIMIT);
    assert_eq!(out.code, Some(EXIT_GUEST_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("triple fault (KVM_EXIT_SHUTDOWN)"), "{}", out.describe());
}

#[test]
fn too_many_guests_for_host_ram() {
    require_kvm();
    let memtest = image("memtest");
    // 64 x 64 GiB is far more than any machine this runs on has available.
    let args = ["run", "--guests", "64", "--memory", "65536", "--kernel", memtest.to_str().unwrap()];
    let out = run_vmm(&args, LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("64 guests x 65536 MiB"), "{}", out.describe());
    assert!(out.stderr.contains("--overcommit"), "{}", out.describe());
}
