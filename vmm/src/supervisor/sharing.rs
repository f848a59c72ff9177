//! Page sharing in the supervisor: the dedup engine and its scanner thread,
//! the guests' merge agents reached over their channels, and
//! `vm.max_map_count` raised when guests need it.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use dedup::{AgentStatus, Engine, GuestId, MergeOutcome, Published, Scanner, Target};

use crate::config::{DedupSettings, DedupUpdate, SharingConfig, Source, MAX_MAP_COUNT};
use crate::error::{Error, Result};
use crate::protocol::{self, Reply, Request};
use crate::supervisor::handle::GuestProcess;

/// How long a broken agent channel waits for its process to finish exiting,
/// so that a guest ending normally is not reported as a lost agent.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The running scanner and the settings it runs with.
pub struct Sharing {
    scanner: Scanner,
    settings: Mutex<DedupSettings>,
    /// Read-only descriptors of each group's stable store, made once.
    stores: Mutex<std::collections::HashMap<u32, File>>,
}

impl Sharing {
    pub fn start(config: &SharingConfig) -> Result<Sharing> {
        config.settings.validate(Source::Cli)?;
        if let Some(n) = config.raise_max_map_count {
            MAX_MAP_COUNT.check(n, Source::Cli)?;
            raise_max_map_count(n)
                .map_err(|e| Error::host(format!("cannot raise vm.max_map_count to {n}: {e} (needs root)")))?;
        }
        let auto_raise = config.auto_raise_max_map_count;
        let mut refused = false;
        let after_step = Box::new(move |e: &mut Engine| {
            if auto_raise && !refused {
                refused = !raise_for_guests(e);
            }
        });
        let engine = Engine::new(config.settings.engine());
        let scanner = Scanner::start(engine, config.settings.pace(), "dedup-scanner", after_step)
            .map_err(|e| Error::host(format!("cannot start page sharing: {e}")))?;
        scanner.set_enabled(config.settings.enabled);
        Ok(Sharing { scanner, settings: Mutex::new(config.settings.clone()), stores: Mutex::default() })
    }

    /// A read-only descriptor of `group`'s stable store, for a guest process.
    pub fn store_file(&self, group: u32) -> Result<File> {
        let mut stores = self.stores.lock().unwrap();
        let file = match stores.entry(group) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                self.scanner.engine().store_file(group).map_err(|e| Error::host(format!("stable store: {e}")))?,
            ),
        };
        file.try_clone().map_err(|e| Error::host(format!("stable store: {e}")))
    }

    /// Starts sharing guest `id`'s pages: `memory` is its RAM's memfd,
    /// `regions` its RAM in its process.
    pub fn add_guest(
        &self,
        id: usize,
        memory: &File,
        regions: Vec<dedup::Region>,
        group: u32,
        process: Arc<GuestProcess>,
    ) -> Result<()> {
        let memfd = memory.try_clone().map_err(|e| Error::host(e.to_string()))?;
        let mem = dedup::GuestMemory { memfd, regions, group, pid: process.pid, agent: Box::new(RemoteAgent(process)) };
        let prepared = Engine::prepare(mem).map_err(|e| Error::host(format!("cannot share the guest's pages: {e}")))?;
        // Its group's store exists (store_file made it), so adding cannot fail.
        self.scanner.add_guest(engine_id(id), prepared);
        Ok(())
    }

    /// Forgets guest `id`; only once its process has exited (its mappings
    /// are gone), so no frame it maps can be freed under it.
    pub fn remove_guest(&self, id: usize) {
        self.scanner.remove_guest(engine_id(id));
    }

    /// Maps the memory of the snapshot in `dir` into guest `id` (added,
    /// not started) as pages on shared frames: clones of one snapshot share
    /// all of it from the start. Returns the pages adopted.
    pub fn adopt_snapshot(&self, id: usize, dir: &std::path::Path) -> Result<u64> {
        let (pages, key) = snapshot_pages(dir)?;
        self.scanner
            .engine()
            .adopt(engine_id(id), Some(key), pages)
            .map_err(|e| Error::host(format!("cannot map in snapshot {}: {e}", dir.display())))
    }

    /// Lays the memory of the snapshot in `dir` out for clones in merge
    /// group `group` before any is made (`Engine::lay_out`), so that no
    /// clone reads it; nothing to do if it is laid out already.
    pub fn lay_out_snapshot(&self, dir: &std::path::Path, group: u32) -> Result<()> {
        let (pages, key) = snapshot_pages(dir)?;
        let guest_pages = pages.guest_pages();
        if self.scanner.engine().holds_placement(key, group, guest_pages) {
            return Ok(());
        }
        // Reading a whole snapshot is too long to run ahead of the guests.
        dedup::os::behind_others(|| self.scanner.engine().lay_out(key, group, guest_pages, pages))
            .map_err(|e| Error::host(format!("cannot lay out snapshot {}: {e}", dir.display())))
    }

    pub fn merge_now(&self, id: usize) -> Result<()> {
        self.scanner.engine().merge_now(engine_id(id)).map_err(|e| Error::conflict(format!("cannot merge: {e}")))
    }

    /// Guest `id`'s counters as last published, while it shares pages.
    pub fn guest_stats(&self, id: usize) -> Option<dedup::GuestStats> {
        self.published().guests.get(&engine_id(id)).cloned()
    }

    /// The engine's books checked against each other (waits for a scan
    /// step: for tests and soaks, not for monitoring).
    pub fn audit(&self) -> dedup::Audit {
        self.scanner.engine().audit()
    }

    /// What the scanner last published: never waits for a scan step.
    pub fn published(&self) -> Arc<Published> {
        self.scanner.published()
    }

    pub fn settings(&self) -> DedupSettings {
        let mut s = self.settings.lock().unwrap().clone();
        s.enabled = self.scanner.is_enabled();
        s
    }

    /// Applies a checked update; nothing changes if it is not valid.
    pub fn update(&self, update: &DedupUpdate) -> Result<DedupSettings> {
        let mut settings = self.settings.lock().unwrap();
        let new = update.apply_to(&settings)?;
        self.scanner.engine().set_config(new.engine());
        self.scanner.set_pace(new.pace());
        self.scanner.set_enabled(new.enabled);
        *settings = new.clone();
        Ok(new)
    }

    /// Room is short (true): the scanner runs at
    /// [`crate::supervisor::pressure::URGENT_NICE`] whatever its own setting, until told
    /// otherwise.
    pub fn set_urgent(&self, on: bool) {
        self.scanner.set_urgent_nice(on.then_some(crate::supervisor::pressure::URGENT_NICE));
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.scanner.uptime()
    }

    /// Stops the scanner; returns what it published last.
    pub fn stop(self) -> Arc<Published> {
        self.scanner.stop()
    }
}

fn raise_max_map_count(n: u64) -> io::Result<()> {
    if (dedup::os::max_map_count()? as u64) < n {
        dedup::os::set_max_map_count(n as usize)?;
    }
    Ok(())
}

/// The engine knows guests by the manager's ids.
pub fn engine_id(id: usize) -> GuestId {
    id as GuestId
}

/// Raises vm.max_map_count when a guest's process is near it, to twice
/// what it is (at least what the guest needs) and says so. Returns false
/// once raising is refused (not root): then guests stay at the limit.
fn raise_for_guests(e: &Engine) -> bool {
    let needed = e
        .guest_ids()
        .into_iter()
        .filter_map(|id| e.guest_stats(id))
        .filter(|g| g.map_limit > 0 && g.mappings + 2 * dedup::agent::MAP_COUNT_MARGIN > g.map_limit)
        .map(|g| g.mappings + 4 * dedup::agent::MAP_COUNT_MARGIN)
        .max();
    let Some(needed) = needed else { return true };
    let Ok(limit) = dedup::os::max_map_count() else { return true };
    let limit = limit as u64;
    if limit >= needed {
        return true;
    }
    let raised = (limit * 2).max(needed).min(MAX_MAP_COUNT.max);
    match dedup::os::set_max_map_count(raised as usize) {
        Ok(()) => {
            eprintln!(
                "vmm: raised vm.max_map_count from {limit} to {raised}: a guest's merged pages needed more mappings"
            );
            true
        }
        Err(e) => {
            eprintln!(
                "vmm: a guest needs more than vm.max_map_count ({limit}) mappings to merge more, and raising it \
                 failed: {e} (run as root, raise it yourself, or pass --raise-max-map-count)"
            );
            false
        }
    }
}

/// A guest's merge agent, in its process, reached over its channel.
struct RemoteAgent(Arc<GuestProcess>);

impl dedup::GuestAgent for RemoteAgent {
    fn watch(&mut self, pages: &[u64]) -> io::Result<()> {
        match self.0.request(&Request::Watch, &protocol::words_to_bytes(pages)).map_err(|e| self.channel_error(e))? {
            (Reply::Ok, _) => Ok(()),
            (other, _) => Err(io::Error::other(format!("watch answered with {other:?}"))),
        }
    }

    fn status(&mut self) -> io::Result<AgentStatus> {
        match self.0.request(&Request::Status, &[]).map_err(|e| self.channel_error(e))? {
            (Reply::Status { has_dirty_log, mappings, map_limit, discarded }, payload) => Ok(AgentStatus {
                dirty: if has_dirty_log { Some(protocol::bytes_to_words(&payload)?) } else { None },
                mappings,
                map_limit,
                discarded,
            }),
            (other, _) => Err(io::Error::other(format!("status answered with {other:?}"))),
        }
    }

    fn merge(&mut self, merges: &[(u32, Target)]) -> io::Result<MergeOutcome> {
        self.remap(Request::Merge, merges)
    }

    fn adopt(&mut self, pages: &[(u32, Target)]) -> io::Result<MergeOutcome> {
        self.remap(Request::Adopt, pages)
    }
}

/// The pages of the snapshot in `dir` and the identity of its memory file.
fn snapshot_pages(dir: &std::path::Path) -> Result<(crate::snapshot::MemoryPages, u64)> {
    let read_error = |e: io::Error| Error::host(format!("cannot read snapshot {}: {e}", dir.display()));
    let pages = crate::snapshot::MemoryPages::open(dir).map_err(read_error)?;
    let key = pages.identity().map_err(read_error)?;
    Ok((pages, key))
}

impl RemoteAgent {
    /// A failed request as the engine sees it: a process that has exited is
    /// gone (end of file), not a failure; one that is stopped was not
    /// asked ([`dedup::GuestAgent`]'s `WouldBlock`).
    fn channel_error(&self, e: Error) -> io::Error {
        if e.kind == crate::error::Kind::Unresponsive {
            // Stopped, and not asked: the engine passes it by for now.
            io::Error::new(io::ErrorKind::WouldBlock, e.message)
        } else if self.0.exits_within(EXIT_GRACE) {
            io::Error::new(io::ErrorKind::UnexpectedEof, e.message)
        } else {
            io::Error::other(e.message)
        }
    }

    /// A merge or an adoption, made by the guest's agent.
    fn remap(&mut self, request: Request, merges: &[(u32, Target)]) -> io::Result<MergeOutcome> {
        let reply = self.0.request(&request, &protocol::encode_merges(merges));
        let (reply, payload) = match reply {
            Ok(r) => r,
            Err(e) => {
                // Nobody knows which merges happened: the guest cannot be
                // trusted to run on (the engine keeps its frames until its
                // process is gone).
                let e = self.channel_error(e);
                if !matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::WouldBlock) {
                    self.0.kill_for(format!("its merge agent failed: {e}"));
                }
                return Err(e);
            }
        };
        match reply {
            Reply::Merged { stalls_ns, write_protected, map_limited, mappings, map_limit, errors, first_error } => {
                Ok(MergeOutcome {
                    merged: payload.iter().map(|&b| b == protocol::MERGED).collect(),
                    changed: payload.iter().map(|&b| b == protocol::CHANGED).collect(),
                    stalls: stalls_ns.into_iter().map(std::time::Duration::from_nanos).collect(),
                    // An adoption holds nothing off.
                    protection: match (&request, write_protected) {
                        (Request::Adopt, _) => None,
                        (_, true) => Some(dedup::Protection::WriteProtect),
                        (_, false) => Some(dedup::Protection::Freeze),
                    },
                    map_limited,
                    mappings,
                    map_limit,
                    errors,
                    first_error,
                })
            }
            other => Err(io::Error::other(format!("{request:?} answered with {other:?}"))),
        }
    }
}
