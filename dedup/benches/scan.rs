//! Page-sharing benchmark on guest-like memory, the workload kernel KSM is
//! measured on: 8 guests x 256 MiB, 80% of pages identical across guests,
//! 10% zero, 10% private, kinds in runs of 16 pages. No vCPUs (nothing
//! writes), so this measures the engine alone: time and CPU to reach 95% of
//! the possible savings, merge cost per page, and scan throughput.
//!
//! The guests' memory is mapped in this process and their merge agents
//! run here, called directly: the same work a guest process does, without
//! the channel to it. Merges use write-protection (PROTECT=freeze for the
//! fallback).
//!
//! Run: `cargo bench -p dedup` (env GUESTS, MIB to change the size).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dedup::os::{self, PAGE_SIZE};
use dedup::{Agent, Config, Engine, Freezer, GuestMemory, ProtectMode, Region};

struct NoWriters;
impl Freezer for NoWriters {
    fn freeze(&self) -> usize {
        0
    }
    fn thaw(&self) {}
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

enum Kind {
    Zero,
    Shared,
    Private,
}

fn kind(page: usize, shared_pct: u64, zero_pct: u64) -> Kind {
    let u = mix(page as u64 / 16) % 100;
    if u < zero_pct {
        Kind::Zero
    } else if u < zero_pct + shared_pct {
        Kind::Shared
    } else {
        Kind::Private
    }
}

struct Guest {
    memfd: std::fs::File,
    base: *mut u8,
    len: usize,
}

fn make_guest(id: usize, pages: usize, shared_pct: u64, zero_pct: u64) -> Guest {
    let memfd = os::memfd("bench-guest").unwrap();
    let len = pages * PAGE_SIZE;
    memfd.set_len(len as u64).unwrap();
    let base = os::map_shared(&memfd, len, 0).unwrap();
    for page in 0..pages {
        // Zero pages are written too, as a guest that clears memory does:
        // a page never written is a hole that costs nothing to begin with.
        let key = match kind(page, shared_pct, zero_pct) {
            Kind::Zero => 0,
            Kind::Shared => mix(page as u64),
            Kind::Private => mix(page as u64 ^ ((id as u64 + 1) << 40)),
        };
        // SAFETY: the page lies inside the mapping made above.
        let words = unsafe { std::slice::from_raw_parts_mut(base.add(page * PAGE_SIZE).cast::<u64>(), PAGE_SIZE / 8) };
        for (i, w) in words.iter_mut().enumerate() {
            *w = if key == 0 { 0 } else { mix(key + i as u64) };
        }
    }
    Guest { memfd, base, len }
}

fn memory(e: &mut Engine, g: &Guest, mode: ProtectMode) -> GuestMemory {
    let regions = vec![Region { host: g.base as u64, len: g.len, file_offset: 0 }];
    let store = e.store_file(0).unwrap();
    let agent =
        Agent::new(regions.clone(), g.memfd.try_clone().unwrap(), store, mode, Arc::new(NoWriters), None).unwrap();
    GuestMemory {
        memfd: g.memfd.try_clone().unwrap(),
        regions,
        group: 0,
        pid: std::process::id(),
        agent: Box::new(agent),
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let guests = env("GUESTS", 8);
    let pages = env("MIB", 256) * 256;
    let (shared_pct, zero_pct) = (80, 10);

    let ideal: u64 = {
        let (mut shared, mut zero) = (0u64, 0u64);
        for p in 0..pages {
            match kind(p, shared_pct, zero_pct) {
                Kind::Zero => zero += 1,
                Kind::Shared => shared += 1,
                Kind::Private => {}
            }
        }
        (guests as u64 - 1) * shared + guests as u64 * zero
    };
    println!("dedup bench: {guests} guests x {} MiB, {shared_pct}% shared, {zero_pct}% zero", pages / 256);
    let made: Vec<Guest> = (0..guests).map(|id| make_guest(id, pages, shared_pct, zero_pct)).collect();

    let mode = match std::env::var("PROTECT").as_deref() {
        Ok("freeze") => ProtectMode::Freeze,
        _ => ProtectMode::WriteProtect,
    };
    println!("merges under {mode:?}");
    let mut e = Engine::new(Config { pages_to_scan: pages * guests, ..Config::default() });
    for g in &made {
        let mem = memory(&mut e, g, mode);
        e.add_guest(mem).unwrap();
    }
    let (wall0, cpu0) = (Instant::now(), thread_cpu());
    let mut passes = Vec::new();
    while e.stats().pages_saved() * 100 < ideal * 95 {
        let (w, c) = (Instant::now(), thread_cpu());
        e.scan();
        passes.push((w.elapsed(), thread_cpu() - c));
        assert!(passes.len() < 10, "no convergence: {:?}", e.stats());
    }
    let (wall, cpu) = (wall0.elapsed(), thread_cpu() - cpu0);
    let s = e.stats();
    println!(
        "converge: 95% of {ideal} possible pages saved in {:.3} s wall, {:.3} CPU-s ({} passes; saved {})",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        passes.len(),
        s.pages_saved()
    );
    for (i, (w, c)) in passes.iter().enumerate() {
        println!("  pass {}: {:.3} s wall, {:.3} CPU-s", i + 1, w.as_secs_f64(), c.as_secs_f64());
    }
    // Calls alternate: a pass over every page, then the end-of-pass call
    // (flushes, copy-on-write check). The first pass only records hashes.
    let total_pages = (pages * guests) as f64;
    let first_look = passes[0].1;
    println!("scan (first look): {:.0} pages/s/core", total_pages / first_look.as_secs_f64().max(1e-9));
    let merging: Duration = passes[2..].iter().map(|p| p.1).sum();
    println!(
        "merge: {:.2} us CPU per page saved, scanning included ({} pages saved)",
        merging.as_secs_f64() * 1e6 / s.pages_saved().max(1) as f64,
        s.pages_saved()
    );
    println!(
        "mappings: {}  frames: {}  general_profit: {} MiB",
        s.mappings_used,
        s.pages_shared,
        s.general_profit >> 20
    );
}
