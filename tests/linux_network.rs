//! Real Linux on the network: four tiny-linux guests on one bridge, each
//! kernel configured by the `ip=` the VMM puts on its command line, answer
//! the host's ping at their own addresses, through the VMM's virtio-net
//! and a Linux virtio-net driver. Their init is told to idle without a
//! system call (`tiny_init=idle`), so the kernel stays up even on PVM
//! hosts, where user space cannot make one (the kernel answers ping in its
//! interrupt and softirq work). A SIGTERM then ends them all cleanly, and
//! the bridge the VMM made goes with it. Needs root (a bridge and TAPs),
//! /dev/kvm and `ping`; on PVM hosts each boot is minutes of emulated
//! kernel code.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmm::config::mac_for_guest;
use vmm::host::HostKind;

const GUESTS: u64 = 4;

/// Deletes the bridge when dropped, should the VMM not have.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).stderr(Stdio::null()).status();
    }
}

/// Ends the VMM should the test fail with it running.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Whether `addr` answers one ping within 2 s.
fn answers(addr: &str) -> bool {
    let mut ping = Command::new("ping");
    ping.args(["-c", "1", "-W", "2", addr]).stdout(Stdio::null()).stderr(Stdio::null());
    ping.status().map(|s| s.success()).unwrap_or(false)
}

/// Whether `addr` answers a ping within `limit`, trying again and again:
/// an emulated guest kernel on a busy host can take longer than 2 s for a
/// frame now and then (seconds more right after its boot, while it works
/// through the frames that came meanwhile).
fn answers_within(addr: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if answers(addr) {
            return true;
        }
    }
    false
}

/// The MAC the host's neighbour table has for `addr` on `dev`.
fn neighbour_mac(addr: &str, dev: &str) -> String {
    let out = Command::new("ip").args(["neigh", "show", addr, "dev", dev]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.by_ref().find(|w| *w == "lladdr");
    words.next().unwrap_or_default().to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Not in the default run (README, "Tests that do not run by default"): on
/// PVM hosts its four emulated boots take 10 to 20 minutes of both cores.
#[test]
#[ignore = "four emulated Linux boots: run with --ignored (README)"]
fn four_tiny_linux_guests_on_one_bridge_each_answer_ping_at_their_own_address() {
    require_kvm();
    // SAFETY: no arguments, no memory.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root: it makes a bridge and TAPs");
    let ping = Command::new("ping").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(ping.is_ok(), "this test needs ping (Debian: apt-get install iputils-ping): {ping:?}");
    let work = scratch_dir("linux-net");
    let consoles = work.join("consoles");

    // tests/network.rs takes 198.19.0-249.x; the VMM's unit tests 198.18.x.
    let bridge = Bridge(format!("vmtl{}", std::process::id() % 100_000));
    let subnet = "198.19.252.0/24";
    let address = |i: u64| format!("198.19.252.{}", 2 + i);
    // The VMM's default Linux command line for this host, and the word
    // that keeps init from making a system call.
    let cmdline = format!("{} tiny_init=idle", HostKind::detect().default_linux_cmdline());
    let (guests, net) = (GUESTS.to_string(), format!("bridge={},subnet={subnet}", bridge.0));
    let mut args = tiny_linux_args(&guests, &consoles, 2100);
    args.extend(["--net", &net, "--cmdline", &cmdline].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (stdout, stderr) = (work.join("stdout"), work.join("stderr"));
    let mut command = vmm(&args);
    command.stdout(std::fs::File::create(&stdout).unwrap()).stderr(std::fs::File::create(&stderr).unwrap());
    let started = Instant::now();
    let mut vmm = Running(command.spawn().expect("cannot start the vmm binary"));
    let console = |i: u64| read(&consoles.join(format!("guest-{i}.log")));
    let describe = || {
        let logs: String = (0..GUESTS).map(|i| format!("--- guest {i} ---\n{}\n", console(i))).collect();
        format!("{logs}--- vmm stderr ---\n{}", read(&stderr))
    };

    // On PVM hosts four emulated boots share two cores: minutes each, and
    // once a guest is up its init's spin takes a share of the CPU from
    // those still booting (on a busy 2-core host the last one took 21
    // minutes to boot).
    let limit = Duration::from_secs(if is_pvm_host() { 1800 } else { 300 });
    let mut answered: Vec<Option<Duration>> = vec![None; GUESTS as usize];
    while answered.iter().any(Option::is_none) {
        if let Some(status) = vmm.0.try_wait().unwrap() {
            panic!("vmm ended ({status}) before every guest answered: {answered:?}\n{}", describe());
        }
        assert!(
            started.elapsed() < limit,
            "not every guest answered ping within {} s (time to first answer per guest: {answered:?})\n{}",
            limit.as_secs(),
            describe()
        );
        // Pinged once its init runs: before, its kernel is busy booting,
        // and every unanswered ping broadcasts ARP requests to every guest.
        let mut tried = false;
        for i in 0..GUESTS {
            if answered[i as usize].is_none() && console(i).contains("Run /init as init process") {
                tried = true;
                if answers(&address(i)) {
                    answered[i as usize] = Some(started.elapsed());
                    eprintln!("guest {i} answered after {:.0} s", started.elapsed().as_secs_f64());
                }
            }
        }
        if !tried {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    eprintln!("time from start to each guest's first answer: {answered:?}");

    // All four up at once, each at its own address with its own MAC, as
    // its kernel was told.
    for i in 0..GUESTS {
        let addr = address(i);
        let again = answers_within(&addr, Duration::from_secs(60));
        assert!(again, "guest {i} answered at {addr} once, then not for 60 s\n{}", describe());
        let mac = mac_for_guest(i).map(|b| format!("{b:02x}")).join(":");
        assert_eq!(neighbour_mac(&addr, &bridge.0), mac, "{addr} is not guest {i}\n{}", describe());
        let log = console(i);
        assert!(log.contains(&format!("ipaddr={addr},")), "guest {i} was not given {addr}:\n{log}");
    }

    // SIGTERM: the VMM stops the guests, exits cleanly and takes its bridge.
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(vmm.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = vmm.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "vmm still running 60 s after SIGTERM\n{}", describe());
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = read(&stderr);
    assert!(status.success(), "vmm exited with {status} after SIGTERM\n{}", describe());
    assert!(err.contains(&format!("stopping {GUESTS} guest(s)")), "not every guest was still running\n{err}");
    assert!(!Path::new("/sys/class/net").join(&bridge.0).exists(), "vmm left bridge {} behind", bridge.0);
    let _ = std::fs::remove_dir_all(work);
}
