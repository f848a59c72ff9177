//! What the supervisor runs: the guests' books ([`manager`]), page sharing
//! ([`sharing`]), the memory governor ([`pressure`]) and cgroups
//! ([`cgroup`]), its handle on each guest process ([`handle`]) and the host
//! resources it makes for guests (networks, vsock sockets, snapshot
//! directories). It speaks to guest processes only through
//! `crate::protocol` and never uses `crate::guest`.

pub mod cgroup;
pub mod dial;
pub mod handle;
mod headroom;
pub mod jailer;
pub mod leftovers;
pub mod manager;
pub mod network;
pub mod pool;
pub mod pressure;
pub mod sharing;
pub mod snapshot_dir;
pub mod vsock_host;
