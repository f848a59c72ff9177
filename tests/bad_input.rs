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
fn a_transport_that_does_not_exist_or_beside_a_restore_is_refused() {
    let out = run_vmm(&["run", "--kernel", "/any", "--transport", "usb"], LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("'usb'") && out.stderr.contains("pci, mmio"), "{}", out.describe());
    let out = run_vmm(&["run", "--restore", "/any", "--transport", "pci"], LIMIT);
    assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{}", out.describe());
    assert!(out.stderr.contains("cannot be used with"), "{}", out.describe());
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

/// A snapshot directory is hostile input: FIFOs, devices, symlinks,
/// directories, oversized or damaged files in it are each refused by
/// name, without waiting on them, and start nothing.
#[test]
fn hostile_snapshot_files_are_refused_by_name() {
    use serde_json::{json, Value};
    let dir = scratch_dir("hostile-snapshot");
    let good = dir.join("good");
    {
        let server = Server::start("hostile-snapshot-server");
        let spec = json!({"kernel": image("memtest"), "memory_mib": 16, "cmdline": "rounds=0 idle=50"});
        let (status, g) = server.call("POST", "/guests", Some(spec));
        assert_eq!(status, 201, "{g}");
        let id = g["id"].as_u64().unwrap();
        assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
        wait_for("a verified round", || rounds(&server, id) >= 1);
        assert_eq!(server.call("POST", &format!("/guests/{id}/pause"), None).0, 200);
        let (status, r) = server.call("PUT", &format!("/guests/{id}/snapshot"), Some(json!({"dir": good})));
        assert_eq!(status, 200, "{r}");
    }
    let state: Value = serde_json::from_slice(&std::fs::read(good.join("state.json")).unwrap()).unwrap();
    type Setup = Box<dyn Fn(&std::path::Path)>;
    let with_state = |state: Value| -> Setup {
        Box::new(move |d: &std::path::Path| std::fs::write(d.join("state.json"), state.to_string()).unwrap())
    };
    let mut absurd_vcpus = state.clone();
    absurd_vcpus["config"]["vcpus"] = json!(100_000);
    let mut absurd_memory = state.clone();
    absurd_memory["config"]["memory_mib"] = json!(1u64 << 40);
    let cases: Vec<(&str, &str, Setup)> = vec![
        ("state-fifo", "state.json: it is a FIFO", Box::new(|d| mkfifo(&d.join("state.json")))),
        (
            "state-zero",
            "state.json: it is a symlink",
            Box::new(|d| std::os::unix::fs::symlink("/dev/zero", d.join("state.json")).unwrap()),
        ),
        (
            "state-huge",
            "more than a state is",
            Box::new(|d| std::fs::File::create(d.join("state.json")).unwrap().set_len(1 << 30).unwrap()),
        ),
        ("state-dir", "it is a directory", Box::new(|d| std::fs::create_dir(d.join("state.json")).unwrap())),
        ("vcpus", "vcpus", with_state(absurd_vcpus)),
        ("memory-size", "memory", with_state(absurd_memory)),
        ("memory-fifo", "it is a FIFO", Box::new(|d| mkfifo(&d.join("memory")))),
        (
            "memory-zero",
            "it is a symlink",
            Box::new(|d| std::os::unix::fs::symlink("/dev/zero", d.join("memory")).unwrap()),
        ),
        (
            "memory-sparse",
            "its memory file holds 1099511627776 bytes",
            Box::new(|d| std::fs::File::create(d.join("memory")).unwrap().set_len(1 << 40).unwrap()),
        ),
    ];
    for (name, says, setup) in cases {
        let case = dir.join(name);
        std::fs::create_dir(&case).unwrap();
        // What the case does not replace is the good snapshot's.
        setup(&case);
        for file in ["state.json", "memory"] {
            if std::fs::symlink_metadata(case.join(file)).is_err() {
                std::fs::hard_link(good.join(file), case.join(file)).unwrap();
            }
        }
        let out = run_vmm(&["run", "--restore", case.to_str().unwrap()], Duration::from_secs(20));
        assert_eq!(out.code, Some(EXIT_SETUP_FAILED), "{name}: {}", out.describe());
        assert!(out.stderr.contains(says), "{name}: {}", out.describe());
        assert!(!out.stderr.contains("guest 0:"), "{name} started a guest: {}", out.describe());
    }
}

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}
