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
        (abuser, "memtest protocol violation: vCPU 0 claimed round 4294967296"),
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
    let cgroup = vmm::supervisor::cgroup::own_memory_cgroup_dir().expect("a memory cgroup").join(format!("vmm-{pid}"));
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

/// A guest process stopped by SIGSTOP (or a hostile process that stops
/// itself) holds nobody up: the API, the scanner, merges of other guests
/// and clones go on, it is reported unresponsive, and it can be deleted.
#[test]
fn a_stopped_guest_process_stalls_nothing_and_can_be_deleted() {
    let server = Server::start("sigstop");
    let spec = || memtest_guest("rounds=0 idle=20 share=0.5");
    let (stopped, other) = (create_and_start(&server, spec()), create_and_start(&server, spec()));
    let verified = |id: u64| guest(&server, id)["rounds_verified"].as_u64().unwrap();
    wait_for("both guests to verify", || verified(stopped) >= 1 && verified(other) >= 1);
    // A snapshot of the other guest, to clone while the first is stopped.
    let snap = scratch_dir("sigstop-snap").join("snap");
    assert_eq!(server.call("POST", &format!("/guests/{other}/pause"), None).0, 200);
    let (status, r) = server.call("PUT", &format!("/guests/{other}/snapshot"), Some(serde_json::json!({"dir": snap})));
    assert_eq!(status, 200, "{r}");
    assert_eq!(server.call("POST", &format!("/guests/{other}/resume"), None).0, 200);

    let pid = guest(&server, stopped)["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the guest's process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    wait_for("it to be reported unresponsive", || guest(&server, stopped)["unresponsive"].is_string());
    let g = guest(&server, stopped);
    assert!(g["unresponsive"].as_str().unwrap().contains("stopped"), "{g}");

    // Each call is timed; before, each waited for the stopped process (a
    // merge of another guest 30 s). The bound is loose for a busy host;
    // the figures are printed.
    let slowest = std::cell::Cell::new(Duration::ZERO);
    let timed = |what: &str, expect: u16, method: &str, path: &str, body: Option<Value>| {
        let started = std::time::Instant::now();
        let (status, r) = server.call(method, path, body);
        let took = started.elapsed();
        println!("{what}: {} ms", took.as_millis());
        assert_eq!(status, expect, "{what}: {r}");
        assert!(took < Duration::from_secs(2), "{what} took {took:?}");
        slowest.set(slowest.get().max(took));
        r
    };
    let passes = |r: &Value| r["global"]["full_scans"].as_u64().unwrap();
    let first = timed("GET /dedup/stats", 200, "GET", "/dedup/stats", None);
    for _ in 0..3 {
        timed("GET /guests", 200, "GET", "/guests", None);
        timed("GET /metrics", 200, "GET", "/metrics", None);
        timed("merge of the other guest", 200, "POST", &format!("/guests/{other}/merge"), None);
    }
    let r = timed("merge of the stopped guest", 409, "POST", &format!("/guests/{stopped}/merge"), None);
    assert!(r["error"].as_str().unwrap().contains("stopped"), "{r}");
    let r = timed("pause of the stopped guest", 409, "POST", &format!("/guests/{stopped}/pause"), None);
    assert!(r["error"].as_str().unwrap().contains("stopped"), "{r}");
    let c = timed("a clone", 201, "POST", "/guests", Some(serde_json::json!({"restore": snap})));
    let clone = c["id"].as_u64().unwrap();
    timed("its start", 200, "POST", &format!("/guests/{clone}/start"), None);
    // The scanner goes on with its passes, past the stopped guest.
    wait_for("two more scanner passes", || passes(&server.call("GET", "/dedup/stats", None).1) >= passes(&first) + 2);
    let s = server.call("GET", "/dedup/stats", None).1;
    assert!(s["guests"][stopped.to_string()]["passes_skipped"].as_u64().unwrap() > 0, "{s}");
    println!("slowest call: {} ms", slowest.get().as_millis());

    // It can be deleted, and its books go with it.
    timed("delete of the stopped guest", 204, "DELETE", &format!("/guests/{stopped}"), None);
    assert_eq!(server.call("GET", &format!("/guests/{stopped}"), None).0, 404);
    wait_for("its process to be gone", || !std::path::Path::new(&format!("/proc/{pid}")).exists());

    // The others (the clone too) verify on, uncorrupted.
    for id in [other, clone] {
        let before = verified(id);
        wait_for("another verified round", || verified(id) > before);
        assert_eq!(guest(&server, id)["corrupted_pages"], 0);
        assert!(guest(&server, id)["unresponsive"].is_null());
    }
    let (status, audit) = server.call("GET", "/dedup/audit", None);
    assert_eq!((status, &audit["leaked_frames"]), (200, &serde_json::json!(0)), "{audit}");
}

/// A guest that writes its console for ever fills no disk: its log file
/// stays under `--console-limit`, keeps its newest output, and says that
/// older output was dropped.
#[test]
fn a_chattering_guest_keeps_its_console_file_under_its_cap() {
    let consoles = scratch_dir("console-cap-logs");
    let server =
        Server::start_with("console-cap", &["--console-limit", "64", "--console-dir", consoles.to_str().unwrap()]);
    let spec = serde_json::json!({"kernel": image("memtest"), "memory_mib": 16, "cmdline": "chatter=1"});
    let id = create_and_start(&server, spec);
    let log = consoles.join(format!("guest-{id}.log"));
    let size = || std::fs::metadata(&log).map_or(0, |m| m.len());
    let mut written = 0u64;
    let mut last = 0;
    wait_for("the guest to write its cap three times over", || {
        let now = size();
        assert!(now <= 64 << 10, "the console file grew to {now} bytes");
        if now < last {
            written += last;
        }
        last = now;
        written + now > 3 * (64 << 10)
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("[vmm: older console output dropped]\n"), "{}", &text[..100.min(text.len())]);
    // Whole lines between the first (cut where the drop was) and the last
    // (being written).
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() > 100 && lines[2..lines.len() - 1].iter().all(|l| l.starts_with("chatter ")),
        "a line was mangled"
    );
    let (status, _) = server.call("POST", &format!("/guests/{id}/stop"), None);
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(consoles);
}
