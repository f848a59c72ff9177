//! `vmm run`: create and start N guests through the manager, wait until
//! they have ended (or Ctrl-C, or `--timeout`), report. With
//! `--api-socket` the API serves the same manager meanwhile, and the run
//! ends when no guest is left running.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::ApiServer;
use crate::config::{check_memory_fits, RunConfig, Source};
use crate::error::{Error, Result};
use crate::host::HostKind;
use crate::image::BaseImage;
use crate::memory::{host_available_memory, MIB};
use crate::outcome::GuestEnd;
use crate::stats_file::{self, Created, RunStats, SharingStats};
use crate::supervisor::manager::{BalloonInfo, GuestInfo, Manager};

/// How every guest ended.
pub struct RunReport {
    pub ends: Vec<GuestEnd>,
}

impl RunReport {
    pub fn all_clean(&self) -> bool {
        self.ends.iter().all(GuestEnd::is_clean)
    }
}

/// Sets up and runs every guest until all have ended.
pub fn run(config: &RunConfig) -> Result<RunReport> {
    config.validate()?;
    let available = host_available_memory().map_err(|e| Error::host(format!("cannot read host memory: {e}")))?;
    let memory_mib = match &config.guest.restore {
        Some(dir) => crate::snapshot::Snapshot::open(dir)?.config.memory_mib,
        None => config.guest.memory_mib,
    };
    check_memory_fits(config.guests, memory_mib, available, config.supervisor.overcommit)?;
    // A bad image is refused before any guest exists.
    if let Some(image) = &config.guest.disk {
        BaseImage::open(image).map_err(|e| Error::bad_input(e.to_string()))?;
    }
    let manager = Manager::new(config.supervisor.clone())?;
    if manager.host() == HostKind::Pvm {
        eprintln!(
            "vmm: KVM-on-PVM host (kvm_pvm): guest kernel code is emulated (slow); \
             Linux guests without --cmdline get PVM-safe parameters"
        );
    }
    if !config.supervisor.console_to_terminal && config.supervisor.console_dir.is_none() {
        eprintln!("vmm: guest consoles in {}", manager.console_dir().display());
    }
    let outcome = run_guests(config, &manager, memory_mib);
    // Whatever happened, the governor's threads go before the manager does.
    manager.close();
    outcome
}

/// How long a run waits for its pool of guest processes to fill.
const POOL_FILL_LIMIT: Duration = Duration::from_secs(10);

/// Makes and starts the guests (in waves), serves the API if asked, and
/// waits for them; stops them all if any cannot be made.
fn run_guests(config: &RunConfig, manager: &Arc<Manager>, memory_mib: u64) -> Result<RunReport> {
    crate::signals::install_stop_handlers().map_err(Error::host)?;
    let mut created = Vec::with_capacity(config.guests);
    // What makes making a guest quick comes first: a snapshot laid out
    // for its clones (a snapshot that cannot be is refused by name when
    // the first clone is made), then the pool's processes.
    match manager.lay_out_snapshot(&config.guest(0)) {
        Ok(Some(took)) => {
            eprintln!("vmm: the snapshot's memory was laid out for its clones in {} ms", took.as_millis())
        }
        Ok(None) => {}
        Err(e) => log::info!("{}", e.message),
    }
    if let Some(took) = manager.wait_for_pool(POOL_FILL_LIMIT) {
        log::info!("the guest process pool was full {} ms into the run", took.as_millis());
    }
    for i in 0..config.guests {
        // Waves: a guest starts once it fits without squeezing the others.
        let waited = manager.wait_for_room(memory_mib * MIB);
        let t = Instant::now();
        // All of a guest's making and starting runs ahead of the running
        // guests' vCPUs, not only `create`: with hundreds running, the
        // steps around it waited seconds for a core at the supervisor's nice.
        let made = dedup::os::ahead_of_others(|| {
            manager.create(config.guest(i), Source::Cli).and_then(|id| {
                let info = manager.get(id)?;
                // A guest booting its disk image: which entry, said once.
                if let (0, Some(entry), Some(image)) = (i, &info.boot_entry, &config.guest.disk) {
                    eprintln!("vmm: {} boots {entry}", image.display());
                }
                // What the guest costs before it has run a single instruction.
                let memory_bytes = info.memory_bytes;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                created.push(Created { ms, memory_bytes, waited_ms: waited.as_secs_f64() * 1000.0 });
                manager.start_admitted(id)
            })
        });
        if let Err(e) = made {
            manager.stop_all(GuestEnd::Stopped);
            return Err(if config.guests == 1 { e } else { e.context(format!("starting guest {i}")) });
        }
    }
    // Served once the run's guests exist, so the API shows them from the start.
    let server = match &config.api_socket {
        Some(path) => match ApiServer::start(path, manager.clone()) {
            Ok(server) => {
                eprintln!("vmm: API on {}", path.display());
                Some(server)
            }
            Err(e) => {
                manager.stop_all(GuestEnd::Stopped);
                return Err(e);
            }
        },
        None => None,
    };
    let report = wait(config, manager, created);
    drop(server);
    Ok(report)
}

/// Waits for the guests, reporting each end as it comes; ends them all on
/// Ctrl-C or when the timeout runs out.
fn wait(config: &RunConfig, manager: &Arc<Manager>, created: Vec<Created>) -> RunReport {
    let started = Instant::now();
    let mut reported = std::collections::BTreeSet::new();
    let mut last_stats = Instant::now();
    // What sharing had reached while every guest was still there.
    let mut sharing_at_peak = manager.sharing().map(|s| s.published());
    // The thread stopping the guests, once one is asked for.
    let mut stopper: Option<std::thread::JoinHandle<()>> = None;
    loop {
        manager.wait_for_change(Duration::from_millis(100));
        let ends = manager.ends();
        let first_end = ends.values().any(Option::is_some);
        if !first_end {
            sharing_at_peak = manager.sharing().map(|s| s.published());
        }
        for (id, end) in &ends {
            if let Some(end) = end.as_ref().filter(|_| !reported.contains(id)) {
                report_end(*id, ends.len(), end);
                reported.insert(*id);
            }
        }
        if let Some(path) = &config.stats_file {
            if last_stats.elapsed() >= stats_file::INTERVAL {
                last_stats = Instant::now();
                write_stats(path, &run_stats(started, manager, &created, false));
            }
        }
        // From the same snapshot as the reports, so no end goes unreported.
        if ends.values().all(Option::is_some) {
            break;
        }
        if stopper.is_some() {
            continue;
        }
        let reason = if crate::signals::stop_requested() {
            Some(GuestEnd::Stopped)
        } else {
            config.timeout.filter(|t| started.elapsed() >= *t).map(GuestEnd::TimedOut)
        };
        if let Some(reason) = reason {
            eprintln!("vmm: stopping {} guest(s): {reason}", manager.live());
            let m = manager.clone();
            // Stopping waits for each guest; the loop goes on reporting.
            stopper = Some(std::thread::spawn(move || m.stop_all(reason)));
        }
    }
    // Its hold on the manager must go before the run ends: the manager's
    // drop removes its temporary directories (found left behind when the
    // process exited while this thread still held it).
    if let Some(stopper) = stopper {
        let _ = stopper.join();
    }
    let mut last = run_stats(started, manager, &created, true);
    if let Some(sharing) = manager.sharing() {
        let now = sharing.published();
        let peak = sharing_at_peak.unwrap_or(now.clone());
        report_sharing(&peak.stats, sharing.uptime(), now.cpu);
        report_sharing_per_guest(&peak);
        // What sharing's remaps, copy-on-write breaks and dirty log cost the guests shows here.
        let kvm = &last.kvm;
        eprintln!(
            "vmm: the guests cost KVM {} page faults, {} TLB flushes and {} exits",
            kvm.page_faults, kvm.tlb_flushes, kvm.exits
        );
        last.sharing = Some(SharingStats { scanner_cpu_s: now.cpu.as_secs_f64(), ..SharingStats::new(&peak) });
    }
    report_pressure(&last);
    report_balloons(manager);
    report_timings(&last);
    if let Some(path) = &config.stats_file {
        write_stats(path, &last);
    }
    let ends = manager.ends().into_values().map(|e| e.unwrap_or(GuestEnd::Stopped)).collect();
    RunReport { ends }
}

fn run_stats(started: Instant, manager: &Manager, created: &[Created], finished: bool) -> RunStats {
    let ends = manager.ends();
    let (corrupted_pages, guests_failed) = manager.failures();
    let pressure = manager.pressure();
    let (guests_verified, rounds_verified) = manager.verified();
    let guests = manager.list();
    RunStats {
        elapsed_s: started.elapsed().as_secs_f64(),
        guests: ends.len(),
        guests_running: manager.live(),
        guests_failed,
        corrupted_pages,
        guests_verified,
        rounds_verified,
        kvm: manager.kvm_counters(),
        created: created.to_vec(),
        throttled_s: pressure.held.values().sum::<Duration>().as_secs_f64(),
        guests_throttled: pressure.held.len(),
        throttled_s_per_guest: pressure.held.iter().map(|(&id, d)| (id, d.as_secs_f64())).collect(),
        guests_ended_for_memory: pressure.ended_for_memory,
        balloon_given_mib: balloon_mib(&guests, |b| b.inflated_pages + b.reported_pages),
        balloon_reclaims: pressure.balloon_reclaims,
        guests_killed: pressure.killed_from_outside,
        sharing: manager.sharing().map(|s| SharingStats::new(&s.published())),
        gaps: manager.gaps(),
        timings: guests.into_iter().map(|g| g.timings).collect(),
        finished,
    }
}

fn write_stats(path: &Path, stats: &RunStats) {
    if let Err(e) = stats.write_to(path) {
        log::warn!("cannot write the stats file {}: {e}", path.display());
    }
}

/// What the memory governor did, if anything.
fn report_pressure(s: &RunStats) {
    let waited = s.waited_s();
    let waves = s.created.iter().filter(|c| c.waited_ms >= 1.0).count();
    if s.balloon_reclaims > 0 {
        eprintln!("vmm: memory governor: {} balloon request(s) to reclaim guests' free memory", s.balloon_reclaims);
    }
    if s.guests_throttled + s.guests_ended_for_memory + waves > 0 {
        let each: Vec<String> = s.throttled_s_per_guest.iter().map(|(id, t)| format!("guest {id} {t:.1} s")).collect();
        eprintln!(
            "vmm: memory governor: {} guest(s) throttled for {:.1} s in all{}; {waves} guest(s) waited {waited:.1} s \
             in all to start; {} guest(s) ended for memory",
            s.guests_throttled,
            s.throttled_s,
            if each.is_empty() { String::new() } else { format!(" ({})", each.join(", ")) },
            s.guests_ended_for_memory
        );
    }
}

/// How long the guests took from the requests that made them: made
/// (ready to start), first instruction, first verified round.
fn report_timings(s: &RunStats) {
    let said: Vec<String> = crate::supervisor::manager::GuestTimings::STEPS
        .iter()
        .filter_map(|&(name, step)| {
            let d = s.spread(step)?;
            Some(format!("{name} p50 {:.1} ms, p99 {:.1}, max {:.1} ({} guests)", d.p50, d.p99, d.max, d.guests))
        })
        .collect();
    if !said.is_empty() {
        eprintln!("vmm: from each guest's request: {}", said.join("; "));
    }
}

/// MiB of the balloons' pages that `pages` counts, over the guests.
fn balloon_mib(guests: &[GuestInfo], pages: fn(&BalloonInfo) -> u64) -> f64 {
    let all: u64 = guests.iter().filter_map(|g| g.balloon.as_ref()).map(pages).sum();
    all as f64 * crate::protocol::BALLOON_PAGE as f64 / MIB as f64
}

/// What the guests' balloons gave back, if they have balloons.
fn report_balloons(manager: &Manager) {
    let guests = manager.list();
    let balloons: Vec<_> = guests.iter().filter_map(|g| g.balloon.as_ref()).collect();
    if balloons.is_empty() {
        return;
    }
    let mib = |pages: fn(&BalloonInfo) -> u64| balloon_mib(&guests, pages);
    eprintln!(
        "vmm: balloons: {} of {} guests' drivers ran; {:.1} MiB given back by inflating, {:.1} MiB reported free, \
         {:.1} MiB taken back by deflating",
        balloons.iter().filter(|b| b.driver_ready).count(),
        balloons.len(),
        mib(|b| b.inflated_pages),
        mib(|b| b.reported_pages),
        mib(|b| b.deflated_pages),
    );
}

fn report_end(id: usize, total: usize, end: &GuestEnd) {
    if total > 1 {
        eprintln!("vmm: guest {id}: {end}");
    } else {
        eprintln!("vmm: {end}");
    }
}

fn report_sharing(s: &dedup::Stats, uptime: Duration, cpu: Duration) {
    let mib = |pages: u64| (pages * 4096) as f64 / MIB as f64;
    let us = |d: Duration| d.as_micros();
    eprintln!(
        "vmm: page sharing: {:.1} MiB saved ({} pages: {} sharing {} frames, {} zero), \
         {} full scans in {:.1} s using {:.2} CPU-s, {} pages unshared, {} volatile, {} copy-on-write breaks, \
         {} pages held back as they keep changing ({} holds: {} after a break, {} changed in a merge, {} rewritten), \
         {} mappings{}; merges: {} write-protected, {} frozen; guests held: {} times (p50 {} us, p99 {} us, \
         max {} us){}",
        mib(s.pages_saved()),
        s.pages_saved(),
        s.pages_sharing,
        s.pages_shared,
        s.zero_pages,
        s.full_scans,
        uptime.as_secs_f64(),
        cpu.as_secs_f64(),
        s.pages_unshared,
        s.pages_volatile,
        s.cow_breaks,
        s.held.now,
        s.held.holds(),
        s.held.after_break,
        s.held.changed_in_merge,
        s.held.rewritten,
        s.mappings_used,
        if s.map_limit_reached { " (a guest reached vm.max_map_count)" } else { "" },
        s.merges_write_protected,
        s.merges_frozen,
        s.stall.count,
        us(s.stall.p50),
        us(s.stall.p99),
        us(s.stall.max),
        if s.errors > 0 {
            format!("; {} failures (last: {})", s.errors, s.last_error.as_deref().unwrap_or("?"))
        } else {
            String::new()
        },
    );
}

/// One line per merge group, then one per guest when there are several.
fn report_sharing_per_guest(published: &dedup::Published) {
    let mut groups: std::collections::BTreeMap<u32, (usize, u64, u64, u64)> = Default::default();
    for g in published.guests.values() {
        let e = groups.entry(g.group).or_default();
        *e = (e.0 + 1, e.1 + g.merged_pages, e.2 + g.zero_pages, e.3 + g.cow_breaks);
    }
    if groups.len() > 1 {
        for (group, (n, merged, zero, cow)) in &groups {
            eprintln!("vmm: merge group {group} ({n} guests): {merged} pages on shared frames, {zero} zero pages, {cow} copy-on-write breaks");
        }
    }
    if published.guests.len() > 1 {
        for (id, g) in &published.guests {
            eprintln!(
                "vmm: guest {id} sharing: {} pages on shared frames, {} zero pages, {} copy-on-write breaks (group {})",
                g.merged_pages, g.zero_pages, g.cow_breaks, g.group
            );
        }
    }
}
