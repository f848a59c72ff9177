//! Guests that boot the user's own disk image, without `--kernel`: vmm
//! reads the image's partition table and /boot (ext4 or FAT) and boots what its
//! boot loader's entry names (docs/design.md, "Booting a disk image").
//! The images are made here with the usual tools (sfdisk, mkfs.ext4,
//! mkfs.vfat and mtools), with
//! memtest as the kernel so the boots are quick on any host.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn memtest() -> Vec<u8> {
    std::fs::read(image("memtest")).unwrap()
}

fn run_image(disk: &Path, guests: &str) -> Outcome {
    require_kvm();
    run_vmm(&["run", "--guests", guests, "--memory", "64", disk.to_str().unwrap()], Duration::from_secs(300))
}

#[test]
fn four_guests_boot_the_newest_boot_loader_spec_entry_of_their_image() {
    let dir = scratch_dir("disk-boot-bls");
    let kernel = memtest();
    let disk = gpt_image(
        &dir,
        "bls",
        &[
            ("boot/memtest", &kernel),
            ("boot/loader/entries/vmm-6.9.conf", b"title old\nversion 6.9\nlinux /memtest\noptions rounds=1\n"),
            (
                "boot/loader/entries/vmm-6.10.conf",
                b"title new\nversion 6.10\nlinux /memtest\noptions rounds=2 share=0.5\n",
            ),
            ("boot/loader/entries/broken.conf", b"title no kernel\nversion 99\nlinux /gone\n"),
        ],
        false,
    );
    let out = run_image(&disk, "4");
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("vmm-6.10.conf on partition 1"), "the chosen entry is not named\n{}", out.describe());
    assert_eq!(out.stderr.matches("memtest passed: 2 rounds verified").count(), 4, "{}", out.describe());
}

#[test]
fn a_guest_boots_grubs_default_entry() {
    let dir = scratch_dir("disk-boot-grub");
    let kernel = memtest();
    let cfg = b"set default=\"1\"\n\
        menuentry 'first' --id first {\n    linux /boot/memtest rounds=1\n}\n\
        menuentry 'second' --id second {\n    insmod ext2\n    linux ($root)/boot/memtest rounds=2 $vt_handoff\n}\n";
    let disk = gpt_image(&dir, "grub", &[("boot/memtest", &kernel), ("boot/grub/grub.cfg", cfg)], true);
    let out = run_image(&disk, "1");
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("GRUB's default entry \"second\""), "{}", out.describe());
    assert!(out.stderr.contains("memtest passed: 2 rounds verified"), "{}", out.describe());
}

#[test]
fn a_guest_boots_the_entry_systemd_boot_keeps_on_the_efi_system_partition() {
    let dir = scratch_dir("disk-boot-esp");
    let kernel = memtest();
    let entry = b"title Arch Linux\nlinux /vmlinuz-linux\noptions rounds=2\n";
    let disk = esp_image(&dir, "esp", &[("vmlinuz-linux", &kernel), ("loader/entries/arch.conf", entry)]);
    let out = run_image(&disk, "1");
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("/loader/entries/arch.conf on partition 1"), "{}", out.describe());
    assert!(out.stderr.contains("memtest passed: 2 rounds verified"), "{}", out.describe());
}

#[test]
fn an_image_with_nothing_to_boot_is_refused_by_name_at_once() {
    let dir = scratch_dir("disk-boot-bad");
    let kernel = memtest();
    let no_entry = gpt_image(&dir, "no-entry", &[("boot/vmlinuz", &kernel)], false);
    let efi_only = esp_image(&dir, "efi", &[("EFI/BOOT/BOOTX64.EFI", b"MZ")]);
    let blank = dir.join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(4 << 20).unwrap();
    for (disk, says) in [
        (&no_entry, "holds nothing vmm can boot"),
        (&efi_only, "UEFI firmware is not supported yet"),
        (&blank, "no ext2, ext4 or FAT file system"),
    ] {
        let out = run_image(disk, "2");
        assert_ne!(out.code, Some(0), "{}", out.describe());
        assert!(out.stderr.contains(says) && out.stderr.contains("give --kernel"), "{says}\n{}", out.describe());
        assert!(out.elapsed < Duration::from_secs(5), "took {:?}", out.elapsed);
        assert!(!out.stderr.contains("memtest"), "a guest ran\n{}", out.describe());
    }
}
