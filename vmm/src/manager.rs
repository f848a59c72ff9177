//! Guests managed while the VMM runs, for the API: create, start, pause,
//! resume, stop and delete them, and see what page sharing does with them.
//!
//! Every guest goes Created -> Running <-> Paused -> Ended. A reaper thread
//! collects guests whose vCPUs have all left (they ended on their own or
//! were stopped), releases their pages from sharing and keeps how they
//! ended. Calls never leave a half-made guest: a failed create stores
//! nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::boot::MAX_VCPUS;
use crate::devices::console::Console;
use crate::disk::{BaseImage, Disk};
use crate::guest::{Guest, GuestConfig};
use crate::host::HostKind;
use crate::hypervisor::Hypervisor;
use crate::memory::{MemoryBackend, MIB, MIN_MEMORY_MIB};
use crate::outcome::GuestEnd;
use crate::sharing::Sharing;

fn default_memory() -> u64 {
    256
}

fn default_vcpus() -> u8 {
    1
}

/// What a guest is made of (the body of `POST /guests`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// A raw disk image: shared read-only, with a copy-on-write overlay.
    #[serde(default)]
    pub disk: Option<PathBuf>,
    #[serde(default)]
    pub disk_readonly: bool,
    /// Pages merge only within a group.
    #[serde(default)]
    pub merge_group: u32,
    #[serde(default)]
    pub dedup_opt_out: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    Created,
    Running,
    Paused,
    Ended,
}

#[derive(Clone, Debug, Serialize)]
pub struct GuestInfo {
    pub id: usize,
    pub state: GuestState,
    pub spec: GuestSpec,
    /// How it ended, once it has.
    pub end: Option<String>,
    pub clean: Option<bool>,
    pub sharing: Option<GuestSharing>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GuestSharing {
    pub group: u32,
    pub merged_pages: u64,
    pub zero_pages: u64,
    pub cow_breaks: u64,
}

impl From<dedup::GuestStats> for GuestSharing {
    fn from(s: dedup::GuestStats) -> Self {
        GuestSharing {
            group: s.group,
            merged_pages: s.merged_pages,
            zero_pages: s.zero_pages,
            cow_breaks: s.cow_breaks,
        }
    }
}

/// Why a call failed; the API turns each kind into its HTTP status.
#[derive(Debug, PartialEq)]
pub enum Error {
    NotFound(String),
    Conflict(String),
    BadRequest(String),
    Internal(String),
}

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m) | Error::Conflict(m) | Error::BadRequest(m) | Error::Internal(m) => m,
        }
    }
}

struct Entry {
    spec: GuestSpec,
    state: GuestState,
    guest: Option<Guest>,
    end: Option<GuestEnd>,
    /// The console's tail when the guest ended.
    last_console: String,
}

pub struct Manager {
    hv: Hypervisor,
    sharing: Option<Sharing>,
    guests: Mutex<(usize, BTreeMap<usize, Entry>)>,
    finished: Mutex<Sender<usize>>,
    overlay_dir: PathBuf,
}

impl Manager {
    /// Opens KVM and starts the reaper; `sharing` is the scanner, if on.
    pub fn new(sharing: Option<Sharing>) -> Result<Arc<Manager>, String> {
        let hv = Hypervisor::open()?;
        crate::vstate::control::install_kick_handler();
        let overlay_dir = crate::runner::fresh_temp_dir("vmm-api-overlays")?;
        let (tx, rx) = mpsc::channel::<usize>();
        let manager = Arc::new(Manager {
            hv,
            sharing,
            guests: Mutex::new((0, BTreeMap::new())),
            finished: Mutex::new(tx),
            overlay_dir,
        });
        let weak: Weak<Manager> = Arc::downgrade(&manager);
        std::thread::Builder::new()
            .name("vmm-reaper".into())
            .spawn(move || loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(id) => match weak.upgrade() {
                        Some(m) => m.reap(id),
                        None => return,
                    },
                    Err(mpsc::RecvTimeoutError::Timeout) if weak.strong_count() > 0 => {}
                    Err(_) => return,
                }
            })
            .map_err(|e| format!("cannot start the reaper thread: {e}"))?;
        Ok(manager)
    }

    pub fn sharing(&self) -> Option<&Sharing> {
        self.sharing.as_ref()
    }

    pub fn host(&self) -> HostKind {
        self.hv.host
    }

    fn reap(&self, id: usize) {
        let mut guests = self.guests.lock().unwrap();
        let Some(entry) = guests.1.get_mut(&id) else { return };
        let Some(guest) = entry.guest.take() else { return };
        if let Some(s) = &self.sharing {
            s.remove_guest(id);
        }
        entry.last_console = guest.console_tail();
        entry.end = Some(guest.join());
        entry.state = GuestState::Ended;
    }

    /// Makes a guest, ready to start; returns its id.
    pub fn create(&self, spec: GuestSpec) -> Result<usize, Error> {
        check_spec(&spec)?;
        let mut guests = self.guests.lock().unwrap();
        let id = guests.0;
        let disk = match &spec.disk {
            None => None,
            Some(path) => {
                let base = BaseImage::open(path).map_err(|e| Error::BadRequest(e.to_string()))?;
                Some(if spec.disk_readonly {
                    Disk::read_only(base)
                } else {
                    Disk::with_overlay(base, &self.overlay_dir.join(format!("guest-{id}.overlay")))
                        .map_err(|e| Error::Internal(e.to_string()))?
                })
            }
        };
        let config = GuestConfig {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.cmdline.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            backend: MemoryBackend::Memfd,
            dirty_log: self.sharing.is_some(),
        };
        let console = Console::with_sink(Box::new(std::io::sink()));
        let guest = Guest::create(&self.hv, id, &config, console, disk).map_err(Error::BadRequest)?;
        if let (Some(s), false) = (&self.sharing, spec.dedup_opt_out) {
            s.add_guest(&guest, spec.merge_group).map_err(Error::Internal)?;
        }
        guests.0 += 1;
        let entry =
            Entry { spec, state: GuestState::Created, guest: Some(guest), end: None, last_console: String::new() };
        guests.1.insert(id, entry);
        Ok(id)
    }

    pub fn list(&self) -> Vec<GuestInfo> {
        let ids: Vec<usize> = self.guests.lock().unwrap().1.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.get(id).ok()).collect()
    }

    pub fn get(&self, id: usize) -> Result<GuestInfo, Error> {
        let guests = self.guests.lock().unwrap();
        let entry = guests.1.get(&id).ok_or_else(|| not_found(id))?;
        Ok(GuestInfo {
            id,
            state: entry.state,
            spec: entry.spec.clone(),
            end: entry.end.as_ref().map(|e| e.to_string()),
            clean: entry.end.as_ref().map(GuestEnd::is_clean),
            sharing: self.sharing.as_ref().and_then(|s| s.guest_stats(id)).map(GuestSharing::from),
        })
    }

    /// Runs `f` on guest `id` if it is in one of `from`, then sets `to`.
    fn transition(
        &self,
        id: usize,
        verb: &str,
        from: &[GuestState],
        to: GuestState,
        f: impl FnOnce(&mut Guest) -> Result<(), Error>,
    ) -> Result<GuestInfo, Error> {
        {
            let mut guests = self.guests.lock().unwrap();
            let entry = guests.1.get_mut(&id).ok_or_else(|| not_found(id))?;
            if !from.contains(&entry.state) {
                return Err(Error::Conflict(
                    format!("cannot {verb} guest {id}: it is {:?}", entry.state).to_lowercase(),
                ));
            }
            let guest = entry.guest.as_mut().ok_or_else(|| Error::Conflict(format!("guest {id} has ended")))?;
            f(guest)?;
            entry.state = to;
        }
        self.get(id)
    }

    pub fn start(&self, id: usize) -> Result<GuestInfo, Error> {
        let finished = self.finished.lock().unwrap().clone();
        self.transition(id, "start", &[GuestState::Created], GuestState::Running, |g| {
            g.start(finished).map_err(|e| Error::Internal(format!("cannot start guest {id}: {e}")))
        })
    }

    pub fn pause(&self, id: usize) -> Result<GuestInfo, Error> {
        self.transition(id, "pause", &[GuestState::Running], GuestState::Paused, |g| {
            g.pause();
            Ok(())
        })
    }

    pub fn resume(&self, id: usize) -> Result<GuestInfo, Error> {
        self.transition(id, "resume", &[GuestState::Paused], GuestState::Running, |g| {
            g.resume();
            Ok(())
        })
    }

    /// Stops a running or paused guest and waits (up to 10 s) until it has
    /// ended.
    pub fn stop(&self, id: usize) -> Result<GuestInfo, Error> {
        let running = [GuestState::Running, GuestState::Paused];
        self.transition(id, "stop", &running, GuestState::Running, |g| {
            g.stop(GuestEnd::Stopped);
            Ok(())
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let info = self.get(id)?;
            if info.state == GuestState::Ended {
                return Ok(info);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::Internal(format!("guest {id} did not stop within 10 s")))
    }

    /// Stops the guest if it runs, then forgets it and frees its memory.
    pub fn delete(&self, id: usize) -> Result<(), Error> {
        let state = self.get(id)?.state;
        if matches!(state, GuestState::Running | GuestState::Paused) {
            self.stop(id)?;
        }
        let entry = self.guests.lock().unwrap().1.remove(&id).ok_or_else(|| not_found(id))?;
        if entry.guest.is_some() {
            // Never started: still registered with sharing.
            if let Some(s) = &self.sharing {
                s.remove_guest(id);
            }
        }
        let _ = std::fs::remove_file(self.overlay_dir.join(format!("guest-{id}.overlay")));
        Ok(())
    }

    pub fn console(&self, id: usize) -> Result<String, Error> {
        let guests = self.guests.lock().unwrap();
        let entry = guests.1.get(&id).ok_or_else(|| not_found(id))?;
        Ok(entry.guest.as_ref().map_or_else(|| entry.last_console.clone(), Guest::console_tail))
    }

    pub fn merge_now(&self, id: usize) -> Result<GuestInfo, Error> {
        let info = self.get(id)?;
        let sharing = self.sharing.as_ref().ok_or_else(|| Error::Conflict("page sharing is off".into()))?;
        if info.state == GuestState::Ended {
            return Err(Error::Conflict(format!("guest {id} has ended")));
        }
        if info.spec.dedup_opt_out {
            return Err(Error::Conflict(format!("guest {id} opted out of page sharing")));
        }
        sharing.merge_now(id).map_err(|e| Error::Internal(format!("merge failed: {e}")))?;
        self.get(id)
    }

    /// Stops every guest and waits for them: for shutdown.
    pub fn stop_all(&self) {
        let ids: Vec<usize> = self.guests.lock().unwrap().1.keys().copied().collect();
        for id in ids {
            let _ = self.delete(id);
        }
        let _ = std::fs::remove_dir_all(&self.overlay_dir);
    }
}

fn not_found(id: usize) -> Error {
    Error::NotFound(format!("no guest {id}"))
}

fn check_spec(spec: &GuestSpec) -> Result<(), Error> {
    let bad = |m: String| Err(Error::BadRequest(m));
    if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > 1 << 20 {
        return bad(format!("memory_mib must be between {MIN_MEMORY_MIB} and {} (got {})", 1 << 20, spec.memory_mib));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return bad(format!("vcpus must be between 1 and {MAX_VCPUS} (got {})", spec.vcpus));
    }
    if spec.disk.is_none() && spec.disk_readonly {
        return bad("disk_readonly needs a disk".into());
    }
    let available = crate::memory::host_available_memory().map_err(|e| Error::Internal(e.to_string()))?;
    if spec.memory_mib * MIB > available {
        return bad(format!("{} MiB is more than the {} MiB the host has available", spec.memory_mib, available / MIB));
    }
    Ok(())
}
