//! The host side of guests' networks, set up by the supervisor (it needs
//! `CAP_NET_ADMIN`; guest processes get an open TAP and nothing more): a
//! TAP per guest, a bridge to attach them to (made with the subnet's first
//! address if it does not exist) or a network namespace of the guest's own,
//! and each guest's address in the subnet.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::config::Subnet;
use crate::tap::{IfReq, Tap};

/// The TAP name the supervisor gives guest `id` on a bridge: unique on
/// the host while this supervisor runs.
pub fn tap_name(id: usize) -> String {
    format!("vm{}t{id}", std::process::id() % 100_000)
}

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRDELBR: libc::c_ulong = 0x89a1;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// A socket to send interface ioctls through.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(request: libc::c_ulong, req: &mut IfReq, what: &str) -> io::Result<()> {
    let sock = control_socket()?;
    // SAFETY: every request used here reads or writes one `struct ifreq`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut IfReq) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn is_bridge(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).join("bridge").exists()
}

fn is_tap(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).join("tun_flags").exists()
}

/// Brings interface `name` up or down.
fn set_up(name: &str, up: bool) -> io::Result<()> {
    let mut req = IfReq::new(name);
    ioctl(SIOCGIFFLAGS, &mut req, &format!("reading {name}'s flags"))?;
    let flags = i16::from_ne_bytes([req.data[0], req.data[1]]);
    let flags = if up { flags | libc::IFF_UP as i16 } else { flags & !(libc::IFF_UP as i16) };
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(SIOCSIFFLAGS, &mut req, &format!("bringing {name} {}", if up { "up" } else { "down" }))
}

/// The bridges and network namespaces a supervisor made, removed when it
/// goes: they outlive the guests in them otherwise, with their addresses
/// and routes.
#[derive(Default)]
pub struct MadeBridges {
    bridges: std::sync::Mutex<Vec<String>>,
    namespaces: std::sync::Mutex<Vec<String>>,
}

impl Drop for MadeBridges {
    fn drop(&mut self) {
        for name in self.namespaces.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            if let Err(e) = ip(&["netns", "del", &name]) {
                log::warn!("{e}");
            }
        }
        for name in self.bridges.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let removed = set_up(&name, false)
                .and_then(|()| ioctl(SIOCBRDELBR, &mut IfReq::new(&name), &format!("removing bridge {name}")));
            if let Err(e) = removed {
                log::warn!("{e}");
            }
        }
    }
}

/// Runs iproute2's `ip` (network namespaces are its files in /run/netns).
fn ip(args: &[&str]) -> io::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(io::Error::other(format!("ip {}: {}", args.join(" "), why.trim())));
    }
    Ok(())
}

/// The namespace guest `id`'s TAP goes to with `netns`.
pub fn namespace_name(id: usize) -> String {
    format!("vmm-{}-guest{id}", std::process::id())
}

/// Makes namespace `ns` (noted in `made`), moves TAP `tap` into it, gives
/// the TAP the subnet's gateway address there and brings it up. The guest
/// process's open TAP keeps working wherever the interface is.
fn move_to_namespace(tap: &str, ns: &str, subnet: Option<Subnet>, made: &MadeBridges) -> io::Result<()> {
    ip(&["netns", "add", ns])?;
    made.namespaces.lock().unwrap_or_else(|e| e.into_inner()).push(ns.to_string());
    ip(&["link", "set", "dev", tap, "netns", ns])?;
    if let Some(s) = subnet {
        ip(&["-n", ns, "addr", "add", &format!("{}/{}", s.gateway(), s.prefix), "dev", tap])?;
    }
    ip(&["-n", ns, "link", "set", tap, "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// Makes sure bridge `name` exists and is up: an existing one is used as
/// it is (it must be a bridge); a new one gets the subnet's gateway
/// address, if a subnet is given, and is noted in `made`.
pub fn ensure_bridge(name: &str, subnet: Option<Subnet>, made: &MadeBridges) -> io::Result<()> {
    let mut made = made.bridges.lock().unwrap_or_else(|e| e.into_inner());
    if interface_exists(name) {
        if !is_bridge(name) {
            let why = format!("{name} exists and is not a bridge");
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, why));
        }
        return set_up(name, true);
    }
    ioctl(SIOCBRADDBR, &mut IfReq::new(name), &format!("creating bridge {name}"))?;
    made.push(name.to_string());
    if let Some(subnet) = subnet {
        ioctl(SIOCSIFADDR, &mut IfReq::with_ipv4(name, subnet.gateway()), &format!("giving {name} an address"))?;
        ioctl(SIOCSIFNETMASK, &mut IfReq::with_ipv4(name, subnet.mask()), &format!("setting {name}'s netmask"))?;
    }
    set_up(name, true)
}

/// Opens (creating it if needed) TAP `name`, brings it up and, with a
/// bridge, attaches it there.
pub fn open_tap(name: &str, bridge: Option<&str>) -> io::Result<Tap> {
    let tap = Tap::open(name).map_err(|e| io::Error::new(e.kind(), format!("opening TAP {name}: {e}")))?;
    set_up(name, true)?;
    if let Some(bridge) = bridge {
        let index = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))?;
        let index: i32 = index.trim().parse().map_err(io::Error::other)?;
        let mut req = IfReq::new(bridge);
        req.data[..4].copy_from_slice(&index.to_ne_bytes());
        ioctl(SIOCBRADDIF, &mut req, &format!("attaching {name} to bridge {bridge}"))?;
    }
    Ok(tap)
}

/// A guest's network, set up: what to show of it, its TAP, and what its
/// process needs to know.
pub struct GuestNetwork {
    pub shown: crate::config::NetConfig,
    pub tap: Tap,
    pub setup: crate::protocol::NetSetup,
}

/// Sets up guest `id`'s network as `net` asks: its bridge (made if absent)
/// or namespace, its TAP, its MAC and address. `restoring`: the guest's kernel already
/// has its address (a clone), so none goes on its command line.
pub fn set_up_guest(
    id: usize,
    net: &crate::config::NetConfig,
    restoring: bool,
    bridges: &MadeBridges,
) -> crate::error::Result<GuestNetwork> {
    use crate::error::Error;
    let subnet = net.subnet.as_deref().map(str::parse::<Subnet>).transpose().map_err(Error::bad_input)?;
    let mac = match &net.mac {
        Some(mac) => crate::config::parse_mac(mac).map_err(Error::bad_input)?,
        None => crate::config::mac_for_guest(id as u64),
    };
    let address = subnet.map(|s| s.guest_address(id).map(|a| (s, a))).transpose().map_err(Error::bad_input)?;
    let tap_name = net.tap.clone().unwrap_or_else(|| tap_name(id));
    if let Some(bridge) = &net.bridge {
        ensure_bridge(bridge, subnet, bridges).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => Error::bad_input(e.to_string()),
            _ => Error::host(format!("bridge {bridge}: {e}")),
        })?;
    }
    if interface_exists(&tap_name) && !is_tap(&tap_name) {
        return Err(Error::bad_input(format!("{tap_name} exists and is not a TAP")));
    }
    let tap = open_tap(&tap_name, net.bridge.as_deref()).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => Error::conflict(format!("TAP {tap_name} is in use by another process")),
        _ => Error::host(e.to_string()),
    })?;
    let namespace = net.netns.then(|| namespace_name(id));
    if let Some(ns) = &namespace {
        move_to_namespace(&tap_name, ns, subnet, bridges).map_err(|e| Error::host(e.to_string()))?;
    }
    // A clone's kernel has its template's address already.
    let (kernel_arg, address) = match address {
        Some((s, a)) if !restoring => (Some(s.kernel_ip_arg(a)), Some(format!("{a}/{}", s.prefix))),
        _ => (None, net.address.clone().filter(|_| restoring)),
    };
    let shown = crate::config::NetConfig {
        tap: Some(tap_name.clone()),
        mac: Some(crate::config::format_mac(mac)),
        address,
        namespace,
        ..net.clone()
    };
    Ok(GuestNetwork { shown, tap, setup: crate::protocol::NetSetup { tap: tap_name, mac, kernel_arg } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::check_ifname;
    use std::net::Ipv4Addr;

    #[test]
    fn subnets_addresses_and_names() {
        let s: Subnet = "10.20.0.0/24".parse().unwrap();
        assert_eq!((s.gateway(), s.mask()), (Ipv4Addr::new(10, 20, 0, 1), Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(s.guest_address(0).unwrap(), Ipv4Addr::new(10, 20, 0, 2));
        assert_eq!(s.guest_address(252).unwrap(), Ipv4Addr::new(10, 20, 0, 254));
        assert!(s.guest_address(253).is_err(), "the broadcast address was given out");
        assert_eq!(s.kernel_ip_arg(s.guest_address(3).unwrap()), "ip=10.20.0.5::10.20.0.1:255.255.255.0::eth0:off");
        for bad in ["10.20.0.0", "10.20.0.1/24", "10.20.0.0/31", "10.20.0.0/4", "x/24", "10.20.0.0/x", "1.2.3/24"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad} was taken");
        }
        assert!(check_ifname("br0").is_ok() && check_ifname(&tap_name(123_456)).is_ok());
        for bad in ["", "a/b", "a b", "sixteen-chars-xx", "..", "eth0:1"] {
            assert!(check_ifname(bad).is_err(), "{bad:?} was taken");
        }
    }
}
