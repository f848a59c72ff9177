//! The Intel MultiProcessor table: how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA interrupts are wired. Placed in the last KiB of
//! base memory, where Linux looks for it.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use super::layout::{APIC_DEFAULT_BASE, EBDA_START, IOAPIC_DEFAULT_BASE};

/// The table must fit in the KiB below 640 KiB.
pub const MAX_VCPUS: u8 = 32;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_BUS: u8 = 0;
const ISA_IRQS: u8 = 16;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `vcpus` CPUs.
pub fn build(vcpus: u8) -> Vec<u8> {
    assert!((1..=MAX_VCPUS).contains(&vcpus));
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend([0, cpu, APIC_VERSION, flags]);
        entries.extend(0x600u32.to_le_bytes()); // signature: family 6
        entries.extend(0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([1, ISA_BUS]);
    entries.extend(b"ISA   ");
    entries.extend([2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 2;
    for irq in 0..ISA_IRQS {
        // type, irqtype, flags (conforming), source bus/irq, dest ioapic/pin
        entries.extend([3, INT_TYPE_INT, 0, 0, ISA_BUS, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 takes the 8259's ExtINT, LINT1 NMIs, on every LAPIC.
    entries.extend([4, INT_TYPE_EXTINT, 0, 0, ISA_BUS, 0, 0xff, 0]);
    entries.extend([4, INT_TYPE_NMI, 0, 0, ISA_BUS, 0, 0xff, 1]);
    count += 2;

    let table_addr = EBDA_START as u32 + 16;
    let mut table: Vec<u8> = Vec::new();
    table.extend(b"PCMP");
    table.extend(((44 + entries.len()) as u16).to_le_bytes());
    table.extend([SPEC_REV, 0]); // checksum patched below
    table.extend(b"VMM     ");
    table.extend(b"000000000000");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend(APIC_DEFAULT_BASE.to_le_bytes());
    table.extend(0u32.to_le_bytes()); // extended table length, checksum
    table.extend(entries);
    table[7] = checksum(&table);

    let mut floating: Vec<u8> = Vec::new();
    floating.extend(b"_MP_");
    floating.extend(table_addr.to_le_bytes());
    floating.extend([1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);
    floating.extend(table);
    floating
}

pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), String> {
    let bytes = build(vcpus);
    debug_assert!(bytes.len() <= 1024);
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(|e| format!("MP table: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for vcpus in [1, 2, MAX_VCPUS] {
            let t = build(vcpus);
            assert!(t.len() <= 1024, "{} bytes for {vcpus} vCPUs", t.len());
            assert_eq!(checksum(&t[..16]), 0);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, vcpus as u16 + 2 + 16 + 2);
            // Processor entries come first, the boot CPU flagged.
            assert_eq!(table[44], 0);
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOT_PROCESSOR);
        }
    }
}
