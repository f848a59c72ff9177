//! Our own test guests mark themselves with an ELF note asking the VMM to
//! start every vCPU at the entry point, so they need no INIT/SIPI dance
//! (whose real-mode trampoline is slow, emulated kernel code on PVM hosts).

use std::io::{Read, Seek, SeekFrom};

/// Note name and type (`"VMM"`, 0x4d4d5601) of the "start all vCPUs at entry" note.
pub const NOTE_NAME: &[u8] = b"VMM\0";
pub const NOTE_ALL_VCPUS_AT_ENTRY: u32 = 0x4d4d_5601;
const PT_NOTE: u32 = 4;

/// Whether the ELF in `file` carries the "start all vCPUs at entry" note.
pub fn starts_all_vcpus<F: Read + Seek>(file: &mut F) -> std::io::Result<bool> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap());
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))?;
        file.read_exact(&mut phdr)?;
        if u32::from_le_bytes(phdr[0..4].try_into().unwrap()) != PT_NOTE {
            continue;
        }
        let offset = u64::from_le_bytes(phdr[8..16].try_into().unwrap());
        let size = u64::from_le_bytes(phdr[32..40].try_into().unwrap()).min(4096);
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut notes)?;
        if has_note(&notes, NOTE_NAME, NOTE_ALL_VCPUS_AT_ENTRY) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Walks a PT_NOTE segment: {namesz, descsz, type, name, desc}, each 4-aligned.
fn has_note(mut notes: &[u8], name: &[u8], kind: u32) -> bool {
    let word = |b: &[u8], i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
    let align4 = |n: u32| (n as usize).div_ceil(4) * 4;
    while notes.len() >= 12 {
        let (namesz, descsz, ty) = (word(notes, 0), word(notes, 1), word(notes, 2));
        let name_end = 12 + align4(namesz);
        let next = name_end + align4(descsz);
        if next > notes.len() {
            return false;
        }
        if ty == kind && &notes[12..12 + namesz as usize] == name {
            return true;
        }
        notes = &notes[next..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], ty: u32) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend((name.len() as u32).to_le_bytes());
        n.extend(4u32.to_le_bytes());
        n.extend(ty.to_le_bytes());
        n.extend(name);
        n.resize(12 + name.len().div_ceil(4) * 4, 0);
        n.extend(0u32.to_le_bytes());
        n
    }

    #[test]
    fn finds_our_note_after_others() {
        let mut notes = note(b"GNU\0", 3);
        notes.extend(note(NOTE_NAME, NOTE_ALL_VCPUS_AT_ENTRY));
        assert!(has_note(&notes, NOTE_NAME, NOTE_ALL_VCPUS_AT_ENTRY));
    }

    #[test]
    fn ignores_other_notes_and_truncation() {
        assert!(!has_note(&note(b"Xen\0", NOTE_ALL_VCPUS_AT_ENTRY), NOTE_NAME, NOTE_ALL_VCPUS_AT_ENTRY));
        let full = note(NOTE_NAME, NOTE_ALL_VCPUS_AT_ENTRY);
        assert!(!has_note(&full[..full.len() - 2], NOTE_NAME, NOTE_ALL_VCPUS_AT_ENTRY));
    }
}
