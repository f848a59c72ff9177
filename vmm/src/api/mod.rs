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

use crate::config::SupervisorConfig;
use crate::error::{Error, Result};
use crate::outcome::GuestEnd;
use crate::supervisor::manager::Manager;

pub struct ApiServer {
    path: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `path` (mode 0600 from the start): a stale socket file is
/// replaced, one a live server answers on is refused, and anything else
/// there (a file, a directory, a symlink) is left alone and refused.
fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::bad_input(format!(
                "{} exists and is not a socket; choose another path (vmm replaces only stale sockets)",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::bad_input(format!(
                "{} is in use by a running server; stop it or choose another path",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::bad_input(format!("cannot remove stale socket {}: {e}", path.display())))?;
    }
    // No moment with the socket open to others: the mask is the process's,
    // so a file another thread makes meanwhile is only the more private.
    // SAFETY: umask cannot fail.
    let mask = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(mask) };
    let listener = listener.map_err(|e| Error::bad_input(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::host(format!("cannot set the mode of {}: {e}", path.display())))?;
    listener.set_nonblocking(true).map_err(|e| Error::host(e.to_string()))?;
    Ok(listener)
}

impl ApiServer {
    pub fn start(path: &Path, manager: Arc<Manager>) -> Result<ApiServer> {
        let listener = bind(path)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::host(format!("cannot start the API runtime: {e}")))?;
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
            .map_err(|e| Error::host(format!("cannot start the API thread: {e}")))?;
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
pub fn serve(path: &Path, config: SupervisorConfig) -> Result<()> {
    crate::signals::install_stop_handlers().map_err(Error::host)?;
    let manager = Manager::new(config)?;
    let server = ApiServer::start(path, manager.clone())?;
    eprintln!("vmm: API on {}", path.display());
    while !crate::signals::stop_requested() {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    manager.stop_all(GuestEnd::Stopped);
    manager.close();
    Ok(())
}
