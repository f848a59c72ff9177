//! The Linux a disk image boots, found the way its boot loader would find
//! it, read in Rust from the image (never mounted, never run): on each
//! partition with an ext2, ext4 or FAT file system (or the whole image,
//! without a partition table; an EFI system partition too, where
//! systemd-boot keeps its entries), `/boot` as a directory or as the
//! partition itself,
//! first a Boot Loader Specification entry (`loader/entries/*.conf`; the
//! highest version wins), then GRUB's default entry in `grub/grub.cfg` or
//! `grub2/grub.cfg`. vmm then loads that kernel, initrd and command line
//! itself, as it loads `--kernel`.
//!
//! Everything here reads hostile input: sizes are bounded before reading,
//! a path that does not resolve inside the file system is not there, and
//! what cannot be parsed is passed over and named in the error.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::file_systems::{self, BootFs};
use super::partitions::{self, Kind};
use super::BaseImage;

/// The largest boot loader file read (an entry, a grub.cfg).
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The most entries looked at in one `loader/entries`.
const MAX_ENTRIES: usize = 256;

/// What the image boots: files in the file system of one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEntry {
    /// The partition holding them (0: the image is the file system).
    pub partition: u32,
    pub kernel: String,
    /// Loaded one after the other as one initrd (Linux takes concatenated
    /// archives).
    pub initrds: Vec<String>,
    /// The entry's kernel command line.
    pub options: String,
    /// Which entry this is, for the user.
    pub described: String,
}

/// Finds what `image` boots, or says what was looked for and where.
pub fn find(image: &BaseImage) -> Result<BootEntry, String> {
    let parts = partitions::read(&image.file, image.len)?;
    let mut passed = Vec::new();
    let mut has_efi = false;
    for part in parts {
        let name = match part.number {
            0 => "the image".to_string(),
            n => format!("partition {n}"),
        };
        match part.kind {
            Kind::NoFileSystem => continue,
            Kind::EfiSystem => has_efi = true,
            Kind::Data => {}
        }
        let Some(fs) = file_systems::open(image, part) else {
            passed.push(format!("{name}: no ext2, ext4 or FAT file system"));
            continue;
        };
        for boot in ["/boot", ""] {
            let found = match bls_entry(fs.as_ref(), boot) {
                Ok(None) => grub_entry(fs.as_ref(), boot),
                other => other,
            };
            match found {
                Ok(Some(mut entry)) => {
                    entry.partition = part.number;
                    entry.described = format!("{} on {name}", entry.described);
                    return Ok(entry);
                }
                Ok(None) => {}
                Err(e) => passed.push(format!("{name}: {e}")),
            }
        }
        if passed.last().is_none_or(|l| !l.starts_with(&name)) {
            passed.push(format!("{name}: no boot loader entry"));
        }
    }
    let mut why = format!(
        "{} holds nothing vmm can boot: it looked for a Boot Loader Specification entry \
         (loader/entries/*.conf) and GRUB's grub.cfg (grub/ or grub2/), in /boot or at the top of each \
         partition's ext2, ext4 or FAT file system",
        image.path.display()
    );
    if !passed.is_empty() {
        why += &format!(" ({})", passed.join("; "));
    }
    if has_efi {
        why += "; it has an EFI system partition without such an entry, and UEFI firmware is not supported yet";
    }
    Err(why + ": give --kernel")
}

/// The file system of partition `partition` of `image` (0: the whole
/// image), where a boot entry's files are.
pub fn open_partition(image: &BaseImage, partition: u32) -> Result<Box<dyn BootFs>, String> {
    let parts = partitions::read(&image.file, image.len)?;
    let part = parts.into_iter().find(|p| p.number == partition).ok_or(format!("no partition {partition}"))?;
    file_systems::open(image, part).ok_or(format!("partition {partition} has no file system vmm reads"))
}

/// A small text file, if it is there.
fn read_config(fs: &dyn BootFs, path: &str) -> Result<Option<String>, String> {
    match fs.file_len(path) {
        None => Ok(None),
        Some(len) if len > MAX_CONFIG_BYTES => Err(format!("{path} is {len} bytes, more than a boot loader's file is")),
        Some(_) => Ok(Some(String::from_utf8_lossy(&fs.read(path, MAX_CONFIG_BYTES)?).into_owned())),
    }
}

/// `path` as an entry names it, resolved in `fs`: relative to the file
/// system holding the entry, or to `boot` when /boot is a directory of it.
fn resolve(fs: &dyn BootFs, boot: &str, path: &str) -> Option<String> {
    let path = strip_device(path);
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    [format!("{boot}{path}"), path].into_iter().find(|p| fs.file_len(p).is_some())
}

/// GRUB's `(hd0,gpt2)/vmlinuz` or `($root)/vmlinuz`: the path after the device.
fn strip_device(path: &str) -> &str {
    match path.strip_prefix('(').and_then(|rest| rest.split_once(')')) {
        Some((_, after)) => after,
        None => path,
    }
}

/// The Boot Loader Specification entry with the highest version in
/// `boot`/loader/entries.
fn bls_entry(fs: &dyn BootFs, boot: &str) -> Result<Option<BootEntry>, String> {
    let dir = format!("{boot}/loader/entries");
    let Some(mut names) = fs.files_in(&dir) else { return Ok(None) };
    names.sort();
    let mut best: Option<(String, String, BootEntry)> = None;
    for name in names.into_iter().take(MAX_ENTRIES) {
        if !name.to_ascii_lowercase().ends_with(".conf") {
            continue;
        }
        let path = format!("{dir}/{name}");
        let Some(text) = read_config(fs, &path)? else { continue };
        let (mut linux, mut initrds, mut options, mut version, mut sort_key) =
            (None, Vec::new(), Vec::new(), None, None);
        for line in text.lines() {
            let line = line.trim();
            let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let value = value.trim();
            match key {
                "linux" => linux = Some(value.to_string()),
                "initrd" => initrds.extend(value.split_whitespace().map(str::to_string)),
                "options" => options.push(value.to_string()),
                "version" => version = Some(value.to_string()),
                "sort-key" => sort_key = Some(value.to_string()),
                _ => {}
            }
        }
        let Some(kernel) = linux.and_then(|l| resolve(fs, boot, &l)) else { continue };
        let initrds: Option<Vec<String>> = initrds.iter().map(|i| resolve(fs, boot, i)).collect();
        let Some(initrds) = initrds else { continue };
        let candidate = BootEntry {
            partition: 0,
            kernel,
            initrds,
            options: options.join(" "),
            described: format!("Boot Loader Specification entry {path}"),
        };
        let key = (sort_key.unwrap_or_default(), version.unwrap_or_else(|| name.clone()));
        let better = match &best {
            None => true,
            Some((k, v, _)) => natural_cmp(&key.0, k).then_with(|| natural_cmp(&key.1, v)) == Ordering::Greater,
        };
        if better {
            best = Some((key.0, key.1, candidate));
        }
    }
    Ok(best.map(|(_, _, entry)| entry))
}

/// Compares version strings the way people read them: runs of digits as
/// numbers ("6.10" after "6.9").
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let order = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (&a[da..], &b[db..]);
            }
            (Some(x), Some(y)) if x != y => return x.cmp(y),
            _ => (a, b) = (&a[1..], &b[1..]),
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&d| d == b'0').count();
    &digits[zeros..]
}

/// GRUB's default entry in `boot`/grub/grub.cfg (or grub2/).
fn grub_entry(fs: &dyn BootFs, boot: &str) -> Result<Option<BootEntry>, String> {
    for cfg in [format!("{boot}/grub/grub.cfg"), format!("{boot}/grub2/grub.cfg")] {
        let Some(text) = read_config(fs, &cfg)? else { continue };
        let menu = parse_grub(&text);
        let Some(chosen) = menu.chosen() else {
            return Err(format!("{cfg} has no menu entry with a linux line"));
        };
        let kernel = resolve(fs, boot, &chosen.linux).ok_or(format!("{cfg}: {} is not in the image", chosen.linux))?;
        let initrds = chosen
            .initrds
            .iter()
            .map(|i| resolve(fs, boot, i).ok_or(format!("{cfg}: {i} is not in the image")))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Some(BootEntry {
            partition: 0,
            kernel,
            initrds,
            options: chosen.options.clone(),
            described: format!("GRUB's default entry {:?} in {cfg}", chosen.title),
        }));
    }
    Ok(None)
}

/// A GRUB menu entry that boots Linux.
#[derive(Debug, Default, PartialEq, Eq)]
struct GrubEntry {
    title: String,
    id: Option<String>,
    linux: String,
    initrds: Vec<String>,
    options: String,
}

#[derive(Debug, Default)]
struct GrubMenu {
    default: Option<String>,
    /// Top-level entries in order (those without a linux line too, as
    /// GRUB counts them).
    entries: Vec<Option<GrubEntry>>,
}

impl GrubMenu {
    /// The entry `set default` names (by number, title or id), else the first.
    fn chosen(&self) -> Option<&GrubEntry> {
        let default = self.default.as_deref().unwrap_or("0");
        let named = match default.parse::<usize>() {
            Ok(i) => self.entries.get(i).and_then(Option::as_ref),
            Err(_) => self.entries.iter().flatten().find(|e| e.title == default || e.id.as_deref() == Some(default)),
        };
        named.or_else(|| self.entries.iter().flatten().next())
    }
}

/// Reads what vmm needs of a grub.cfg: `set default=`, and the top-level
/// `menuentry` blocks with their `linux` and `initrd` lines. Submenus and
/// scripting are passed over; words holding an unexpanded `$variable` are
/// dropped from the command line.
fn parse_grub(text: &str) -> GrubMenu {
    let mut menu = GrubMenu::default();
    let mut depth = 0usize;
    let mut current: Option<(usize, GrubEntry)> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let words = shell_words(line);
        match words.first().map(String::as_str) {
            Some("set") if depth == 0 && current.is_none() => {
                if let Some(value) = words.get(1).and_then(|w| w.strip_prefix("default=")) {
                    menu.default = Some(value.to_string());
                }
            }
            Some("menuentry") if current.is_none() => {
                let title = words.get(1).cloned().unwrap_or_default();
                let id = words.iter().position(|w| w == "--id").and_then(|i| words.get(i + 1)).cloned();
                current = Some((depth, GrubEntry { title, id, ..GrubEntry::default() }));
            }
            Some("linux" | "linux16" | "linuxefi") => {
                if let Some((_, entry)) = current.as_mut() {
                    entry.linux = words.get(1).cloned().unwrap_or_default();
                    let kept: Vec<&str> =
                        words[2.min(words.len())..].iter().map(String::as_str).filter(|w| !w.contains('$')).collect();
                    entry.options = kept.join(" ");
                }
            }
            Some("initrd" | "initrd16" | "initrdefi") => {
                if let Some((_, entry)) = current.as_mut() {
                    entry.initrds = words[1..].to_vec();
                }
            }
            _ => {}
        }
        depth += line.matches('{').count();
        let closes = line.matches('}').count();
        depth = depth.saturating_sub(closes);
        if closes > 0 && current.as_ref().is_some_and(|(at, _)| depth <= *at) {
            let (at, entry) = current.take().unwrap();
            if at == 0 {
                menu.entries.push((!entry.linux.is_empty()).then_some(entry));
            }
        }
    }
    menu
}

/// A line's words, with single and double quotes taken off.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quote, mut any) = (None, false);
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => (quote, any) = (Some(c), true),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            _ => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_people_read_them() {
        assert_eq!(natural_cmp("6.10.0", "6.9.3"), Ordering::Greater);
        assert_eq!(natural_cmp("6.1.0-28", "6.1.0-9"), Ordering::Greater);
        assert_eq!(natural_cmp("abc", "abd"), Ordering::Less);
        assert_eq!(natural_cmp("007", "7"), Ordering::Equal);
    }

    #[test]
    fn grub_default_entries_by_number_title_and_id() {
        let cfg = r#"
set default="1"
menuentry 'Debian GNU/Linux' --class debian --id 'gnulinux-simple' {
    load_video
    insmod ext2
    linux   /boot/vmlinuz-6.1.0-28-amd64 root=UUID=1234 ro quiet $vt_handoff
    initrd  /boot/initrd.img-6.1.0-28-amd64
}
submenu 'Advanced options' {
    menuentry 'Debian, with Linux 6.1.0-27' {
        linux /boot/vmlinuz-6.1.0-27-amd64 root=UUID=1234 ro
    }
}
menuentry "Rescue" {
    linux (hd0,gpt2)/vmlinuz-rescue single
}
"#;
        let menu = parse_grub(cfg);
        assert_eq!(menu.entries.len(), 2, "{menu:?}");
        let chosen = menu.chosen().unwrap();
        assert_eq!(chosen.title, "Rescue");
        assert_eq!(strip_device(&chosen.linux), "/vmlinuz-rescue");
        let first = GrubMenu { default: Some("gnulinux-simple".into()), ..parse_grub(cfg) };
        let first = first.chosen().unwrap();
        assert_eq!(first.options, "root=UUID=1234 ro quiet");
        assert_eq!(first.initrds, vec!["/boot/initrd.img-6.1.0-28-amd64".to_string()]);
        let unknown = GrubMenu { default: Some("${saved_entry}".into()), ..parse_grub(cfg) };
        assert_eq!(unknown.chosen().unwrap().title, "Debian GNU/Linux");
        assert!(parse_grub("menuentry 'x' {\n}\n").chosen().is_none());
    }
}
