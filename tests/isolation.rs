//! One guest, one process: a guest whose process is killed, crashes or
//! abuses its devices ends alone, with its reason, while the others keep
//! verifying their memory and the API keeps answering.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Polls the API from another thread all along: it must always answer.
struct Prober {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Prober {
    fn start(socket: std::path::PathBuf) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    for path in ["/guests", "/dedup/stats", "/metrics"] {
                        match vmm::ctl::request(&socket, "GET", path, None) {
                            Ok((200, _)) => {
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            other => failures.push(format!("{path}: {other:?}")),
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                failures
            })
        };
        Prober { stop, answered, thread: Some(thread) }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.thread.take().unwrap().join().unwrap();
        (self.answered.load(Ordering::SeqCst), failures)
    }
}

#[test]
fn a_guest_that_is_killed_or_abuses_its_devices_ends_alone() {
    let server = Server::start("isolation");
    let healthy: Vec<u64> =
        (0..3).map(|_| create_and_start(&server, memtest_guest("rounds=0 idle=50 share=0.6 volatile=64"))).collect();
    let victim = create_and_start(&server, memtest_guest("rounds=0 idle=50 share=0.6"));
    let crasher = create_and_start(&server, memtest_guest("rounds=0 idle=50 share=0.6"));
    wait_for("the guests to verify", || healthy.iter().all(|&id| rounds(&server, id) >= 2));
    let prober = Prober::start(server.socket.clone());

    // Killed from outside, as the OOM killer or an operator would.
    let pid = guest(&server, victim)["pid"].as_u64().expect("a running guest has a process");
    // SAFETY: kill(2) on the guest's process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // A crash (an abort in the VMM's code for that guest; a kill(2)'d
    // SIGSEGV would only be taken for a stack overflow check by Rust's
    // runtime, so a crash is stood in for by SIGABRT).
    let pid = guest(&server, crasher)["pid"].as_u64().unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGABRT) }, 0);
    // A guest that writes absurd values to its doorbell (progress 0, then
    // 2^32 rounds, then done: these once crashed the whole VMM).
    let abuser = create_and_start(&server, memtest_guest("abuse=1 rounds=0"));

    for (id, why) in [
        (victim, "killed by signal 9 (SIGKILL)"),
        (crasher, "killed by signal 6 (SIGABRT)"),
        (abuser, "memtest passed"),
    ] {
        wait_for("the guest to end", || guest(&server, id)["state"] == "ended");
        let g = guest(&server, id);
        assert!(g["end"].as_str().unwrap().contains(why), "guest {id}: {g}");
        assert!(g["pid"].is_null(), "an ended guest has no process: {g}");
    }
    assert_eq!(guest(&server, victim)["clean"], false);

    // The others went on verifying, and end clean.
    let before: Vec<usize> = healthy.iter().map(|&id| rounds(&server, id)).collect();
    wait_for("the healthy guests to go on", || {
        healthy.iter().zip(&before).all(|(&id, &b)| rounds(&server, id) >= b + 3)
    });
    for &id in &healthy {
        let (status, g) = server.call("POST", &format!("/guests/{id}/stop"), None);
        assert_eq!((status, g["clean"].as_bool()), (200, Some(true)), "{g}");
        let (_, c) = server.call("GET", &format!("/guests/{id}/console"), None);
        assert!(!c["tail"].as_str().unwrap().contains("FAILED"), "{c}");
    }
    let (answered, failures) = prober.finish();
    assert!(failures.is_empty(), "the API failed while guests died: {failures:?}");
    assert!(answered > 10, "the API was barely asked ({answered})");
    // The supervisor itself is still fine.
    assert_eq!(server.call("GET", "/host", None).0, 200);
}

/// A guest's process has its own memory cgroup where the host allows it,
/// and the API reports what the guest uses.
#[test]
fn each_guest_reports_its_host_memory() {
    let server = Server::start("guest-memory");
    let id = create_and_start(&server, memtest_guest("rounds=0 idle=50 share=0 zero=0"));
    wait_for("the guest to verify", || rounds(&server, id) >= 1);
    let bytes = guest(&server, id)["memory_bytes"].as_u64().expect("memory_bytes");
    // It filled most of its 64 MiB with private data.
    assert!(bytes > 40 << 20, "{bytes}");
    let (_, metrics) = server.call("GET", "/metrics", None);
    assert!(metrics.as_str().unwrap().contains(&format!("vmm_guest_memory_bytes{{guest=\"{id}\"}}")), "{metrics}");
}

/// Every `vmm run` flag works with the API on: --timeout, --stats-file,
/// --console-dir and --merge-group.
#[test]
fn vmm_run_with_the_api_honours_every_flag() {
    let dir = scratch_dir("run-api-flags");
    let (socket, stats, consoles) = (dir.join("api.sock"), dir.join("stats.json"), dir.join("consoles"));
    let memtest = image("memtest");
    let child = vmm(&[
        "run",
        "--guests",
        "2",
        "--memory",
        "64",
        "--kernel",
        memtest.to_str().unwrap(),
        "--cmdline",
        "rounds=0 idle=50",
        "--api-socket",
        socket.to_str().unwrap(),
        "--timeout",
        "6",
        "--stats-file",
        stats.to_str().unwrap(),
        "--console-dir",
        consoles.to_str().unwrap(),
        "--merge-group",
        "per-guest",
    ])
    .spawn()
    .unwrap();
    wait_for("the run's API", || std::os::unix::net::UnixStream::connect(&socket).is_ok());
    let (_, text) = vmm::ctl::request(&socket, "GET", "/guests", None).unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    let groups: Vec<u64> =
        list.as_array().unwrap().iter().map(|g| g["spec"]["merge_group"].as_u64().unwrap()).collect();
    assert_eq!(groups, [0, 1], "{list}");
    let out = wait_with_limit(child, Duration::from_secs(60));
    // Timed out: the guests count as failed.
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_eq!(
        out.stderr.lines().filter(|l| l.starts_with("vmm: guest ") && l.ends_with(": timed out after 6 s")).count(),
        2,
        "{}",
        out.describe()
    );
    let last: Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!((last["guests"].as_u64(), last["finished"].as_bool()), (Some(2), Some(true)), "{last}");
    for id in 0..2 {
        let log = std::fs::read_to_string(consoles.join(format!("guest-{id}.log"))).unwrap();
        assert!(log.contains("round 1 ok"), "guest {id}: {log}");
    }
}

/// A supervisor killed with SIGKILL takes its guests with it; what it
/// left (its memory cgroups, its temporary console and overlay
/// directories) the next supervisor removes.
#[test]
fn the_next_supervisor_removes_what_a_killed_one_left() {
    require_kvm();
    let memtest = image("memtest");
    let child = vmm(&["run", "--guests", "2", "--memory", "32", "--kernel", memtest.to_str().unwrap()])
        .args(["--cmdline", "rounds=0 idle=50"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let cgroup = vmm::cgroup::own_memory_cgroup_dir().expect("a memory cgroup").join(format!("vmm-{pid}"));
    let temp_dirs = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                ["vmm-consoles", "vmm-overlays"].iter().any(|k| name.starts_with(&format!("{k}-{pid}-")))
            })
            .collect()
    };
    wait_for("its guests' cgroups and its consoles", || cgroup.join("guest-1").exists() && temp_dirs().len() == 2);
    let left = temp_dirs();
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("its guests to end with it", || {
        std::fs::read_to_string(cgroup.join("guest-0/cgroup.procs")).map_or(true, |p| p.trim().is_empty())
            && std::fs::read_to_string(cgroup.join("guest-1/cgroup.procs")).map_or(true, |p| p.trim().is_empty())
    });
    assert!(cgroup.exists() && left.iter().all(|d| d.exists()), "a killed supervisor left nothing to clean");

    let out = run_vmm(
        &["run", "--memory", "32", "--kernel", memtest.to_str().unwrap(), "--cmdline", "rounds=1"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(!cgroup.exists(), "{} is still there", cgroup.display());
    for d in left {
        assert!(!d.exists(), "{} is still there", d.display());
    }
}
