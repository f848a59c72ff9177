//! The partitions of a disk image (GPT or MBR), read as hostile input:
//! counts and sizes are bounded, and an entry that points outside the
//! image is skipped, never followed.

use std::fs::File;
use std::os::unix::fs::FileExt;

const SECTOR: u64 = 512;
/// The most GPT entries read (the usual table has 128).
const MAX_GPT_ENTRIES: u32 = 1024;

/// One partition: its number as Linux counts them (1, 2, ...; 0 for an
/// image that is one file system without a table) and where it lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub kind: Kind,
}

/// What a partition's type says it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// May hold a file system (Linux data, /boot, or a type we do not know).
    Data,
    /// An EFI system partition: UEFI firmware's, not ours (yet).
    EfiSystem,
    /// Holds no file system: swap, a BIOS boot partition, an extended
    /// MBR partition.
    NoFileSystem,
}

/// GPT type GUIDs as stored on disk (the first three fields little endian).
const EMPTY: [u8; 16] = [0; 16];
const GPT_EFI_SYSTEM: [u8; 16] =
    guid_bytes(0xC12A_7328, 0xF81F, 0x11D2, [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B]);
const GPT_BIOS_BOOT: [u8; 16] =
    guid_bytes(0x2168_6148, 0x6449, 0x6E6F, [0x74, 0x4E, 0x65, 0x65, 0x64, 0x45, 0x46, 0x49]);
const GPT_LINUX_SWAP: [u8; 16] =
    guid_bytes(0x0657_FD6D, 0xA4AB, 0x43C4, [0x84, 0xE5, 0x09, 0x33, 0xC8, 0x4B, 0x4F, 0x4F]);

const fn guid_bytes(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let (a, b, c) = (a.to_le_bytes(), b.to_le_bytes(), c.to_le_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

/// The partitions of the image in `file` (`len` bytes), in table order;
/// the whole image as partition 0 when it has no table.
pub fn read(file: &File, len: u64) -> Result<Vec<Partition>, String> {
    let mut mbr = [0u8; SECTOR as usize];
    file.read_exact_at(&mut mbr, 0).map_err(|e| format!("cannot read its first sector: {e}"))?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(vec![Partition { number: 0, start: 0, len, kind: Kind::Data }]);
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    if entries.iter().any(|e| e[4] == 0xEE) {
        return read_gpt(file, len);
    }
    let mut found = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let kind = match e[4] {
            0 => continue,
            0xEF => Kind::EfiSystem,
            0x05 | 0x0F | 0x85 | 0x82 => Kind::NoFileSystem,
            _ => Kind::Data,
        };
        let start = u64::from(u32::from_le_bytes(e[8..12].try_into().unwrap())) * SECTOR;
        let size = u64::from(u32::from_le_bytes(e[12..16].try_into().unwrap())) * SECTOR;
        push_within(&mut found, i as u32 + 1, start, size, len, kind);
    }
    if found.is_empty() {
        // A boot sector without partitions: a FAT file system, say.
        return Ok(vec![Partition { number: 0, start: 0, len, kind: Kind::Data }]);
    }
    Ok(found)
}

fn read_gpt(file: &File, len: u64) -> Result<Vec<Partition>, String> {
    let mut header = [0u8; 92];
    file.read_exact_at(&mut header, SECTOR).map_err(|e| format!("cannot read its GPT header: {e}"))?;
    if &header[0..8] != b"EFI PART" {
        return Err("its MBR says GPT, but sector 1 holds no GPT header".into());
    }
    let entries_at = u64::from_le_bytes(header[72..80].try_into().unwrap());
    let count = u32::from_le_bytes(header[80..84].try_into().unwrap());
    let size = u32::from_le_bytes(header[84..88].try_into().unwrap());
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&size) || size % 8 != 0 {
        return Err(format!("its GPT header is damaged: {count} entries of {size} bytes"));
    }
    let table_len = u64::from(count) * u64::from(size);
    let table_at = entries_at.checked_mul(SECTOR).filter(|at| at.checked_add(table_len).is_some_and(|end| end <= len));
    let table_at = table_at.ok_or_else(|| format!("its GPT entries (at sector {entries_at}) lie outside the image"))?;
    let mut table = vec![0u8; table_len as usize];
    file.read_exact_at(&mut table, table_at).map_err(|e| format!("cannot read its GPT entries: {e}"))?;
    let mut found = Vec::new();
    for (i, e) in table.chunks(size as usize).enumerate() {
        let kind = match <[u8; 16]>::try_from(&e[0..16]).unwrap() {
            EMPTY => continue,
            GPT_EFI_SYSTEM => Kind::EfiSystem,
            GPT_BIOS_BOOT | GPT_LINUX_SWAP => Kind::NoFileSystem,
            _ => Kind::Data,
        };
        let first = u64::from_le_bytes(e[32..40].try_into().unwrap());
        let last = u64::from_le_bytes(e[40..48].try_into().unwrap());
        let start = first.saturating_mul(SECTOR);
        let size = last.checked_sub(first).map_or(0, |n| n.saturating_add(1).saturating_mul(SECTOR));
        push_within(&mut found, i as u32 + 1, start, size, len, kind);
    }
    Ok(found)
}

/// Keeps a partition that lies inside the image; drops one that does not.
fn push_within(found: &mut Vec<Partition>, number: u32, start: u64, size: u64, len: u64, kind: Kind) {
    if size > 0 && start.checked_add(size).is_some_and(|end| end <= len) {
        found.push(Partition { number, start, len: size, kind });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, bytes: &[(u64, &[u8])], len: u64) -> File {
        let path = std::env::temp_dir().join(format!("vmm-parts-{}-{name}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(len).unwrap();
        for (at, b) in bytes {
            file.write_all_at(b, *at).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn mbr_entry(kind: u8, lba: u32, sectors: u32) -> [u8; 16] {
        let mut e = [0u8; 16];
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
        e
    }

    #[test]
    fn mbr_partitions_are_read_and_those_outside_the_image_dropped() {
        let len = 8 << 20;
        let file = image(
            "mbr",
            &[
                (446, &mbr_entry(0x83, 2048, 4096)),
                (462, &mbr_entry(0xEF, 6144, 2048)),
                (478, &mbr_entry(0x83, 8192, 1 << 30)),
                (510, &[0x55, 0xAA]),
            ],
            len,
        );
        let parts = read(&file, len).unwrap();
        assert_eq!(
            parts,
            vec![
                Partition { number: 1, start: 1 << 20, len: 2 << 20, kind: Kind::Data },
                Partition { number: 2, start: 3 << 20, len: 1 << 20, kind: Kind::EfiSystem },
            ]
        );
        let bare = image("bare", &[], len);
        assert_eq!(read(&bare, len).unwrap(), vec![Partition { number: 0, start: 0, len, kind: Kind::Data }]);
    }

    #[test]
    fn gpt_entries_are_read_and_a_damaged_header_refused() {
        let len = 8 << 20;
        let mut header = [0u8; 92];
        header[0..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&4u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        let mut entries = vec![0u8; 4 * 128];
        let mut put = |i: usize, kind: [u8; 16], first: u64, last: u64| {
            entries[i * 128..i * 128 + 16].copy_from_slice(&kind);
            entries[i * 128 + 32..i * 128 + 40].copy_from_slice(&first.to_le_bytes());
            entries[i * 128 + 40..i * 128 + 48].copy_from_slice(&last.to_le_bytes());
        };
        put(0, GPT_EFI_SYSTEM, 2048, 4095);
        put(2, [7; 16], 4096, 8191);
        put(3, [7; 16], 8192, u64::MAX);
        let file = image(
            "gpt",
            &[(446, &mbr_entry(0xEE, 1, 100)), (510, &[0x55, 0xAA]), (512, &header), (1024, &entries)],
            len,
        );
        let parts = read(&file, len).unwrap();
        assert_eq!(
            parts,
            vec![
                Partition { number: 1, start: 1 << 20, len: 1 << 20, kind: Kind::EfiSystem },
                Partition { number: 3, start: 2 << 20, len: 2 << 20, kind: Kind::Data },
            ]
        );
        header[80..84].copy_from_slice(&1_000_000u32.to_le_bytes());
        let damaged = image("gpt-bad", &[(446, &mbr_entry(0xEE, 1, 100)), (510, &[0x55, 0xAA]), (512, &header)], len);
        assert!(read(&damaged, len).unwrap_err().contains("damaged"));
    }
}
