//! Guests with a vsock device: a host program talks to each memtest guest
//! through its Unix socket (`CONNECT <port>`), guests reach listeners at
//! `<socket>_<port>`, flow control holds both ways, bad lines and a peer
//! that never reads cost the host nothing, a clone answers on a socket of
//! its own, and the sockets go with their guests. Needs /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn memtest_with_vsock(socket: &Path, cmdline: &str) -> Value {
    json!({"kernel": image("memtest"), "memory_mib": 16, "cmdline": cmdline, "vsock": {"socket": socket}})
}

/// Connects to a guest's `port` through its socket: the stream after the
/// device's `OK <port>` line, or the line (or end) that came instead.
fn connect(socket: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let line = read_line(&mut s);
    match line.starts_with("OK ") {
        true => Ok(s),
        false => Err(format!("{line:?}")),
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let (mut line, mut byte) = (Vec::new(), [0u8; 1]);
    while matches!(s.read(&mut byte), Ok(1)) && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Sends `bytes` bytes and checks that the same come back, in order.
fn echo(s: &mut UnixStream, seed: u64, bytes: usize) {
    let data: Vec<u8> = (0..bytes as u64).map(|i| (i * 7 + seed * 13 + (i >> 9)) as u8).collect();
    let (mut w, sent) = (s.try_clone().unwrap(), data.clone());
    // The echo comes back while we send: neither side's credit holds it all.
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut got = vec![0u8; bytes];
    s.read_exact(&mut got).unwrap_or_else(|e| panic!("the echo stopped: {e}"));
    writer.join().unwrap().unwrap();
    assert!(got == data, "the echo differs from what was sent");
}

/// The next connection to `listener`, within a while.
fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("no connection from the guest: {e}"),
        }
    }
}

#[test]
fn a_host_program_talks_to_each_memtest_guest_over_vsock() {
    let dir = scratch_dir("vsock-echo");
    let socket = |id: u64| dir.join(format!("guest-{id}.sock"));
    // Each guest connects to the host's port 5000 once and says hello.
    let hellos: Vec<UnixListener> =
        (0..4).map(|id| UnixListener::bind(dir.join(format!("guest-{id}.sock_5000"))).unwrap()).collect();
    let server = Server::start("vsock-server");
    for id in 0..4u64 {
        let spec = memtest_with_vsock(&dir, "rounds=0 seed=3 idle=30 vsock_hello=5000");
        let (status, g) = server.call("POST", "/guests", Some(spec));
        assert_eq!(status, 201, "{g}");
        assert_eq!(g["spec"]["vsock"], json!({"socket": socket(id), "cid": 3}), "{g}");
        assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
    }
    for (id, listener) in hellos.iter().enumerate() {
        let mut said = String::new();
        accept(listener).read_to_string(&mut said).unwrap();
        assert_eq!(said, format!("memtest guest {id} says hello\n"));
    }
    // 300 KB each way: far past either side's credit, so flow control
    // works both ways.
    for id in 0..4 {
        let mut s = connect(&socket(id), 1234).unwrap();
        echo(&mut s, id, 300_000);
    }

    // Nobody listens on the guest's port 99: refused, no OK.
    assert!(connect(&socket(0), 99).is_err(), "a connection to a closed port was accepted");
    // A bad line is answered and the stream closed.
    let mut bad = UnixStream::connect(socket(0)).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    bad.write_all(b"CONNECT seven\n").unwrap();
    assert!(read_line(&mut bad).starts_with("ERROR"), "a bad CONNECT line was not refused");
    // A peer that sends and never reads its echo: the device holds no more
    // than the guest's credit, the guest gives up on it, and the next
    // connection is served.
    let mut hog = connect(&socket(1), 1234).unwrap();
    hog.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0;
    while sent < 64 << 20 && hog.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    assert!(sent < 64 << 20, "a peer that never reads sent {sent} bytes: nothing held it back");
    assert!(sent >= 64 << 10, "the echo took only {sent} bytes");
    drop(hog);
    let mut after = connect(&socket(1), 1234).unwrap();
    echo(&mut after, 9, 10_000);

    // The guests still verify their memory.
    for id in 0..4 {
        let done = rounds(&server, id);
        wait_for("the guests to verify more rounds", || rounds(&server, id) > done);
    }

    // A clone answers on a socket of its own, beside its template's.
    assert_eq!(server.call("POST", "/guests/2/pause", None).0, 200);
    let snap = scratch_dir("vsock-snap").join("snapshot");
    let (status, written) = server.call("PUT", "/guests/2/snapshot", Some(json!({"dir": snap})));
    assert_eq!(status, 200, "{written}");
    let (status, clone) = server.call("POST", "/guests", Some(json!({"restore": snap})));
    assert_eq!(status, 201, "{clone}");
    let id = clone["id"].as_u64().unwrap();
    assert_eq!(clone["spec"]["vsock"]["socket"], json!(socket(id)), "{clone}");
    assert_eq!(server.call("POST", &format!("/guests/{id}/start"), None).0, 200);
    let mut s = connect(&socket(id), 1234).unwrap();
    echo(&mut s, 11, 100_000);

    // A socket that exists is not taken over.
    let (status, taken) =
        server.call("POST", "/guests", Some(json!({"kernel": image("memtest"), "vsock": {"socket": socket(0)}})));
    assert_eq!(status, 409, "{taken}");
    drop(server);
    for id in [0, 1, 2, 3, id] {
        assert!(!socket(id).exists(), "the server left {} behind", socket(id).display());
    }
}
