//! The pool of guest processes started ahead of need (`--pool`): what it
//! holds, that a pooled process that dies is replaced, that guests are
//! made from it and jailed as any, and that it never outlives the
//! supervisor.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

fn pool(server: &Server) -> Value {
    let (status, host) = server.call("GET", "/host", None);
    assert_eq!(status, 200, "{host}");
    host["pool"].clone()
}

fn pids(pool: &Value) -> Vec<u64> {
    pool["pids"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect()
}

fn alive(pid: u64) -> bool {
    // A zombie has exited: only a process that still runs counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[test]
fn a_pooled_process_that_dies_is_replaced_and_guests_come_from_the_pool() {
    let server = Server::start_with("pool-replaced", &["--pool", "2"]);
    wait_for("a full pool", || pool(&server)["ready"] == 2);
    let before = pids(&pool(&server));
    assert_eq!(pool(&server)["size"], 2);
    for &pid in &before {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(cmdline.split(|&b| b == 0).any(|a| a == b"guest"), "pid {pid} is not a guest process");
    }

    // SAFETY: kill(2) with a plain signal; the pid is the pool's process.
    unsafe { libc::kill(before[0] as i32, libc::SIGKILL) };
    wait_for("the dead one replaced", || {
        let p = pool(&server);
        p["replaced"] == 1 && p["ready"] == 2 && !pids(&p).contains(&before[0])
    });
    assert!(!alive(before[0]), "the killed process was not reaped");

    // A guest made now takes a pooled process (the oldest), jailed as any.
    let ready = pids(&pool(&server));
    let id = create_and_start(&server, memtest_guest("rounds=0 idle=50"));
    let g = guest(&server, id);
    let pid = g["pid"].as_u64().unwrap();
    assert_eq!(pid, ready[0], "guest {id} did not get the pool's oldest process: {g}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    assert!(!uid.contains("\t0\t"), "a pooled guest process still runs as root: {uid}");
    wait_for("a verified round", || rounds(&server, id) >= 1);
    assert_eq!(guest(&server, id)["corrupted_pages"], 0);
    wait_for("the pool refilled", || pool(&server)["ready"] == 2);
}

#[test]
fn without_a_pool_host_shows_none_and_guests_still_run() {
    let server = Server::start_with("pool-none", &["--pool", "0"]);
    assert_eq!(pool(&server), Value::Null);
    let id = create_and_start(&server, memtest_guest("rounds=0 idle=50"));
    wait_for("a verified round", || rounds(&server, id) >= 1);
}

#[test]
fn the_pool_never_outlives_the_supervisor() {
    let server = Server::start_with("pool-outlive", &["--pool", "3"]);
    wait_for("a full pool", || pool(&server)["ready"] == 3);
    let spares = pids(&pool(&server));
    assert!(spares.iter().all(|&p| alive(p)));
    let mut server = server;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while spares.iter().any(|&p| alive(p)) {
        assert!(std::time::Instant::now() < deadline, "pooled processes outlived a killed supervisor: {spares:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_pool_size_out_of_range_is_refused_by_name() {
    let out =
        run_vmm(&["serve", "--api-socket", "/tmp/vmm-pool-bad.sock", "--pool", "100000"], Duration::from_secs(10));
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--pool must be between 0 and 256"), "{}", out.describe());
}
