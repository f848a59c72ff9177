//! vmm: a KVM hypervisor that runs many guests in one process.
//!
//! Data flow: the CLI builds a [`runner::RunConfig`]; the runner opens KVM
//! once ([`hypervisor`]), then builds each [`guest::Guest`]: RAM ([`memory`]),
//! the loaded kernel and boot structures ([`boot`]), a VM and its vCPUs
//! ([`vstate`]) and devices ([`devices`]). Each vCPU has its own thread; a
//! guest ends with a [`outcome::GuestEnd`]. See docs/design.md.

pub mod api;
pub mod bench;
pub mod boot;
pub mod cli;
pub mod ctl;
pub mod devices;
pub mod disk;
pub mod guest;
pub mod host;
pub mod hypervisor;
pub mod manager;
pub mod memory;
pub mod outcome;
pub mod proc;
pub mod runner;
pub mod sharing;
pub mod signals;
pub mod snapshot;
pub mod vstate;
