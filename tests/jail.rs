//! A guest process that is taken over owns nothing: it runs as a user of
//! its own with no capabilities, in namespaces of its own with an empty
//! root, and the memory it shares with the supervisor and other guests
//! cannot be shrunk under them or written through a reopened descriptor.
//! Snapshots are written into files the supervisor makes, readable by it
//! alone. Needs root (as every test here: see README).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

use common::*;
use serde_json::{json, Value};

/// A `Name:\tvalue` line of /proc/PID/status.
fn status_field(pid: u64, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("no {name}"));
    line.split_once(':').unwrap().1.trim().to_string()
}

/// The /proc path of the descriptor of process `pid` whose target starts
/// with `name` (guest processes get theirs with their setup, at no fixed number).
fn fd_named(pid: u64, name: &str) -> String {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let found = fds.map(|e| e.unwrap().path()).find(|p| {
        std::fs::read_link(p).is_ok_and(|target| target.to_string_lossy().trim_start_matches('/').starts_with(name))
    });
    found.unwrap_or_else(|| panic!("process {pid} holds no {name}")).to_string_lossy().into_owned()
}

fn namespace(pid: &str, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap().to_string_lossy().into_owned()
}

/// Runs `script` under sh as `uid` (no groups, no capabilities) with
/// `file` as its descriptor 3; returns whether it succeeded.
fn as_user_with_fd(uid: u32, file: &std::fs::File, script: &str) -> bool {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut command = std::process::Command::new("sh");
    command.arg("-c").arg(script).stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set.
            let placed = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if placed < 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.status().unwrap().success()
}

#[test]
fn a_guest_process_is_jailed_and_its_shared_memory_is_sealed() {
    let server = Server::start("jail");
    let first = guest(&server, create_and_start(&server, memtest_guest("rounds=0 idle=50 share=0.5")));
    let second = guest(&server, create_and_start(&server, memtest_guest("rounds=0 idle=50 share=0.5")));
    let pid = first["pid"].as_u64().expect("a running guest shows its pid");
    let uid = first["jail"]["uid"].as_u64().expect("a jailed guest shows its user") as u32;
    assert_ne!(uid, 0);
    assert_ne!(second["jail"]["uid"], first["jail"]["uid"], "two guests share a user id");

    // Who it is and what it may do.
    assert_eq!(status_field(pid, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(status_field(pid, "Gid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Every thread is under seccomp filters: the process's, and vCPUs and
    // the I/O thread their own on top.
    let filters = |task: &std::path::Path| {
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_string();
        (field("Seccomp:"), field("Seccomp_filters:").parse::<u32>().unwrap())
    };
    let (mode, process_filters) = filters(std::path::Path::new(&format!("/proc/{pid}/task/{pid}")));
    assert_eq!(mode, "2", "the main thread is not filtered");
    assert!(process_filters >= 1);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let (mode, n) = filters(&task);
        assert_eq!(mode, "2", "thread {comm}");
        if comm.starts_with("vcpu") || comm.trim() == "io" {
            assert!(n > process_filters, "thread {comm} has no filter of its own");
        }
        // It ran at the supervisor's priority until built: its threads now
        // run at the default (its control thread, which makes merges,
        // real-time), never above it at a nice of their own.
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        // After the name: state is field 3, nice 19 and policy 41 of stat(5).
        let (nice, policy) = (fields[19 - 3], fields[41 - 3]);
        if task.file_name().unwrap().to_string_lossy() != pid.to_string() {
            assert_eq!((nice, policy), ("0", "0"), "thread {comm}: nice and policy");
        }
    }
    // Namespaces of its own: no host network, IPC, host name or mounts,
    // and no other process in sight (it is process 1 of its own).
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        assert_ne!(namespace(&pid.to_string(), ns), namespace("self", ns), "it shares the supervisor's {ns} namespace");
    }
    assert_ne!(
        namespace(&pid.to_string(), "pid"),
        namespace(&second["pid"].to_string(), "pid"),
        "two guest processes share a PID namespace"
    );
    assert_eq!(status_field(pid, "NSpid").split_whitespace().last(), Some("1"), "not process 1 of its namespace");
    // Its root is an empty directory: the host's files are out of reach.
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root")).unwrap().collect();
    assert!(root.is_empty(), "its root holds {root:?}");
    // Not dumpable: its /proc files belong to root, not to its user.
    assert_eq!(std::fs::metadata(format!("/proc/{pid}/fd")).unwrap().uid(), 0);

    // Its RAM cannot shrink or grow under the supervisor's mapping of it
    // (even for root: the memfd is sealed).
    let ram_path = fd_named(pid, "memfd:vmm-guest");
    let ram = std::fs::OpenOptions::new().read(true).write(true).open(&ram_path).unwrap();
    let len = ram.metadata().unwrap().len();
    assert_eq!(len, 64 << 20);
    let shrink = ram.set_len(len / 2).unwrap_err();
    assert_eq!(shrink.raw_os_error(), Some(libc::EPERM), "{shrink}");
    assert!(ram.set_len(len * 2).is_err(), "the guest's RAM grew");

    // The stable store: only its owner (the supervisor's user) may open it
    // writable. The guest's user, holding a read-only descriptor as the
    // guest process does, cannot reopen it writable.
    let store_path = fd_named(pid, "memfd:vmm-stable-store-");
    let store = std::fs::File::open(&store_path).unwrap();
    let meta = store.metadata().unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o400, 0), "the store's mode and owner");
    assert!(!as_user_with_fd(uid, &store, "exec 4<>/proc/self/fd/3"), "the guest's user reopened the store writable");
    // The same reopening of its RAM (its own, writable anyway) works: it
    // is the store's mode that stops it, not the way it is tried.
    assert!(as_user_with_fd(uid, &ram, "exec 4<>/proc/self/fd/3"), "the check itself is broken");
    // Nor can it be shrunk under the guests' mappings.
    let writable = std::fs::OpenOptions::new().write(true).open(&store_path).unwrap();
    wait_for("a merge into the store", || writable.metadata().unwrap().len() > 0);
    let store_len = writable.metadata().unwrap().len();
    assert!(writable.set_len(store_len - 4096).is_err(), "the store shrank");

    // Both guests still verify their memory.
    for g in [&first, &second] {
        let id = g["id"].as_u64().unwrap();
        let before = rounds(&server, id);
        wait_for("another verified round", || rounds(&server, id) > before);
        let g = server.call("GET", &format!("/guests/{id}"), None).1;
        assert_eq!(g["corrupted_pages"], 0, "{g}");
    }
}

#[test]
fn without_the_jail_a_guest_process_runs_as_the_supervisor() {
    let server = Server::start_with("nojail", &["--no-jail"]);
    let g = guest(&server, create_and_start(&server, memtest_guest("rounds=0 idle=50")));
    assert_eq!(g["jail"], Value::Null, "{g}");
    let pid = g["pid"].as_u64().unwrap();
    assert_eq!(status_field(pid, "Uid"), "0\t0\t0\t0");
    assert_eq!(namespace(&pid.to_string(), "net"), namespace("self", "net"));
}

#[test]
fn a_bad_uid_base_is_refused_by_name() {
    let out = run_vmm(&["run", "--kernel", image("memtest").to_str().unwrap(), "--jail-uid-base", "x"], LIMIT);
    assert!(out.code != Some(0) && out.stderr.contains("--jail-uid-base"), "{}", out.describe());
    let out = run_vmm(
        &["run", "--kernel", image("memtest").to_str().unwrap(), "--guests", "2", "--jail-uid-base", "4294967294"],
        LIMIT,
    );
    assert!(out.code != Some(0) && out.stderr.contains("past the last user id"), "{}", out.describe());
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A snapshot goes into a directory only the supervisor's user can enter,
/// in files only it can read, written by the jailed guest process through
/// descriptors; a directory of another user or a symlink is refused.
#[test]
fn a_snapshot_is_private_to_the_supervisor_and_refuses_foreign_directories() {
    let server = Server::start("jail-snap");
    let g = guest(&server, create_and_start(&server, memtest_guest("rounds=0 idle=50")));
    let id = g["id"].as_u64().unwrap();
    let (status, r) = server.call("POST", &format!("/guests/{id}/pause"), None);
    assert_eq!(status, 200, "{r}");
    let scratch = scratch_dir("jail-snap-dirs");

    let foreign = scratch.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(4242), Some(4242)).unwrap();
    let link = scratch.join("link");
    std::os::unix::fs::symlink(&foreign, &link).unwrap();
    for (dir, why) in [(&foreign, "belongs to user 4242"), (&link, "is not a directory")] {
        let (status, r) = server.call("PUT", &format!("/guests/{id}/snapshot"), Some(json!({"dir": dir})));
        assert_eq!(status, 400, "{r}");
        assert!(r.to_string().contains(why), "{r}");
    }
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 0, "something was written into the foreign directory");

    let dir = scratch.join("snap");
    let (status, r) = server.call("PUT", &format!("/guests/{id}/snapshot"), Some(json!({"dir": dir})));
    assert_eq!(status, 200, "{r}");
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, meta.uid()), (0o700, 0));
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["memory", "state.json"], "a disk-less guest's snapshot");
    for name in ["memory", "state.json"] {
        let meta = std::fs::metadata(dir.join(name)).unwrap();
        assert_eq!((meta.permissions().mode() & 0o777, meta.uid()), (0o600, 0), "{name}");
    }
    // It restores: the files are whole.
    let (status, c) = server.call("POST", "/guests", Some(json!({"restore": dir})));
    assert_eq!(status, 201, "{c}");
    let clone = c["id"].as_u64().unwrap();
    let (status, c) = server.call("POST", &format!("/guests/{clone}/start"), None);
    assert_eq!(status, 200, "{c}");
    let before = rounds(&server, clone);
    wait_for("the clone to verify a round", || rounds(&server, clone) > before);
    let _ = std::fs::remove_dir_all(scratch);
}

/// A guest's disk overlay that nobody asked to keep is a file without a
/// name as soon as its process has opened it: nothing of it can be left
/// behind, however the process or the supervisor ends.
#[test]
fn an_overlay_not_kept_is_unlinked_once_open() {
    let server = Server::start("jail-overlay");
    let disk = scratch_dir("jail-overlay-disk").join("disk.img");
    write_mbr_image(&disk, 4);
    let mut spec = memtest_guest("rounds=0 idle=50");
    spec["disk"] = json!(disk);
    let g = guest(&server, create_and_start(&server, spec));
    let pid = g["pid"].as_u64().unwrap();
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let overlay = links.iter().find(|l| l.contains(".overlay")).unwrap_or_else(|| panic!("no overlay open: {links:?}"));
    assert!(overlay.ends_with(" (deleted)"), "its overlay still has a name: {overlay}");
}
