//! One process per guest: the channel to it ([`ipc`]), the supervisor's
//! handle on it ([`handle`]), the process itself ([`child`]), the jail it
//! runs in ([`jail`]) and the host connections it asks for ([`dial`]).

pub mod child;
pub mod dial;
pub mod handle;
pub mod ipc;
pub mod jail;
mod last_words;
pub mod seccomp;
mod syscall_names;
