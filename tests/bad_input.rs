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
    assert!(out.stderr.contains("--memory must be between 8 and"), "{}", out.describe());
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

#[test]
fn bad_disk_images_are_refused_before_any_guest_starts() {
    require_kvm();
    let dir = scratch_dir("bad-disks");
    std::fs::write(dir.join("odd.img"), [0u8; 1000]).unwrap();
    let mut qcow = b"QFI\xfb".to_vec();
    qcow.resize(4096, 0);
    std::fs::write(dir.join("disk.qcow2"), qcow).unwrap();
    let memtest = image("memtest");
    let cases = [
        (dir.join("missing.img"), "cannot open disk image"),
        (dir.clone(), "is not a regular file"),
        (dir.join("odd.img"), "not a multiple of the 512-byte sector"),
        (dir.join("disk.qcow2"), "qemu-img convert"),
    ];
    for (path, expected) in cases {
        let out =
            run_vmm(&["run", "--kernel", memtest.to_str().unwrap(), path.to_str().unwrap()], Duration::from_secs(30));
        assert_eq!(out.code, Some(2), "{}", out.describe());
        assert!(out.stderr.contains(expected) && out.stderr.contains(path.to_str().unwrap()), "{}", out.describe());
        assert!(!out.stdout.contains("memtest:"), "a guest ran: {}", out.describe());
    }
    std::fs::remove_dir_all(dir).unwrap();
}
