//! The REST API on a Unix socket: `vmm serve` and `vmm run --api-socket`.
//!
//! The HTTP side (axum on a single-threaded tokio runtime) runs on its own
//! thread, "vmm-api"; handlers hand the manager's blocking work to tokio's
//! blocking pool, and vCPU threads never touch the runtime.

pub mod routes;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::manager::{GuestSpec, GuestState, Manager};
use crate::outcome::GuestEnd;
use crate::runner::{RunConfig, RunReport};

pub struct ApiServer {
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `path` (mode 0600): a stale socket file is replaced, one a live
/// server answers on is refused.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!("{} is in use by a running server; stop it or choose another path", path.display()));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(listener)
}

impl ApiServer {
    pub fn start(path: &Path, manager: Arc<Manager>) -> Result<ApiServer, String> {
        let listener = bind(path)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the API runtime: {e}"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vmm-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return log::error!("API: {e}"),
                    };
                    let server = axum::serve(listener, routes::router(manager)).with_graceful_shutdown(async {
                        let _ = rx.await;
                    });
                    if let Err(e) = server.await {
                        log::error!("API server failed: {e}");
                    }
                })
            })
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        Ok(ApiServer { path: path.into(), shutdown: Some(tx), thread: Some(thread) })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `vmm serve`: no guests at first; runs until SIGINT or SIGTERM, then
/// stops every guest.
pub fn serve(path: &Path, sharing: &crate::sharing::SharingConfig) -> Result<(), String> {
    crate::signals::install_stop_handlers()?;
    let manager = Manager::new(crate::runner::start_sharing(sharing)?)?;
    let server = ApiServer::start(path, manager.clone())?;
    eprintln!("vmm: API on {}", path.display());
    while !crate::signals::stop_requested() {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    manager.stop_all();
    Ok(())
}

/// `vmm run --api-socket`: the run's guests, made and started through the
/// manager so the API sees them; ends when they all have (or on a signal).
pub fn run_with_api(config: &RunConfig, path: &Path) -> Result<RunReport, String> {
    crate::signals::install_stop_handlers()?;
    let manager = Manager::new(crate::runner::start_sharing(&config.sharing)?)?;
    let server = ApiServer::start(path, manager.clone())?;
    eprintln!("vmm: API on {}", path.display());
    let g = &config.guest;
    for i in 0..config.guests {
        let spec = GuestSpec {
            kernel: g.kernel.clone(),
            initrd: g.initrd.clone(),
            cmdline: g.cmdline.clone(),
            memory_mib: g.memory_mib,
            vcpus: g.vcpus,
            disk: config.disk.as_ref().map(|d| d.image.clone()),
            disk_readonly: config.disk.as_ref().is_some_and(|d| d.read_only),
            merge_group: config.sharing.groups[i],
            dedup_opt_out: config.sharing.opt_out[i],
        };
        let started = manager.create(spec).and_then(|id| manager.start(id));
        if let Err(e) = started {
            drop(server);
            manager.stop_all();
            return Err(format!("guest {i}: {}", e.message()));
        }
    }
    // Guests the API adds count too; the run ends when none is left running.
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let live = manager.list().iter().filter(|g| g.state != GuestState::Ended).count();
        if live == 0 || crate::signals::stop_requested() {
            break;
        }
    }
    drop(server);
    for g in manager.list() {
        eprintln!("vmm: guest {}: {}", g.id, g.end.as_deref().unwrap_or("still running; stopping it"));
    }
    let ends = manager
        .list()
        .into_iter()
        .map(|g| match g.clean {
            Some(false) => GuestEnd::VmmError(g.end.unwrap_or_default()),
            _ => GuestEnd::Stopped,
        })
        .collect();
    manager.stop_all();
    Ok(RunReport { ends })
}
