//! The guest process's end of its channel for connections to host sockets
//! ([`SetupFile::VsockDial`](crate::protocol::SetupFile::VsockDial)): a jailed guest
//! process has no right to connect to a user's socket itself, and it names
//! only a port, never a path; the supervisor dials (`supervisor::dial`).
//!
//! Protocol, on a socket pair per guest: the guest process sends a port
//! (u32, little endian); the supervisor answers at once with an errno
//! (i32, little endian, 0: connected) and, when it is 0, the connected
//! socket as `SCM_RIGHTS`. The supervisor's connect never blocks (a full
//! backlog is a refusal), so answers come in order and promptly.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long the guest process waits for an answer; a supervisor that has
/// not answered by then is wedged or gone, and the dialer gives up for good.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The guest process's end: asks the supervisor for connections.
pub struct HostDialer {
    channel: UnixStream,
    broken: bool,
}

impl HostDialer {
    pub fn new(channel: UnixStream) -> io::Result<HostDialer> {
        channel.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(HostDialer { channel, broken: false })
    }

    /// A connection to the host socket for `port`.
    pub fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        if self.broken {
            return Err(io::Error::other("the supervisor no longer answers connection requests"));
        }
        let answer = self.ask(port);
        if answer.as_ref().is_err_and(|e| e.raw_os_error().is_none()) {
            // Out of step with the supervisor: an answer may still come.
            self.broken = true;
        }
        answer
    }

    fn ask(&mut self, port: u32) -> io::Result<UnixStream> {
        self.channel.write_all(&port.to_le_bytes())?;
        let mut errno = [0u8; 4];
        let (n, fd) = self.channel.recv_with_fd(&mut errno).map_err(|e| io::Error::other(e.to_string()))?;
        if n == 0 {
            return Err(io::Error::other("the supervisor closed the connection channel"));
        }
        if n < 4 {
            self.channel.read_exact(&mut errno[n..])?;
        }
        match (i32::from_le_bytes(errno), fd) {
            (0, Some(file)) => Ok(UnixStream::from(OwnedFd::from(file))),
            (0, None) => Err(io::Error::other("the supervisor connected but sent no socket")),
            (errno, _) => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}
