//! Guests with a network device: the supervisor makes a bridge and a TAP
//! per guest, hands each guest process its TAP, gives each guest a MAC and
//! an address, shows them in the API, and a clone gets a TAP of its own
//! with its template's MAC and address; with `netns`, in a network
//! namespace of its own. Bad network settings are refused
//! before anything is made, and a bridge the supervisor made goes with
//! it. Needs root (bridges and TAPs).

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

fn memtest_with(net: Value) -> Value {
    json!({"kernel": image("memtest"), "memory_mib": 16, "cmdline": "rounds=0 seed=4 idle=30", "net": net})
}

fn link(name: &str) -> std::path::PathBuf {
    Path::new("/sys/class/net").join(name)
}

/// Whether `addr` answers ping (run in namespace `ns` if given): a few
/// tries, as the first needs the guest's answer to ARP.
fn answers_ping(ns: Option<&str>, addr: &str) -> bool {
    let mut cmd = match ns {
        Some(ns) => {
            let mut ip = std::process::Command::new("ip");
            ip.args(["netns", "exec", ns, "ping"]);
            ip
        }
        None => std::process::Command::new("ping"),
    };
    let out = cmd.args(["-c", "3", "-i", "0.2", "-W", "5", "-q", addr]).output();
    let out = out.expect("ping (iputils-ping) must be installed");
    out.status.success()
}

/// The bridge a network interface is attached to.
fn master(tap: &str) -> Option<String> {
    let target = std::fs::read_link(link(tap).join("master")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Deletes the test's bridge when dropped.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let mut ip = std::process::Command::new("ip");
        let _ = ip.args(["link", "del", &self.0]).stderr(std::process::Stdio::null()).status();
    }
}

#[test]
fn guests_on_a_bridge_get_taps_macs_and_addresses_and_so_do_their_clones() {
    let pid = std::process::id();
    let bridge = Bridge(format!("vmb{}", pid % 100_000));
    let net3 = pid % 250;
    let subnet = format!("198.19.{net3}.0/24");
    let server = Server::start("net-bridge");
    let mut guests = Vec::new();
    for id in 0..2u64 {
        let (status, g) =
            server.call("POST", "/guests", Some(memtest_with(json!({"bridge": bridge.0, "subnet": subnet}))));
        assert_eq!(status, 201, "{g}");
        assert_eq!(g["id"], id);
        let net = &g["spec"]["net"];
        assert_eq!(net["address"], format!("198.19.{net3}.{}/24", 2 + id), "{g}");
        assert_eq!(net["mac"], format!("06:76:6d:00:00:{id:02x}"), "{g}");
        let tap = net["tap"].as_str().unwrap_or_else(|| panic!("no TAP: {g}")).to_string();
        assert_eq!(master(&tap).as_deref(), Some(bridge.0.as_str()), "{tap} is not on the bridge");
        assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
        // A TAP has a carrier while a process holds it open: the guest's
        // (the supervisor let go of it).
        let carrier = std::fs::read_to_string(link(&tap).join("carrier")).unwrap_or_default();
        assert_eq!(carrier.trim(), "1", "nobody holds {tap}");
        guests.push((id, tap));
    }
    let up = std::fs::read_to_string(link(&bridge.0).join("operstate")).unwrap();
    assert!(!up.contains("down"), "the bridge is {up}");
    let addr = std::process::Command::new("ip").args(["-4", "addr", "show", &bridge.0]).output().unwrap();
    let addr = String::from_utf8_lossy(&addr.stdout);
    assert!(addr.contains(&format!("198.19.{net3}.1/24")), "the bridge has not the subnet's first address: {addr}");
    for (id, _) in &guests {
        wait_for("guests with a network to verify rounds", || rounds(&server, *id) >= 2);
        let addr = format!("198.19.{net3}.{}", 2 + id);
        assert!(answers_ping(None, &addr), "guest {id} does not answer ping at {addr}");
    }

    // A clone: a TAP of its own on the bridge, the template's MAC and address.
    let (template, tap0) = guests[0].clone();
    assert_eq!(server.call("POST", &format!("/guests/{template}/pause"), None).0, 200);
    let dir = scratch_dir("net-bridge-snap").join("snapshot");
    let (status, written) = server.call("PUT", &format!("/guests/{template}/snapshot"), Some(json!({"dir": dir})));
    assert_eq!(status, 200, "{written}");
    let (status, clone) = server.call("POST", "/guests", Some(json!({"restore": dir})));
    assert_eq!(status, 201, "{clone}");
    let id = clone["id"].as_u64().unwrap();
    let net = &clone["spec"]["net"];
    assert_eq!((&net["mac"], &net["address"]), (&json!("06:76:6d:00:00:00"), &json!(format!("198.19.{net3}.2/24"))));
    let tap = net["tap"].as_str().unwrap().to_string();
    assert_ne!(tap, tap0, "the clone took its template's TAP");
    assert_eq!(master(&tap).as_deref(), Some(bridge.0.as_str()));
    assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
    wait_for("the clone to verify rounds", || rounds(&server, id) >= 2);
    // The template's TAP goes with its process (and the bridge forgets
    // where its MAC was): the address then answers from the clone, which
    // has the same MAC.
    for g in [template, 1] {
        let (status, ended) = server.call("POST", &format!("/guests/{g}/stop"), None);
        assert_eq!((status, &ended["clean"]), (200, &json!(true)), "{ended}");
        assert_eq!(server.call("DELETE", &format!("/guests/{g}"), None).0, 204);
    }
    wait_for("the template's TAP to go", || !link(&tap0).exists());
    assert!(answers_ping(None, &format!("198.19.{net3}.2")), "the clone does not answer ping");
    let (status, ended) = server.call("POST", &format!("/guests/{id}/stop"), None);
    assert_eq!((status, &ended["clean"]), (200, &json!(true)), "{ended}");
    assert_eq!(server.call("DELETE", &format!("/guests/{id}"), None).0, 204);
    for tap in [&tap0, &guests[1].1, &tap] {
        wait_for("a deleted guest's TAP to go", || !link(tap).exists());
    }
    // The bridge the server made goes with it.
    drop(server);
    assert!(!link(&bridge.0).exists(), "the server left bridge {} behind", bridge.0);
}

#[test]
fn bad_network_settings_are_refused_and_make_nothing() {
    let server = Server::start("net-bad");
    let cases = [
        (json!({"tap": "a/b"}), "interface name"),
        (json!({"tap": "sixteen-chars-xx"}), "interface name"),
        (json!({}), "a bridge or netns"),
        (json!({"netns": true, "bridge": "b0"}), "not on a bridge"),
        (json!({"tap": "t0", "subnet": "10.0.0.0/24"}), "goes with a bridge"),
        (json!({"bridge": "b0", "subnet": "10.0.0.1/24"}), "host bits"),
        (json!({"bridge": "b0", "subnet": "10.0.0.0/31"}), "prefix"),
        (json!({"bridge": "b0", "mac": "01:00:5e:00:00:01"}), "multicast"),
        (json!({"bridge": "b0", "mac": "06:76"}), "not a MAC"),
        (json!({"bridge": "b0", "vlan": 3}), "unknown field"),
        (json!({"bridge": "b0", "limit": {"bytes_per_s": 0}}), "stop the device"),
        (json!({"bridge": "b0", "limit": {}}), "bytes or ops"),
        (json!({"bridge": "b0", "limit": {"ops_burst": 4}}), "goes with its rate"),
    ];
    for (net, why) in cases {
        let (status, e) = server.call("POST", "/guests", Some(memtest_with(net.clone())));
        assert_eq!(status, 400, "{net}: {e}");
        assert!(e.to_string().contains(why), "{net}: expected '{why}': {e}");
    }
    let mut limited_without_disk = memtest_with(json!({"bridge": "b0"}));
    limited_without_disk["disk_limit"] = json!({"ops_per_s": 100});
    let (status, e) = server.call("POST", "/guests", Some(limited_without_disk));
    assert_eq!(status, 400, "{e}");
    assert!(e.to_string().contains("needs a disk"), "{e}");
    let (_, list) = server.call("GET", "/guests", None);
    assert_eq!(list, json!([]), "a refused guest was left behind");
    // Existing interfaces of another kind.
    for (net, why) in [(json!({"bridge": "lo"}), "not a bridge"), (json!({"tap": "lo"}), "not a TAP")] {
        let (status, e) = server.call("POST", "/guests", Some(memtest_with(net)));
        assert_eq!(status, 400, "{e}");
        assert!(e.to_string().contains(why), "{e}");
    }

    for (args, why) in [
        (vec!["--guests", "2", "--net", "tap=t0"], "one guest"),
        (vec!["--net", "bridge=b0,colour=red"], "unknown key"),
        (vec!["--net", "bridge"], "KEY=VALUE"),
        (vec!["--net", "bridge=b0,bridge=b1"], "twice"),
        (vec!["--net", "bridge=b0,bytes=0"], "stop the device"),
        (vec!["--net", "bridge=b0,ops=fast"], "not a number"),
        (vec!["--disk-limit", "ops=10"], "needs a disk"),
        (vec!["--disk-limit", "iops=10"], "unknown limit"),
    ] {
        let mut all = vec!["run", "--kernel", "x"];
        all.extend(args);
        let out = run_vmm(&all, std::time::Duration::from_secs(30));
        assert_ne!(out.code, Some(0), "{}", out.describe());
        assert!(out.stderr.contains(why), "expected '{why}'\n{}", out.describe());
    }
}

/// What `ip -n NS -br addr` says.
fn addresses_in(ns: &str) -> String {
    let out = std::process::Command::new("ip").args(["-n", ns, "-br", "addr"]).output().unwrap();
    assert!(out.status.success(), "namespace {ns}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Clones of one template carry its MAC and address in their kernels: with
/// `netns`, each clone's TAP is in a namespace of its own, with the
/// gateway address there, so each of 8 clones answers ping in its
/// namespace at the template's address. The namespaces go with the server.
#[test]
fn clones_in_namespaces_of_their_own_each_have_the_templates_network() {
    let net3 = (std::process::id() + 125) % 250;
    let subnet = format!("198.19.{net3}.0/24");
    let server = Server::start("net-netns");
    let (status, g) = server.call("POST", "/guests", Some(memtest_with(json!({"netns": true, "subnet": subnet}))));
    assert_eq!(status, 201, "{g}");
    let template = g["id"].as_u64().unwrap();
    let net = &g["spec"]["net"];
    let (ns0, tap0) = (net["namespace"].as_str().unwrap().to_string(), net["tap"].as_str().unwrap().to_string());
    assert!(!link(&tap0).exists(), "the TAP stayed in the host's namespace");
    let inside = addresses_in(&ns0);
    assert!(inside.contains(&tap0) && inside.contains(&format!("198.19.{net3}.1/24")), "{ns0}: {inside}");
    assert_eq!(server.call("POST", &format!("/guests/{template}/start"), None).0, 200);
    wait_for("the template to verify rounds", || rounds(&server, template) >= 2);
    assert_eq!(server.call("POST", &format!("/guests/{template}/pause"), None).0, 200);
    let dir = scratch_dir("net-netns-snap").join("snapshot");
    let (status, written) = server.call("PUT", &format!("/guests/{template}/snapshot"), Some(json!({"dir": dir})));
    assert_eq!(status, 200, "{written}");

    let mut namespaces = vec![ns0];
    let mut clones = Vec::new();
    for _ in 0..8 {
        let (status, clone) = server.call("POST", "/guests", Some(json!({"restore": dir})));
        assert_eq!(status, 201, "{clone}");
        let net = &clone["spec"]["net"];
        assert_eq!(net["address"], format!("198.19.{net3}.2/24"), "{clone}");
        assert_eq!(net["mac"], "06:76:6d:00:00:00", "{clone}");
        let ns = net["namespace"].as_str().unwrap().to_string();
        assert!(!namespaces.contains(&ns), "two guests in namespace {ns}");
        let inside = addresses_in(&ns);
        let tap = net["tap"].as_str().unwrap();
        assert!(inside.contains(tap) && inside.contains(&format!("198.19.{net3}.1/24")), "{ns}: {inside}");
        let id = clone["id"].as_u64().unwrap();
        assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
        clones.push((id, ns.clone()));
        namespaces.push(ns);
    }
    let addr = format!("198.19.{net3}.2");
    for (id, ns) in &clones {
        wait_for("a clone to verify rounds", || rounds(&server, *id) >= 2);
        assert!(answers_ping(Some(ns), &addr), "clone {id} does not answer ping at {addr} in {ns}");
    }
    drop(server);
    for ns in namespaces {
        assert!(!Path::new("/run/netns").join(&ns).exists(), "the server left namespace {ns} behind");
    }
}

/// Sends `count` datagrams of up to 1,400 bytes to `addr` one at a time and
/// checks each echo byte for byte. Returns how many came back whole.
fn echo_udp(addr: &str, id: u64, count: u64) -> Result<u64, String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 2048];
    for seq in 0..count {
        let len = 8 + ((seq * 131 + id * 7) % 1392) as usize;
        let mut datagram: Vec<u8> = (0..len as u64).map(|i| (seq * 31 + id * 17 + i * 7) as u8).collect();
        datagram[..8].copy_from_slice(&seq.to_le_bytes());
        socket.send(&datagram).map_err(|e| format!("datagram {seq}: {e}"))?;
        let n = socket.recv(&mut buf).map_err(|e| format!("datagram {seq}: no echo ({e})"))?;
        if buf[..n] != datagram[..] {
            return Err(format!("datagram {seq}: the echo differs ({n} bytes back for {len})"));
        }
    }
    Ok(count)
}

/// 8 memtest guests on one bridge each echo 1,000 UDP datagrams (sent one
/// at a time, checked byte for byte) while the scanner merges their pages,
/// the receive buffers among them: nothing is lost or changed, merges and
/// copy-on-write breaks both happen, and every guest's pages keep
/// verifying.
#[test]
fn memtest_guests_echo_udp_while_their_pages_merge() {
    let pid = std::process::id();
    let bridge = Bridge(format!("vme{}", pid % 100_000));
    let net3 = (pid + 60) % 250;
    let subnet = format!("198.19.{net3}.0/24");
    let server = Server::start_with("net-echo", &["--scan-nice", "-10", "--scan-sleep-ms", "5"]);
    let cmdline = "rounds=0 seed=6 share=0.6 zero=0.1 volatile=32 churn=64 idle=20";
    let guests = 8u64;
    for id in 0..guests {
        let net = json!({"bridge": bridge.0, "subnet": subnet});
        let spec = json!({"kernel": image("memtest"), "memory_mib": 32, "cmdline": cmdline, "net": net});
        let (status, g) = server.call("POST", "/guests", Some(spec));
        assert_eq!(status, 201, "{g}");
        assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
    }
    for id in 0..guests {
        wait_for("the guests to verify a round", || rounds(&server, id) >= 1);
    }
    let echoes: Vec<_> = (0..guests)
        .map(|id| {
            let addr = format!("198.19.{net3}.{}:7777", 2 + id);
            std::thread::spawn(move || echo_udp(&addr, id, 1000))
        })
        .collect();
    for (id, echo) in echoes.into_iter().enumerate() {
        assert_eq!(echo.join().unwrap(), Ok(1000), "guest {id}");
    }
    let (_, stats) = server.call("GET", "/dedup/stats", None);
    let global = &stats["global"];
    assert!(global["pages_sharing"].as_u64() > Some(1000), "little merged: {stats}");
    assert!(global["cow_breaks"].as_u64() > Some(0), "no merged page was written: {stats}");
    for id in 0..guests {
        let done = rounds(&server, id);
        wait_for("the guests to verify two more rounds", || rounds(&server, id) >= done + 2);
        let (_, c) = server.call("GET", &format!("/guests/{id}/console"), None);
        let tail = c["tail"].as_str().unwrap_or_default();
        assert!(!tail.contains("FAILED") && !tail.contains("MISMATCH"), "guest {id}:\n{tail}");
    }
}
