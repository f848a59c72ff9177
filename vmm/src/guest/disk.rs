//! Disk images for guests: one read-only base image shared by every guest,
//! and a copy-on-write overlay per guest so guests never see each other's
//! writes and the base never changes.
//!
//! The overlay is a sparse file as large as the base, written in clusters of
//! 4 KiB: the first write to a cluster copies it from the layer below (if the
//! write does not cover it whole) and from then on the cluster is read from
//! the overlay. A bitmap in memory says which clusters the overlay holds.
//!
//! A clone of a snapshot has one more layer: the snapshot's own overlay,
//! read-only, between the clone's overlay and the base. Clones chain to it
//! instead of copying it, so making a clone writes nothing to disk; a
//! snapshot of a clone writes both layers as one, so snapshots never chain.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::image::{BaseIdentity, BaseImage, DiskError};

const CLUSTER: u64 = 4096;

/// A disk as a snapshot keeps it (the overlay's clusters are a file beside).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskState {
    base: BaseIdentity,
    /// The overlay's cluster bitmap; None for a read-only disk.
    present: Option<Vec<u64>>,
}

impl DiskState {
    /// Whether `base` is the image this disk was saved on, unchanged.
    pub fn matches(&self, base: &BaseImage) -> bool {
        base.identity().ok().as_ref() == Some(&self.base)
    }

    pub fn has_overlay(&self) -> bool {
        self.present.is_some()
    }
}

/// What one guest sees as its disk.
#[derive(Debug)]
pub struct Disk {
    base: Arc<BaseImage>,
    /// A clone's: the overlay of the snapshot it came from, never written.
    saved: Option<Overlay>,
    /// Where this guest's writes go; None for a read-only disk.
    overlay: Option<Overlay>,
}

/// An overlay file and the clusters it holds, one bit each.
#[derive(Debug)]
struct Overlay {
    file: File,
    present: Vec<u64>,
}

impl Overlay {
    fn has(&self, cluster: u64) -> bool {
        holds(&self.present, cluster)
    }

    fn mark(&mut self, cluster: u64) {
        self.present[(cluster / 64) as usize] |= 1 << (cluster % 64);
    }
}

fn out_of_range(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{len} bytes at offset {offset} are beyond the end of the {size}-byte disk"),
    )
}

/// Whether a cluster bitmap has `cluster`.
fn holds(bitmap: &[u64], cluster: u64) -> bool {
    bitmap.get((cluster / 64) as usize).is_some_and(|w| w & (1 << (cluster % 64)) != 0)
}

fn bitmap_len(disk_len: u64) -> usize {
    disk_len.div_ceil(CLUSTER).div_ceil(64) as usize
}

impl Disk {
    /// A disk that refuses writes.
    pub fn read_only(base: Arc<BaseImage>) -> Disk {
        Disk { base, saved: None, overlay: None }
    }

    /// A disk whose writes go to a fresh sparse overlay at `path` (an old
    /// file there is replaced).
    pub fn with_overlay(base: Arc<BaseImage>, path: &Path) -> Result<Disk, DiskError> {
        let overlay_err = |e| DiskError::Overlay(path.into(), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(overlay_err)?;
        file.set_len(base.len).map_err(overlay_err)?;
        let present = vec![0; bitmap_len(base.len)];
        Ok(Disk { base, saved: None, overlay: Some(Overlay { file, present }) })
    }

    /// A clone's disk: a fresh overlay at `path` for the clone's writes, over
    /// the snapshot's overlay `saved` (opened read-only, never copied) over
    /// the base.
    pub fn restore(base: Arc<BaseImage>, state: &DiskState, saved: &Path, path: &Path) -> Result<Disk, DiskError> {
        if !state.matches(&base) {
            return Err(DiskError::Changed(base.path.clone()));
        }
        let mut disk = Disk::with_overlay(base, path)?;
        let Some(present) = &state.present else { return Ok(disk) };
        if present.len() != bitmap_len(disk.base.len) {
            return Err(DiskError::Changed(saved.into()));
        }
        let file = crate::snapshot::open_file(saved).map_err(|e| DiskError::Open(saved.into(), e))?;
        if file.metadata().map_err(|e| DiskError::Open(saved.into(), e))?.len() != disk.base.len {
            return Err(DiskError::Changed(saved.into()));
        }
        disk.saved = Some(Overlay { file, present: present.clone() });
        Ok(disk)
    }

    pub fn size(&self) -> u64 {
        self.base.len
    }

    pub fn is_read_only(&self) -> bool {
        self.overlay.is_none()
    }

    /// A serial number for the guest (virtio-blk GET_ID): 20 bytes.
    pub fn id(&self) -> [u8; 20] {
        let mut id = [0u8; 20];
        let name = self.base.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        id
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.base.len => Ok(()),
            _ => Err(out_of_range(offset, len, self.base.len)),
        }
    }

    /// The file `cluster` is read from: the top layer that holds it.
    fn holder(&self, cluster: u64) -> &File {
        [&self.overlay, &self.saved]
            .into_iter()
            .flatten()
            .find(|layer| layer.has(cluster))
            .map_or(&self.base.file, |layer| &layer.file)
    }

    /// Fills `buf` from `offset`, cluster by cluster from the layer holding it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = ((CLUSTER - at % CLUSTER) as usize).min(buf.len() - done);
            self.holder(at / CLUSTER).read_exact_at(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the overlay.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        if self.overlay.is_none() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only"));
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let cluster = at / CLUSTER;
            let n = ((CLUSTER - at % CLUSTER) as usize).min(buf.len() - done);
            let overlay = self.overlay.as_ref().expect("checked above");
            if !overlay.has(cluster) && n as u64 != CLUSTER {
                // First write to this cluster, and only part of it: bring
                // the rest over from the layer below first.
                let start = cluster * CLUSTER;
                let mut whole = vec![0u8; (CLUSTER.min(self.base.len - start)) as usize];
                self.holder(cluster).read_exact_at(&mut whole, start)?;
                let within = (at - start) as usize;
                whole[within..within + n].copy_from_slice(&buf[done..done + n]);
                overlay.file.write_all_at(&whole, start)?;
            } else {
                overlay.file.write_all_at(&buf[done..done + n], at)?;
            }
            self.overlay.as_mut().expect("checked above").mark(cluster);
            done += n;
        }
        Ok(())
    }

    /// Writes every cluster the overlay layers hold (the clone's and the
    /// snapshot's under it, as one) to `out`, a new file left sparse, and
    /// returns what a restore needs besides: the base's identity and that
    /// cluster bitmap. A read-only disk writes nothing.
    pub fn save(&self, out: Option<&File>) -> io::Result<DiskState> {
        let base = self.base.identity()?;
        let Some(own) = &self.overlay else { return Ok(DiskState { base, present: None }) };
        let out = out.ok_or_else(|| io::Error::other("no file was made for the disk's overlay"))?;
        let mut present = own.present.clone();
        if let Some(saved) = &self.saved {
            present.iter_mut().zip(&saved.present).for_each(|(word, below)| *word |= below);
        }
        out.set_len(self.base.len)?;
        let mut buf = vec![0u8; CLUSTER as usize];
        for cluster in (0..self.base.len.div_ceil(CLUSTER)).filter(|&c| holds(&present, c)) {
            let at = cluster * CLUSTER;
            let n = CLUSTER.min(self.base.len - at) as usize;
            self.holder(cluster).read_exact_at(&mut buf[..n], at)?;
            out.write_all_at(&buf[..n], at)?;
        }
        out.sync_all()?;
        Ok(DiskState { base, present: Some(present) })
    }

    /// Makes the overlay's writes durable.
    pub fn flush(&self) -> io::Result<()> {
        match &self.overlay {
            Some(o) => o.file.sync_data(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-disk-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A base image of `len` patterned bytes in `dir`.
    fn patterned_base(dir: &Path, len: usize) -> (PathBuf, Arc<BaseImage>) {
        let path = dir.join("base.img");
        std::fs::write(&path, pattern(len)).unwrap();
        let base = BaseImage::open(&path).unwrap();
        (path, base)
    }

    #[test]
    fn overlays_isolate_guests_and_spare_the_base() {
        let dir = scratch("overlay");
        let (base_path, base) = patterned_base(&dir, 64 * 1024);
        let mut a = Disk::with_overlay(base.clone(), &dir.join("a.overlay")).unwrap();
        let b = Disk::with_overlay(base.clone(), &dir.join("b.overlay")).unwrap();

        // A partial-cluster write spanning two clusters.
        a.write_at(&[0xAA; 1000], 4096 - 500).unwrap();
        let mut got = vec![0u8; 8192];
        a.read_at(&mut got, 0).unwrap();
        let mut want = pattern(8192);
        want[4096 - 500..4096 + 500].fill(0xAA);
        assert_eq!(got, want, "a reads its write, and the base around it");
        b.read_at(&mut got, 0).unwrap();
        assert_eq!(got, pattern(8192), "b does not see a's write");
        assert_eq!(std::fs::read(&base_path).unwrap(), pattern(64 * 1024), "the base changed");
        a.flush().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A disk saved and restored as two clones: each sees what was written
    /// before the snapshot, neither sees the other's writes after it, a
    /// clone's partial write into a cluster the snapshot holds keeps the
    /// snapshot's bytes around it, the snapshot's overlay is never written
    /// or copied, a snapshot of a clone holds both layers; a changed base is
    /// refused.
    #[test]
    fn clones_of_a_saved_disk_start_from_its_writes() {
        let dir = scratch("saved");
        let (base_path, base) = patterned_base(&dir, 64 * 1024);
        let mut template = Disk::with_overlay(base.clone(), &dir.join("t.overlay")).unwrap();
        template.write_at(&[0x11; 600], 8000).unwrap();
        let saved = dir.join("saved.overlay");
        let state = template.save(Some(&File::create(&saved).unwrap())).unwrap();
        let saved_bytes = std::fs::read(&saved).unwrap();
        let mut one = Disk::restore(base.clone(), &state, &saved, &dir.join("1.overlay")).unwrap();
        let two = Disk::restore(base.clone(), &state, &saved, &dir.join("2.overlay")).unwrap();
        one.write_at(&[0x22; 80], 8100).unwrap();
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 1000]);
        one.read_at(&mut a, 7800).unwrap();
        two.read_at(&mut b, 7800).unwrap();
        let mut want = pattern(8800)[7800..].to_vec();
        want[200..800].fill(0x11);
        assert_eq!(b, want, "a clone does not see the template's write");
        want[300..380].fill(0x22);
        assert_eq!(a, want);
        assert_eq!(std::fs::read(&saved).unwrap(), saved_bytes, "a clone wrote to the snapshot's overlay");
        let own = std::fs::read(dir.join("1.overlay")).unwrap();
        assert!(own[8192..8192 + 4096].iter().all(|&b| b == 0), "the snapshot's cluster was copied into the clone's");
        assert!(own[4096..8192].contains(&0x22), "the clone's own write is in its own overlay");

        // A snapshot of a clone is whole on its own: a clone of it reads
        // both the template's and the first clone's writes.
        let again = dir.join("again.overlay");
        let state_again = one.save(Some(&File::create(&again).unwrap())).unwrap();
        let three = Disk::restore(base.clone(), &state_again, &again, &dir.join("3.overlay")).unwrap();
        let mut c = vec![0u8; 1000];
        three.read_at(&mut c, 7800).unwrap();
        assert_eq!(c, want, "a snapshot of a clone lost a layer");

        std::fs::write(&saved, [0u8; 512]).unwrap();
        let err = Disk::restore(base, &state, &saved, &dir.join("5.overlay")).unwrap_err();
        assert!(err.to_string().contains("saved.overlay changed since the snapshot"), "{err}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&base_path, pattern(64 * 1024)).unwrap();
        let changed = BaseImage::open(&base_path).unwrap();
        let err = Disk::restore(changed, &state, &saved, &dir.join("4.overlay")).unwrap_err();
        assert!(err.to_string().contains("changed since the snapshot"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn read_only_disks_and_ranges() {
        let dir = scratch("ro");
        let mut disk = Disk::read_only(patterned_base(&dir, 4096).1);
        assert!(disk.is_read_only());
        assert_eq!(disk.write_at(&[1], 0).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        let mut buf = [0u8; 16];
        assert_eq!(disk.read_at(&mut buf, 4090).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(disk.read_at(&mut buf, u64::MAX).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(&disk.id()[..8], b"base.img");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_images_are_named() {
        let dir = scratch("bad");
        let err = |p: &Path| BaseImage::open(p).unwrap_err().to_string();
        assert!(err(&dir.join("missing")).contains("cannot open disk image"));
        assert!(err(&dir).contains("is not a regular file"));
        std::fs::write(dir.join("odd"), [0u8; 1000]).unwrap();
        assert!(err(&dir.join("odd")).contains("1000 bytes, not a multiple of the 512-byte sector"));
        std::fs::write(dir.join("empty"), []).unwrap();
        assert!(err(&dir.join("empty")).contains("0 bytes"));
        let mut qcow = b"QFI\xfb".to_vec();
        qcow.resize(1024, 0);
        std::fs::write(dir.join("q"), qcow).unwrap();
        assert!(err(&dir.join("q")).contains("qemu-img convert"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
