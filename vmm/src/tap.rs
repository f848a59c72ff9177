//! A TAP device: Ethernet frames in and out of the host's network stack,
//! each with a virtio-net header in front (`IFF_VNET_HDR`), so checksum
//! and segmentation offloads pass through as the guest's driver asked.
//! Opening one by name needs `CAP_NET_ADMIN` only if it must be created;
//! the supervisor opens it and a guest process gets the descriptor.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The virtio-net header of a virtio 1.x device (`virtio_net_hdr_v1`:
/// flags, gso type, header length, gso size, checksum start and offset,
/// number of buffers), which TAP and virtio put in front of every frame.
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offloads the host may hand the guest (TUNSETOFFLOAD).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// `struct ifreq`: a name, then a 24-byte union.
#[repr(C)]
pub(crate) struct IfReq {
    pub name: [u8; libc::IFNAMSIZ],
    pub data: [u8; 24],
}

impl IfReq {
    pub fn new(name: &str) -> IfReq {
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    pub fn with_ipv4(name: &str, addr: Ipv4Addr) -> IfReq {
        let mut req = IfReq::new(name);
        // struct sockaddr_in: family, port, address.
        req.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        req.data[4..8].copy_from_slice(&addr.octets());
        req
    }
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if it does not exist) the TAP called `name`,
    /// non-blocking, with 12-byte virtio-net headers.
    pub fn open(name: &str) -> io::Result<Tap> {
        // The name must fit `ifreq` (checked, not assumed: the copy below
        // relies on it).
        check_ifname(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a constant, NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq::new(name);
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Tap { file, name: name.into() };
        tap.set_int(TUNSETVNETHDRSZ, VNET_HDR_LEN as libc::c_int)?;
        Ok(tap)
    }

    /// A TAP opened by someone else (the supervisor), set up by [`Tap::open`].
    pub fn from_fd(fd: OwnedFd, name: String) -> Tap {
        Tap { file: File::from(fd), name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads (`TUN_F_*`) the host may use in frames for the guest.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_int(&self, request: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
        // SAFETY: the request reads one int through the pointer.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), request, &value) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One frame (header first) into `buf`; WouldBlock when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Sends one frame (header first), whole or not at all.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let n = io::Write::write(&mut &self.file, frame)?;
        if n != frame.len() {
            return Err(io::Error::other(format!("the TAP took {n} of {} bytes", frame.len())));
        }
        Ok(())
    }
}

impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> OwnedFd {
        tap.file.into()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether `name` can be a network interface's name.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    ok.then_some(())
        .ok_or_else(|| format!("{name:?} is not a network interface name (1 to 15 characters, no '/', ':' or spaces)"))
}
