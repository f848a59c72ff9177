//! The snapshot the `cloned` mode restores: one guest of the bench's
//! profile, booted alone (with page sharing, as in the other runs) until
//! it has verified a round of its memory, then paused and snapshotted
//! through the API, as a user would make a template.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::{run_command, stop_child, BenchConfig, Guests};

/// Where the template's snapshot is, and what making it took.
#[derive(Clone, Debug, Serialize)]
pub struct Template {
    pub dir: PathBuf,
    /// From starting its `vmm run` to its first verified round.
    pub boot_s: f64,
    /// How long the snapshot held the (paused) guest.
    pub held_ms: f64,
    /// Pages written to the snapshot's memory file (zero pages are holes).
    pub pages: u64,
}

/// How long the template may take to verify its first round.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

pub fn make(config: &BenchConfig, initrd: Option<&Path>, dir: &Path) -> Result<Template, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let socket = dir.join("api.sock");
    let mut command = run_command(config, 1, Guests::Booted(initrd), dir)?;
    command.args(["--dedup", "inprocess"]).arg("--api-socket").arg(&socket);
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| format!("cannot start the template's vmm run: {e}"))?;
    eprintln!("vmm bench: booting the template for cloned");
    let made = snapshot_when_verified(&mut child, &socket, &dir.join("snapshot"), started);
    stop_child(&mut child);
    made.map_err(|e| format!("the cloned mode's template: {e} (its log: {})", dir.join("vmm.log").display()))
}

fn snapshot_when_verified(
    child: &mut Child,
    socket: &Path,
    snapshot: &Path,
    started: Instant,
) -> Result<Template, String> {
    let boot_s = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("its vmm run ended ({status}) before the guest verified a round"));
        }
        if crate::signals::stop_requested() {
            return Err("interrupted".into());
        }
        if started.elapsed() > BOOT_LIMIT {
            return Err(format!("the guest verified no round in {} s", BOOT_LIMIT.as_secs()));
        }
        // The socket appears once the guest exists.
        let rounds = call(socket, "GET", "/guests/0", None).ok().and_then(|g| g["rounds_verified"].as_u64());
        if rounds.is_some_and(|r| r > 0) {
            break started.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    call(socket, "POST", "/guests/0/pause", None)?;
    let written = call(socket, "PUT", "/guests/0/snapshot", Some(&json!({ "dir": snapshot })))?;
    Ok(Template {
        dir: snapshot.to_path_buf(),
        boot_s,
        held_ms: written["held_ms"].as_f64().unwrap_or_default(),
        pages: written["pages"].as_u64().unwrap_or_default(),
    })
}

/// One API call that must succeed; its JSON reply.
fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let (status, text) = crate::ctl::request(socket, method, path, body)?;
    if !(200..300).contains(&status) {
        return Err(format!("{method} {path}: {status} {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{method} {path}: bad reply ({e}): {text}"))
}
