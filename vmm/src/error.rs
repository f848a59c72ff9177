//! Errors at the boundaries of the supervisor: each says what went wrong in
//! words a user can act on, and keeps its kind, which the API turns into a
//! status code and `vmm run` into an exit code.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The request or configuration is wrong (400; exit 2).
    BadInput,
    /// No such guest (404).
    NotFound,
    /// Not possible in the guest's current state (409).
    Conflict,
    /// The guest's process cannot answer now: it is stopped (SIGSTOP or a
    /// tracer). Nothing was asked of it (409).
    Unresponsive,
    /// The host could not do it: KVM, memory, processes (500; exit 2).
    Host,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(Kind::BadInput, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, message)
    }

    pub fn host(message: impl Into<String>) -> Self {
        Self::new(Kind::Host, message)
    }

    /// The same error with `context: ` in front of its message.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Error { kind: self.kind, message: format!("{context}: {}", self.message) }
    }
}

impl From<Error> for String {
    fn from(e: Error) -> String {
        e.message
    }
}

pub type Result<T> = std::result::Result<T, Error>;
