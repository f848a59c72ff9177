//! One process per guest: the channel to it ([`ipc`]), the supervisor's
//! handle on it ([`handle`]) and the process itself ([`child`]).

pub mod child;
pub mod handle;
pub mod ipc;
