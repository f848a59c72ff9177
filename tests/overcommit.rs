//! Overcommit without the OOM killer: guests given more RAM than the memory
//! cgroup the VMM runs in allows, all at once, are held back (throttled, or
//! started in waves) while page sharing makes room, and finish verified
//! with no OOM kill; when their unique memory cannot fit, exactly one guest
//! is ended, with a "not enough memory" reason, and the rest finish.
//!
//! Each test runs the VMM in a memory cgroup of its own with a limit, made
//! under this process's cgroup: it needs root (or a delegated memory
//! controller) and fails saying so otherwise.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vmm::supervisor::cgroup::MemoryCgroup;

const MIB: u64 = 1 << 20;

/// One at a time: each fills its guests as fast as two cores allow, and
/// the governor must react within milliseconds; two at once on a two-core
/// host would measure the scheduler as much as the governor.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn limited_cgroup(name: &str, limit_mib: u64) -> MemoryCgroup {
    let cg = MemoryCgroup::create(&format!("vmm-test-{name}-{}", std::process::id()), None).unwrap_or_else(|e| {
        panic!("these tests run the VMM in a memory cgroup with a limit, and none can be made here ({e}): run as root")
    });
    cg.set_limit(limit_mib * MIB).unwrap();
    cg
}

fn guests(server: &Server) -> Vec<Value> {
    server.call("GET", "/guests", None).1.as_array().cloned().unwrap_or_default()
}

/// Six guests of 128 MiB (1.5x the 512 MiB limit), 80% of their pages
/// alike, created and started through the API all at once: the API starts
/// what it is asked to, and with the scanner slowed down (a step every
/// 500 ms) they fill faster than it merges, so the governor must throttle
/// them and have them merged first.
#[test]
fn guests_over_the_limit_are_throttled_and_all_finish() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cg = limited_cgroup("throttled", 512);
    let socket = scratch_dir("overcommit-throttled").join("api.sock");
    let mut command =
        vmm(&["serve", "--api-socket", socket.to_str().unwrap(), "--overcommit", "--scan-sleep-ms", "500"]);
    cg.enroll(&mut command);
    let server = Server::spawn(command, socket);
    let spec = json!({"kernel": image("memtest"), "memory_mib": 128, "cmdline": "rounds=8 share=0.8 zero=0.05 seed=5"});
    for id in 0..6 {
        let (status, g) = server.call("POST", "/guests", Some(spec.clone()));
        assert_eq!(status, 201, "{g}");
        let (status, g) = server.call("POST", &format!("/guests/{id}/start"), None);
        assert_eq!(status, 200, "{g}");
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    while !guests(&server).iter().all(|g| g["state"] == "ended") {
        assert!(Instant::now() < deadline, "the guests did not finish: {:#?}", guests(&server));
        std::thread::sleep(Duration::from_millis(200));
    }
    let all = guests(&server);
    for g in &all {
        assert_eq!(g["clean"], true, "guest {} did not finish verified: {}", g["id"], g["end"]);
        assert!(g["end"].as_str().unwrap().contains("8 rounds verified"), "{}", g["end"]);
    }
    assert_eq!(cg.oom_kills(), 0, "the kernel's OOM killer acted");
    let throttled: u64 = all.iter().map(|g| g["throttled_ms"].as_u64().unwrap()).sum();
    assert!(throttled > 0, "nothing was throttled, so nothing was tested: {all:#?}");
    let metrics = vmm::ctl::request(&server.socket, "GET", "/metrics", None).unwrap().1;
    assert!(metrics.contains("vmm_guest_throttled_seconds_total{guest=\"0\"}"), "{metrics}");
    // The host's memory stall (PSI) is reported where the kernel keeps it.
    let psi = std::path::Path::new("/proc/pressure/memory").exists();
    assert_eq!(metrics.contains("vmm_host_memory_stall_seconds_total{tasks=\"some\"}"), psi, "{metrics}");
}

/// Four guests of 96 MiB whose pages are all their own, in 400 MiB: three
/// fit, the fourth cannot. `vmm run` starts it once the others are quiet;
/// it is throttled, sharing finds nothing to give back, and it is ended
/// for memory; the other three finish verified. (They run 400 rounds, about
/// 16 s here, so that they are still holding their memory when the governor
/// has waited its 5 s for room: with 150 they once finished first, and the
/// fourth then had room.)
#[test]
fn when_sharing_cannot_make_room_one_guest_is_ended() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cg = limited_cgroup("unique", 400);
    let dir = scratch_dir("overcommit-unique");
    let stats = dir.join("stats.json");
    let memtest = image("memtest");
    let mut command = vmm(&[
        "run",
        "--guests",
        "4",
        "--memory",
        "96",
        "--overcommit",
        "--kernel",
        memtest.to_str().unwrap(),
        "--cmdline",
        "rounds=400 share=0 zero=0 seed=9",
        "--console-dir",
        dir.to_str().unwrap(),
        "--stats-file",
        stats.to_str().unwrap(),
    ]);
    cg.enroll(&mut command);
    require_kvm();
    let out = wait_with_limit(command.spawn().unwrap(), Duration::from_secs(300));
    let ended: Vec<&str> = out.stderr.lines().filter(|l| l.contains("ended for memory: not enough memory")).collect();
    assert_eq!(ended.len(), 1, "exactly one guest is ended for memory\n{}", out.describe());
    assert!(ended[0].starts_with("vmm: guest 3:"), "the one that wanted more is ended\n{}", out.describe());
    let passed = out.stderr.lines().filter(|l| l.contains("memtest passed: 400 rounds verified")).count();
    assert_eq!(passed, 3, "the other three finish\n{}", out.describe());
    assert_eq!(out.code, Some(1), "a guest ended for memory is a failure\n{}", out.describe());
    assert_eq!(cg.oom_kills(), 0, "the kernel's OOM killer acted\n{}", out.describe());
    let stats = vmm::stats_file::RunStats::read_from(Path::new(&stats)).unwrap();
    assert_eq!(stats.guests_ended_for_memory, 1);
    assert!(stats.created.iter().any(|c| c.waited_ms > 0.0), "no guest waited to start: {stats:?}");
}
