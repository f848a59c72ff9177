//! The REST API over its Unix socket, against a real `vmm serve`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vmm::api::routes::ROUTES;
use vmm::ctl::request;

fn memtest_spec(extra: Value) -> Value {
    let mut spec = json!({"kernel": image("memtest"), "memory_mib": 64, "cmdline": "rounds=0 idle=100 share=0.6"});
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    spec
}

#[test]
fn guests_live_through_the_api() {
    let server = Server::start("api-life");
    for _ in 0..3 {
        let (status, g) = server.call("POST", "/guests", Some(memtest_spec(json!({}))));
        assert_eq!(status, 201, "{g}");
        assert_eq!(g["state"], "created");
        let (status, g) = server.call("POST", &format!("/guests/{}/start", g["id"]), None);
        assert_eq!((status, g["state"].as_str()), (200, Some("running")), "{g}");
    }
    wait_for("merging", || server.call("GET", "/dedup/stats", None).1["global"]["pages_sharing"].as_u64() > Some(1000));
    let (_, stats) = server.call("GET", "/dedup/stats", None);
    assert_eq!(stats["groups"]["0"]["guests"], 3, "{stats}");

    // Pause: its rounds stop; resume: they go on.
    let (status, g) = server.call("POST", "/guests/1/pause", None);
    assert_eq!((status, g["state"].as_str()), (200, Some("paused")));
    let paused_at = rounds(&server, 1);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(rounds(&server, 1), paused_at, "a paused guest made progress");
    assert_eq!(server.call("POST", "/guests/1/resume", None).0, 200);
    wait_for("guest 1 to resume", || rounds(&server, 1) > paused_at);

    // Delete one; the others keep verifying.
    assert_eq!(server.call("DELETE", "/guests/2", None).0, 204);
    assert_eq!(server.call("GET", "/guests/2", None).0, 404);
    let before = [rounds(&server, 0), rounds(&server, 1)];
    wait_for("the others to go on", || rounds(&server, 0) > before[0] + 2 && rounds(&server, 1) > before[1] + 2);
    for id in [0, 1] {
        let (status, g) = server.call("POST", &format!("/guests/{id}/stop"), None);
        assert_eq!((status, g["state"].as_str(), g["clean"].as_bool()), (200, Some("ended"), Some(true)), "{g}");
        let (_, c) = server.call("GET", &format!("/guests/{id}/console"), None);
        assert!(!c["tail"].as_str().unwrap().contains("FAILED"), "{c}");
    }
    let (_, list) = server.call("GET", "/guests", None);
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[test]
fn bad_requests_get_the_right_status_and_a_json_error() {
    let server = Server::start("api-bad");
    let (_, g) = server.call("POST", "/guests", Some(memtest_spec(json!({}))));
    let id = g["id"].as_u64().unwrap();
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        ("POST", "/guests".into(), "{not json".into(), 400, "bad request body"),
        ("POST", "/guests".into(), memtest_spec(json!({"colour": 1})).to_string(), 400, "unknown field `colour`"),
        ("POST", "/guests".into(), memtest_spec(json!({"memory_mib": "lots"})).to_string(), 400, "invalid type"),
        ("POST", "/guests".into(), memtest_spec(json!({"vcpus": 0})).to_string(), 400, "vcpus must be"),
        ("POST", "/guests".into(), json!({"kernel": "/nonexistent"}).to_string(), 400, "/nonexistent"),
        ("POST", "/guests".into(), format!("{{\"kernel\": \"{}\"}}", "x".repeat(100_000)), 413, "larger than"),
        ("GET", "/guests/99".into(), String::new(), 404, "no guest 99"),
        ("GET", "/guests/abc".into(), String::new(), 400, "not a guest id"),
        ("POST", format!("/guests/{id}/resume"), String::new(), 409, "cannot resume"),
        ("POST", format!("/guests/{id}/pause"), String::new(), 409, "cannot pause"),
        ("POST", format!("/guests/{id}/fly"), String::new(), 404, "no such route"),
        ("GET", "/guests/18446744073709551616".into(), String::new(), 400, "not a guest id"),
        ("PATCH", "/dedup/config".into(), "{\"scan_pages\": 0}".into(), 400, "scan_pages"),
        ("PATCH", "/dedup/config".into(), "{\"speed\": 1}".into(), 400, "unknown field"),
        ("PATCH", "/dedup/config".into(), "{\"scan_target_secs\": 1e300}".into(), 400, "scan_target_secs must be"),
        ("PATCH", "/dedup/config".into(), "{\"scan_target_secs\": 1e19}".into(), 400, "scan_target_secs must be"),
        ("PATCH", "/dedup/config".into(), "{\"scan_pages\": 5, \"scan_nice\": 99}".into(), 400, "scan_nice"),
        ("PATCH", "/dedup/config".into(), "{\"scan_pages\": null}".into(), 400, "invalid type: null"),
        ("GET", "/nowhere".into(), String::new(), 404, "no such route"),
        ("PUT", "/guests".into(), String::new(), 405, "method not allowed"),
    ];
    for (method, path, body, status, words) in cases {
        let (got, reply) = server.raw(method, &path, &body);
        assert_eq!(got, status, "{method} {path}: {reply}");
        let error = reply["error"].as_str().unwrap_or_else(|| panic!("{method} {path}: no JSON error: {reply}"));
        assert!(error.contains(words), "{method} {path}: '{error}' does not say '{words}'");
    }
    // A refused update changed nothing, not even its valid parts.
    let (_, config) = server.call("GET", "/dedup/config", None);
    assert_eq!(
        (config["scan_target_secs"].clone(), config["scan_pages"].as_u64()),
        (Value::Null, Some(16384)),
        "{config}"
    );
    // Deleting twice: the second is a 404.
    assert_eq!(server.call("DELETE", &format!("/guests/{id}"), None).0, 204);
    assert_eq!(server.call("DELETE", &format!("/guests/{id}"), None).0, 404);
    // Nothing was left half made.
    assert_eq!(server.call("GET", "/guests", None).1, json!([]));
}

/// Random bodies, from mutations of good ones, never crash the server and
/// always get a 4xx with a JSON error (or a success for a valid body).
#[test]
fn random_bodies_never_break_the_server() {
    let server = Server::start("api-fuzz");
    let seeds = [
        json!({"kernel": "/nonexistent", "memory_mib": 64}).to_string(),
        json!({"scan_pages": 100, "zero_pages": true, "scan_target_secs": 2.5}).to_string(),
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    const ALPHABET: &[u8] = b"{}[]\":,0123456789-.eEtruefalsnl \\xyz_";
    for round in 0..600 {
        let seed = &seeds[round % 2];
        let mut body = seed.as_bytes().to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % (body.len() + 1);
            match next() % 3 {
                0 if at < body.len() => body[at] = ALPHABET[next() as usize % ALPHABET.len()],
                1 if at < body.len() => {
                    body.remove(at);
                }
                _ => body.insert(at, ALPHABET[next() as usize % ALPHABET.len()]),
            }
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let (method, path) = if round % 2 == 0 { ("POST", "/guests") } else { ("PATCH", "/dedup/config") };
        let (status, reply) = server.raw(method, path, &body);
        match status {
            200 => assert!(reply.is_object(), "{body} -> {reply}"),
            400 | 409 | 413 => assert!(reply["error"].is_string(), "{body} -> {status} {reply}"),
            other => panic!("{method} {path} with {body:?} -> {other} {reply}"),
        }
    }
    assert_eq!(server.call("GET", "/guests", None), (200, json!([])));
}

#[test]
fn concurrent_clients_all_get_answers() {
    let server = Server::start("api-load");
    server.call("POST", "/guests", Some(memtest_spec(json!({}))));
    let socket = server.socket.clone();
    let paths = ["/guests", "/dedup/stats", "/host", "/guests/0", "/metrics"];
    let clients: Vec<_> = (0..20)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                for i in 0..100 {
                    let started = Instant::now();
                    let (status, _) = request(&socket, "GET", paths[(c + i) % paths.len()], None).unwrap();
                    latencies.push(started.elapsed());
                    assert_eq!(status, 200);
                }
                latencies
            })
        })
        .collect();
    let mut all: Vec<Duration> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    all.sort();
    eprintln!(
        "API latency, 20 clients x 100 requests: p50 {:?}, p99 {:?}, max {:?}",
        all[all.len() / 2],
        all[all.len() * 99 / 100],
        all[all.len() - 1]
    );
    assert_eq!(all.len(), 2000);
}

fn spec_routes() -> Vec<(String, String)> {
    let spec: Value = serde_json::from_slice(&std::fs::read(repo_root().join("docs/api.json")).unwrap()).unwrap();
    let mut routes: Vec<(String, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect();
    routes.sort();
    routes
}

/// docs/api.json is made from the handlers' types (`vmm api-spec`), so
/// it cannot drift from the code.
#[test]
fn the_spec_is_what_the_code_describes() {
    let committed = std::fs::read_to_string(repo_root().join("docs/api.json")).unwrap();
    let made = vmm::api::routes::openapi_json();
    assert!(
        committed.trim_end() == made.trim_end(),
        "docs/api.json is stale: regenerate it with `cargo run --release -- api-spec > docs/api.json`"
    );
}

#[test]
fn the_spec_and_the_server_have_the_same_routes() {
    let mut ours: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    ours.sort();
    assert_eq!(spec_routes(), ours, "docs/api.json and api::routes::ROUTES differ");
    // And the server answers every one of them (not with the no-route fallback).
    let server = Server::start("api-routes");
    for (method, path) in ROUTES {
        let path = path.replace("{id}", "0");
        let (status, reply) = server.raw(method, &path, "{}");
        let fallback =
            reply["error"].as_str().is_some_and(|e| e == "no such route" || e.starts_with("method not allowed"));
        assert!(!fallback, "{method} {path}: {status} {reply}");
    }
}

#[test]
fn the_socket_is_private_and_a_live_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start("api-socket");
    let mode = std::fs::metadata(&server.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = run_vmm(&["serve", "--api-socket", server.socket.to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("in use by a running server"), "{}", out.describe());
    // A stale socket file (no server behind it) is replaced.
    let stale = server.socket.with_file_name("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(Path::new(&stale).exists());
    let mut child = vmm(&["serve", "--api-socket", stale.to_str().unwrap()]).spawn().unwrap();
    wait_for("the server on the stale path", || std::os::unix::net::UnixStream::connect(&stale).is_ok());
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(!stale.exists(), "the socket was not removed at exit");
    // Anything else at the path is left alone and refused.
    let file = server.socket.with_file_name("precious");
    std::fs::write(&file, "keep me").unwrap();
    let out = run_vmm(&["serve", "--api-socket", file.to_str().unwrap()], Duration::from_secs(20));
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("is not a socket"), "{}", out.describe());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn vmm_run_serves_the_api_while_its_guests_run() {
    let dir = scratch_dir("api-run");
    let socket = dir.join("run.sock");
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
        "rounds=40 idle=50",
        "--api-socket",
        socket.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    wait_for("the run's API", || std::os::unix::net::UnixStream::connect(&socket).is_ok());
    let (status, text) = request(&socket, "GET", "/guests", None).unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let out = wait_with_limit(child, Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(out.stderr.matches("memtest passed: 40 rounds").count(), 2, "{}", out.describe());
    assert!(!socket.exists(), "the socket outlived the run");
}
