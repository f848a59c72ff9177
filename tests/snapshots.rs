//! Snapshots and clones: a guest written to a directory while paused, and
//! guests started from it that go on where it left off.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A memtest template made through the API, started, run for `rounds`
/// rounds (so its memory is filled), paused and written to a fresh
/// directory; returns the directory and the snapshot's reply.
fn snapshot_memtest(server: &Server, name: &str, spec: Value, rounds_first: usize) -> (u64, PathBuf, Value) {
    let (status, g) = server.call("POST", "/guests", Some(spec));
    assert_eq!(status, 201, "{g}");
    let id = g["id"].as_u64().unwrap();
    assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
    // Its first vCPU too (with two, one may run rounds ahead of the other
    // on a busy host): a clone's vCPU 0 must have a round to go on from.
    wait_for("the template to fill its memory", || {
        rounds(server, id) >= rounds_first
            && server.call("GET", &format!("/guests/{id}/console"), None).1["tail"].as_str().is_some_and(|c| {
                c.lines().any(|l| {
                    l.strip_prefix("memtest: vcpu 0 round ")
                        .and_then(|r| r.strip_suffix(" ok")?.parse::<usize>().ok())
                        .is_some_and(|n| n >= 2)
                })
            })
    });
    let dir = scratch_dir(&format!("{name}-dir")).join("snapshot");
    let (status, refused) = server.call("PUT", &format!("/guests/{id}/snapshot"), Some(json!({"dir": dir})));
    assert_eq!(status, 409, "a running guest was snapshotted: {refused}");
    assert!(refused["error"].as_str().unwrap().contains("pause it"), "{refused}");
    assert!(!dir.exists(), "a refused snapshot left its directory");
    assert_eq!(server.call("POST", &format!("/guests/{id}/pause"), None).0, 200);
    let (status, written) = server.call("PUT", &format!("/guests/{id}/snapshot"), Some(json!({"dir": dir})));
    assert_eq!(status, 200, "{written}");
    (id, dir, written)
}

fn memtest(cmdline: &str, memory_mib: u64, vcpus: u64) -> Value {
    json!({"kernel": image("memtest"), "memory_mib": memory_mib, "vcpus": vcpus, "cmdline": cmdline})
}

/// The console lines of a run's guest `id`.
fn console(dir: &Path, id: usize) -> String {
    std::fs::read_to_string(dir.join(format!("guest-{id}.log"))).unwrap_or_default()
}

#[test]
fn memtest_clones_go_on_from_the_snapshot_and_verify_every_round() {
    let server = Server::start("snap-memtest");
    let spec = memtest("rounds=40 seed=5 share=0.6 zero=0.1 volatile=64 churn=128 near=0.1 idle=30", 64, 2);
    let (template, dir, written) = snapshot_memtest(&server, "snap-memtest", spec, 3);
    let pages = written["pages"].as_u64().unwrap();
    assert!(pages > 8_000 && pages < 16_384, "{written}: 64 MiB, about 70% of it not zero");
    assert!(written["held_ms"].as_f64().is_some(), "{written}");
    let memory_blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(dir.join("memory")).unwrap());
    assert!(memory_blocks * 512 < 60 << 20, "the memory file is not sparse: {} bytes", memory_blocks * 512);
    let (status, again) = server.call("PUT", &format!("/guests/{template}/snapshot"), Some(json!({"dir": dir})));
    assert_eq!(status, 409, "a snapshot overwrote another: {again}");

    // Quiet for longer than tokio keeps an idle blocking thread (10 s): a
    // guest must not die with the thread that made it.
    std::thread::sleep(Duration::from_secs(12));
    let (_, g) = server.call("GET", &format!("/guests/{template}"), None);
    assert_eq!(g["state"], "paused", "{g}");

    // Eight clones in a run of their own.
    let consoles = scratch_dir("snap-memtest-clones");
    let out = run_vmm(
        &[
            "run",
            "--restore",
            dir.to_str().unwrap(),
            "--guests",
            "8",
            "--console-dir",
            consoles.to_str().unwrap(),
            "--scan-pages",
            "16384",
            "--scan-sleep-ms",
            "5",
        ],
        Duration::from_secs(300),
    );
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(out.stderr.matches("memtest passed: 40 rounds verified").count(), 8, "{}", out.describe());
    for id in 0..8 {
        let log = console(&consoles, id);
        // It went on: no boot banner, and its first round is past the template's.
        assert!(!log.contains("memtest: guest "), "clone {id} booted afresh:\n{log}");
        let first: usize = log
            .lines()
            .find_map(|l| l.strip_prefix("memtest: vcpu 0 round ")?.strip_suffix(" ok")?.parse().ok())
            .unwrap_or_else(|| panic!("clone {id} verified nothing:\n{log}"));
        assert!(first >= 2, "clone {id} started over at round {first}");
    }
    // Clones of one guest are the same memory: nearly all of it merges.
    let saved: u64 = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmm: page sharing: ")?.split(" pages").next()?.split('(').nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no sharing report\n{}", out.describe()));
    assert!(saved >= 7 * pages * 8 / 10, "clones saved {saved} pages of {} possible\n{}", 7 * pages, out.describe());
    // The run says how long the clones took from their requests.
    assert!(
        out.stderr.lines().any(|l| l.starts_with("vmm: from each guest's request: made p50 ")
            && l.contains("first instruction p50 ")
            && l.contains("first verified round p50 ")
            && l.contains("(8 guests)")),
        "{}",
        out.describe()
    );

    // And one clone into the server that made the snapshot: all of its
    // memory is on shared frames before it first runs, and costs its
    // process next to nothing.
    let (status, clone) = server.call("POST", "/guests", Some(json!({"restore": dir})));
    assert_eq!(status, 201, "{clone}");
    assert_eq!((clone["spec"]["memory_mib"].as_u64(), clone["spec"]["vcpus"].as_u64()), (Some(64), Some(2)), "{clone}");
    let id = clone["id"].as_u64().unwrap();
    // Every page on a frame (those written, and zero pages in short runs,
    // laid out with them) or on the zero page.
    wait_for("the clone's adopted pages in the stats", || {
        let g = &server.call("GET", "/dedup/stats", None).1["guests"][id.to_string()];
        let (merged, zero) = (g["merged_pages"].as_u64().unwrap_or(0), g["zero_pages"].as_u64().unwrap_or(0));
        merged >= pages && merged + zero == 64 << 8
    });
    let (_, created) = server.call("GET", &format!("/guests/{id}"), None);
    let memory = created["memory_bytes"].as_u64().unwrap_or(0);
    assert!(memory < pages * 4096 / 4, "a clone's process holds {memory} bytes of a {pages}-page snapshot");
    assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
    wait_for("the clone to verify rounds", || rounds(&server, id) >= 3);
    // Made, then first in the guest, then a round verified, each timed
    // from its request.
    let t = &server.call("GET", &format!("/guests/{id}"), None).1["timings"];
    let step = |name: &str| t[name].as_f64().unwrap_or_else(|| panic!("no {name}: {t}"));
    let (made, first, round) = (step("made_ms"), step("first_instruction_ms"), step("first_round_ms"));
    assert!(0.0 < made && made <= first && first <= round, "{t}");

    // A clone can be snapshotted in turn, and its clone goes on from there.
    assert_eq!(server.call("POST", &format!("/guests/{id}/pause"), None).0, 200);
    let again = scratch_dir("snap-memtest-again").join("snapshot");
    let (status, written) = server.call("PUT", &format!("/guests/{id}/snapshot"), Some(json!({"dir": again})));
    assert_eq!(status, 200, "{written}");
    let (status, grandchild) = server.call("POST", "/guests", Some(json!({"restore": again})));
    assert_eq!(status, 201, "{grandchild}");
    assert_eq!(grandchild["spec"]["kernel"], clone["spec"]["kernel"], "{grandchild}");
    let second = grandchild["id"].as_u64().unwrap();
    assert_eq!(server.call("POST", &format!("/guests/{second}/start"), None).0, 200);
    wait_for("the clone's clone to verify rounds", || rounds(&server, second) >= 3);
    for g in [id, second] {
        let (_, ended) = server.call("POST", &format!("/guests/{g}/stop"), None);
        assert_eq!(ended["clean"], true, "{ended}");
    }
}

#[test]
fn bad_snapshots_are_refused_and_start_nothing() {
    let server = Server::start("snap-bad");
    let (_, dir, _) = snapshot_memtest(&server, "snap-bad", memtest("rounds=0 seed=2 idle=50", 16, 1), 1);
    let (_, before) = server.call("GET", "/guests", None);
    let copy = |name: &str| -> PathBuf {
        let to = scratch_dir(name);
        for f in ["state.json", "memory"] {
            std::fs::copy(dir.join(f), to.join(f)).unwrap();
        }
        to
    };
    let truncated = copy("snap-bad-truncated");
    std::fs::OpenOptions::new().write(true).open(truncated.join("memory")).unwrap().set_len(8 << 20).unwrap();
    let other_version = copy("snap-bad-version");
    let state = std::fs::read_to_string(other_version.join("state.json")).unwrap();
    std::fs::write(
        other_version.join("state.json"),
        state.replacen(&format!("\"version\":{}", vmm::snapshot::VERSION), "\"version\":7", 1),
    )
    .unwrap();
    let cut_state = copy("snap-bad-cut");
    std::fs::write(cut_state.join("state.json"), &state[..state.len() / 2]).unwrap();
    let cases: [(&Path, &str); 4] = [
        (&scratch_dir("snap-bad-empty"), "no state.json"),
        (&truncated, "truncated"),
        (&other_version, "version 7"),
        (&cut_state, "truncated"),
    ];
    for (bad, why) in cases {
        let (status, e) = server.call("POST", "/guests", Some(json!({"restore": bad})));
        assert_eq!(status, 400, "{e}");
        assert!(e["error"].as_str().unwrap().contains(why), "expected '{why}': {e}");
        let out = run_vmm(&["run", "--restore", bad.to_str().unwrap(), "--guests", "2"], Duration::from_secs(30));
        assert_ne!(out.code, Some(0), "{}", out.describe());
        assert!(out.stderr.contains(why), "expected '{why}'\n{}", out.describe());
        assert!(!out.stderr.contains("vmm: guest "), "a guest started\n{}", out.describe());
    }
    let (status, e) = server.call("POST", "/guests", Some(json!({"restore": dir, "kernel": image("memtest")})));
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("not both"), "{e}");
    let (status, e) = server.call("POST", "/guests", Some(json!({"restore": dir, "transport": "pci"})));
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("keeps its snapshot's devices"), "{e}");
    let (status, e) = server.call("POST", "/guests", Some(json!({"kernel": image("memtest"), "transport": "usb"})));
    assert_eq!(status, 400, "{e}");
    let ids =
        |list: Value| -> Vec<u64> { list.as_array().unwrap().iter().map(|g| g["id"].as_u64().unwrap()).collect() };
    assert_eq!(ids(before), ids(server.call("GET", "/guests", None).1), "a refused restore left a guest behind");
}

/// Linux boots from its disk image (the kernel, initrd and command line
/// its Boot Loader Specification entry names) on our ACPI tables with its
/// disk on PCI, is paused mid-boot and restored four times: each clone boots on to its init (the marker its
/// init prints on hardware KVM; on PVM hosts, where user space cannot make
/// system calls, the kernel's line) from where the snapshot left off, which
/// only works if its vCPU, interrupt controller, timer and serial port state
/// came through; each probes its virtio-pci disk (BAR, MSI-X, queue: the
/// PCI state the snapshot kept) and reads its partition table
/// through its own overlay, and the image never changes. The clones also
/// share their kernel's pages, and each one's balloon driver starts. (This is the suite's Linux boot and disk
/// test: one boot and four part-boots instead of seven whole boots.)
#[test]
fn tiny_linux_booted_from_its_disk_image_snapshotted_mid_boot_boots_on_in_four_clones() {
    let work = scratch_dir("snap-linux-work");
    // The template boots its disk image: tiny-linux in its /boot, named by
    // a Boot Loader Specification entry (no kernel in its spec).
    let dir = image("tiny-linux");
    let (kernel, initrd) =
        (std::fs::read(dir.join("vmlinux")).unwrap(), std::fs::read(dir.join("initramfs.cpio.gz")).unwrap());
    let entry = b"title tiny-linux\nversion 6.1\nlinux /vmlinux\ninitrd /initramfs.cpio.gz\noptions vmm_entry=bls\n";
    let files: [(&str, &[u8]); 3] =
        [("boot/vmlinux", &kernel), ("boot/initramfs.cpio.gz", &initrd), ("boot/loader/entries/tiny.conf", entry)];
    let disk = gpt_image(&work, "disk", &files, false);
    let before = std::fs::read(&disk).unwrap();
    let template_console = work.join("template-console");
    let server = Server::start_with("snap-linux", &["--console-dir", template_console.to_str().unwrap()]);
    let spec = json!({"memory_mib": 128, "disk": disk, "balloon": {}});
    let (status, g) = server.call("POST", "/guests", Some(spec));
    assert_eq!(status, 201, "{g}");
    let (_, g) = server.call("GET", "/guests/0", None);
    assert!(g["boot_entry"].as_str().is_some_and(|e| e.contains("tiny.conf on partition 1")), "{g}");
    assert!(g["spec"]["cmdline"].as_str().is_some_and(|c| c.starts_with("vmm_entry=bls ")), "{g}");
    assert_eq!(server.call("POST", "/guests/0/start", None).0, 200);
    // The last line before the kernel probes its devices, unpacks its
    // initramfs and starts init (on PVM hosts about a third of the way).
    let mid_boot = "io scheduler";
    let deadline = std::time::Instant::now() + Duration::from_secs(400);
    let console = || server.call("GET", "/guests/0/console", None).1["tail"].as_str().unwrap_or_default().to_string();
    while !console().contains(mid_boot) {
        assert!(std::time::Instant::now() < deadline, "no '{mid_boot}' in 400 s:\n{}", console());
        let (_, g) = server.call("GET", "/guests/0", None);
        assert_eq!(g["state"], "running", "the template stopped before '{mid_boot}': {g}\n{}", console());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(server.call("POST", "/guests/0/pause", None).0, 200);
    let snapshot = work.join("snapshot");
    let (status, written) = server.call("PUT", "/guests/0/snapshot", Some(json!({"dir": snapshot})));
    assert_eq!(status, 200, "{written}");
    assert!(!console().contains("[vda]") && !console().contains("Run /init"), "snapshot not mid-boot:\n{}", console());
    // It booted on our ACPI tables (the MADT for its CPUs, the FADT's PM
    // blocks for S5, the DSDT's root bridge and the MCFG for PCI bus 0,
    // where its disk is), not on the MP table.
    let booted = std::fs::read_to_string(template_console.join("guest-0.log")).unwrap();
    for line in [
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "ACPI: PM: (supports S0 S5)",
        "PCI: MMCONFIG at [mem 0xe0000000-0xe00fffff] reserved",
        "ACPI: PCI Root Bridge [PCI0]",
        "pci 0000:00:01.0: [1af4:1042]",
    ] {
        assert!(booted.contains(line), "no '{line}' in the template's boot:\n{booted}");
    }
    assert_eq!(server.call("DELETE", "/guests/0", None).0, 204);
    drop(server);

    let (consoles, overlays) = (work.join("consoles"), work.join("overlays"));
    let args = ["run", "--restore", snapshot.to_str().unwrap(), "--guests", "4", "--timeout", "800"];
    let paths = ["--console-dir", consoles.to_str().unwrap(), "--overlay-dir", overlays.to_str().unwrap()];
    let args: Vec<&str> = args.iter().chain(paths.iter()).copied().collect();
    let out = run_vmm(&args, Duration::from_secs(880));
    let marker = if is_pvm_host() { "Run /init as init process" } else { "VMM-TINY-LINUX: init reached user space" };
    for id in 0..4 {
        let log = std::fs::read_to_string(consoles.join(format!("guest-{id}.log"))).unwrap_or_default();
        assert!(log.contains(marker), "clone {id}: no '{marker}':\n{log}\n{}", out.describe());
        assert!(!log.contains("Linux version"), "clone {id} booted from the start:\n{log}");
        let blocks = format!("virtio_blk virtio0: [vda] {} 512-byte logical blocks", before.len() / 512);
        assert!(log.contains(&blocks), "clone {id} did not see its whole vda ({blocks}):\n{log}");
        assert!(log.contains(" vda: vda1"), "clone {id} did not read the partition table:\n{log}");
        // The disk is a virtio-pci function, probed by the clone itself.
        assert!(log.contains("virtio-pci 0000:00:01.0: enabling device"), "clone {id}: no disk on PCI:\n{log}");
        let overlay = overlays.join(format!("guest-{id}.overlay"));
        assert_eq!(std::fs::metadata(&overlay).unwrap().len(), before.len() as u64, "{}", overlay.display());
    }
    assert!(std::fs::read(&disk).unwrap() == before, "the base image changed");
    // On PVM hosts the guests end when their init cannot run (a reset); on
    // hardware KVM the init reboots: both are clean.
    assert_eq!(out.stderr.matches("guest reset").count(), 4, "{}", out.describe());
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // The kernel image alone is thousands of identical pages.
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("vmm: guest 1 sharing: "))
        .unwrap_or_else(|| panic!("{}", out.describe()));
    let on_frames: u64 = line["vmm: guest 1 sharing: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(on_frames >= 1000, "only {on_frames} pages of clone 1 shared\n{}", out.describe());
    // Each clone's balloon driver (probed after the snapshot, on PCI) ran.
    assert!(
        out.stderr.lines().any(|l| l.starts_with("vmm: balloons: 4 of 4 guests' drivers ran")),
        "{}",
        out.describe()
    );
    std::fs::remove_dir_all(work).unwrap();
}

/// A guest paused in the middle of an I/O instruction is saved after it:
/// KVM finishes a port access (and an MMIO read) only on the vCPU's next
/// entry, so a snapshot taken before that would make every clone do it
/// again. The guest (memtest `chatter=2`, then `chatter=1`) writes
/// numbered console lines a byte per `out` to the serial port (per MMIO
/// write to the doorbell); each clone's first bytes must go on from the
/// template's last, with no byte written twice or lost.
#[test]
fn clones_of_a_guest_paused_mid_io_repeat_no_console_byte() {
    for mode in ["chatter=2", "chatter=1"] {
        clone_mid_io(mode);
    }
}

fn clone_mid_io(mode: &str) {
    let server = Server::start("snap-mid-io");
    let template = create_and_start(&server, memtest(mode, 16, 1));
    let console =
        |id: u64| server.call("GET", &format!("/guests/{id}/console"), None).1["tail"].as_str().unwrap().to_string();
    wait_for("the template to chatter", || console(template).matches('\n').count() > 100);
    let scratch = scratch_dir("snap-mid-io-dirs");
    for i in 0..10 {
        assert_eq!(server.call("POST", &format!("/guests/{template}/pause"), None).0, 200);
        let dir = scratch.join(format!("snap{i}"));
        let (status, r) = server.call("PUT", &format!("/guests/{template}/snapshot"), Some(json!({"dir": dir})));
        assert_eq!(status, 200, "{r}");
        let before = console(template);
        assert_eq!(server.call("POST", &format!("/guests/{template}/resume"), None).0, 200);
        let (status, c) = server.call("POST", "/guests", Some(json!({"restore": dir})));
        assert_eq!(status, 201, "{c}");
        let clone = c["id"].as_u64().unwrap();
        assert_eq!(server.call("POST", &format!("/guests/{clone}/start"), None).0, 200);
        wait_for("the clone to chatter", || console(clone).matches('\n').count() > 3);
        let after = console(clone);
        assert_eq!(server.call("DELETE", &format!("/guests/{clone}"), None).0, 204);
        // The template's last (partial) line, then the clone's output.
        let joined = format!("{}{}", &before[before.rfind('\n').unwrap() + 1..], after);
        let numbers: Vec<u64> = joined
            .lines()
            .take(3)
            .map(|l| {
                let n = l.strip_prefix("chatter ").and_then(|n| n.parse().ok());
                n.unwrap_or_else(|| {
                    panic!("{mode} clone {i}: a broken line {l:?} where the template's ended:\n{before:?}\n{after:?}")
                })
            })
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{mode} clone {i}: lines out of sequence {numbers:?}");
        let whole = &before[..before.rfind('\n').unwrap()];
        let last_whole: u64 = whole.lines().last().unwrap().strip_prefix("chatter ").unwrap().parse().unwrap();
        assert_eq!(numbers[0], last_whole + 1, "{mode} clone {i}: {before:?} then {after:?}");
    }
    let _ = std::fs::remove_dir_all(scratch);
}
