//! Disks end to end: Linux guests boot with one shared image and each
//! reads it through its own copy-on-write overlay; the image never changes.

mod common;

use common::*;

#[test]
fn four_tiny_linux_guests_share_one_disk_image() {
    let dir = scratch_dir("disk-linux");
    let (image, overlays, consoles) = (dir.join("disk.img"), dir.join("overlays"), dir.join("consoles"));
    write_mbr_image(&image, 4);
    let before = std::fs::read(&image).unwrap();
    let out = run_tiny_linux("4", &consoles, &["--overlay-dir", overlays.to_str().unwrap(), image.to_str().unwrap()]);
    // On PVM hosts the guests end when their init cannot run (a reset); on
    // hardware KVM the init reboots: both are clean.
    assert_eq!(out.code, Some(0), "{}", out.describe());
    for id in 0..4 {
        let log = std::fs::read_to_string(consoles.join(format!("guest-{id}.log"))).unwrap();
        assert!(
            log.contains("virtio_blk virtio0: [vda] 8192 512-byte logical blocks (4.19 MB/4.00 MiB)"),
            "guest {id} did not see a 4 MiB vda:\n{log}"
        );
        assert!(log.contains(" vda: vda1"), "guest {id} did not read the partition table:\n{log}");
        let overlay = overlays.join(format!("guest-{id}.overlay"));
        assert_eq!(std::fs::metadata(&overlay).unwrap().len(), before.len() as u64, "{}", overlay.display());
    }
    assert!(std::fs::read(&image).unwrap() == before, "the base image changed");
    std::fs::remove_dir_all(dir).unwrap();
}
