//! The soak: churn guests created, paused, resumed, merged on request and
//! deleted through the API at random for VMM_SOAK_MINUTES (default 10)
//! minutes; it ends with the rounds verified, the mismatches (must be 0),
//! the frames leaked (must be 0) and the stores' size against their live
//! frames. Not part of the default test run (it is long):
//!
//! `cargo test --release -p vmm --test soak -- --ignored --nocapture`

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Rounds verified and mismatching lines over every console log in `dir`.
fn console_totals(dir: &std::path::Path) -> (usize, usize) {
    let (mut ok, mut bad) = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
        ok += log.matches(" ok\n").count();
        bad += log.matches("FAILED").count() + log.matches("MISMATCH").count();
    }
    (ok, bad)
}

#[test]
#[ignore = "a long soak: run with --ignored (docs/benchmarks.md)"]
fn soak_guests_coming_and_going_under_sharing() {
    let minutes: u64 = std::env::var("VMM_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(10);
    let consoles = scratch_dir("soak-consoles");
    let server = Server::start_with("soak", &["--console-dir", consoles.to_str().unwrap(), "--scan-sleep-ms", "2"]);
    let spec = |seed: u64| {
        json!({"kernel": image("memtest"), "memory_mib": 64, "vcpus": 2,
               "cmdline": format!("rounds=0 seed={} share=0.6 zero=0.1 volatile=32 churn=256 near=0.2 hammer=200 idle=20", seed % 3)})
    };
    let mut live: Vec<u64> = Vec::new();
    let mut rng = 0x5eed_1234_abcd_9876u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut created, mut deleted, mut merges, mut pauses, mut audits) = (0, 0, 0, 0, 0);
    let started = Instant::now();
    let mut last_audit = Instant::now();
    while started.elapsed() < Duration::from_secs(minutes * 60) {
        let r = next();
        if live.len() < 3 || (live.len() < 6 && r % 7 == 0) {
            let (status, g) = server.call("POST", "/guests", Some(spec(r)));
            assert_eq!(status, 201, "{g}");
            let id = g["id"].as_u64().unwrap();
            assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
            live.push(id);
            created += 1;
            continue;
        }
        let id = live[(r >> 8) as usize % live.len()];
        match (r >> 16) % 10 {
            0..=3 => {
                assert_eq!(server.call("POST", &format!("/guests/{id}/merge"), None).0, 200);
                merges += 1;
            }
            4 | 5 => {
                assert_eq!(server.call("POST", &format!("/guests/{id}/pause"), None).0, 200);
                std::thread::sleep(Duration::from_millis(100));
                assert_eq!(server.call("POST", &format!("/guests/{id}/resume"), None).0, 200);
                pauses += 1;
            }
            6 if live.len() > 3 => {
                assert_eq!(server.call("DELETE", &format!("/guests/{id}"), None).0, 204);
                live.retain(|&g| g != id);
                deleted += 1;
            }
            _ => {}
        }
        for &g in &live {
            let (_, info) = server.call("GET", &format!("/guests/{g}"), None);
            assert_eq!(info["corrupted_pages"], 0, "{info}");
            assert_ne!(info["state"], "ended", "a guest ended by itself: {info}");
        }
        if last_audit.elapsed() > Duration::from_secs(30) {
            last_audit = Instant::now();
            let (_, audit) = server.call("GET", "/dedup/audit", None);
            assert_eq!(audit["leaked_frames"], 0, "{audit}");
            audits += 1;
        }
        std::thread::sleep(Duration::from_millis(200 + next() % 400));
    }
    let (_, stats) = server.call("GET", "/dedup/stats", None);
    let (_, audit_live) = server.call("GET", "/dedup/audit", None);
    for id in live.drain(..) {
        assert_eq!(server.call("DELETE", &format!("/guests/{id}"), None).0, 204);
    }
    // Every guest gone: every frame must be gone too.
    wait_for("the last guests to leave page sharing", || {
        server.call("GET", "/dedup/audit", None).1["live_frames"] == 0
    });
    let (_, audit_end) = server.call("GET", "/dedup/audit", None);
    let (rounds, bad) = console_totals(&consoles);
    let g: &Value = &stats["global"];
    eprintln!(
        "soak: {minutes} min, {created} guests made, {deleted} deleted, {merges} merges on request, {pauses} pauses; \
         {rounds} vCPU rounds verified, {bad} mismatching; {} pages saved at the end, {} copy-on-write breaks, \
         {} failures counted; frames: {} live, {} leaked ({audits} audits); stores {} pages; after the last \
         guest: {} live frames, {} store pages",
        g["pages_saved"],
        g["cow_breaks"],
        g["errors"],
        audit_live["live_frames"],
        audit_live["leaked_frames"],
        audit_live["store_pages"],
        audit_end["live_frames"],
        audit_end["store_pages"],
    );
    assert_eq!(bad, 0, "pages mismatched");
    assert!(rounds > 100, "the guests barely ran");
    assert_eq!(audit_live["leaked_frames"], 0, "{audit_live}");
    assert!(audit_live["store_pages"].as_u64() <= audit_live["live_frames"].as_u64(), "{audit_live}");
    assert_eq!((audit_end["live_frames"].as_u64(), audit_end["store_pages"].as_u64()), (Some(0), Some(0)));
}
