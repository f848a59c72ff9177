//! The supervisor's side of a guest process: starting it with its
//! descriptors, asking it things, hearing its events, and learning how it
//! ended, whichever way that was (a clean end it reported, a panic, a
//! signal, the OOM killer).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol::{self, Event, Reply, Request, Setup, SetupFile};
use crate::supervisor::cgroup::MemoryCgroup;

/// How long a guest process may take to build its guest.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long it may take to answer anything else; a process that does not is
/// broken, and is ended.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of a guest process's stderr kept to explain its end.
const STDERR_LINES: usize = 20;
/// How often a request waiting for its reply checks whether the process
/// has been stopped.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// The request channel: its socket and the number of the last request.
struct Channel {
    stream: UnixStream,
    last: u64,
}

/// Whether `fd` has something to read (or has hung up, or, a pidfd, its
/// process has exited) within `wait`; a wait under a millisecond is one.
fn readable_within(fd: RawFd, wait: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = if wait.is_zero() { 0 } else { wait.as_millis().clamp(1, i32::MAX as u128) as i32 };
    // SAFETY: poll on one pollfd of our own; no memory but `p` involved.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// What the supervisor hands a new guest process besides its setup.
pub struct Descriptors<'a> {
    pub memory: Option<&'a File>,
    pub store: Option<File>,
    pub console: File,
    pub tap: Option<std::os::fd::OwnedFd>,
    pub vsock: Option<std::os::fd::OwnedFd>,
    pub vsock_dial: Option<std::os::fd::OwnedFd>,
}

impl Descriptors<'_> {
    /// What each descriptor is and its number here, in the order sent.
    fn listed(&self) -> (Vec<SetupFile>, Vec<RawFd>) {
        let optional = [
            (SetupFile::Memory, self.memory.map(|f| f.as_raw_fd())),
            (SetupFile::Store, self.store.as_ref().map(|f| f.as_raw_fd())),
            (SetupFile::Tap, self.tap.as_ref().map(|f| f.as_raw_fd())),
            (SetupFile::Vsock, self.vsock.as_ref().map(|f| f.as_raw_fd())),
            (SetupFile::VsockDial, self.vsock_dial.as_ref().map(|f| f.as_raw_fd())),
        ];
        std::iter::once((SetupFile::Console, Some(self.console.as_raw_fd())))
            .chain(optional)
            .filter_map(|(kind, fd)| Some((kind, fd?)))
            .unzip()
    }
}

/// How a guest process ended, as the supervisor saw it.
pub struct Exit {
    pub status: Option<ExitStatus>,
    /// Its last lines on stderr.
    pub stderr: Vec<String>,
}

impl Exit {
    /// Whether SIGKILL ended it.
    pub fn sigkilled(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.status.is_some_and(|s| s.signal() == Some(libc::SIGKILL))
    }

    /// Why the process ended without reporting an end of its own.
    pub fn reason(&self, oom_killed: bool) -> String {
        if let Some(panic) = self.stderr.iter().rev().find_map(|l| l.strip_prefix("vmm-guest panic: ")) {
            return format!("its process panicked: {panic}");
        }
        if let Some(call) = self.stderr.iter().rev().find_map(|l| l.strip_prefix(crate::protocol::VIOLATION)) {
            return format!("seccomp violation: {call}");
        }
        use std::os::unix::process::ExitStatusExt;
        let signal = self.stderr.iter().rev().find_map(|l| l.strip_prefix(crate::protocol::FATAL_SIGNAL)?.parse().ok());
        match self.status {
            Some(s) if s.signal() == Some(libc::SIGKILL) && oom_killed => {
                "its process was killed by the kernel's OOM killer".into()
            }
            Some(s) if s.signal().or(signal).is_some() => {
                let sig = s.signal().or(signal).unwrap();
                match signal_name(sig) {
                    Some(name) => format!("its process was killed by signal {sig} ({name})"),
                    None => format!("its process was killed by signal {sig}"),
                }
            }
            Some(s) => match self.stderr.last() {
                Some(line) => format!("its process exited with {s}: {line}"),
                None => format!("its process exited with {s} without reporting how the guest ended"),
            },
            None => "its process could not be waited for".into(),
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => return None,
    })
}

/// A running guest process.
pub struct GuestProcess {
    pub id: usize,
    pub pid: u32,
    /// Signals go through a pidfd: never to another process that reused the pid.
    pidfd: OwnedFd,
    requests: Mutex<Channel>,
    /// Set when the request channel can no longer be trusted (a running
    /// process let a request time out, or sent a frame out of turn):
    /// every later request fails at once.
    broken: AtomicBool,
    /// Why the supervisor ended the process, if it did.
    killed_for: Mutex<Option<String>>,
}

/// What a new guest process reported about its guest.
pub struct Created {
    pub regions: Vec<dedup::Region>,
    pub protection: Option<String>,
    /// Whether its process came from the pool (started before it was asked for).
    pub pooled: bool,
    /// How long each step of its making took, in ms, from the spawn on:
    /// "process started" is the fork, exec and the runtime's start.
    pub stages: Vec<(String, f64)>,
}

/// Each stage's time from the end of the one before, the first from
/// `spawned_ns`; stages out of order (a clock that is not the same) read 0.
fn stage_times(spawned_ns: u64, stages: &[(String, u64)]) -> Vec<(String, f64)> {
    let mut last = spawned_ns;
    stages
        .iter()
        .map(|(name, at)| {
            let ms = at.saturating_sub(last) as f64 / 1e6;
            last = last.max(*at);
            (name.clone(), ms)
        })
        .collect()
}

/// A guest process started ahead of its guest: it has KVM open and an
/// empty VM made, and waits for a setup (the pool keeps a few, pool.rs).
pub struct Spare {
    child: Child,
    pidfd: OwnedFd,
    requests: UnixStream,
    events: UnixStream,
    /// Its stderr, read from its start: a guest made of it starts no
    /// thread for it (starting a thread waits for the address space's lock).
    stderr: StderrForward,
    /// The cgroup it was started in, its guest's once it has one.
    cgroup: Option<MemoryCgroup>,
}

/// A thread reading a guest process's stderr: it keeps the last lines, and
/// shows each line once the process has a guest.
struct StderrForward {
    guest: Arc<OnceLock<usize>>,
    tail: JoinHandle<Vec<String>>,
}

impl Spare {
    /// Starts `vmm guest`, in `cgroup` if given, and in a PID namespace of
    /// its own if it will be `jailed`.
    pub fn start(cgroup: Option<&MemoryCgroup>, jailed: bool) -> io::Result<Spare> {
        let (requests, child_requests) = UnixStream::pair()?;
        let (events, child_events) = UnixStream::pair()?;
        // This very binary, even if its file was replaced since it started:
        // the guest process must speak the supervisor's protocol.
        let mut command = Command::new("/proc/self/exe");
        command
            .arg("--log-level")
            .arg(log::max_level().to_string().to_lowercase())
            .arg("guest")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Into the cgroup first: placing the channels may overwrite the
        // number of its cgroup.procs descriptor (pre_exec steps run in order).
        if let Some(cg) = cgroup {
            cg.enroll(&mut command);
        }
        place_descriptors(
            &mut command,
            vec![(child_requests.as_raw_fd(), protocol::FD_REQUESTS), (child_events.as_raw_fd(), protocol::FD_EVENTS)],
        );
        let mut child = spawn_from_lasting_thread(command, jailed)?;
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr = match forward_stderr(stderr) {
            Ok(forward) => forward,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(e.kind(), format!("a thread to read its stderr: {e}")));
            }
        };
        Ok(Spare { child, pidfd, requests, events, stderr, cgroup: None })
    }

    /// Starts one in a cgroup of its own, which goes to its guest with it.
    pub fn start_in(cgroup: Option<MemoryCgroup>, jailed: bool) -> io::Result<Spare> {
        let mut spare = Spare::start(cgroup.as_ref(), jailed)?;
        spare.cgroup = cgroup;
        Ok(spare)
    }

    /// The cgroup it runs in, if it was started in one of its own.
    pub fn take_cgroup(&mut self) -> Option<MemoryCgroup> {
        self.cgroup.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` until it says it is ready (`Event::Ready`).
    pub fn wait_ready(&mut self, limit: Duration) -> io::Result<()> {
        self.events.set_read_timeout(Some(limit))?;
        let ready = protocol::receive::<Event>(&mut self.events);
        self.events.set_read_timeout(None)?;
        match ready? {
            Some((Event::Ready, _)) => Ok(()),
            Some((other, _)) => Err(io::Error::other(format!("its first event was {other:?}"))),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "it exited before it was ready")),
        }
    }

    /// Its pidfd, readable once it has exited.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    pub fn has_exited(&self) -> bool {
        readable_within(self.pidfd.as_raw_fd(), Duration::ZERO)
    }

    /// Ends it (if it has not ended), reaps it and returns how it ended and
    /// its last lines on stderr.
    pub fn end(mut self) -> (Option<ExitStatus>, Vec<String>) {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        // Empty now: it can go.
        drop(self.cgroup.take());
        (status, self.stderr.tail.join().unwrap_or_default())
    }
}

impl GuestProcess {
    /// Gives `setup` to a guest process, `spare` if one is given (in
    /// `cgroup` already), else one started now in `cgroup`, and waits until
    /// it has built the guest. `on_event` receives its events; `on_gone`
    /// runs once it has exited (its memory mappings are gone then) and
    /// before it is reaped.
    pub fn spawn(
        mut setup: Box<Setup>,
        fds: Descriptors,
        cgroup: Option<&MemoryCgroup>,
        spare: Option<Spare>,
        on_event: impl Fn(Event) + Send + 'static,
        on_gone: impl FnOnce(Exit) + Send + 'static,
    ) -> Result<(Arc<GuestProcess>, Created)> {
        let id = setup.id;
        let host = |what: &str, e: io::Error| Error::host(format!("guest {id}: {what}: {e}"));
        let jailed = setup.jail.is_some();
        let spawned_ns = crate::proc::monotonic_ns();
        let pooled = spare.is_some();
        let spare = match spare {
            Some(spare) => spare,
            None => Spare::start(cgroup, jailed).map_err(|e| host("cannot start its process", e))?,
        };
        let Spare { mut child, pidfd, requests, mut events, stderr, cgroup: _ } = spare;
        let (kinds, files) = fds.listed();
        setup.files = kinds;
        let pid = child.id();
        let process = Arc::new(GuestProcess {
            id,
            pid,
            pidfd,
            requests: Mutex::new(Channel { stream: requests, last: 0 }),
            broken: AtomicBool::new(false),
            killed_for: Mutex::new(None),
        });
        let _ = stderr.guest.set(id);
        let stderr_tail = stderr.tail;
        let created = process.call_with_timeout(&Request::Setup(setup), &[], &files, SETUP_TIMEOUT);
        drop(fds);
        let created = match created {
            Ok((Reply::Created { regions, protection, stages }, _)) => Ok(Created {
                pooled,
                stages: stage_times(spawned_ns, &stages),
                regions: regions
                    .into_iter()
                    .map(|(host, len, file_offset)| dedup::Region { host, len: len as usize, file_offset })
                    .collect(),
                protection,
            }),
            Ok((Reply::Error { kind, message }, _)) => Err(Error::new(kind, message)),
            Ok((other, _)) => Err(Error::host(format!("guest {id}: its process answered {other:?} to its setup"))),
            Err(e) => Err(e),
        };
        let created = match created {
            Ok(c) => c,
            Err(e) => {
                process.kill();
                let _ = child.wait();
                let lines = stderr_tail.join().unwrap_or_default();
                return Err(if lines.is_empty() { e } else { e.context(lines.join("; ")) });
            }
        };
        // Started off this path: starting a thread waits for the address
        // space's lock (headroom.rs); meanwhile its events wait in the channel.
        start_off_path(format!("guest{id}-watch"), move |own_thread| {
            if !own_thread {
                log::error!("guest {id}: no thread to watch its process; ending it");
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            // Events until the process closes its end (it exits).
            loop {
                match protocol::receive::<Event>(&mut events) {
                    Ok(Some((event, _))) => on_event(event),
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("guest {id}: its process sent garbage ({e}); ending it");
                        // SAFETY: kill(2) on our own child, not yet reaped.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        break;
                    }
                }
            }
            let status = wait_exited(&child);
            let stderr = stderr_tail.join().unwrap_or_default();
            on_gone(Exit { status, stderr });
            let _ = child.wait();
        })
        .map_err(|e| host("cannot start its watcher thread", e))?;
        Ok((process, created))
    }

    /// Sends a request and waits for the reply; the guest's errors come back
    /// as they are, a silent or broken channel as a host error.
    pub fn request(&self, request: &Request, payload: &[u8]) -> Result<(Reply, Vec<u8>)> {
        self.request_within(request, payload, REQUEST_TIMEOUT)
    }

    /// As [`GuestProcess::request`], for requests that may take longer.
    pub fn request_within(&self, request: &Request, payload: &[u8], timeout: Duration) -> Result<(Reply, Vec<u8>)> {
        guest_error(self.call_with_timeout(request, payload, &[], timeout)?)
    }

    /// As [`GuestProcess::request_within`], with descriptors sent after
    /// the request (a snapshot's files).
    pub fn request_with_files(
        &self,
        request: &Request,
        files: &[RawFd],
        timeout: Duration,
    ) -> Result<(Reply, Vec<u8>)> {
        guest_error(self.call_with_timeout(request, &[], files, timeout)?)
    }

    /// One request and its reply. A request waits for its own reply (each
    /// carries a number) until `timeout`; a reply to an earlier request
    /// that was given up is dropped. A process found stopped is not asked
    /// (a [`crate::error::Kind::Unresponsive`] error), and one that stops while it is
    /// asked is given up at once unless the request changes guest memory
    /// (a merge or an adoption, whose outcome must be known): so a stopped
    /// process holds nobody up but a caller that must wait.
    fn call_with_timeout(
        &self,
        request: &Request,
        payload: &[u8],
        files: &[RawFd],
        timeout: Duration,
    ) -> Result<(Reply, Vec<u8>)> {
        let id = self.id;
        if self.broken.load(Ordering::SeqCst) {
            return Err(Error::host(format!("guest {id}'s process no longer answers")));
        }
        let mut channel = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_stopped() {
            return Err(self.stopped_error(request));
        }
        let may_give_up = !matches!(request, Request::Merge | Request::Adopt);
        channel.last += 1;
        let number = channel.last;
        let deadline = std::time::Instant::now() + timeout;
        let stream = &mut channel.stream;
        let broken = |e: io::Error| {
            self.broken.store(true, Ordering::SeqCst);
            Error::host(format!("guest {id}'s process did not answer its {} request: {e}", request.name()))
        };
        protocol::send(stream, &(number, request), payload)
            .and_then(|()| if files.is_empty() { Ok(()) } else { protocol::send_files(stream, files) })
            .map_err(broken)?;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                let why = format!("no answer in {} s", timeout.as_secs());
                return Err(broken(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
            if !readable_within(stream.as_raw_fd(), left.min(STOP_CHECK)) {
                if may_give_up && self.is_stopped() {
                    return Err(self.stopped_error(request));
                }
                continue;
            }
            // A frame is coming: it is read whole, within what is left.
            let frame = stream.set_read_timeout(Some(left)).and_then(|()| protocol::receive::<(u64, Reply)>(stream));
            match frame.map_err(broken)? {
                None => return Err(broken(io::Error::new(io::ErrorKind::UnexpectedEof, "its process has exited"))),
                Some(((n, reply), payload)) if n == number => return Ok((reply, payload)),
                // The late reply to a request given up earlier.
                Some(((n, _), _)) if n < number => continue,
                Some(((n, _), _)) => {
                    return Err(broken(io::Error::other(format!("it answered request {n}, not yet asked"))))
                }
            }
        }
    }

    /// Whether the process is stopped (by SIGSTOP or a tracer) now.
    pub fn is_stopped(&self) -> bool {
        crate::proc::is_stopped(self.pid) && !self.has_exited()
    }

    /// Why the process cannot be asked anything now, if it cannot.
    pub fn unresponsive(&self) -> Option<String> {
        if self.broken.load(Ordering::SeqCst) {
            Some("its process stopped answering requests".into())
        } else if self.is_stopped() {
            Some("its process is stopped (SIGSTOP or a tracer); it answers again once continued".into())
        } else {
            None
        }
    }

    fn stopped_error(&self, request: &Request) -> Error {
        Error::new(
            crate::error::Kind::Unresponsive,
            format!("guest {}'s process is stopped (SIGSTOP or a tracer): not asked to {}", self.id, request.name()),
        )
    }

    /// Ends the process at once for `reason` (the first reason given is
    /// the one reported).
    pub fn kill_for(&self, reason: String) {
        if self.has_exited() {
            // It ended by itself first: that is its story.
            return;
        }
        self.killed_for.lock().unwrap().get_or_insert(reason);
        self.kill();
    }

    /// Why the supervisor ended the process, if it did.
    pub fn killed_for(&self) -> Option<String> {
        self.killed_for.lock().unwrap().clone()
    }

    /// Whether the process has exited (its pidfd is readable then).
    pub fn has_exited(&self) -> bool {
        self.exits_within(Duration::ZERO)
    }

    /// Whether the process exits within `wait`. An exiting process closes
    /// its sockets a moment before its pidfd turns readable, so a broken
    /// channel is worth this short wait before it is called a failure.
    pub fn exits_within(&self, wait: Duration) -> bool {
        readable_within(self.pidfd.as_raw_fd(), wait)
    }

    /// Ends the process at once (SIGKILL).
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal on a pidfd we own; no memory involved.
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
        };
    }
}

/// The guest's errors as errors.
fn guest_error(reply: (Reply, Vec<u8>)) -> Result<(Reply, Vec<u8>)> {
    match reply {
        (Reply::Error { kind, message }, _) => Err(Error::new(kind, message)),
        reply => Ok(reply),
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall returning a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as RawFd;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until the child has exited, without reaping it: its pid stays
/// ours (nothing else can get it) while the engine lets go of its memory,
/// which is gone by the time a process can be waited for. Returns how it
/// exited.
fn wait_exited(child: &Child) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        // SAFETY: waitid into a zeroed siginfo of our own.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; WNOWAIT leaves the child waitable.
        let r =
            unsafe { libc::waitid(libc::P_PID, child.id() as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            // SAFETY: waitid filled in a SIGCHLD siginfo.
            let status = unsafe { info.si_status() };
            // The wait(2) status encoding: an exit code in bits 8-15, or a signal.
            return Some(match info.si_code {
                libc::CLD_EXITED => ExitStatus::from_raw((status & 0xff) << 8),
                libc::CLD_DUMPED => ExitStatus::from_raw(status | 0x80),
                _ => ExitStatus::from_raw(status),
            });
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// Copies the child's stderr to ours once it has a guest, each line marked
/// with the guest (a spare's lines are only kept), and keeps its last
/// lines; the thread returns them at the end of the stream.
/// A guest process is not trusted with the supervisor's memory or log:
/// lines are cut at [`STDERR_LINE_BYTES`] and at most
/// [`STDERR_LINES_PER_SECOND`] a second are copied (the rest are counted,
/// and still kept as the last lines).
fn forward_stderr(stderr: std::process::ChildStderr) -> io::Result<StderrForward> {
    let guest = Arc::new(OnceLock::<usize>::new());
    let label = guest.clone();
    let tail = dedup::os::spawn_keeping_nice("guest-stderr".into(), move || {
        let mut last = VecDeque::new();
        let mut reader = BufReader::new(stderr);
        let mut limit = LineLimit::default();
        while let Some(line) = read_bounded_line(&mut reader) {
            // A spare's lines are only kept: they come with its end.
            if let Some(id) = label.get() {
                match limit.admit(std::time::Instant::now()) {
                    Admit::Yes { dropped: 0 } => eprintln!("[guest {id}] {line}"),
                    Admit::Yes { dropped } => {
                        eprintln!("[guest {id}] ({dropped} lines dropped: over {STDERR_LINES_PER_SECOND} a second)");
                        eprintln!("[guest {id}] {line}");
                    }
                    Admit::No => {}
                }
            }
            keep_last(&mut last, line);
        }
        last.into()
    })?;
    Ok(StderrForward { guest, tail })
}

/// Keeps `line` among the last [`STDERR_LINES`] lines of a process's stderr.
fn keep_last(last: &mut VecDeque<String>, line: String) {
    if last.len() == STDERR_LINES {
        last.pop_front();
    }
    last.push_back(line);
}

/// The longest line of a guest process's stderr kept whole.
const STDERR_LINE_BYTES: usize = 4096;
/// Lines of a guest process's stderr copied to ours per second at most.
const STDERR_LINES_PER_SECOND: u32 = 100;

/// The next line, cut at [`STDERR_LINE_BYTES`] (the rest of it is read and
/// dropped); `None` at the end of the stream.
fn read_bounded_line(reader: &mut impl BufRead) -> Option<String> {
    let mut line = Vec::new();
    let mut cut = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) if line.is_empty() && !cut => return None,
            Ok([]) => break,
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        let (take, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        let room = STDERR_LINE_BYTES - line.len();
        cut |= take > room;
        line.extend_from_slice(&buf[..take.min(room)]);
        reader.consume(take + usize::from(end));
        if end {
            break;
        }
    }
    let mut line = String::from_utf8_lossy(&line).into_owned();
    if cut {
        line.push_str(" [cut]");
    }
    Some(line)
}

/// At most [`STDERR_LINES_PER_SECOND`] lines in each second.
#[derive(Default)]
struct LineLimit {
    second: Option<std::time::Instant>,
    lines: u32,
    dropped: u64,
}

enum Admit {
    /// Copy it, after saying how many were dropped before it.
    Yes {
        dropped: u64,
    },
    No,
}

impl LineLimit {
    fn admit(&mut self, now: std::time::Instant) -> Admit {
        if self.second.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            self.second = Some(now);
            self.lines = 0;
        }
        if self.lines == STDERR_LINES_PER_SECOND {
            self.dropped += 1;
            return Admit::No;
        }
        self.lines += 1;
        Admit::Yes { dropped: std::mem::take(&mut self.dropped) }
    }
}

/// Starts `command` from a thread that lives as long as this process.
///
/// A guest process dies with the thread that forked it
/// (`PR_SET_PDEATHSIG` follows the forking thread, not the process), and
/// the API makes guests on tokio's blocking threads, which exit after 10 s
/// idle: forked there, a guest was killed 10 s after the API went quiet.
fn spawn_from_lasting_thread(command: Command, own_pid_namespace: bool) -> io::Result<Child> {
    type Job = (Command, bool, std::sync::mpsc::Sender<io::Result<Child>>);
    static SPAWNER: Mutex<Option<std::sync::mpsc::Sender<Job>>> = Mutex::new(None);
    let (reply, answer) = std::sync::mpsc::channel();
    {
        let mut spawner = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
        if spawner.is_none() {
            let (jobs, queue) = std::sync::mpsc::channel::<Job>();
            dedup::os::spawn_keeping_nice("guest-spawner".into(), move || {
                // Processes start real-time, where allowed: a fork, an exec
                // and a runtime's start must not queue for a core behind
                // hundreds of busy vCPUs. Each guest process puts itself
                // back (guest::process) before it runs anything of a guest.
                let param = libc::sched_param { sched_priority: 1 };
                // SAFETY: sched_setscheduler on the calling thread with a
                // valid parameter; a refusal leaves it as it was.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
                for (mut command, own_pid_namespace, reply) in queue {
                    let spawned = match own_pid_namespace {
                        true => super::jailer::new_pid_namespace()
                            .map_err(|e| io::Error::new(e.kind(), format!("a PID namespace of its own: {e}")))
                            .and_then(|()| command.spawn()),
                        false => command.spawn(),
                    };
                    let _ = reply.send(spawned);
                }
            })?;
            *spawner = Some(jobs);
        }
        let jobs = spawner.as_ref().expect("the spawner runs");
        jobs.send((command, own_pid_namespace, reply))
            .map_err(|_| io::Error::other("the guest spawner thread is gone"))?;
    }
    answer.recv().map_err(|_| io::Error::other("the guest spawner thread is gone"))?
}

/// Runs `job` on a thread of its own named `name`, started by a thread
/// that lives as long as this process, so that the caller does not wait
/// for the start. `job` learns whether it got its own thread: if none could
/// be started it runs on the starter's, after the jobs before it.
fn start_off_path(name: String, job: impl FnOnce(bool) + Send + 'static) -> io::Result<()> {
    type Job = (String, Box<dyn FnOnce(bool) + Send>);
    static STARTER: Mutex<Option<std::sync::mpsc::Sender<Job>>> = Mutex::new(None);
    let mut starter = STARTER.lock().unwrap_or_else(|e| e.into_inner());
    if starter.is_none() {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        dedup::os::spawn_keeping_nice("thread-starter".into(), move || {
            for (name, job) in queue {
                // Handed over through a slot: a failed start gives it back.
                let slot = Arc::new(Mutex::new(Some(job)));
                let mine = slot.clone();
                let started = dedup::os::spawn_keeping_nice(name, move || {
                    if let Some(job) = mine.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        job(true)
                    }
                });
                if started.is_err() {
                    if let Some(job) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        job(false)
                    }
                }
            }
        })?;
        *starter = Some(jobs);
    }
    let jobs = starter.as_ref().expect("the starter runs");
    jobs.send((name, Box::new(job))).map_err(|_| io::Error::other("the thread starter is gone"))
}

/// Makes the child see each (parent fd, child fd) pair at its number, open
/// across exec.
fn place_descriptors(command: &mut Command, mapping: Vec<(RawFd, RawFd)>) {
    // SAFETY: the closure runs in the forked child before exec and calls
    // only fcntl, dup2 and close_range, which are async-signal-safe, and
    // prctl.
    unsafe {
        command.pre_exec(move || {
            // Die with the supervisor: a guest must never outlive it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // It keeps the spawner's priority through exec and its start
            // (a busy host must not slow a process that runs nothing of a
            // guest's yet); it puts itself at the default before its guest
            // runs (guest::process).
            // Nothing the supervisor inherited or opened reaches the guest
            // process but what is placed below (dup2 clears close-on-exec
            // on its targets alone).
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Out of the way first, so no source is overwritten by a target.
            let mut moved = [0; 10];
            for (i, &(from, _)) in mapping.iter().enumerate() {
                moved[i] = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 64);
                if moved[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, &(_, to)) in mapping.iter().enumerate() {
                // dup2 leaves the new descriptor open across exec.
                if libc::dup2(moved[i], to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exit(raw: i32, stderr: &[&str]) -> Exit {
        Exit { status: Some(ExitStatus::from_raw(raw)), stderr: stderr.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn a_guest_process_cannot_flood_the_supervisor_through_stderr() {
        let long = format!("{}\nshort\n", "x".repeat(1 << 20));
        let mut reader = BufReader::new(long.as_bytes());
        let first = read_bounded_line(&mut reader).unwrap();
        assert_eq!(first.len(), STDERR_LINE_BYTES + " [cut]".len());
        assert_eq!(read_bounded_line(&mut reader).as_deref(), Some("short"));
        assert_eq!(read_bounded_line(&mut reader), None);
        assert_eq!(read_bounded_line(&mut BufReader::new(&b"no newline"[..])).as_deref(), Some("no newline"));

        let mut limit = LineLimit::default();
        let t0 = std::time::Instant::now();
        let copied = (0..1000).filter(|_| matches!(limit.admit(t0), Admit::Yes { .. })).count();
        assert_eq!(copied, STDERR_LINES_PER_SECOND as usize);
        match limit.admit(t0 + Duration::from_secs(1)) {
            Admit::Yes { dropped } => assert_eq!(dropped, 900),
            Admit::No => panic!("a new second copies again"),
        }
    }

    #[test]
    fn the_reason_names_what_ended_the_process() {
        let panic = "vmm-guest panic: panicked at vmm/src/x.rs:1:1: attempt to divide by zero";
        let reason = exit(6, &["noise", panic]).reason(false);
        assert_eq!(reason, "its process panicked: panicked at vmm/src/x.rs:1:1: attempt to divide by zero");
        assert_eq!(exit(9, &[]).reason(true), "its process was killed by the kernel's OOM killer");
        assert_eq!(exit(9, &[]).reason(false), "its process was killed by signal 9 (SIGKILL)");
        assert_eq!(exit(11 | 0x80, &[]).reason(false), "its process was killed by signal 11 (SIGSEGV)");
        assert_eq!(exit(40, &[]).reason(false), "its process was killed by signal 40");
        assert_eq!(exit(31 << 8, &["vmm-guest seccomp violation: socket"]).reason(false), "seccomp violation: socket");
        assert_eq!(
            exit(2 << 8, &["vmm guest: bad"]).reason(false),
            "its process exited with exit status: 2: vmm guest: bad"
        );
    }
}
