//! PCI bus 0 (`--transport pci`): a host bridge in slot 0 and one function
//! per slot after it, reached through both configuration mechanisms a
//! kernel may use, ports 0xCF8/0xCFC and the ECAM window the ACPI MCFG
//! table names, and each function's memory BAR inside the window the DSDT
//! gives the root bridge. No INTx: functions interrupt by MSI-X only.
//!
//! The BARs are placed here (there is no firmware to place them); a
//! kernel may move them within the window, and the bus follows.

pub mod msix;

use std::sync::{Arc, Mutex};

use super::bus::BusDevice;
use super::Action;

/// The ECAM window for bus 0 (1 MiB: 32 devices x 8 functions x 4 KiB).
pub const ECAM_BASE: u64 = 0xE000_0000;
pub const ECAM_SIZE: u64 = 1 << 20;
/// Where BARs go: the root bridge's memory window.
pub const WINDOW_BASE: u64 = 0xC000_0000;
pub const WINDOW_SIZE: u64 = 0x1000_0000;
/// The configuration address and data ports.
pub const CONFIG_PORTS: u16 = 0xCF8;
pub const CONFIG_PORTS_LEN: u16 = 8;
/// Functions after the host bridge (slots 1 to 31).
pub const MAX_FUNCTIONS: usize = 31;
/// The configuration space a function has (ECAM's 4 KiB; above 256 bytes
/// everything reads zero).
const CONFIG_SIZE: u64 = 0x1000;

/// Standard header registers.
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
/// Command: memory space decoding on.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Status: the function has a capabilities list.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Where slot `slot`'s BAR 0 starts until the kernel moves it (each
/// function gets 1 MiB of the window).
pub fn bar_base(slot: usize) -> u64 {
    WINDOW_BASE + (slot as u64) * 0x10_0000
}

/// Whether `size` bytes at `address` lie inside the BAR window.
pub fn in_window(address: u64, size: u64) -> bool {
    address >= WINDOW_BASE && address.saturating_add(size) <= WINDOW_BASE + WINDOW_SIZE
}

/// A function on the bus: its configuration space and its one memory BAR.
pub trait PciFunction: Send + Sync {
    fn config_read(&self, offset: u64, data: &mut [u8]);
    fn config_write(&self, offset: u64, data: &[u8]);
    /// Where its BAR decodes now (address, size), if memory decoding is on.
    fn bar(&self) -> Option<(u64, u64)>;
    fn bar_read(&self, vcpu: u8, offset: u64, data: &mut [u8]);
    fn bar_write(&self, vcpu: u8, offset: u64, data: &[u8]) -> Action;
}

/// Bus 0: the host bridge in slot 0, `functions` from slot 1 on.
pub struct PciBus {
    functions: Vec<Arc<dyn PciFunction>>,
    /// The last value written to the configuration address port.
    address: Mutex<u32>,
}

impl PciBus {
    pub fn new(functions: Vec<Arc<dyn PciFunction>>) -> Result<PciBus, String> {
        if functions.len() > MAX_FUNCTIONS {
            return Err(format!("{} PCI functions; at most {MAX_FUNCTIONS}", functions.len()));
        }
        let mut all: Vec<Arc<dyn PciFunction>> = vec![Arc::new(HostBridge::default())];
        all.extend(functions);
        Ok(PciBus { functions: all, address: Mutex::new(0) })
    }

    /// The function of configuration address `slot` on bus 0, function 0.
    fn function(&self, bus: u64, slot: u64, function: u64) -> Option<&dyn PciFunction> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.functions.get(slot as usize).map(|f| f.as_ref())
    }

    /// An ECAM access: bus, device, function and register from the offset.
    fn ecam(&self, offset: u64) -> (Option<&dyn PciFunction>, u64) {
        let function = self.function(offset >> 20, (offset >> 15) & 0x1f, (offset >> 12) & 7);
        (function, offset & (CONFIG_SIZE - 1))
    }

    /// The function and register the address port selects, if enabled.
    fn selected(&self, port_offset: u64) -> (Option<&dyn PciFunction>, u64) {
        let address = u64::from(*self.address.lock().unwrap());
        if address & (1 << 31) == 0 {
            return (None, 0);
        }
        let function = self.function((address >> 16) & 0xff, (address >> 11) & 0x1f, (address >> 8) & 7);
        (function, (address & 0xfc) + port_offset)
    }

    /// The function whose BAR holds `addr`, and the offset into it.
    fn bar_at(&self, addr: u64) -> Option<(&dyn PciFunction, u64)> {
        self.functions.iter().find_map(|f| {
            let (base, size) = f.bar()?;
            (addr >= base && addr - base < size).then(|| (f.as_ref(), addr - base))
        })
    }
}

fn config_read(function: Option<&dyn PciFunction>, offset: u64, data: &mut [u8]) {
    match function {
        // A read past the 4 KiB wraps into nothing: all ones.
        Some(f) if offset + data.len() as u64 <= CONFIG_SIZE => f.config_read(offset, data),
        _ => data.fill(0xff),
    }
}

fn config_write(function: Option<&dyn PciFunction>, offset: u64, data: &[u8]) {
    if let Some(f) = function.filter(|_| offset + data.len() as u64 <= CONFIG_SIZE) {
        f.config_write(offset, data);
    }
}

/// Ports 0xCF8-0xCFF: the address register, then the data window.
pub struct ConfigPorts(pub Arc<PciBus>);

impl BusDevice for ConfigPorts {
    fn read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.0.address.lock().unwrap().to_le_bytes()),
            4..=7 => {
                let (function, register) = self.0.selected(offset - 4);
                config_read(function, register, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&self, _vcpu: u8, offset: u64, data: &[u8]) -> Action {
        match offset {
            // Only whole-dword writes set the address (a byte write to
            // 0xCFB is how kernels probe for the older mechanism 2).
            0 if data.len() == 4 => *self.0.address.lock().unwrap() = u32::from_le_bytes(data.try_into().unwrap()),
            4..=7 => {
                let (function, register) = self.0.selected(offset - 4);
                config_write(function, register, data);
            }
            _ => {}
        }
        Action::Continue
    }
}

/// The ECAM window.
pub struct Ecam(pub Arc<PciBus>);

impl BusDevice for Ecam {
    fn read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
        let (function, register) = self.0.ecam(offset);
        config_read(function, register, data);
    }

    fn write(&self, _vcpu: u8, offset: u64, data: &[u8]) -> Action {
        let (function, register) = self.0.ecam(offset);
        config_write(function, register, data);
        Action::Continue
    }
}

/// The root bridge's memory window: each access goes to the function whose
/// BAR holds it, wherever the kernel put it.
pub struct BarWindow(pub Arc<PciBus>);

impl BusDevice for BarWindow {
    fn read(&self, vcpu: u8, offset: u64, data: &mut [u8]) {
        match self.0.bar_at(WINDOW_BASE + offset) {
            Some((f, at)) => f.bar_read(vcpu, at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, vcpu: u8, offset: u64, data: &[u8]) -> Action {
        match self.0.bar_at(WINDOW_BASE + offset) {
            Some((f, at)) => f.bar_write(vcpu, at, data),
            None => Action::Continue,
        }
    }
}

/// A function's 256-byte configuration header, with the bits a driver may
/// write; the rest is read-only.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    writable: [u8; 256],
}

impl ConfigSpace {
    /// A type 0 header for `vendor:device` of `class` (class, subclass,
    /// interface), with a capabilities list if `capabilities` is not 0.
    pub fn new(vendor: u16, device: u16, class: [u8; 3], capabilities: u8) -> ConfigSpace {
        let mut c = ConfigSpace { bytes: [0; 256], writable: [0; 256] };
        c.set16(VENDOR_ID, vendor);
        c.set16(VENDOR_ID + 2, device);
        c.bytes[REVISION] = 1;
        c.bytes[REVISION + 1..REVISION + 4].copy_from_slice(&[class[2], class[1], class[0]]);
        if capabilities != 0 {
            c.set16(STATUS, STATUS_CAPABILITIES);
            c.bytes[CAPABILITIES] = capabilities;
        }
        // Memory decoding and bus mastering; the interrupt line byte is
        // scratch for the kernel.
        c.writable[COMMAND] = 0x06;
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    pub fn set16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn get16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// Puts bytes in (capabilities), `writable` the bits a driver may change.
    pub fn put(&mut self, at: usize, bytes: &[u8], writable: &[u8]) {
        self.bytes[at..at + bytes.len()].copy_from_slice(bytes);
        self.writable[at..at + writable.len()].copy_from_slice(writable);
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// A driver's write: only writable bits change.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset as usize + i;
            if let Some(mask) = self.writable.get(at).copied() {
                self.bytes[at] = self.bytes[at] & !mask | b & mask;
            }
        }
    }

    pub fn memory_enabled(&self) -> bool {
        self.get16(COMMAND) & COMMAND_MEMORY != 0
    }

    /// The bytes a snapshot keeps (the writable ones are all that change).
    pub fn bytes(&self) -> &[u8; 256] {
        &self.bytes
    }

    /// Takes saved bytes back, the writable bits only.
    pub fn restore(&mut self, saved: &[u8]) {
        for (at, &b) in saved.iter().enumerate().take(256) {
            let mask = self.writable[at];
            self.bytes[at] = self.bytes[at] & !mask | b & mask;
        }
    }
}

/// A 32-bit memory BAR of `size` bytes (a power of two): it reads back
/// its size mask while the kernel sizes it, and decodes where the kernel
/// put it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub address: u32,
    pub size: u32,
}

impl Bar {
    pub fn read(&self) -> u32 {
        self.address
    }

    /// A dword write (the only way to write a BAR): the address, aligned to
    /// the size, or all ones to learn the size.
    pub fn write(&mut self, v: u32) {
        self.address = v & !(self.size - 1);
    }
}

/// The host bridge in slot 0: an ID and nothing to program.
struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        // Red Hat's ID for a generic PCIe host bridge (as QEMU's).
        HostBridge(ConfigSpace::new(0x1b36, 0x0008, [0x06, 0x00, 0x00], 0))
    }
}

impl PciFunction for HostBridge {
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn config_write(&self, _offset: u64, _data: &[u8]) {}

    fn bar(&self) -> Option<(u64, u64)> {
        None
    }

    fn bar_read(&self, _vcpu: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&self, _vcpu: u8, _offset: u64, _data: &[u8]) -> Action {
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with a plain config space and a 16 KiB BAR.
    struct Plain(Mutex<(ConfigSpace, Bar)>);

    impl PciFunction for Plain {
        fn config_read(&self, offset: u64, data: &mut [u8]) {
            let (config, bar) = &*self.0.lock().unwrap();
            if offset == BAR0 as u64 {
                return data.copy_from_slice(&bar.read().to_le_bytes()[..data.len()]);
            }
            config.read(offset, data);
        }
        fn config_write(&self, offset: u64, data: &[u8]) {
            let (config, bar) = &mut *self.0.lock().unwrap();
            if offset == BAR0 as u64 && data.len() == 4 {
                return bar.write(u32::from_le_bytes(data.try_into().unwrap()));
            }
            config.write(offset, data);
        }
        fn bar(&self) -> Option<(u64, u64)> {
            let (config, bar) = &*self.0.lock().unwrap();
            config.memory_enabled().then_some((u64::from(bar.address), u64::from(bar.size)))
        }
        fn bar_read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&self, _vcpu: u8, _offset: u64, _data: &[u8]) -> Action {
            Action::Continue
        }
    }

    fn bus() -> Arc<PciBus> {
        let config = ConfigSpace::new(0x1af4, 0x1042, [0x01, 0x80, 0], 0);
        let bar = Bar { address: bar_base(1) as u32, size: 0x4000 };
        Arc::new(PciBus::new(vec![Arc::new(Plain(Mutex::new((config, bar))))]).unwrap())
    }

    fn port_read(ports: &ConfigPorts, address: u32, register_byte: u64, len: usize) -> u32 {
        ports.write(0, 0, &address.to_le_bytes());
        let mut data = [0u8; 4];
        ports.read(0, 4 + register_byte, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    #[test]
    fn both_mechanisms_reach_the_same_functions() {
        let bus = bus();
        let (ports, ecam) = (ConfigPorts(bus.clone()), Ecam(bus.clone()));
        let enable = 1u32 << 31;
        assert_eq!(port_read(&ports, enable, 0, 4), 0x0008_1b36, "the host bridge in slot 0");
        assert_eq!(port_read(&ports, enable | 1 << 11, 0, 4), 0x1042_1af4);
        assert_eq!(port_read(&ports, enable | 1 << 11, 2, 2), 0x1042, "a word at byte 2");
        assert_eq!(port_read(&ports, enable | 2 << 11, 0, 4), 0xffff_ffff, "an empty slot");
        assert_eq!(port_read(&ports, enable | 1 << 16 | 1 << 11, 0, 4), 0xffff_ffff, "bus 1");
        assert_eq!(port_read(&ports, 1 << 11, 0, 4), 0xffff_ffff, "the enable bit clear");
        // The address register reads back what was written (the kernel's
        // probe), and a byte write to it changes nothing.
        ports.write(0, 3, &[1]);
        let mut a = [0u8; 4];
        ports.read(0, 0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 1 << 11);
        let mut id = [0u8; 4];
        ecam.read(0, 1 << 15, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        ecam.read(0, 1 << 15 | 1 << 12, &mut id);
        assert_eq!(id, [0xff; 4], "function 1");
        ecam.read(0, 1 << 15 | 0x100, &mut id);
        assert_eq!(id, [0; 4], "extended configuration space reads zero");
    }

    #[test]
    fn a_bar_is_sized_moved_and_decoded_only_with_memory_on() {
        let bus = bus();
        let (ecam, window) = (Ecam(bus.clone()), BarWindow(bus.clone()));
        let slot1 = 1u64 << 15;
        let mut b = [0u8; 4];
        window.read(0, bar_base(1) - WINDOW_BASE, &mut b);
        assert_eq!(b, [0xff; 4], "memory decoding off");
        ecam.write(0, slot1 + COMMAND as u64, &COMMAND_MEMORY.to_le_bytes());
        window.read(0, bar_base(1) - WINDOW_BASE + 3, &mut b);
        assert_eq!(b, [3; 4]);
        // Sizing, then a move.
        ecam.write(0, slot1 + BAR0 as u64, &u32::MAX.to_le_bytes());
        ecam.read(0, slot1 + BAR0 as u64, &mut b);
        assert_eq!(u32::from_le_bytes(b), !0x3fff);
        ecam.write(0, slot1 + BAR0 as u64, &0xc800_0000u32.to_le_bytes());
        window.read(0, 0x0800_0005, &mut b);
        assert_eq!(b, [5; 4]);
        // Read-only bits stay: the vendor ID cannot be written.
        ecam.write(0, slot1, &0u32.to_le_bytes());
        ecam.read(0, slot1, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1042_1af4);
    }

    /// Any port, any width, any value: nothing panics.
    #[test]
    fn fuzzed_configuration_accesses() {
        let bus = bus();
        let (ports, ecam, window) = (ConfigPorts(bus.clone()), Ecam(bus.clone()), BarWindow(bus.clone()));
        let mut rng = crate::guest::devices::XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..50_000 {
            let x = rng.next_u64();
            let len = [1usize, 2, 4, 8][(x >> 40) as usize % 4];
            let mut data: Vec<u8> = (0..len).map(|i| (x >> (8 * i)) as u8).collect();
            let write = x & 1 == 0;
            match (x >> 1) % 3 {
                0 => {
                    let offset = (x >> 8) % 8;
                    if write {
                        ports.write(0, offset, &data);
                    } else {
                        ports.read(0, offset, &mut data);
                    }
                }
                1 => {
                    let offset = (x >> 8) % ECAM_SIZE;
                    if write {
                        ecam.write(0, offset, &data);
                    } else {
                        ecam.read(0, offset, &mut data);
                    }
                }
                _ => {
                    let offset = (x >> 8) % WINDOW_SIZE;
                    if write {
                        window.write(0, offset, &data);
                    } else {
                        window.read(0, offset, &mut data);
                    }
                }
            }
        }
    }
}
