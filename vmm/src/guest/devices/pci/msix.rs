//! An MSI-X table and its pending bits (PCI 3.0 6.8.2), as one function
//! keeps them: the driver writes each vector's message (an address in the
//! LAPIC's window and a data word) and masks or unmasks it; a vector the
//! device raises while masked stays pending until it is unmasked.

use serde::{Deserialize, Serialize};

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control's mask bit.
const MASKED: u32 = 1;
/// Message control's bits.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// "No vector" in virtio's vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// Our devices have a vector per queue and one for configuration changes.
pub const MAX_VECTORS: usize = 64;

/// A message to deliver: what KVM_SIGNAL_MSI takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where MSI messages go (KVM, or a test's recorder).
pub trait MsiSink: Send + Sync {
    fn signal(&self, message: MsiMessage);
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MsixTable {
    /// Per vector: address low, address high, data, vector control.
    entries: Vec<[u32; 4]>,
    pending: u64,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    /// A table of `vectors` entries (at most [`MAX_VECTORS`]), all masked,
    /// MSI-X off, as a function comes out of reset.
    pub fn new(vectors: usize) -> MsixTable {
        let vectors = vectors.clamp(1, MAX_VECTORS);
        MsixTable { entries: vec![[0, 0, 0, MASKED]; vectors], pending: 0, enabled: false, function_masked: false }
    }

    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Message control as the capability reads it: table size - 1 and
    /// the enable and function mask bits.
    pub fn control(&self) -> u16 {
        let mut control = self.entries.len() as u16 - 1;
        if self.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.function_masked {
            control |= CONTROL_FUNCTION_MASK;
        }
        control
    }

    /// The driver writes message control; returns the pending messages
    /// that unmasking let go.
    pub fn set_control(&mut self, control: u16) -> Vec<MsiMessage> {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.release_pending()
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        read_dwords(offset, data, |i| self.entries.get(i / 4).map(|e| e[i % 4]));
    }

    /// A write into the table (only whole dwords); returns the pending
    /// messages an unmask let go.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<MsiMessage> {
        let Some(v) = dword(offset, data) else {
            return Vec::new();
        };
        let i = (offset / 4) as usize;
        if let Some(entry) = self.entries.get_mut(i / 4) {
            entry[i % 4] = v;
        }
        self.release_pending()
    }

    /// The pending bit array: read-only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let words = [self.pending as u32, (self.pending >> 32) as u32];
        read_dwords(offset, data, |i| words.get(i).copied());
    }

    /// The device raises `vector`: its message if it may go now; masked,
    /// it waits as pending. Nothing goes while MSI-X is off.
    pub fn trigger(&mut self, vector: u16) -> Option<MsiMessage> {
        let vector = usize::from(vector);
        if !self.enabled || vector >= self.entries.len() {
            return None;
        }
        if self.function_masked || self.entries[vector][3] & MASKED != 0 {
            self.pending |= 1 << vector;
            return None;
        }
        Some(self.message(vector))
    }

    fn message(&self, vector: usize) -> MsiMessage {
        let [lo, hi, data, _] = self.entries[vector];
        MsiMessage { address: u64::from(hi) << 32 | u64::from(lo), data }
    }

    fn release_pending(&mut self) -> Vec<MsiMessage> {
        if !self.enabled || self.function_masked {
            return Vec::new();
        }
        let mut out = Vec::new();
        for vector in 0..self.entries.len() {
            if self.pending & (1 << vector) != 0 && self.entries[vector][3] & MASKED == 0 {
                self.pending &= !(1 << vector);
                out.push(self.message(vector));
            }
        }
        out
    }

    /// Takes a saved table, checked: same size, as a hostile state file
    /// could say otherwise.
    pub fn restore(&mut self, saved: &MsixTable) -> Result<(), String> {
        if saved.entries.len() != self.entries.len() {
            return Err(format!("{} saved MSI-X vectors for a function with {}", saved.entries.len(), self.vectors()));
        }
        *self = saved.clone();
        let len = self.entries.len();
        self.pending &= if len >= 64 { u64::MAX } else { (1 << len) - 1 };
        Ok(())
    }
}

/// A dword-aligned 4-byte write's value.
fn dword(offset: u64, data: &[u8]) -> Option<u32> {
    (offset.is_multiple_of(4) && data.len() == 4).then(|| u32::from_le_bytes(data.try_into().unwrap()))
}

/// Reads `data` from `offset` of an array of dwords (`word(i)`), any
/// width; past the end reads zero.
fn read_dwords(offset: u64, data: &mut [u8], word: impl Fn(usize) -> Option<u32>) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset as usize + i;
        *byte = word(at / 4).map_or(0, |w| w.to_le_bytes()[at % 4]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(t: &mut MsixTable, offset: u64, v: u32) -> Vec<MsiMessage> {
        t.write_table(offset, &v.to_le_bytes())
    }

    #[test]
    fn vectors_fire_when_enabled_and_unmasked_and_wait_while_masked() {
        let mut t = MsixTable::new(3);
        assert_eq!(t.control(), 2);
        write(&mut t, 16, 0xfee0_0000);
        write(&mut t, 20, 0);
        write(&mut t, 24, 0x4041);
        assert_eq!(t.trigger(1), None, "MSI-X off");
        assert!(t.set_control(CONTROL_ENABLE).is_empty());
        assert_eq!(t.trigger(1), None, "vector 1 is still masked");
        let released = write(&mut t, 28, 0);
        assert_eq!(released, vec![MsiMessage { address: 0xfee0_0000, data: 0x4041 }], "unmasking lets it go");
        assert_eq!(t.trigger(1), Some(MsiMessage { address: 0xfee0_0000, data: 0x4041 }));
        // The function mask holds every vector.
        t.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(t.trigger(1), None);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert_eq!(t.set_control(CONTROL_ENABLE).len(), 1);
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert_eq!(t.trigger(7), None, "no such vector");
        let mut word = [0u8; 4];
        t.read_table(24, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x4041);
        t.read_table(100, &mut word);
        assert_eq!(word, [0; 4], "past the table");
    }

    #[test]
    fn a_saved_table_of_another_size_is_refused() {
        let mut t = MsixTable::new(3);
        t.set_control(CONTROL_ENABLE);
        let saved = t.clone();
        let mut back = MsixTable::new(3);
        back.restore(&saved).unwrap();
        assert_eq!(back, saved);
        assert!(MsixTable::new(2).restore(&saved).is_err());
    }
}
