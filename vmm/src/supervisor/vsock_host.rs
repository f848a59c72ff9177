//! The supervisor's side of a guest's vsock: the Unix socket host programs
//! connect to, bound here and handed to the guest process as a descriptor
//! (so a guest process never makes files), and removed once the guest is
//! gone. The device itself is `guest/devices/virtio/vsock.rs`.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::config::VsockConfig;
use crate::config::DEFAULT_GUEST_CID;
use crate::error::{Error, Result};
use crate::protocol::VsockSetup;

/// The longest socket path: a Unix socket's 107 bytes, less room for the
/// `_<port>` of the guest's connections beside it.
pub const MAX_SOCKET_PATH: usize = 96;

/// A socket file the supervisor made; removed when dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct GuestVsock {
    /// The configuration with the socket's path as chosen.
    pub shown: VsockConfig,
    pub listener: UnixListener,
    pub file: SocketFile,
    pub setup: VsockSetup,
    /// The guest process's end of its channel for connections to host
    /// sockets beside this one (dial.rs).
    pub dial: std::os::unix::net::UnixStream,
}

/// Where guest `id`'s socket goes: `socket` itself, or `guest-<id>.sock`
/// in it if it is a directory.
pub fn socket_path(id: usize, socket: &Path) -> PathBuf {
    match socket.is_dir() {
        true => socket.join(format!("guest-{id}.sock")),
        false => socket.to_path_buf(),
    }
}

/// Binds guest `id`'s socket.
pub fn set_up_guest(id: usize, config: &VsockConfig) -> Result<GuestVsock> {
    let path = std::path::absolute(socket_path(id, &config.socket))
        .map_err(|e| Error::bad_input(format!("vsock: {}: {e}", config.socket.display())))?;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::bad_input(format!(
            "vsock: {} is {len} bytes long; Unix socket paths hold at most {MAX_SOCKET_PATH} here",
            path.display()
        )));
    }
    if path.symlink_metadata().is_ok() {
        return Err(Error::conflict(format!("vsock: {} exists already", path.display())));
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| Error::bad_input(format!("vsock: cannot bind {}: {e}", path.display())))?;
    let cid = config.cid.unwrap_or(DEFAULT_GUEST_CID);
    let file = SocketFile(path.clone());
    let dial = crate::supervisor::dial::serve(&path).map_err(|e| Error::host(format!("vsock: {e}")))?;
    Ok(GuestVsock {
        shown: VsockConfig { socket: path.clone(), cid: Some(cid) },
        listener,
        file,
        setup: VsockSetup { cid },
        dial,
    })
}
