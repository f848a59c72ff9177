//! The directory a snapshot is written into, as the supervisor makes it
//! (new, 0700, its files 0600: `snapshot::SnapshotFiles`) and finishes it
//! once the guest process has written it.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::snapshot::{MEMORY_FILE, OVERLAY_FILE, PARTIAL_STATE_FILE, STATE_FILE};

/// Where to write a snapshot: `dir` must not exist yet (it is made here,
/// 0700), or be an empty directory of this user's (made 0700); never a
/// symlink or another user's directory. Returns it absolute.
pub fn prepare(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.as_os_str().is_empty() {
        return Err(Error::bad_input("the snapshot directory must be named"));
    }
    let dir = std::path::absolute(dir).map_err(|e| Error::bad_input(format!("{}: {e}", dir.display())))?;
    let shown = dir.display();
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            std::fs::DirBuilder::new()
                .recursive(!parent.exists())
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::bad_input(format!("cannot make {shown}: {e}")))?;
        }
        Err(e) => return Err(Error::bad_input(format!("{shown}: {e}"))),
        Ok(m) if !m.is_dir() => {
            return Err(Error::bad_input(format!("{shown} is not a directory: snapshots go to a new directory")))
        }
        // SAFETY: geteuid has no arguments and cannot fail.
        Ok(m) if m.uid() != unsafe { libc::geteuid() } => {
            return Err(Error::bad_input(format!(
                "{shown} belongs to user {}: snapshots go to a new directory, or an empty one of this user's",
                m.uid()
            )))
        }
        Ok(_) => {
            let mut entries = std::fs::read_dir(&dir).map_err(|e| Error::bad_input(format!("{shown}: {e}")))?;
            if entries.next().is_some() {
                return Err(Error::conflict(format!("{shown} is not empty: snapshots go to a new directory")));
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::bad_input(format!("{shown}: {e}")))?;
        }
    }
    Ok(dir)
}

/// Removes what a failed snapshot left in `dir`, and `dir` itself if that
/// leaves it empty.
pub fn discard(dir: &Path) {
    for name in [STATE_FILE, MEMORY_FILE, OVERLAY_FILE, PARTIAL_STATE_FILE] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Makes the state the guest process wrote the snapshot's: until this, a
/// crash leaves no `state.json`, so nothing half-written is ever restored.
/// An overlay nobody wrote (a read-only disk's) goes.
pub fn finish(dir: &Path) -> io::Result<()> {
    let overlay = dir.join(OVERLAY_FILE);
    if std::fs::symlink_metadata(&overlay).is_ok_and(|m| m.is_file() && m.len() == 0) {
        std::fs::remove_file(&overlay)?;
    }
    std::fs::rename(dir.join(PARTIAL_STATE_FILE), dir.join(STATE_FILE))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_new_or_empty_directory_of_ours_takes_a_snapshot() {
        let base = std::env::temp_dir().join(format!("vmm-snap-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = prepare(&base.join("new")).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::write(dir.join(MEMORY_FILE), b"x").unwrap();
        assert!(prepare(&dir).unwrap_err().to_string().contains("not empty"));
        std::os::unix::fs::symlink(&dir, base.join("link")).unwrap();
        assert!(prepare(&base.join("link")).unwrap_err().to_string().contains("not a directory"));
        discard(&dir);
        assert!(!dir.exists(), "a failed snapshot's directory stayed");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
