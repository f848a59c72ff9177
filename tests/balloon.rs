//! Memory that comes back: guests give pages back through their balloons
//! (inflating, or reporting them free) and the host frees them, with
//! page sharing running, while every page they keep verifies.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn memtest_spec(cmdline: &str) -> Value {
    json!({"kernel": image("memtest"), "memory_mib": 128, "vcpus": 2, "cmdline": cmdline, "balloon": {}})
}

/// What the guest's RAM holds on the host.
fn ram(server: &Server, id: u64) -> u64 {
    guest(server, id)["ram_bytes"].as_u64().unwrap_or_else(|| panic!("no ram_bytes: {}", guest(server, id)))
}

/// Three memtest guests of one seed, sharing pages: one gives back half
/// its pages every round by inflating its balloon and takes them back the
/// round after (each must read zero, then holds its content again), one
/// reports them free instead, one keeps everything. The first two hold
/// far less host memory than the third, every page any of them keeps
/// verifies every round, and the balloons' counts say what happened.
/// A clone of a guest snapshotted with pages in its balloon goes on
/// likewise. Targets are refused, with reasons, for a guest without a
/// balloon, a guest whose driver has not started, and more than a guest
/// has.
#[test]
fn memtest_guests_give_memory_back_every_round_and_verify_the_rest() {
    let server = Server::start("balloon-memtest");
    let common = "rounds=0 seed=9 share=0.3 zero=0";
    let inflating = create_and_start(&server, memtest_spec(&format!("{common} free=0.5")));
    let reporting = create_and_start(&server, memtest_spec(&format!("{common} free=0.5 report=1")));
    let keeping = create_and_start(&server, memtest_spec(common));
    let ids = [inflating, reporting, keeping];
    // Two vCPUs: two "ok" lines a round.
    wait_for("five rounds in each guest", || ids.iter().all(|&id| rounds(&server, id) >= 10));
    // Host memory, sampled across rounds: the most the givers held against
    // the least the keeper held.
    let (mut gave, mut kept) = (0u64, u64::MAX);
    for _ in 0..6 {
        gave = gave.max(ram(&server, inflating)).max(ram(&server, reporting));
        kept = kept.min(ram(&server, keeping));
        std::thread::sleep(Duration::from_millis(400));
    }
    eprintln!(
        "memtest guests giving half back hold at most {} MiB, one keeping all at least {} MiB",
        gave / MIB,
        kept / MIB
    );
    // 70% of 128 MiB is the guests' own (unshared); half of that is out.
    assert!(
        gave + 25 * MIB < kept,
        "guests giving half their pages back hold {} MiB, one keeping them {} MiB",
        gave / MIB,
        kept / MIB
    );
    let (a, b, c) = (guest(&server, inflating), guest(&server, reporting), guest(&server, keeping));
    for g in [&a, &b, &c] {
        assert_eq!(g["corrupted_pages"], 0, "{g}");
        assert_eq!(g["balloon"]["driver_ready"], true, "{g}");
        assert_eq!(g["state"], "running", "{g}");
    }
    let pages = |g: &Value, what: &str| g["balloon"][what].as_u64().unwrap();
    assert!(pages(&a, "inflated_pages") > 10_000 && pages(&a, "deflated_pages") > 5_000, "{a}");
    assert!(a["balloon"]["actual_mib"].as_u64().unwrap() > 10, "{a}");
    assert!(pages(&b, "reported_pages") > 10_000 && pages(&b, "inflated_pages") == 0, "{b}");
    assert_eq!(b["balloon"]["free_page_reporting"], true, "{b}");
    assert_eq!(pages(&c, "inflated_pages") + pages(&c, "reported_pages"), 0, "{c}");
    // Page sharing let go of what was given back, merged or not.
    assert!(a["sharing"]["discarded_pages"].as_u64().unwrap() > 10_000, "{a}");
    assert!(a["sharing"]["merged_pages"].as_u64().unwrap() > 0, "{a}");
    let metrics = server.call("GET", "/metrics", None).1;
    let metrics = metrics.as_str().unwrap_or_default();
    assert!(metrics.contains(&format!("vmm_guest_balloon_pages_total{{guest=\"{reporting}\",how=\"reported\"}}")));

    // A clone of the inflating guest, snapshotted with half its pages in
    // its balloon, goes on giving back and taking back (each taken back
    // must read zero: a hole in the snapshot), and its counts go on.
    assert_eq!(server.call("POST", &format!("/guests/{inflating}/pause"), None).0, 200);
    let snapshot = scratch_dir("balloon-memtest-snapshot").join("snap");
    let (status, r) = server.call("PUT", &format!("/guests/{inflating}/snapshot"), Some(json!({"dir": snapshot})));
    assert_eq!(status, 200, "{r}");
    let at_snapshot = pages(&guest(&server, inflating), "inflated_pages");
    assert_eq!(server.call("POST", &format!("/guests/{inflating}/resume"), None).0, 200);
    let clone = create_and_start(&server, json!({"restore": snapshot}));
    wait_for("two rounds in the clone", || rounds(&server, clone) >= 4);
    let g = guest(&server, clone);
    assert_eq!((&g["corrupted_pages"], &g["state"]), (&json!(0), &json!("running")), "{g}");
    assert!(pages(&g, "inflated_pages") > at_snapshot && pages(&g, "deflated_pages") > 0, "{g}");
    assert_eq!(server.call("DELETE", &format!("/guests/{clone}"), None).0, 204);

    // Targets: taken for a running driver, refused with reasons otherwise.
    let put =
        |id: u64, mib: u64| server.call("PUT", &format!("/guests/{id}/balloon"), Some(json!({"target_mib": mib})));
    let (status, g) = put(keeping, 16);
    assert_eq!((status, &g["balloon"]["target_mib"]), (200, &json!(16)), "{g}");
    let (status, e) = put(keeping, 129);
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("more than guest"), "{e}");
    let no_balloon = create_and_start(&server, memtest_guest("rounds=0"));
    let (status, e) = put(no_balloon, 8);
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("no balloon"), "{e}");
    let (status, created) = server.call("POST", "/guests", Some(memtest_spec("rounds=0")));
    assert_eq!(status, 201, "{created}");
    let (status, e) = put(created["id"].as_u64().unwrap(), 8);
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("driver has not started"), "{e}");
    let (status, e) = server.raw("PUT", &format!("/guests/{keeping}/balloon"), r#"{"target_mib": -1}"#);
    assert_eq!(status, 400, "{e}");

    for id in ids {
        assert_eq!(server.call("POST", &format!("/guests/{id}/stop"), None).0, 200);
    }
    for id in ids {
        wait_for("the guest to end", || guest(&server, id)["state"] == "ended");
        let g = guest(&server, id);
        assert_eq!(g["corrupted_pages"], 0, "{g}");
        let (_, console) = server.call("GET", &format!("/guests/{id}/console"), None);
        assert!(!console["tail"].as_str().unwrap().contains("MISMATCH"), "{console}");
    }
}

/// The same under the freeze (merges stop the guest instead of
/// write-protecting pages), from `vmm run`: both guests pass every round
/// while giving half their pages back, and the run's report says what the
/// balloons gave back.
#[test]
fn vmm_run_guests_give_memory_back_under_the_freeze() {
    let out = run_memtest(&[
        "--guests",
        "2",
        "--memory",
        "128",
        "--vcpus",
        "2",
        "--balloon",
        "--merge-protect",
        "freeze",
        "--cmdline",
        "rounds=4 free=0.5 share=0.5",
    ]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(out.stderr.matches("memtest passed: 4 rounds verified").count(), 2, "{}", out.describe());
    let line = out.stderr.lines().find(|l| l.starts_with("vmm: balloons: 2 of 2 guests' drivers ran"));
    let given: f64 = line
        .and_then(|l| l.split("; ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no balloon report\n{}", out.describe()));
    // Half of 2 x 128 MiB, three times over (rounds 1 to 3; round 4's
    // share too, taken back by nobody).
    assert!(given > 200.0, "{given} MiB given back\n{}", out.describe());
}

/// Linux with a balloon (tiny-linux, its virtio-balloon driver): booted
/// with an initrd the kernel cannot unpack past its initramfs, which it
/// then frees, writing it over (poison) as it does, so its free memory is
/// touched memory. Asked to give 64 MiB back, its driver inflates the
/// balloon and the guest's RAM on the host shrinks by at least 60 MiB;
/// asked for none, it deflates it all. (Page sharing is off for it, so the
/// poisoned pages, all alike, are not merged first; free page reporting
/// is off, or it would give them back before the balloon does.) A second
/// guest, booted beside it with free page reporting and page sharing on,
/// reports its free memory on its own, and the host frees it.
#[test]
fn tiny_linux_inflates_its_balloon_and_its_memory_comes_back() {
    require_kvm();
    let work = scratch_dir("balloon-linux-work");
    let dir = image("tiny-linux");
    let mut initrd = std::fs::read(dir.join("initramfs.cpio.gz")).unwrap();
    initrd.resize(initrd.len().next_multiple_of(4096), 0);
    // Not an archive (0xff is no cpio or compression magic), not alike
    // page to page (so nothing merges it before the kernel frees it).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    initrd.extend((0..96 * MIB / 8).flat_map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x | 0xff).to_le_bytes()
    }));
    let initrd_path = work.join("initrd");
    std::fs::write(&initrd_path, &initrd).unwrap();
    let cmdline = format!("{} tiny_init=idle", vmm::host::HostKind::detect().default_linux_cmdline());
    let server = Server::start("balloon-linux");
    let spec = json!({
        "kernel": dir.join("vmlinux"), "initrd": initrd_path, "memory_mib": 160, "cmdline": cmdline,
        "dedup_opt_out": true, "balloon": {"free_page_reporting": false},
    });
    let id = create_and_start(&server, spec.clone());
    let mut spec = spec;
    spec["balloon"] = json!({});
    spec["dedup_opt_out"] = json!(false);
    spec["initrd"] = json!(work.join("initrd2"));
    // Its own free memory, unlike the first guest's (or sharing would
    // merge the two before the kernel frees them).
    initrd.iter_mut().skip(4096).step_by(4096).for_each(|b| *b ^= 0x55);
    std::fs::write(work.join("initrd2"), &initrd).unwrap();
    let reporting = create_and_start(&server, spec);
    let console = || server.call("GET", &format!("/guests/{id}/console"), None).1["tail"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(400);
    while !(console().contains("Run /init") && guest(&server, id)["balloon"]["driver_ready"] == true) {
        assert!(std::time::Instant::now() < deadline, "no Run /init and balloon driver in 400 s:\n{}", console());
        assert_eq!(guest(&server, id)["state"], "running", "{}", console());
        std::thread::sleep(Duration::from_millis(500));
    }
    let ram = || guest(&server, id)["ram_bytes"].as_u64().unwrap();
    let before = ram();
    // The reporting guest gave back its free memory unasked.
    let reported = || guest(&server, reporting)["balloon"]["reported_pages"].as_u64().unwrap() * 4096;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while reported() < 96 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "{} MiB reported: {}",
            reported() / MIB,
            guest(&server, reporting)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = guest(&server, reporting);
    let reporting_ram = r["ram_bytes"].as_u64().unwrap();
    assert!(
        reporting_ram + 60 * MIB < before,
        "with reporting {} MiB, without {} MiB",
        reporting_ram / MIB,
        before / MIB
    );
    assert!(r["balloon"]["stats"]["free_memory"].as_u64().unwrap() > 96 * MIB, "{r}");
    assert!(r["sharing"]["discarded_pages"].as_u64().unwrap() > 0, "{r}");
    let put = |mib: u64| server.call("PUT", &format!("/guests/{id}/balloon"), Some(json!({"target_mib": mib})));
    let (status, g) = put(64);
    assert_eq!((status, &g["balloon"]["target_mib"]), (200, &json!(64)), "{g}");
    let balloon = || guest(&server, id)["balloon"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while balloon()["actual_mib"] != 64 {
        assert!(std::time::Instant::now() < deadline, "the balloon did not reach 64 MiB: {}", balloon());
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = ram();
    assert!(before >= after + 60 * MIB, "RAM {} MiB before inflating 64 MiB, {} MiB after", before / MIB, after / MIB);
    let b = balloon();
    assert_eq!((b["inflated_pages"].as_u64(), b["bad_pages"].as_u64()), (Some(16384), Some(0)), "{b}");
    assert_eq!(put(0).0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while balloon()["actual_mib"] != 0 {
        assert!(std::time::Instant::now() < deadline, "the balloon did not deflate: {}", balloon());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(balloon()["deflated_pages"], 16384);
    assert_eq!(guest(&server, id)["state"], "running", "{}", console());
    eprintln!(
        "tiny-linux RAM on the host: {} MiB, {} MiB with 64 MiB in its balloon; {} MiB with free page reporting",
        before / MIB,
        after / MIB,
        reporting_ram / MIB
    );
    std::fs::remove_dir_all(work).unwrap();
}
