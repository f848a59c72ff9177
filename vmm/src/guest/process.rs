//! The guest process (`vmm guest`, started by the supervisor): builds one
//! guest from the setup the supervisor sends, runs it, answers requests
//! (start, pause, stop, page sharing's status and merges) and reports how
//! the guest ended, then exits. Its descriptors are listed in
//! [`crate::protocol`]. Whatever happens here, only this guest is affected: a
//! panic ends the process (and the supervisor reports it); the process
//! also ends if the supervisor goes away.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::GuestConfig;
use crate::error::{Error, Result};
use crate::guest::boot::BootFile;
use crate::guest::devices::console::{CappedFile, Console};
use crate::guest::devices::virtio::balloon::{self, Balloon, BalloonControl, BalloonStatus, GiveBack};
use crate::guest::devices::virtio::{
    self, block::Block, device::from_value, net::Net, vsock::Vsock, Persist, VirtioDevice, VirtioSlot,
};
use crate::guest::disk::Disk;
use crate::guest::machine::{Guest, GuestOptions};
use crate::guest::reclaim::GuestPages;
use crate::guest::snapshot::SnapshotState;
use crate::guest::vstate::vm;
use crate::hypervisor::Hypervisor;
use crate::image::boot_entry::{self, BootEntry};
use crate::image::BaseImage;
use crate::memory::{GuestRam, MemoryBackend};
use crate::outcome::GuestEnd;
use crate::protocol::{self, Event, Reply, Request, Setup, SetupFile};

/// When each step of making the guest ended, for the supervisor's log.
struct Stages(Vec<(String, u64)>);

impl Stages {
    fn mark(&mut self, step: &str) {
        self.0.push((step.into(), crate::proc::monotonic_ns()));
    }
}

pub fn main() -> ExitCode {
    let mut stages = Stages(vec![("process started".into(), crate::proc::monotonic_ns())]);
    // A panic anywhere ends this guest at once, with its message on stderr
    // for the supervisor, rather than leaving a half-dead guest.
    std::panic::set_hook(Box::new(|info| {
        // One line: the supervisor keeps the last lines of our stderr.
        eprintln!("vmm-guest panic: {}", info.to_string().replace('\n', " "));
        std::process::abort();
    }));
    crate::guest::vstate::control::install_kick_handler();
    // What it makes (a snapshot's files come made) is nobody else's.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
    // If the kernel's OOM killer must act, this guest goes, not the
    // supervisor (which maps every guest's memory and so looks biggest).
    let _ = std::fs::write("/proc/self/oom_score_adj", protocol::GUEST_OOM_SCORE_ADJ.to_string());
    // Until a restored guest is built this thread runs ahead of every
    // guest's vCPUs (real-time where allowed; the threads it starts do not
    // inherit that, and start at nice 0): a restore must not queue for a
    // core behind running guests. A booted guest's process goes back to
    // the default priority when its setup comes. It started at the
    // supervisor's spawner's priority: first the default, whatever that was.
    dedup::os::normal_priority();
    dedup::os::prioritize_thread(0, "the guest process");
    // What every guest needs, made before its setup comes: the process may
    // wait for it in the supervisor's pool.
    let prepared = Prepared::make();
    stages.mark("VM prepared");
    // SAFETY: the supervisor started us with these descriptors open (protocol.rs).
    let (requests, mut events) =
        unsafe { (UnixStream::from_raw_fd(protocol::FD_REQUESTS), UnixStream::from_raw_fd(protocol::FD_EVENTS)) };
    // (A failure to make the VM is the setup's answer.)
    if let Err(e) = protocol::send(&mut events, &Event::Ready, &[]) {
        eprintln!("vmm guest: {e}");
        return ExitCode::from(2);
    }
    match serve(requests, events, prepared, stages) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm guest: {e}");
            ExitCode::from(2)
        }
    }
}

/// KVM opened and an empty VM made (`vm::new`), before the guest is known.
struct Prepared {
    hv: Hypervisor,
    vm: VmFd,
}

impl Prepared {
    fn make() -> Result<Prepared> {
        let hv = Hypervisor::open().map_err(Error::host)?;
        let vm = vm::new(&hv.kvm).map_err(|e| Error::host(format!("cannot create the VM: {e}")))?;
        Ok(Prepared { hv, vm })
    }
}

/// The descriptors that came with the setup, by what they are.
struct SetupFiles(Vec<(SetupFile, File)>);

impl SetupFiles {
    fn new(kinds: &[SetupFile], files: Vec<File>) -> Result<SetupFiles> {
        if kinds.len() != files.len() {
            return Err(Error::host(format!("its setup names {} descriptors, {} came", kinds.len(), files.len())));
        }
        Ok(SetupFiles(kinds.iter().copied().zip(files).collect()))
    }

    /// The descriptor of this kind.
    fn take(&mut self, kind: SetupFile) -> Result<File> {
        let at = self.0.iter().position(|(k, _)| *k == kind);
        at.map(|i| self.0.swap_remove(i).1).ok_or_else(|| Error::host(format!("its setup came without {kind:?}")))
    }
}

/// Builds the guest its setup describes in `prepared` and runs it until it
/// ends; `stages` holds when the steps before the setup ended.
fn serve(
    mut requests: UnixStream,
    mut events: UnixStream,
    prepared: Result<Prepared>,
    mut stages: Stages,
) -> io::Result<()> {
    // Each request comes with a number its reply carries back.
    let (number, setup) = match protocol::receive::<(u64, Request)>(&mut requests)? {
        Some(((n, Request::Setup(setup)), _)) => (n, setup),
        _ => return Err(io::Error::other("the supervisor sent no setup")),
    };
    let files = match setup.files.is_empty() {
        true => Ok(Vec::new()),
        false => protocol::receive_files(&requests),
    };
    stages.mark("setup received");
    if setup.restore.is_none() {
        dedup::os::normal_priority();
    }
    let built = files
        .map_err(|e| Error::host(format!("its setup's descriptors: {e}")))
        .and_then(|files| SetupFiles::new(&setup.files, files))
        .and_then(|files| build(&setup, prepared?, files, &mut stages));
    // The snapshot's state is in the guest now; its copy goes before the
    // heap is handed back.
    let id = setup.id;
    let jail_setup = setup.jail;
    drop(setup);
    // Only the merges it makes keep this thread ahead of the vCPUs (and
    // the jail's system call filter allows no change of priority).
    if built.as_ref().is_ok_and(|b| b.agent.is_none()) {
        dedup::os::normal_priority();
    }
    let built = built.and_then(|built| {
        jail(jail_setup)?;
        stages.mark("jail");
        Ok(built)
    });
    let Built { mut guest, agent, balloon } = match built {
        Ok(built) => built,
        Err(e) => {
            return protocol::send(&mut requests, &(number, Reply::Error { kind: e.kind, message: e.message }), &[]);
        }
    };
    let regions = guest.ram().regions().iter().map(|r| (r.host, r.len as u64, r.file_offset)).collect();
    // Named as --merge-protect names them.
    let mut balloon = balloon.and_then(|control| BalloonHandle::new(&guest, control));
    let protection = agent.as_ref().map(|a| match a.lock().unwrap().protection() {
        dedup::Protection::WriteProtect => "uffd".to_string(),
        dedup::Protection::Freeze => "freeze".to_string(),
    });
    protocol::send(&mut requests, &(number, Reply::Created { regions, protection, stages: stages.0 }), &[])?;
    return_freed_heap();

    // The control loop waits for a request or for the vCPUs to finish,
    // itself: no thread hop on the way to a merge. The last vCPU to leave
    // writes it.
    let finished_fd = Arc::new(EventFd::new(EFD_NONBLOCK)?);

    let mut started = false;
    let mut stopped_before_start = GuestEnd::Stopped;
    let mut mismatches = 0;
    // What a clone's doorbell brought from its template.
    let rounds_before = guest.rounds().unwrap_or(0);
    let mut rounds = 0;
    let mut first_entry_sent = false;
    let (mut gaps_sent, mut gaps_at) = (0, std::time::Instant::now());
    let mut kvm_sent = Default::default();
    let mut closed = false;
    loop {
        let (request_ready, finished) = wait_for_input(&requests, &finished_fd, Duration::from_millis(200))?;
        if finished {
            break;
        }
        if request_ready && !closed {
            match protocol::receive::<(u64, Request)>(&mut requests) {
                Ok(Some(((number, request), payload))) => {
                    let stop = matches!(request, Request::Stop(_));
                    let adopt = matches!(request, Request::Adopt);
                    if let (Request::Stop(reason), false) = (&request, started) {
                        stopped_before_start = reason.clone();
                    }
                    // A snapshot's files follow its request.
                    let files = match request {
                        Request::Snapshot => Some(protocol::receive_files(&requests)),
                        _ => None,
                    };
                    let (reply, out) = match files {
                        Some(files) => snapshot(&guest, files),
                        None => {
                            let parts = Parts { agent: agent.as_ref(), balloon: balloon.as_ref() };
                            handle(&mut guest, parts, &mut started, &finished_fd, request, &payload)
                        }
                    };
                    protocol::send(&mut requests, &(number, reply), &out)?;
                    if adopt {
                        return_freed_heap();
                    }
                    if stop && !started {
                        break;
                    }
                }
                other => {
                    let why = match other {
                        Err(e) => format!("bad request: {e}"),
                        _ => "the supervisor closed the channel".into(),
                    };
                    log::warn!("guest {id}: {why}; stopping");
                    closed = true;
                    guest.stop(GuestEnd::Stopped);
                    if !started {
                        break;
                    }
                }
            }
        }
        let now = guest.reported_mismatches();
        if now != mismatches {
            mismatches = now;
            protocol::send(&mut events, &Event::Mismatches(now), &[])?;
        }
        let now = guest.rounds().unwrap_or(0).saturating_sub(rounds_before);
        if now != rounds {
            rounds = now;
            protocol::send(&mut events, &Event::Rounds(now), &[])?;
        }
        let first_entry = crate::guest::vstate::vcpu::first_entry_ns();
        if !first_entry_sent && first_entry != 0 {
            first_entry_sent = true;
            protocol::send(&mut events, &Event::FirstEntry(first_entry), &[])?;
        }
        if let Some(b) = balloon.as_mut() {
            if let Some(status) = b.tick() {
                protocol::send(&mut events, &Event::Balloon(status), &[])?;
            }
        }
        if gaps_at.elapsed() >= Duration::from_secs(1) {
            gaps_at = std::time::Instant::now();
            send_gaps(&guest, &mut gaps_sent, &mut events)?;
            send_kvm_counters(&guest, &mut kvm_sent, &mut events)?;
        }
    }
    send_gaps(&guest, &mut gaps_sent, &mut events)?;
    send_kvm_counters(&guest, &mut kvm_sent, &mut events)?;
    // Rounds verified since the last look (a guest may finish within one).
    let now = guest.rounds().unwrap_or(0).saturating_sub(rounds_before);
    if now != rounds {
        protocol::send(&mut events, &Event::Rounds(now), &[])?;
    }
    let console = guest.console_tail();
    // The agent maps guest memory: gone before the memory is.
    drop(agent);
    let end = if started { guest.join() } else { stopped_before_start };
    protocol::send(&mut events, &Event::Ended { end, console }, &[])
}

/// Locks the process in its jail, if it has one (jail.rs); the
/// /proc files it keeps reading are opened first, since the jail has none.
fn jail(jail: Option<crate::protocol::Jail>) -> Result<()> {
    let Some(jail) = jail else { return Ok(()) };
    dedup::os::keep_proc_files().map_err(|e| Error::host(format!("cannot open its /proc files: {e}")))?;
    super::jail::handle_ending_signals().map_err(|e| Error::host(format!("cannot handle signals: {e}")))?;
    jail.enter(supervisor_alive).map_err(|e| Error::host(format!("cannot enter its jail: {e}")))?;
    super::seccomp::install(super::seccomp::Role::Process)
        .map_err(|e| Error::host(format!("cannot filter its system calls: {e}")))
}

/// Whether the supervisor still holds its end of the request channel.
fn supervisor_alive() -> bool {
    let mut p = libc::pollfd { fd: protocol::FD_REQUESTS, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: poll on one pollfd of our own, not waiting.
    let ready = unsafe { libc::poll(&mut p, 1, 0) };
    ready == 0 || (ready == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) == 0)
}

/// Writes a snapshot into the files that came with the request.
fn snapshot(guest: &Guest, files: io::Result<Vec<File>>) -> (Reply, Vec<u8>) {
    use crate::error::Kind;
    let files = files.and_then(crate::snapshot::SnapshotFiles::from_files);
    match files.map(|files| guest.snapshot(&files)) {
        Ok(Ok(written)) => (Reply::Snapshotted(written), Vec::new()),
        Ok(Err(e)) => error_reply(e.kind, e.message),
        Err(e) => error_reply(Kind::BadInput, format!("the snapshot's files: {e}")),
    }
}

/// Waits up to `limit` for a request or the vCPUs' end: (request ready,
/// finished). A closed channel reads as a request (its end of file).
fn wait_for_input(requests: &UnixStream, finished: &EventFd, limit: Duration) -> io::Result<(bool, bool)> {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd { fd: requests.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: finished.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: poll on two pollfds of our own.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, limit.as_millis() as i32) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok((false, false)) } else { Err(e) };
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}

/// Hands the heap that building the guest or adopting a snapshot's pages
/// used and freed (parsed state, page lists: hundreds of KiB) back to the
/// host: the allocator keeps it otherwise, and a clone is meant to cost
/// its host next to nothing.
fn return_freed_heap() {
    // glibc's allocator keeps freed memory until asked; musl has no malloc_trim.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends the guest's gap histogram if it grew since the last time.
fn send_gaps(guest: &Guest, sent: &mut u64, events: &mut UnixStream) -> io::Result<()> {
    let gaps = guest.gaps();
    if gaps.count() == *sent {
        return Ok(());
    }
    *sent = gaps.count();
    protocol::send(events, &Event::Gaps(gaps), &[])
}

/// Sends what the guest has cost KVM if it changed since the last time.
fn send_kvm_counters(
    guest: &Guest,
    sent: &mut crate::protocol::KvmCounters,
    events: &mut UnixStream,
) -> io::Result<()> {
    let now = guest.kvm_counters();
    if now == *sent {
        return Ok(());
    }
    *sent = now;
    protocol::send(events, &Event::Kvm(now), &[])
}

/// A guest built, with what its control thread drives beside it.
struct Built {
    guest: Guest,
    /// With in-process sharing; shared with the balloon's discards.
    agent: Option<Arc<Mutex<dedup::Agent>>>,
    balloon: Option<Arc<BalloonControl>>,
}

/// The guest's balloon, as the control thread drives it: targets, the
/// statistics it asks for now and then, and what it tells the supervisor.
struct BalloonHandle {
    control: Arc<BalloonControl>,
    slot: Arc<VirtioSlot>,
    stats_every: Option<Duration>,
    stats_asked: Instant,
    /// The status last sent to the supervisor.
    sent: Option<BalloonStatus>,
}

impl BalloonHandle {
    fn new(guest: &Guest, control: Arc<BalloonControl>) -> Option<BalloonHandle> {
        let slot = guest.virtio_slot(balloon::NAME)?;
        let every = guest.config().balloon.as_ref().map_or(0, |b| b.stats_interval_s);
        Some(BalloonHandle {
            control,
            slot,
            stats_every: (every > 0).then(|| Duration::from_secs(every)),
            stats_asked: Instant::now(),
            sent: None,
        })
    }

    /// A new target, in 4 KiB pages.
    fn set_target(&self, pages: u32) -> std::result::Result<(), String> {
        self.control.set_target(pages)?;
        self.slot.config_changed();
        Ok(())
    }

    /// Asks for statistics when due; returns the status if it changed
    /// since it was last sent.
    fn tick(&mut self) -> Option<BalloonStatus> {
        if self.stats_every.is_some_and(|every| self.stats_asked.elapsed() >= every) {
            self.stats_asked = Instant::now();
            if let Some(queue) = self.control.want_stats() {
                self.slot.kick_queue(queue);
            }
        }
        let now = self.control.status();
        (self.sent.as_ref() != Some(&now)).then(|| {
            self.sent = Some(now.clone());
            now
        })
    }
}

/// Builds the guest and, with in-process sharing, its merge agent.
fn build(setup: &Setup, prepared: Prepared, mut files: SetupFiles, stages: &mut Stages) -> Result<Built> {
    let Prepared { hv, vm } = prepared;
    let config = &setup.guest;
    // The supervisor checked what the snapshot is and which guest it
    // holds; its machine state is parsed and checked here.
    let state = match (&setup.restore, &config.restore) {
        (Some(saved), Some(dir)) => Some((SnapshotState::parse(saved, dir)?, dir.as_path())),
        _ => None,
    };
    let restore = state.as_ref().map(|(state, dir)| (state, *dir));
    let memfd = (setup.backend == MemoryBackend::Memfd).then(|| files.take(SetupFile::Memory)).transpose()?;
    let ram = GuestRam::new(config.memory_bytes(), memfd)
        .map_err(|e| Error::host(format!("cannot map {} MiB of guest memory: {e}", config.memory_mib)))?;
    // The snapshot's memory is read here only when the supervisor does not
    // adopt it.
    if let (Some((_, dir)), false) = (restore, setup.adopt_memory) {
        crate::guest::snapshot::load_memory(dir, &ram)
            .map_err(|e| Error::host(format!("cannot read snapshot {}: {e}", dir.display())))?;
    }
    if setup.ksm {
        ram.mark_mergeable().map_err(|e| Error::host(format!("MADV_MERGEABLE failed: {e}")))?;
    }
    let pages = Arc::new(GuestPages::new(&ram).map_err(|e| Error::host(format!("its memory file: {e}")))?);
    let balloon = config.balloon.as_ref().map(|_| Arc::new(BalloonControl::default()));
    stages.mark("state and memory");
    let balloon_parts = balloon.as_ref().map(|c| (c.clone(), pages.clone() as _));
    let virtio = virtio_devices(config, setup, &mut files, restore, balloon_parts)?;
    stages.mark("devices");
    let console_file = files.take(SetupFile::Console)?;
    let console = match setup.console_limit {
        Some(limit) => Console::with_sink(Box::new(
            CappedFile::new(console_file, limit).map_err(|e| Error::host(format!("its console file: {e}")))?,
        )),
        None => Console::with_sink(Box::new(console_file)),
    };
    let options = GuestOptions {
        dirty_log: setup.sharing.is_some_and(|a| a.dirty_log),
        hide_virtualization: setup.sharing.is_some(),
        kernel_args: setup.net.iter().filter_map(|n| n.kernel_arg.clone()).collect(),
        from_disk: match (&setup.boot_entry, &config.disk) {
            (Some(entry), Some(disk)) => Some(boot_files(entry, disk, config.memory_bytes())?),
            _ => None,
        },
    };
    let restored = restore.map(|(state, _)| state);
    let guest = Guest::create(&hv, vm, setup.id, config, ram, console, virtio, options, restored)?;
    stages.mark("VM and vCPUs");
    let agent = match setup.sharing {
        None => None,
        Some(agent) => {
            // This (the control) thread makes the merges.
            dedup::os::prioritize_thread(agent.nice, "the merge agent");
            let memfd = guest.ram().memfd().ok_or_else(|| Error::host("page sharing needs memfd guest memory"))?;
            let memfd = memfd.try_clone().map_err(|e| Error::host(e.to_string()))?;
            let store = files.take(SetupFile::Store)?;
            let agent = dedup::Agent::new(
                guest.ram().regions(),
                memfd,
                store,
                agent.protect.into(),
                guest.freezer(),
                guest.dirty_tracker(),
            )
            .map_err(|e| Error::host(format!("cannot set up page sharing: {e}")))?;
            let agent = Arc::new(Mutex::new(agent));
            pages.share_with(&agent);
            stages.mark("merge agent");
            Some(agent)
        }
    };
    Ok(Built { guest, agent, balloon })
}

/// The largest kernel read from a disk image.
const MAX_KERNEL_BYTES: u64 = 256 << 20;

/// The kernel and initrds a disk image's boot entry names, read from the
/// image into memfds (the initrds one after the other, as one), none
/// larger than the guest's RAM.
fn boot_files(entry: &BootEntry, disk: &Path, ram: u64) -> Result<(BootFile, Option<BootFile>)> {
    let image = BaseImage::open(disk).map_err(|e| Error::bad_input(e.to_string()))?;
    let bad = |e: String| Error::bad_input(format!("{}: {e}", disk.display()));
    let fs = boot_entry::open_partition(&image, entry.partition).map_err(bad)?;
    let read = |path: &str, limit| fs.read(path, limit).map_err(bad);
    let name = |path: &str| format!("{path} in {}", disk.display());
    let memfd_err = |e: std::io::Error| Error::host(format!("cannot hold a boot file: {e}"));
    let kernel = read(&entry.kernel, MAX_KERNEL_BYTES.min(ram))?;
    let kernel = BootFile::from_bytes(name(&entry.kernel), &[kernel]).map_err(memfd_err)?;
    if entry.initrds.is_empty() {
        return Ok((kernel, None));
    }
    let parts = entry.initrds.iter().map(|path| read(path, ram)).collect::<Result<Vec<_>>>()?;
    let initrd = BootFile::from_bytes(name(&entry.initrds.join(" + ")), &parts).map_err(memfd_err)?;
    Ok((kernel, Some(initrd)))
}

/// The guest's virtio devices in slot order (`virtio::planned`), each
/// built afresh or from its state in the snapshot it is restored from.
/// The disk's writes go to `setup.disk_overlay` (none: read-only), the
/// network's frames to the TAP the supervisor passed.
fn virtio_devices(
    config: &GuestConfig,
    setup: &Setup,
    files: &mut SetupFiles,
    restore: Option<(&SnapshotState, &std::path::Path)>,
    balloon: Option<(Arc<BalloonControl>, Arc<dyn GiveBack>)>,
) -> Result<Vec<Box<dyn VirtioDevice>>> {
    let disk_overlay = setup.disk_overlay.clone();
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(path) = &config.disk {
        let base = BaseImage::open(path).map_err(|e| Error::bad_input(e.to_string()))?;
        let saved =
            restore.and_then(|(state, dir)| Some((state.device(crate::guest::devices::virtio::block::NAME)?, dir)));
        let block = match (saved, disk_overlay) {
            (Some((saved, dir)), overlay) => from_value::<Block>(&saved.state)
                .and_then(|state| Block::restore((base, overlay), &state, dir))
                .map_err(|e| Error::bad_input(format!("the snapshot's disk: {e}")))?,
            (None, Some(overlay)) => {
                Block::new(Disk::with_overlay(base, &overlay).map_err(|e| Error::host(e.to_string()))?)
            }
            (None, None) => Block::new(Disk::read_only(base)),
        };
        let block = match &config.disk_limit {
            Some(limit) => block.with_limiter(limiter(limit)?),
            None => block,
        };
        // An overlay nobody asked to keep is a file without a name from
        // now on: whatever ends this process, nothing is left behind.
        if let (Some(overlay), false) = (&setup.disk_overlay, setup.keep_overlay) {
            std::fs::remove_file(overlay)
                .map_err(|e| Error::host(format!("cannot unlink its overlay {}: {e}", overlay.display())))?;
        }
        devices.push(Box::new(block));
    }
    if let Some(net) = &setup.net {
        let tap = crate::tap::Tap::from_fd(files.take(SetupFile::Tap)?.into(), net.tap.clone());
        let saved = restore.and_then(|(state, dir)| Some((state.device(virtio::net::NAME)?, dir)));
        let device = match saved {
            Some((saved, dir)) => from_value::<Net>(&saved.state)
                .and_then(|state| Net::restore(tap, &state, dir))
                .map_err(|e| Error::bad_input(format!("the snapshot's network device: {e}")))?,
            None => Net::new(tap, net.mac),
        };
        let device = match config.net.as_ref().and_then(|n| n.limit.as_ref()) {
            Some(limit) => device.with_limiter(limiter(limit)?),
            None => device,
        };
        devices.push(Box::new(device));
    }
    if let Some(v) = &setup.vsock {
        let listener =
            std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(files.take(SetupFile::Vsock)?));
        let dial = UnixStream::from(std::os::fd::OwnedFd::from(files.take(SetupFile::VsockDial)?));
        let dialer = crate::guest::dial::HostDialer::new(dial).map_err(|e| Error::host(format!("vsock: {e}")))?;
        let saved = restore.and_then(|(state, dir)| Some((state.device(virtio::vsock::NAME)?, dir)));
        let device = match saved {
            Some((saved, dir)) => from_value::<Vsock>(&saved.state)
                .and_then(|state| Vsock::restore((dialer, listener), &state, dir))
                .map_err(|e| Error::bad_input(format!("the snapshot's vsock device: {e}")))?,
            None => Vsock::new(v.cid, dialer, listener).map_err(|e| Error::host(format!("vsock: {e}")))?,
        };
        devices.push(Box::new(device));
    }
    if let (Some(b), Some((control, give_back))) = (&config.balloon, balloon) {
        let saved = restore.and_then(|(state, dir)| Some((state.device(balloon::NAME)?, dir)));
        let device = match saved {
            Some((saved, dir)) => from_value::<Balloon>(&saved.state)
                .and_then(|state| Balloon::restore((control, give_back), &state, dir))
                .map_err(|e| Error::bad_input(format!("the snapshot's balloon: {e}")))?,
            None => Balloon::new(b.deflate_on_oom, b.free_page_reporting, control, give_back)
                .map_err(|e| Error::host(format!("balloon: {e}")))?,
        };
        devices.push(Box::new(device));
    }
    Ok(devices)
}

fn limiter(limit: &crate::config::RateLimit) -> Result<crate::guest::devices::rate_limiter::RateLimiter> {
    crate::guest::devices::rate_limiter::RateLimiter::new(limit).map_err(|e| Error::host(format!("timerfd: {e}")))
}

fn error_reply(kind: crate::error::Kind, message: impl Into<String>) -> (Reply, Vec<u8>) {
    (Reply::Error { kind, message: message.into() }, Vec::new())
}

/// What besides the guest a request may reach.
struct Parts<'a> {
    agent: Option<&'a Arc<Mutex<dedup::Agent>>>,
    balloon: Option<&'a BalloonHandle>,
}

fn handle(
    guest: &mut Guest,
    parts: Parts,
    started: &mut bool,
    finished: &Arc<EventFd>,
    request: Request,
    payload: &[u8],
) -> (Reply, Vec<u8>) {
    use crate::error::Kind;
    let ok = (Reply::Ok, Vec::new());
    // Only the merge agent's own requests wait for it (a balloon's
    // discard may be holding it).
    let for_agent = matches!(request, Request::Status | Request::Watch | Request::Merge | Request::Adopt);
    let mut agent = parts.agent.filter(|_| for_agent).map(|a| a.lock().unwrap_or_else(|e| e.into_inner()));
    let agent = agent.as_deref_mut();
    match request {
        Request::Setup(_) => error_reply(Kind::Conflict, "the guest is set up already"),
        Request::Start if *started => error_reply(Kind::Conflict, "the guest has started already"),
        Request::Start => match guest.start(finished.clone()) {
            Ok(()) => {
                *started = true;
                ok
            }
            Err(e) => error_reply(Kind::Host, format!("cannot start the guest: {e}")),
        },
        Request::Pause => {
            guest.pause();
            ok
        }
        Request::Resume => {
            guest.resume();
            ok
        }
        Request::Throttle(on) => {
            guest.throttle(on);
            ok
        }
        Request::Stop(reason) => {
            guest.stop(reason);
            ok
        }
        Request::Console => (Reply::Console(guest.console_tail()), Vec::new()),
        Request::Balloon(pages) => {
            let Some(balloon) = parts.balloon else {
                return error_reply(Kind::Conflict, "this guest has no balloon device");
            };
            match balloon.set_target(pages) {
                Ok(()) => ok,
                Err(e) => error_reply(Kind::Conflict, e),
            }
        }
        Request::Snapshot => error_reply(Kind::BadInput, "a snapshot's files did not come with it"),
        Request::Status => {
            let Some(agent) = agent else { return error_reply(Kind::Conflict, "this guest does not share pages") };
            match agent.status() {
                Ok(s) => (
                    Reply::Status {
                        has_dirty_log: s.dirty.is_some(),
                        mappings: s.mappings,
                        map_limit: s.map_limit,
                        discarded: s.discarded,
                    },
                    protocol::words_to_bytes(&s.dirty.unwrap_or_default()),
                ),
                Err(e) => error_reply(Kind::Host, format!("reading the dirty log: {e}")),
            }
        }
        Request::Watch => {
            let Some(agent) = agent else { return error_reply(Kind::Conflict, "this guest does not share pages") };
            let watch = protocol::bytes_to_words(payload).and_then(|pages| dedup::GuestAgent::watch(agent, &pages));
            match watch {
                Ok(()) => ok,
                Err(e) => error_reply(Kind::Host, format!("watching the dirty log: {e}")),
            }
        }
        Request::Adopt if *started => error_reply(Kind::Conflict, "only a guest that has not run can adopt pages"),
        Request::Merge | Request::Adopt => {
            let Some(agent) = agent else { return error_reply(Kind::Conflict, "this guest does not share pages") };
            let merges = match protocol::decode_merges(payload) {
                Ok(m) => m,
                Err(e) => return error_reply(Kind::BadInput, e.to_string()),
            };
            let out = if matches!(request, Request::Adopt) { agent.adopt(&merges) } else { agent.merge(&merges) };
            let merged = (out.merged.iter().zip(&out.changed))
                .map(|(&m, &c)| {
                    if m {
                        protocol::MERGED
                    } else if c {
                        protocol::CHANGED
                    } else {
                        0
                    }
                })
                .collect();
            let reply = Reply::Merged {
                stalls_ns: out.stalls.iter().map(|d| d.as_nanos() as u64).collect(),
                write_protected: out.protection == Some(dedup::Protection::WriteProtect),
                map_limited: out.map_limited,
                mappings: out.mappings,
                map_limit: out.map_limit,
                errors: out.errors,
                first_error: out.first_error,
            };
            (reply, merged)
        }
    }
}
