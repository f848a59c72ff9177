//! Guests' addresses as the user gives them: an IPv4 subnet for a bridge
//! (`--net bridge=NAME,subnet=...`), the MAC a guest gets when none is
//! given, and vsock CIDs.

use std::net::Ipv4Addr;

/// An IPv4 subnet, `ADDR/PREFIX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Subnet, String> {
        let bad = || format!("{s:?} is not an IPv4 subnet (like 10.0.0.0/24)");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let base: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("subnet {s}: a prefix from /8 to /30 leaves room for a gateway and guests"));
        }
        let subnet = Subnet { base, prefix };
        if u32::from(base) & !subnet.mask_bits() != 0 {
            return Err(format!("{s} has host bits set: did you mean {}/{prefix}?", subnet.network()));
        }
        Ok(subnet)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Subnet {
    fn mask_bits(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) & self.mask_bits())
    }

    /// The bridge's address: the first in the subnet.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// Guest `id`'s address: the subnet's base + 2 + id, if the subnet has
    /// room for it (the broadcast address is not one).
    pub fn guest_address(&self, id: usize) -> Result<Ipv4Addr, String> {
        let hosts = (1u64 << (32 - self.prefix)) - 1;
        let offset = 2 + id as u64;
        if offset >= hosts {
            return Err(format!("subnet {self} has no address for guest {id}: use a larger subnet"));
        }
        Ok(Ipv4Addr::from(u32::from(self.base) + offset as u32))
    }

    /// The kernel parameter that configures eth0 (Linux's `ip=`, which
    /// memtest reads too).
    pub fn kernel_ip_arg(&self, address: Ipv4Addr) -> String {
        format!("ip={address}::{}:{}::eth0:off", self.gateway(), self.mask())
    }
}

/// A MAC for guest `id` when none is given: locally administered, unicast.
pub fn mac_for_guest(id: u64) -> [u8; 6] {
    let b = id.to_be_bytes();
    [0x06, 0x76, 0x6d, b[5], b[6], b[7]]
}

/// The host's address.
pub const HOST_CID: u64 = 2;
/// The guest's address unless configured: the first a guest may have.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// A guest's CID: not the hypervisor's (0), the local (1), the host's (2)
/// or the wildcard (u32::MAX), and 32 bits as Linux keeps it.
pub fn check_cid(cid: u64) -> Result<(), String> {
    if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
        return Err(format!("{cid} is not a guest's vsock CID (3 to {})", u32::MAX - 1));
    }
    Ok(())
}
