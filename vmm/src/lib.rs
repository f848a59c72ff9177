//! vmm: a KVM hypervisor that runs many guests, each in a process of its
//! own, under one supervisor that merges their identical pages.
//!
//! Data flow: the CLI (or the API) builds a [`config`]; the supervisor's
//! [`supervisor::manager::Manager`] makes each guest in a process of its
//! own, speaking [`protocol`] to it; there [`guest::process`] builds a
//! [`guest::machine::Guest`]: RAM ([`memory`]), the loaded kernel and boot
//! structures ([`guest::boot`]), a VM and its vCPUs ([`guest::vstate`]) and
//! devices ([`guest::devices`]). Each vCPU has its own thread; a guest ends
//! with a [`outcome::GuestEnd`]. Page sharing ([`supervisor::sharing`], the
//! `dedup` crate) runs in the supervisor and merges through each guest
//! process's agent. The tree follows the processes: [`guest`] and
//! [`supervisor`] never use each other (see `boundary` below and
//! docs/design.md).

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod error;
pub mod gaps;
pub mod guest;
pub mod host;
pub mod hypervisor;
pub mod image;
pub mod memory;
pub mod outcome;
pub mod proc;
pub mod protocol;
pub mod runner;
pub mod signals;
pub mod snapshot;
pub mod stats_file;
pub mod supervisor;
pub mod tap;

/// The boundary the tree stands for (docs/design.md): the guest process's
/// code ([`guest`]) and the supervisor's ([`supervisor`]) never use each
/// other; what both use (the protocol, configuration, file formats, host
/// facts) uses neither; the front ends (CLI, API, bench) drive the
/// supervisor and never reach into a guest process's code. Tests may.
#[cfg(test)]
mod boundary {
    use std::path::{Path, PathBuf};

    const SHARED: [&str; 14] = [
        "config",
        "error",
        "gaps",
        "host",
        "hypervisor",
        "image",
        "memory",
        "outcome",
        "proc",
        "protocol",
        "signals",
        "snapshot",
        "stats_file",
        "tap",
    ];
    const FRONT_ENDS: [&str; 5] = ["api", "bench", "cli", "ctl", "runner"];

    fn rust_files(at: &Path) -> Vec<PathBuf> {
        if at.is_file() {
            return vec![at.into()];
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(at).unwrap_or_else(|e| panic!("{}: {e}", at.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(rust_files(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        files
    }

    /// Lines of module `name` (a file or a folder under src/), outside
    /// comments and test modules, that use `crate::<side>`.
    fn crossings(name: &str, sides: &[&str]) -> Vec<String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let at = match src.join(name) {
            dir if dir.is_dir() => dir,
            _ => src.join(format!("{name}.rs")),
        };
        let mut found = Vec::new();
        for file in rust_files(&at) {
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (i, line) in code.lines().enumerate() {
                let crosses = sides.iter().any(|side| line.contains(&format!("crate::{side}")));
                if crosses && !line.trim_start().starts_with("//") {
                    found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
                }
            }
        }
        found
    }

    #[test]
    fn neither_side_uses_the_other_and_what_both_use_uses_neither() {
        let mut found = crossings("guest", &["supervisor"]);
        found.extend(crossings("supervisor", &["guest"]));
        for shared in SHARED {
            found.extend(crossings(shared, &["guest", "supervisor"]));
        }
        for front in FRONT_ENDS {
            found.extend(crossings(front, &["guest"]));
        }
        assert!(found.is_empty(), "code crossing the process boundary:\n{}", found.join("\n"));
    }

    #[test]
    fn the_check_sees_a_crossing() {
        let all: Vec<String> = crossings("supervisor", &["supervisor"]);
        assert!(!all.is_empty(), "the scan found no use of crate::supervisor inside the supervisor");
    }
}
