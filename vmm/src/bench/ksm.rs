//! Kernel KSM through /sys/kernel/mm/ksm, for the bench's KSM runs: the
//! host's settings are saved when we take control and put back when we let
//! go (also on error or Ctrl-C, via `Drop`), after unmerging with `run=2`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SYSFS: &str = "/sys/kernel/mm/ksm";

/// The knobs we change, restored in this order (`run` last, so ksmd
/// restarts only once the rest is back).
const SAVED: [&str; 4] = ["advisor_mode", "pages_to_scan", "sleep_millisecs", "run"];

/// KSM's own defaults (mm/ksm.c).
pub const DEFAULT_PAGES_TO_SCAN: u64 = 100;
pub const DEFAULT_SLEEP_MS: u64 = 20;

/// Control of KSM for the length of the bench.
pub struct Ksm {
    dir: PathBuf,
    saved: Vec<(&'static str, String)>,
}

impl Ksm {
    /// Saves the current settings. Fails, naming why, where KSM is missing
    /// or we may not change it.
    pub fn take() -> io::Result<Ksm> {
        Self::take_in(Path::new(SYSFS))
    }

    fn take_in(dir: &Path) -> io::Result<Ksm> {
        let mut saved = Vec::new();
        for knob in SAVED {
            let path = dir.join(knob);
            match std::fs::read_to_string(&path) {
                Ok(text) => saved.push((knob, current_choice(&text))),
                // Older kernels have no advisor; nothing to save or restore.
                Err(e) if e.kind() == io::ErrorKind::NotFound && knob == "advisor_mode" => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))),
            }
        }
        let ksm = Ksm { dir: dir.to_path_buf(), saved };
        // Writing the value it has proves we may write (root).
        let run = ksm.saved.iter().find(|(k, _)| *k == "run").map(|(_, v)| v.clone()).unwrap_or_default();
        ksm.write("run", &run)?;
        Ok(ksm)
    }

    /// Starts ksmd scanning `pages_to_scan` pages every `sleep_ms`, with the
    /// advisor off so these numbers hold.
    pub fn start(&self, pages_to_scan: u64, sleep_ms: u64) -> io::Result<()> {
        if self.saved.iter().any(|(k, _)| *k == "advisor_mode") {
            self.write("advisor_mode", "none")?;
        }
        self.write("sleep_millisecs", &sleep_ms.to_string())?;
        self.set_pages_to_scan(pages_to_scan)?;
        self.write("run", "1")
    }

    pub fn set_pages_to_scan(&self, pages: u64) -> io::Result<()> {
        self.write("pages_to_scan", &pages.to_string())
    }

    /// Stops ksmd and breaks every KSM page back into private copies.
    pub fn unmerge(&self) -> io::Result<()> {
        self.write("run", "2")
    }

    /// Host pages KSM saves: sharers beyond the first of each KSM page, and
    /// pages mapped to the zero page (with `use_zero_pages`). These are
    /// host-wide counters.
    pub fn pages_saved(&self) -> u64 {
        self.read_u64("pages_sharing") + self.read_u64("ksm_zero_pages")
    }

    fn read_u64(&self, knob: &str) -> u64 {
        std::fs::read_to_string(self.dir.join(knob)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    fn write(&self, knob: &str, value: &str) -> io::Result<()> {
        let path = self.dir.join(knob);
        std::fs::write(&path, value)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot write '{value}' to {}: {e}", path.display())))
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        if let Err(e) = self.unmerge() {
            log::warn!("KSM: {e}");
        }
        for (knob, value) in &self.saved {
            if let Err(e) = self.write(knob, value) {
                eprintln!("vmm bench: could not restore KSM's {knob}: {e}");
            }
        }
    }
}

/// A sysfs choice file reads like `[none] scan-time`: the bracketed word is
/// the current one; other files hold just the value.
fn current_choice(text: &str) -> String {
    let text = text.trim();
    match (text.find('['), text.find(']')) {
        (Some(a), Some(b)) if a < b => text[a + 1..b].to_string(),
        _ => text.to_string(),
    }
}

/// CPU time ksmd has used since boot.
pub fn ksmd_cpu() -> Option<Duration> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim() == "ksmd") {
            return crate::proc::cpu_time(&entry.path().join("stat"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(advisor: bool) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-ksm-test-{}-{advisor}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (k, v) in [("run", "0\n"), ("pages_to_scan", "100\n"), ("sleep_millisecs", "20\n")] {
            std::fs::write(dir.join(k), v).unwrap();
        }
        if advisor {
            std::fs::write(dir.join("advisor_mode"), "[scan-time] none\n").unwrap();
        }
        dir
    }

    fn read(dir: &Path, knob: &str) -> String {
        std::fs::read_to_string(dir.join(knob)).unwrap()
    }

    #[test]
    fn settings_come_back_after_a_run() {
        for advisor in [true, false] {
            let dir = fake_sysfs(advisor);
            {
                let ksm = Ksm::take_in(&dir).unwrap();
                ksm.start(5000, 10).unwrap();
                assert_eq!(read(&dir, "run"), "1");
                assert_eq!(read(&dir, "pages_to_scan"), "5000");
                assert_eq!(read(&dir, "sleep_millisecs"), "10");
                if advisor {
                    assert_eq!(read(&dir, "advisor_mode"), "none");
                }
            }
            assert_eq!(read(&dir, "run"), "0");
            assert_eq!(read(&dir, "pages_to_scan"), "100");
            assert_eq!(read(&dir, "sleep_millisecs"), "20");
            if advisor {
                assert_eq!(read(&dir, "advisor_mode"), "scan-time");
            } else {
                assert!(!dir.join("advisor_mode").exists());
            }
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn missing_ksm_is_an_error_naming_the_file() {
        let err = Ksm::take_in(Path::new("/nonexistent/ksm")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/ksm/pages_to_scan"), "{err}");
    }

    #[test]
    fn choice_files_parse() {
        assert_eq!(current_choice("[none] scan-time\n"), "none");
        assert_eq!(current_choice("none [scan-time]"), "scan-time");
        assert_eq!(current_choice("20\n"), "20");
    }
}
