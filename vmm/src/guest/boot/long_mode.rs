//! The CPU state for entering a 64-bit kernel directly: a flat GDT, an
//! identity-mapped first 4 GiB (2 MiB pages), and the registers of the Linux
//! 64-bit boot protocol.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use super::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT as Linux's boot protocol wants it: code at 0x10, data at 0x18.
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS (KVM needs a valid one)
];
const CODE_SELECTOR: usize = 2;
const DATA_SELECTOR: usize = 3;
const TSS_SELECTOR: usize = 4;

/// Packs a segment descriptor from its flags (access byte in bits 0-7,
/// granularity/size/long-mode nibble in bits 12-15), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Unpacks a descriptor into the form KVM takes.
fn kvm_segment_from(index: usize) -> kvm_segment {
    let entry = GDT[index];
    let access = (entry >> 40) as u8;
    let flags = (entry >> 52) as u8 & 0xf;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = flags & 0x8 != 0;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: access & 0xf,
        present: access >> 7,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g: flags >> 3,
        avl: flags & 1,
        unusable: if access >> 7 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and the identity page tables into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), String> {
    let err = |what: &str, e: vm_memory::GuestMemoryError| format!("{what}: {e}");
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + i as u64 * 8)).map_err(|e| err("GDT", e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START)).map_err(|e| err("IDT", e))?;

    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    mem.write_obj(PDPT_START | PRESENT_WRITABLE, GuestAddress(PML4_START)).map_err(|e| err("PML4", e))?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_START + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_WRITABLE, GuestAddress(PDPT_START + pd * 8)).map_err(|e| err("PDPT", e))?;
        let entries: Vec<u8> =
            (0..512u64).flat_map(|i| (((pd * 512 + i) << 21) | PRESENT_WRITABLE | HUGE_PAGE).to_le_bytes()).collect();
        mem.write_slice(&entries, GuestAddress(pd_addr)).map_err(|e| err("PD", e))?;
    }
    Ok(())
}

/// Puts `sregs` in 64-bit mode with paging, using the tables from `write_tables`.
pub fn configure_sregs(sregs: &mut kvm_sregs) {
    let data = kvm_segment_from(DATA_SELECTOR);
    sregs.cs = kvm_segment_from(CODE_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from(TSS_SELECTOR);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers at the 64-bit entry: RSI points at the boot params, RDI
/// carries the vCPU index (our own guests use it; Linux ignores it).
pub fn boot_regs(entry: GuestAddress, vcpu_index: u8) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rdi: u64::from(vcpu_index),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRam, MIB};

    #[test]
    fn code_segment_is_64_bit() {
        let cs = kvm_segment_from(CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.dpl), (1, 0, 1, 1, 0));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.selector, 0x10);
        assert_eq!(cs.limit, 0xffff_ffff);
    }

    #[test]
    fn data_segment_is_flat() {
        let ds = kvm_segment_from(DATA_SELECTOR);
        assert_eq!((ds.base, ds.limit, ds.db, ds.g, ds.type_), (0, 0xffff_ffff, 1, 1, 3));
        assert_eq!(ds.selector, 0x18);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let ram = GuestRam::new(16 * MIB, None).unwrap();
        let mem = ram.memory();
        write_tables(mem).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(), PDPT_START | 3);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDPT_START + 24)).unwrap(), (PD_START + 0x3000) | 3);
        // The last 2 MiB page below 4 GiB maps itself.
        let last = mem.read_obj::<u64>(GuestAddress(PD_START + 0x3000 + 511 * 8)).unwrap();
        assert_eq!(last, ((4 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn sregs_enable_long_mode() {
        let mut sregs = kvm_sregs::default();
        configure_sregs(&mut sregs);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr0 & X86_CR0_PG, X86_CR0_PG);
        assert_eq!(sregs.cr3, PML4_START);
    }
}
