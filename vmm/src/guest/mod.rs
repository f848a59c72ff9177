//! What a guest process runs, and nothing else: the VM and its vCPUs
//! ([`vstate`]), the devices ([`devices`]), the boot ([`boot`]), the disk
//! ([`disk`]), snapshot writing and loading ([`snapshot`]), the process's
//! main loop ([`process`]) and the jail it enters ([`jail`], [`seccomp`]).
//! It speaks to the supervisor only through `crate::protocol` and never
//! uses `crate::supervisor`.

pub mod boot;
pub mod devices;
pub mod dial;
pub mod disk;
pub mod jail;
mod last_words;
pub mod machine;
pub mod process;
pub mod reclaim;
pub mod seccomp;
pub mod snapshot;
mod syscall_names;
pub mod vstate;
