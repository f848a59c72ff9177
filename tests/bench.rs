//! `vmm bench` end to end: small guests, short runs, every figure checked
//! for sense, and kernel KSM left as it was found.

mod common;

use std::time::Duration;

use common::*;

const KSM_KNOBS: [&str; 4] = ["run", "pages_to_scan", "sleep_millisecs", "advisor_mode"];

fn ksm_settings() -> Vec<String> {
    KSM_KNOBS.iter().map(|k| std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{k}")).unwrap_or_default()).collect()
}

fn images_dir() -> String {
    image("memtest");
    repo_root().join("guest-images/out").to_str().unwrap().to_string()
}

#[test]
fn bench_compares_the_modes_and_restores_ksm() {
    require_kvm();
    let dir = scratch_dir("bench");
    let (json, plot, tmp) = (dir.join("bench.json"), dir.join("bench.svg"), dir.join("tmp"));
    std::fs::create_dir(&tmp).unwrap();
    let ksm_before = ksm_settings();
    let mut bench = vmm(&[
        "bench",
        "--images-dir",
        &images_dir(),
        "--guests",
        "2",
        "--memory",
        "64",
        "--duration",
        "8",
        "--modes",
        "inprocess,off,ksm-matched",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let out = wait_with_limit(bench.env("TMPDIR", &tmp).spawn().unwrap(), Duration::from_secs(240));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the bench's temporary work dir was left behind");
    assert_eq!(ksm_settings(), ksm_before, "KSM settings were not restored");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let modes = report["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["off", "inprocess", "ksm-matched"], "modes run in their fixed order");
    let mode = |name: &str| modes.iter().find(|m| m["mode"] == name).unwrap();
    let f = |name: &str, key: &str| mode(name)[key].as_f64().unwrap_or_else(|| panic!("{name}.{key}"));
    for name in names {
        assert_eq!(mode(name)["guests_failed"], 0, "{name}: a guest failed verification\n{}", out.describe());
        assert!(mode(name)["samples"].as_array().unwrap().len() >= 14, "{name}: too few samples");
        // The guests' 128 MiB are all touched, so a run uses a good part of it.
        assert!(f(name, "steady_memory_mib") > 20.0, "{name}: implausible memory");
    }
    assert_eq!(f("off", "saved_mib"), 0.0);
    assert!(f("inprocess", "saved_mib") > 10.0, "in-process sharing saved nothing");
    assert!(f("ksm-matched", "saved_mib") > 10.0, "KSM saved nothing");
    assert!(f("inprocess", "overcommit_ratio") > 1.2 * f("off", "overcommit_ratio"));
    assert!(f("inprocess", "cpu_s") > 0.0 && f("ksm-matched", "cpu_s") > 0.0);
    assert!(mode("ksm-matched")["ksm_pages_to_scan"].as_u64().is_some());
    assert_eq!(report["ratios"][0]["versus"], "ksm-matched");

    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 3, "{svg}");
    assert!(out.stdout.contains("| inprocess |") && out.stdout.contains("inprocess vs ksm-matched"), "{}", out.stdout);
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--clone`: clones of a template against booted guests, each run in a
/// memory cgroup with a limit (`--host-memory`); every start-up and limit
/// figure is there and makes sense.
#[test]
fn bench_clones_against_booted_guests_under_a_memory_limit() {
    require_kvm();
    let dir = scratch_dir("bench-clone");
    let json = dir.join("bench.json");
    let args = ["--guests", "3", "--memory", "64", "--duration", "8", "--clone", "--host-memory", "400"];
    let images = images_dir();
    let mut all = vec!["bench", "--images-dir", images.as_str(), "--json", json.to_str().unwrap()];
    all.extend(args);
    let out = wait_with_limit(vmm(&all).spawn().unwrap(), Duration::from_secs(240));
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let modes = report["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["inprocess", "cloned"]);
    let f = |m: &serde_json::Value, key: &str| m[key].as_f64().unwrap_or_else(|| panic!("{}.{key}", m["mode"]));
    for m in modes {
        assert_eq!(
            m["guests_failed"],
            0,
            "{}
{}",
            m["mode"],
            out.describe()
        );
        assert_eq!((m["oom_kills"].as_u64(), m["guests_killed"].as_u64()), (Some(0), Some(0)));
        assert!(
            f(m, "all_verified_s") > 0.0
                && f(m, "create_p50_ms") > 0.0
                && f(m, "create_p99_ms") >= f(m, "create_p50_ms")
        );
        assert!(f(m, "peak_memory_mib") <= 400.0 + 1.0, "{}: more than the limit", m["mode"]);
        let psi = std::path::Path::new("/proc/pressure/memory").exists();
        assert_eq!(
            m["memory_stall_s"].as_f64().is_some_and(|s| s >= 0.0),
            psi,
            "{}: the host's memory stall",
            m["mode"]
        );
    }
    let (booted, cloned) = (&modes[0], &modes[1]);
    // A booted guest has loaded its OS image (about 12 MiB) before it runs;
    // a clone's memory is all on shared frames.
    assert!(f(cloned, "memory_at_create_mib") * 2.0 < f(booted, "memory_at_create_mib"), "{}", out.stdout);
    assert!(f(cloned, "saved_mib") > 64.0, "clones share their snapshot from the start");
    assert!(report["template"]["pages"].as_u64().unwrap() > 1000);
    assert!(report["clone_ratios"]["memory_at_create"].as_f64().unwrap() > 2.0);
    assert!(out.stdout.contains("In 400 MiB") && out.stdout.contains("| cloned | yes |"), "{}", out.stdout);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_refuses_what_it_cannot_do() {
    let images = images_dir();
    let tmp = scratch_dir("bench-refusals");
    let cases: [(&[&str], &str); 6] = [
        (&["--modes", "off,ksm-matched"], "needs inprocess"),
        (&["--clone", "--image", "tiny-linux"], "cloned mode needs --image memtest"),
        (&["--host-memory", "10"], "--host-memory"),
        (&["--guests", "1000", "--memory", "65536"], "more than the"),
        (&["--duration", "1"], "--duration must be at least 5"),
        (&["--images-dir", "/nonexistent"], "guest-images/build.sh"),
    ];
    for (args, expected) in cases {
        let mut all = vec!["bench"];
        if !args.contains(&"--images-dir") {
            all.extend(["--images-dir", &images]);
        }
        all.extend_from_slice(args);
        let out = wait_with_limit(vmm(&all).env("TMPDIR", &tmp).spawn().unwrap(), Duration::from_secs(30));
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.describe());
        assert!(out.stderr.contains(expected), "{args:?}: expected '{expected}'\n{}", out.describe());
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{args:?}: a refusal left files behind");
    }
    std::fs::remove_dir_all(tmp).unwrap();
}
