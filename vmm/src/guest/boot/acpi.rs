//! ACPI tables: how an OS that reads ACPI (any distribution's kernel)
//! learns a guest's CPUs, interrupt controllers and serial port, and how it
//! powers the guest off. Built with rust-vmm's `acpi_tables` and placed in
//! the BIOS area below 1 MiB, where an OS looks for the RSDP (and named in
//! the boot params as well).
//!
//! The platform is a PC's ACPI, not hardware-reduced ACPI: Linux on
//! hardware-reduced ACPI drops the legacy PIC and PIT, and on PVM hosts,
//! where the paravirtual clock is off, it then has no timer to calibrate
//! against and stops at boot. So the FADT names PM1 event and control
//! blocks and the ACPI PM timer, all ports of ours
//! (`devices::power`, from [`PM_BASE`]), with no SMI (ACPI is always on)
//! and an SCI on IRQ 9 that never fires; `_S5_` says which sleep type is
//! soft-off, and writing it to the PM1 control block ends the guest
//! cleanly. The MP table stays for kernels without ACPI. ISA interrupts are
//! wired one to one to the IOAPIC's pins (KVM's default routing); the MADT
//! says only that the SCI is level-triggered.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE};
use crate::guest::devices::pci;
use crate::guest::devices::serial::{COM1_BASE, COM1_IRQ};
use crate::memory::GuestMemoryMmap;

/// Where the tables go: the BIOS area an OS scans for the RSDP.
pub const RSDP_START: u64 = 0xe_0000;
const AREA_END: u64 = 0x10_0000;
/// The PM registers: PM1a event block (status, enable: 2 bytes each),
/// PM1a control block (2 bytes), the PM timer (4 bytes).
pub const PM_BASE: u16 = 0x600;
pub const PM1_EVENT: u16 = PM_BASE;
pub const PM1_CONTROL: u16 = PM_BASE + 4;
pub const PM_TIMER: u16 = PM_BASE + 8;
pub const PM_LEN: u16 = 12;
/// The PM timer's rate, fixed by the ACPI specification.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The SCI's interrupt (never raised: no event of ours needs it).
const SCI_IRQ: u16 = 9;
/// The sleep type `_S5_` names: soft-off.
pub const S5_SLEEP_TYPE: u16 = 5;
/// PM1 control: SCI_EN (ACPI mode; always on), SLP_TYP and SLP_EN.
pub const SCI_ENABLED: u16 = 1;
const SLEEP_TYPE_SHIFT: u16 = 10;
const SLEEP_ENABLE: u16 = 1 << 13;

const OEM_ID: [u8; 6] = *b"VMMRS ";
const OEM_TABLE_ID: [u8; 8] = *b"VMMGUEST";
const OEM_REVISION: u32 = 1;

/// Whether `value`, written to the PM1 control block, asks for soft-off
/// (S5).
pub fn is_power_off(value: u16) -> bool {
    value & SLEEP_ENABLE != 0 && (value >> SLEEP_TYPE_SHIFT) & 0x7 == S5_SLEEP_TYPE
}

/// The tables for a guest of `vcpus` vCPUs, with PCI bus 0 (the root
/// bridge in the DSDT, its ECAM in an MCFG) if `pci`, each at its guest
/// address, the RSDP first at [`RSDP_START`].
pub fn tables(vcpus: u8, pci: bool) -> Vec<(u64, Vec<u8>)> {
    let mut at = RSDP_START + Rsdp::len() as u64;
    let mut place = |bytes: Vec<u8>| {
        at = at.next_multiple_of(16);
        let here = at;
        at += bytes.len() as u64;
        (here, bytes)
    };
    let dsdt = place(dsdt(pci));
    let fadt = place(fadt(dsdt.0));
    let madt = place(madt(vcpus));
    let mcfg = pci.then(|| place(mcfg()));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for (addr, _) in [Some(&fadt), Some(&madt), mcfg.as_ref()].into_iter().flatten() {
        xsdt.add_entry(*addr);
    }
    let xsdt = place(bytes_of(&xsdt));
    let rsdp = (RSDP_START, bytes_of(&Rsdp::new(OEM_ID, xsdt.0)));
    assert!(at <= AREA_END, "ACPI tables overflow the BIOS area");
    [Some(rsdp), Some(xsdt), Some(fadt), Some(madt), mcfg, Some(dsdt)].into_iter().flatten().collect()
}

/// Writes the tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8, pci: bool) -> Result<(), String> {
    for (addr, bytes) in tables(vcpus, pci) {
        mem.write_slice(&bytes, GuestAddress(addr)).map_err(|e| format!("ACPI tables: {e}"))?;
    }
    Ok(())
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// A PC's FADT: PM1a event and control blocks and the PM timer on our
/// ports, an SCI, no SMI command port (ACPI is on from the start), the
/// i8042 and legacy devices present, and the DSDT at `dsdt`.
fn fadt(dsdt: u64) -> Vec<u8> {
    const LEGACY_DEVICES: u16 = 1 << 0;
    const I8042: u16 = 1 << 1;
    let io = |port: u16, bytes: u8| GAS::new(AddressSpace::SystemIo, bytes * 8, 0, AccessSize::Undefined, port.into());
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::TmrValExt);
    fadt.sci_int = SCI_IRQ.into();
    fadt.pm1a_evt_blk = u32::from(PM1_EVENT).into();
    fadt.pm1a_cnt_blk = u32::from(PM1_CONTROL).into();
    fadt.pm_tmr_blk = u32::from(PM_TIMER).into();
    (fadt.pm1_evt_len, fadt.pm1_cnt_len, fadt.pm_tmr_len) = (4, 2, 4);
    fadt.x_pm1a_evt_blk = io(PM1_EVENT, 4);
    fadt.x_pm1a_cnt_blk = io(PM1_CONTROL, 2);
    fadt.x_pm_tmr_blk = io(PM_TIMER, 4);
    fadt.iapc_boot_arch = (LEGACY_DEVICES | I8042).into();
    bytes_of(&fadt.finalize())
}

/// The MADT: a PC with dual 8259s, a local APIC per vCPU, the IOAPIC (its
/// id after the vCPUs', as in the MP table), the SCI level-triggered, and
/// the NMI line (LINT1) of every local APIC.
fn madt(vcpus: u8) -> Vec<u8> {
    const LOCAL_APIC: u8 = 0;
    const IO_APIC: u8 = 1;
    const INTERRUPT_OVERRIDE: u8 = 2;
    const LOCAL_APIC_NMI: u8 = 4;
    const ENABLED: u32 = 1;
    const PCAT_COMPAT: u32 = 1;
    const ACTIVE_HIGH_LEVEL: u16 = 0b1101;
    const ALL_PROCESSORS: u8 = 0xff;
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, APIC_DEFAULT_BASE);
    madt.write_u32(40, PCAT_COMPAT);
    for cpu in 0..vcpus {
        let mut entry = vec![LOCAL_APIC, 8, cpu, cpu];
        entry.extend(ENABLED.to_le_bytes());
        madt.append_slice(&entry);
    }
    let mut ioapic = vec![IO_APIC, 12, vcpus, 0];
    ioapic.extend(IOAPIC_DEFAULT_BASE.to_le_bytes());
    ioapic.extend(0u32.to_le_bytes()); // its first GSI
    madt.append_slice(&ioapic);
    let mut sci = vec![INTERRUPT_OVERRIDE, 10, 0, SCI_IRQ as u8];
    sci.extend(u32::from(SCI_IRQ).to_le_bytes());
    sci.extend(ACTIVE_HIGH_LEVEL.to_le_bytes());
    madt.append_slice(&sci);
    // Flags 0: the bus's polarity and trigger mode.
    madt.append_slice(&[LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    madt.as_slice().to_vec()
}

/// The MCFG: bus 0's ECAM window.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci::ECAM_BASE, 0, 0, 0);
    bytes_of(&mcfg)
}

/// The DSDT: COM1 with its ports and interrupt, PCI bus 0's root bridge
/// (for a guest with PCI) and `_S5_`.
fn dsdt(pci: bool) -> Vec<u8> {
    let (ports, irq) =
        (aml::IO::new(COM1_BASE, COM1_BASE, 1, 8), aml::Interrupt::new(true, true, false, false, COM1_IRQ));
    let resources = aml::ResourceTemplate::new(vec![&ports, &irq]);
    let hid = aml::EISAName::new("PNP0501");
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &resources),
    );
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    // PCI bus 0's root bridge (PCI Express, so the MCFG's window is used),
    // its resources: bus 0, the configuration ports, the I/O ports around
    // them, and the memory window BARs go in.
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(pci::CONFIG_PORTS, pci::CONFIG_PORTS, 1, pci::CONFIG_PORTS_LEN as u8);
    let io_low = aml::AddressSpace::new_io(0u16, pci::CONFIG_PORTS - 1, None);
    let io_high = aml::AddressSpace::new_io(pci::CONFIG_PORTS + pci::CONFIG_PORTS_LEN, 0xffffu16, None);
    let window_end = (pci::WINDOW_BASE + pci::WINDOW_SIZE - 1) as u32;
    let cacheable = aml::AddressSpaceCacheable::NotCacheable;
    let window = aml::AddressSpace::new_memory(cacheable, true, pci::WINDOW_BASE as u32, window_end, None);
    let resources = aml::ResourceTemplate::new(vec![&buses, &config_ports, &io_low, &io_high, &window]);
    let (pcie, pci_compatible) = (aml::EISAName::new("PNP0A08"), aml::EISAName::new("PNP0A03"));
    let (hid, cid, seg, uid, bbn, crs) = (
        aml::Name::new("_HID".into(), &pcie),
        aml::Name::new("_CID".into(), &pci_compatible),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &resources),
    );
    let root_bridge = aml::Device::new("PCI0".into(), vec![&hid, &cid, &seg, &uid, &bbn, &crs]);
    let mut devices: Vec<&dyn Aml> = vec![&com1];
    if pci {
        devices.push(&root_bridge);
    }
    let system_bus = aml::Scope::new("\\_SB_".into(), devices);
    let s5_type = S5_SLEEP_TYPE as u8;
    let s5_package = aml::Package::new(vec![&s5_type, &s5_type, &aml::ZERO, &aml::ZERO]);
    let s5 = aml::Name::new("_S5_".into(), &s5_package);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    system_bus.to_aml_bytes(&mut dsdt);
    s5.to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn every_table_is_whole_and_checksummed_and_the_rsdp_finds_them() {
        for (vcpus, pci) in [(1, false), (4, true), (32, true)] {
            let tables = tables(vcpus, pci);
            let (rsdp_at, rsdp) = &tables[0];
            assert_eq!((*rsdp_at, &rsdp[..8]), (RSDP_START, &b"RSD PTR "[..]));
            assert_eq!((sum(&rsdp[..20]), sum(rsdp)), (0, 0));
            let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
            let find = |at: u64| tables.iter().find(|(a, _)| *a == at).map(|(_, b)| b.clone()).unwrap();
            let xsdt = find(xsdt_at);
            for (_, table) in &tables[1..] {
                let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, table.len(), "{}", String::from_utf8_lossy(&table[..4]));
                assert_eq!(sum(table), 0, "{} checksum", String::from_utf8_lossy(&table[..4]));
            }
            let listed: Vec<Vec<u8>> =
                xsdt[36..].chunks(8).map(|c| find(u64::from_le_bytes(c.try_into().unwrap()))[..4].to_vec()).collect();
            let mut expected = vec![b"FACP".to_vec(), b"APIC".to_vec()];
            if pci {
                expected.push(b"MCFG".to_vec());
            }
            assert_eq!(listed, expected);
            let madt = find(tables.iter().find(|(_, t)| &t[..4] == b"APIC").unwrap().0);
            let cpus = madt[44..].chunks(8).take_while(|e| e[0] == 0).count();
            assert_eq!(cpus, vcpus as usize);
        }
    }

    #[test]
    fn only_s5_with_the_enable_bit_powers_off() {
        assert!(is_power_off(5 << 10 | 1 << 13));
        assert!(is_power_off(5 << 10 | 1 << 13 | SCI_ENABLED));
        assert!(!is_power_off(5 << 10), "no SLP_EN");
        assert!(!is_power_off(3 << 10 | 1 << 13), "S3 is not off");
    }
}
