//! vmm: a KVM hypervisor that runs many guests, each in a process of its
//! own, under one supervisor that merges their identical pages.
//!
//! Data flow: the CLI (or the API) builds a [`config`]; the supervisor's
//! [`manager::Manager`] makes each guest in a process of its own
//! ([`process`]), where a [`guest::Guest`] is built: RAM ([`memory`]), the
//! loaded kernel and boot structures ([`boot`]), a VM and its vCPUs
//! ([`vstate`]) and devices ([`devices`]). Each vCPU has its own thread; a
//! guest ends with a [`outcome::GuestEnd`]. Page sharing ([`sharing`], the
//! `dedup` crate) runs in the supervisor and merges through each guest
//! process's agent. See docs/design.md.

pub mod api;
pub mod bench;
pub mod boot;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod devices;
pub mod disk;
pub mod error;
pub mod gaps;
pub mod guest;
pub mod host;
pub mod hypervisor;
pub mod leftovers;
pub mod manager;
pub mod memory;
pub mod network;
pub mod outcome;
pub mod pressure;
pub mod proc;
pub mod process;
pub mod runner;
pub mod sharing;
pub mod signals;
pub mod snapshot;
pub mod stats_file;
pub mod vsock_host;
pub mod vstate;
