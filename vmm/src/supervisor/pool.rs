//! Guest processes started ahead of need (`--pool N`), so that making a
//! guest, a clone above all, is a message to a process that is already
//! running rather than a fork and exec: a [`Spare`] has KVM open and an
//! empty VM made, and waits for its setup. Spares are started as any guest
//! process is (from the supervisor's spawner thread, in a PID namespace of
//! their own when guests are jailed, dying with the supervisor); each
//! jails itself once it has its guest, with that guest's user id.
//!
//! A keeper thread keeps `size` spares: it starts one for each taken and
//! replaces any that ends before it is used (logging how it ended). While
//! guests are being made in a burst and two spares or more are left, it
//! waits for the burst to end ([`QUIET_BEFORE_REFILL`]): starting a process
//! forks the supervisor, which holds up the guests being made meanwhile.
//! Each spare lives in a memory cgroup of its own, which becomes its
//! guest's when it is taken; the pool ends them all when it is stopped (it
//! lives until then: the keeper holds it).

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::supervisor::cgroup::CgroupPlace;
use crate::supervisor::handle::Spare;

/// How long the keeper waits after a spare fails to start before it tries
/// again (a host out of processes or memory must not be hammered).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a new spare may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long after the last spare was taken the keeper starts replacements,
/// unless one spare or none is left. A fork copies the supervisor's page
/// tables with its address space locked (0.6-20 ms with 50 guests here,
/// once 72 ms): every guest being made waits meanwhile for its own mappings.
pub const QUIET_BEFORE_REFILL: Duration = Duration::from_millis(200);

pub struct Pool {
    size: usize,
    jailed: bool,
    /// Where each spare's cgroup is made (each has its own, which becomes
    /// its guest's: a process moved between cgroups waits for the kernel).
    cgroups: Option<CgroupPlace>,
    /// Names spares' cgroups.
    started: AtomicU64,
    spares: Mutex<VecDeque<Spare>>,
    /// Wakes the keeper: a spare was taken, or the pool is stopping.
    wake: EventFd,
    stopping: AtomicBool,
    keeper: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Spares that ended before they were used, and were replaced.
    replaced: AtomicU64,
    /// When a spare was last taken.
    last_take: Mutex<Option<Instant>>,
}

/// What the pool holds now (`GET /host`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    /// Spares it keeps (`--pool`).
    pub size: usize,
    /// Spares ready now.
    pub ready: usize,
    /// Their process ids (in the host's PID namespace).
    pub pids: Vec<u32>,
    /// Spares that ended before they were used, and were replaced.
    pub replaced: u64,
}

impl Pool {
    /// Starts a pool of `size` spares (each in a cgroup of its own in
    /// `cgroups`, if given) and its keeper.
    pub fn start(size: usize, jailed: bool, cgroups: Option<CgroupPlace>) -> std::io::Result<Arc<Pool>> {
        let pool = Arc::new(Pool {
            size,
            jailed,
            cgroups,
            started: AtomicU64::new(0),
            spares: Mutex::new(VecDeque::with_capacity(size)),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
            keeper: Mutex::new(None),
            replaced: AtomicU64::new(0),
            last_take: Mutex::new(None),
        });
        let keeper = pool.clone();
        let handle = std::thread::Builder::new().name("pool-keeper".into()).spawn(move || keeper.keep())?;
        *pool.keeper.lock().unwrap() = Some(handle);
        Ok(pool)
    }

    /// A spare that is still running, if one is ready (the oldest first);
    /// the keeper starts another in its place.
    pub fn take(&self) -> Option<Spare> {
        let mut dead = Vec::new();
        let spare = {
            let mut spares = self.spares.lock().unwrap();
            loop {
                match spares.pop_front() {
                    Some(spare) if spare.has_exited() => dead.push(spare),
                    other => break other,
                }
            }
        };
        // Reaped outside the lock, as the keeper does.
        dead.into_iter().for_each(|spare| self.bury(spare));
        *self.last_take.lock().unwrap() = Some(Instant::now());
        let _ = self.wake.write(1);
        spare
    }

    /// Waits until every spare is ready, up to `limit`; whether they are.
    pub fn wait_full(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if self.spares.lock().unwrap().len() >= self.size {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn status(&self) -> PoolStatus {
        let spares = self.spares.lock().unwrap();
        PoolStatus {
            size: self.size,
            ready: spares.len(),
            pids: spares.iter().map(Spare::pid).collect(),
            replaced: self.replaced.load(Ordering::Relaxed),
        }
    }

    /// Stops the keeper and ends every spare; waits for both.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(keeper) = self.keeper.lock().unwrap().take() {
            let _ = keeper.join();
        }
        for spare in std::mem::take(&mut *self.spares.lock().unwrap()) {
            spare.end();
        }
    }

    /// The keeper: fills the pool, replaces spares that end, until stopped.
    fn keep(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            let dead: VecDeque<Spare> = {
                let mut spares = self.spares.lock().unwrap();
                let (dead, alive) = std::mem::take(&mut *spares).into_iter().partition(Spare::has_exited);
                *spares = alive;
                dead
            };
            dead.into_iter().for_each(|spare| self.bury(spare));
            if let Some(left) = self.burst_left() {
                self.wait(left);
                continue;
            }
            let mut wait = Duration::from_secs(1);
            while self.spares.lock().unwrap().len() < self.size && !self.stopping.load(Ordering::SeqCst) {
                // Started outside the lock: a take never waits for an exec.
                // Offered once ready: a setup sent before would wait for it.
                let started = self.start_spare().and_then(|mut spare| match spare.wait_ready(READY_WITHIN) {
                    Ok(()) => Ok(spare),
                    Err(e) => {
                        let (_, stderr) = spare.end();
                        Err(io::Error::new(e.kind(), format!("{e}{}", tail(&stderr))))
                    }
                });
                match started {
                    Ok(spare) => self.spares.lock().unwrap().push_back(spare),
                    Err(e) => {
                        log::warn!("guest process pool: cannot start a process: {e}; trying again in a second");
                        wait = RETRY_AFTER;
                        break;
                    }
                }
            }
            self.wait(wait);
        }
    }

    /// How much longer to wait before replacing spares taken in a burst of
    /// making: none if the burst is over or the pool is down to its last
    /// spare (a burst longer than the pool would then fork in its own path).
    fn burst_left(&self) -> Option<Duration> {
        let since = self.last_take.lock().unwrap().map(|t| t.elapsed())?;
        let two_or_more_left = self.spares.lock().unwrap().len() >= 2;
        (two_or_more_left && since < QUIET_BEFORE_REFILL && !self.stopping.load(Ordering::SeqCst))
            .then(|| QUIET_BEFORE_REFILL - since)
    }

    /// A new spare, in a new cgroup if spares get one.
    fn start_spare(&self) -> io::Result<Spare> {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let cgroup = self.cgroups.as_ref().map(|place| place.create(&format!("spare-{n}"))).transpose()?;
        Spare::start_in(cgroup, self.jailed)
    }

    /// Ends and reaps a spare found dead, saying how it ended.
    fn bury(&self, spare: Spare) {
        let pid = spare.pid();
        let (status, stderr) = spare.end();
        self.replaced.fetch_add(1, Ordering::Relaxed);
        let status = status.map_or("an unknown status".to_string(), |s| s.to_string());
        log::warn!(
            "guest process pool: process {pid} ended before it was used ({status}){}; starting another",
            tail(&stderr)
        );
    }

    /// Until woken, a spare ends, or `limit` passes.
    fn wait(&self, limit: Duration) {
        let mut fds = vec![libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        fds.extend(self.spares.lock().unwrap().iter().map(|s| libc::pollfd {
            fd: s.pidfd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: poll on pollfds of our own; a spare taken meanwhile keeps
        // its pidfd open (the guest's handle holds it), or it is closed and
        // poll reports it invalid, which only wakes us.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, limit.as_millis() as i32) };
        let _ = self.wake.read();
    }
}

/// A process's last lines on stderr, as the end of a message.
fn tail(stderr: &[String]) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.join("; "))
    }
}
