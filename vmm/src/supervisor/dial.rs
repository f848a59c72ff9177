//! The supervisor's end of each guest's channel for connections to host
//! sockets (`<socket>_<port>`; the protocol is `guest::dial`'s): a thread
//! per guest that dials what the guest asks for and passes the socket.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Makes the supervisor's side for the host sockets beside `socket` and
/// returns the guest process's end. A thread answers until the guest
/// process closes its end (it exits).
pub fn serve(socket: &Path) -> io::Result<UnixStream> {
    let (guest_end, ours) = UnixStream::pair()?;
    let socket = socket.to_path_buf();
    std::thread::Builder::new().name("vsock-dial".into()).spawn(move || answer_all(&socket, ours))?;
    Ok(guest_end)
}

fn answer_all(socket: &Path, mut channel: UnixStream) {
    let mut port = [0u8; 4];
    while channel.read_exact(&mut port).is_ok() {
        let port = u32::from_le_bytes(port);
        let sent = match connect_now(&path_for(socket, port)) {
            Ok(stream) => channel
                .send_with_fd(&0i32.to_le_bytes()[..], stream.as_raw_fd())
                .map(drop)
                .map_err(|e| io::Error::from_raw_os_error(e.errno())),
            Err(e) => channel.write_all(&e.raw_os_error().unwrap_or(libc::ECONNREFUSED).to_le_bytes()),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// The host socket a guest's connection to `port` goes to.
pub fn path_for(socket: &Path, port: u32) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(format!("_{port}"));
    path.into()
}

/// Connects without waiting: a listener whose backlog is full refuses.
fn connect_now(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: a plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is fresh and ours.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (to, &from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = from as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::dial::HostDialer;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_supervisor_connects_to_the_port_socket_and_refuses_what_is_not_there() {
        let dir = std::env::temp_dir().join(format!("vmm-dial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("g.sock");
        let listener = UnixListener::bind(path_for(&socket, 52)).unwrap();
        let mut dialer = HostDialer::new(serve(&socket).unwrap()).unwrap();
        let mut conn = dialer.connect(52).unwrap();
        conn.set_nonblocking(false).unwrap();
        conn.write_all(b"hi").unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let refused = dialer.connect(53).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ENOENT), "{refused}");
        // A refusal leaves the channel in step.
        assert!(dialer.connect(52).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
