//! `vmm bench --net`: what the VMM adds to a packet's trip. For each guest
//! count it starts that many memtest guests on one bridge (`vmm run --net`,
//! mostly idle, answering from their WAIT doorbell) and measures, side by
//! side with a kernel-only baseline (a veth peer in a network namespace,
//! answered by the host kernel itself):
//!
//! - ping round trips, p50 and p99: each guest and the baseline pinged in
//!   turn, so both see the same host load;
//! - UDP echo: every guest echoing 64-byte datagrams, a window of 16 in
//!   flight per guest, for a few seconds: datagrams echoed per second, and
//!   host CPU per datagram (all CPUs' busy time during the flood, less that
//!   of as long a quiet spell just before, over the datagrams).
//!
//! Root is needed (bridge, TAPs, veth, namespace) and `ping` (iputils).

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

const BRIDGE: &str = "vmmbench0";
const SUBNET: &str = "198.18.0.0/24";
const VETH: &str = "vmmbv0";
const VETH_PEER: &str = "vmmbv1";
const NAMESPACE: &str = "vmmbench-veth";
const VETH_HOST: &str = "198.18.1.1";
const VETH_GUEST: &str = "198.18.1.2";
/// Ping samples per side and guest count, at least.
const PINGS: usize = 400;
const UDP_WINDOW: usize = 16;
const UDP_SECONDS: u64 = 4;

#[derive(Clone, Debug)]
pub struct NetBenchConfig {
    pub guest_counts: Vec<usize>,
    pub memory_mib: u64,
    pub memtest: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct NetResult {
    pub guests: usize,
    pub ping_p50_us: f64,
    pub ping_p99_us: f64,
    pub baseline_p50_us: f64,
    pub baseline_p99_us: f64,
    pub udp_echoes_per_s: f64,
    pub udp_lost: u64,
    pub cpu_us_per_echo: f64,
}

/// Runs every guest count in turn; the baseline is made first and removed
/// at the end, whatever happens.
pub fn run(config: &NetBenchConfig) -> Result<Vec<NetResult>, String> {
    let _baseline = Baseline::make()?;
    let mut results = Vec::new();
    for &guests in &config.guest_counts {
        let run = Guests::start(config, guests)?;
        let result = measure(guests);
        drop(run);
        results.push(result?);
    }
    Ok(results)
}

pub fn table(results: &[NetResult]) -> String {
    let mut t = String::from(
        "guests  ping p50 / p99 (us)   veth baseline p50 / p99 (us)   added p99 (us)   UDP echoes/s   lost   host CPU/echo (us)\n",
    );
    for r in results {
        t.push_str(&format!(
            "{:>6}  {:>8.0} / {:<8.0}   {:>14.0} / {:<12.0}   {:>14.0}   {:>12.0}   {:>4}   {:>18.1}\n",
            r.guests,
            r.ping_p50_us,
            r.ping_p99_us,
            r.baseline_p50_us,
            r.baseline_p99_us,
            r.ping_p99_us - r.baseline_p99_us,
            r.udp_echoes_per_s,
            r.udp_lost,
            r.cpu_us_per_echo
        ));
    }
    t
}

fn guest_addr(i: usize) -> String {
    format!("198.18.0.{}", 2 + i)
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())),
    }
}

/// The kernel-only peer: a veth pair, one end in a namespace of its own.
struct Baseline;

impl Baseline {
    fn make() -> Result<Baseline, String> {
        Baseline::remove();
        let made = Baseline;
        sh(&["ip", "netns", "add", NAMESPACE])?;
        sh(&["ip", "link", "add", VETH, "type", "veth", "peer", "name", VETH_PEER])?;
        sh(&["ip", "link", "set", VETH_PEER, "netns", NAMESPACE])?;
        sh(&["ip", "addr", "add", &format!("{VETH_HOST}/24"), "dev", VETH])?;
        sh(&["ip", "link", "set", VETH, "up"])?;
        sh(&["ip", "-n", NAMESPACE, "addr", "add", &format!("{VETH_GUEST}/24"), "dev", VETH_PEER])?;
        sh(&["ip", "-n", NAMESPACE, "link", "set", VETH_PEER, "up"])?;
        sh(&["ip", "-n", NAMESPACE, "link", "set", "lo", "up"])?;
        Ok(made)
    }

    fn remove() {
        let _ = sh(&["ip", "link", "del", VETH]);
        let _ = sh(&["ip", "netns", "del", NAMESPACE]);
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        Baseline::remove();
    }
}

/// A `vmm run` of memtest guests on the bench's bridge.
struct Guests(Child);

impl Guests {
    fn start(config: &NetBenchConfig, guests: usize) -> Result<Guests, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .args(["run", "--guests", &guests.to_string(), "--memory", &config.memory_mib.to_string()])
            .args(["--kernel", &config.memtest.to_string_lossy()])
            .args(["--cmdline", "rounds=0 seed=1 share=0.5 zero=0.1 idle=1000"])
            .args(["--net", &format!("bridge={BRIDGE},subnet={SUBNET}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("vmm run: {e}"))?;
        let run = Guests(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..guests {
            while ping(None, &guest_addr(i), 1, 0.2).map(|t| t.is_empty()).unwrap_or(true) {
                if Instant::now() > deadline {
                    return Err(format!("guest {i} of {guests} never answered ping at {}", guest_addr(i)));
                }
            }
        }
        Ok(run)
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// Round trips in microseconds of `count` pings `interval` s apart.
fn ping(namespace: Option<&str>, addr: &str, count: usize, interval: f64) -> Result<Vec<f64>, String> {
    let mut cmd = match namespace {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "ping"]);
            c
        }
        None => Command::new("ping"),
    };
    let out = cmd
        .args(["-n", "-c", &count.to_string(), "-i", &interval.to_string(), "-W", "1", addr])
        .output()
        .map_err(|e| format!("ping (iputils-ping): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect())
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn measure(guests: usize) -> Result<NetResult, String> {
    let (mut ours, mut kernel) = (Vec::new(), Vec::new());
    let per_turn = 20;
    while ours.len() < PINGS || kernel.len() < PINGS {
        for i in 0..guests {
            ours.extend(ping(None, &guest_addr(i), per_turn, 0.005)?);
            // The baseline from the host's side too: the peer answers in
            // its namespace, through the veth.
            kernel.extend(ping(None, VETH_GUEST, per_turn, 0.005)?);
        }
    }
    let (quiet, ()) = busy_cpu_s(|| std::thread::sleep(Duration::from_secs(UDP_SECONDS)))?;
    let (busy, floods) = busy_cpu_s(|| {
        let floods: Vec<_> = (0..guests).map(|i| std::thread::spawn(move || udp_flood(&guest_addr(i)))).collect();
        floods.into_iter().map(|f| f.join().map_err(|_| "a UDP flood thread panicked".to_string())?).collect::<Vec<_>>()
    })?;
    let (mut echoed, mut lost) = (0, 0);
    for flood in floods {
        let (e, l) = flood?;
        echoed += e;
        lost += l;
    }
    Ok(NetResult {
        guests,
        ping_p50_us: percentile(&mut ours, 0.5),
        ping_p99_us: percentile(&mut ours, 0.99),
        baseline_p50_us: percentile(&mut kernel, 0.5),
        baseline_p99_us: percentile(&mut kernel, 0.99),
        udp_echoes_per_s: echoed as f64 / UDP_SECONDS as f64,
        udp_lost: lost,
        cpu_us_per_echo: (busy - quiet).max(0.0) * 1e6 / echoed.max(1) as f64,
    })
}

/// Echoes 64-byte datagrams from `addr` for UDP_SECONDS with a window in
/// flight; returns (echoed, lost).
fn udp_flood(addr: &str) -> Result<(u64, u64), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect((addr, 7777)).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(UDP_SECONDS);
    let (mut in_flight, mut echoed, mut lost) = (0usize, 0u64, 0u64);
    let (datagram, mut buf) = ([0x42u8; 64], [0u8; 128]);
    while Instant::now() < deadline {
        while in_flight < UDP_WINDOW {
            socket.send(&datagram).map_err(|e| e.to_string())?;
            in_flight += 1;
        }
        match socket.recv(&mut buf) {
            Ok(_) => {
                echoed += 1;
                in_flight -= 1;
            }
            Err(_) => {
                // What is still out after a silence is lost.
                lost += in_flight as u64;
                in_flight = 0;
            }
        }
    }
    Ok((echoed, lost))
}

/// All CPUs' idle time so far (idle and iowait), seconds: busy time is
/// what a spell's wall time times the CPUs leaves of it (guest time is
/// not counted as the host's user time everywhere, idle time is).
fn idle_cpu_s() -> Result<f64, String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| e.to_string())?;
    let cpu = stat.lines().next().ok_or("an empty /proc/stat")?;
    let f: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(idle / hz)
}

/// Busy CPU seconds (all CPUs) while `work` runs.
fn busy_cpu_s<T>(work: impl FnOnce() -> T) -> Result<(f64, T), String> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let (idle, t0) = (idle_cpu_s()?, Instant::now());
    let out = work();
    let idle = idle_cpu_s()? - idle;
    Ok(((t0.elapsed().as_secs_f64() * cpus - idle).max(0.0), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let mut s = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut s, 0.5), 3.0);
        assert_eq!(percentile(&mut s, 0.99), 5.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }
}
