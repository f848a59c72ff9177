//! Emulated devices. Each guest has one `Devices`: a port I/O bus and an
//! MMIO bus ([`bus::Bus`]) its vCPU threads route their exits through, and
//! the devices themselves for the rest of the VMM (snapshots, the I/O
//! thread, memtest's progress).

pub mod bus;
pub mod console;
pub mod doorbell;
pub mod i8042;
pub mod io_gate;
pub mod pci;
pub mod power;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use crate::outcome::GuestEnd;
use bus::{Bus, BusDevice};
use console::Console;
use doorbell::Doorbell;
use serial::Serial;

/// What the vCPU does after a device handled an access.
#[derive(Debug, PartialEq)]
pub enum Action {
    Continue,
    /// This vCPU idles for up to this long (a pause or stop cuts it short).
    Idle(std::time::Duration),
    /// This vCPU waits up to this long, or less if a device raises an
    /// interrupt meanwhile (or a pause or stop comes).
    WaitForDevice(std::time::Duration),
    /// This vCPU has finished its work and must not run again.
    VcpuFinished,
    /// The whole guest ends.
    EndGuest(GuestEnd),
}

/// The devices of one guest.
pub struct Devices {
    pio: Bus,
    mmio: Bus,
    serial: Arc<SerialPort>,
    pub doorbell: Arc<Doorbell>,
    pub power: Arc<power::PmRegisters>,
    pub console: Console,
    /// In slot order.
    pub virtio: Vec<Arc<virtio::VirtioSlot>>,
}

impl Devices {
    /// Puts the devices on their buses: COM1, the i8042's ports, the ACPI
    /// PM registers, the doorbell page (for a guest that asks for
    /// it), and each virtio device's slot on MMIO or, with `pci`, PCI bus 0
    /// (its configuration ports, its ECAM window and its BAR window).
    pub fn new(
        serial: Serial,
        doorbell: Doorbell,
        power: power::PmRegisters,
        console: Console,
        virtio: Vec<Arc<virtio::VirtioSlot>>,
        pci: bool,
    ) -> Result<Self, String> {
        let serial = Arc::new(SerialPort(Mutex::new(serial)));
        let doorbell = Arc::new(doorbell);
        let (mut pio, mut mmio) = (Bus::default(), Bus::default());
        pio.insert(u64::from(serial::COM1_BASE), 8, serial.clone())?;
        for port in i8042::PORTS {
            pio.insert(u64::from(port), 1, Arc::new(i8042::Port(port)))?;
        }
        let pm = (u64::from(crate::guest::boot::acpi::PM_BASE), u64::from(crate::guest::boot::acpi::PM_LEN));
        let power = Arc::new(power);
        pio.insert(pm.0, pm.1, power.clone())?;
        if doorbell.is_mapped() {
            let page = DoorbellPage { doorbell: doorbell.clone(), console: console.clone() };
            mmio.insert(doorbell::DOORBELL_BASE, doorbell::DOORBELL_SIZE, Arc::new(page))?;
        }
        if !pci {
            for device in &virtio {
                let (base, len) = device.mmio_range();
                mmio.insert(base, len, device.clone())?;
            }
        } else {
            let functions = virtio.iter().map(|d| d.clone() as Arc<dyn pci::PciFunction>);
            let bus = Arc::new(pci::PciBus::new(functions.collect())?);
            let ports = (u64::from(pci::CONFIG_PORTS), u64::from(pci::CONFIG_PORTS_LEN));
            pio.insert(ports.0, ports.1, Arc::new(pci::ConfigPorts(bus.clone())))?;
            mmio.insert(pci::ECAM_BASE, pci::ECAM_SIZE, Arc::new(pci::Ecam(bus.clone())))?;
            mmio.insert(pci::WINDOW_BASE, pci::WINDOW_SIZE, Arc::new(pci::BarWindow(bus)))?;
        }
        Ok(Devices { pio, mmio, serial, doorbell, power, console, virtio })
    }

    /// The serial port's registers, for a snapshot.
    pub fn serial_state(&self) -> serial::SerialSnapshot {
        self.serial.0.lock().unwrap().state().into()
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(0, u64::from(port), data);
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> Action {
        self.pio.write(0, u64::from(port), data)
    }

    pub fn mmio_read(&self, vcpu: u8, addr: u64, data: &mut [u8]) {
        self.mmio.read(vcpu, addr, data);
    }

    pub fn mmio_write(&self, vcpu: u8, addr: u64, data: &[u8]) -> Action {
        self.mmio.write(vcpu, addr, data)
    }
}

/// A xorshift generator for the fuzz tests: hostile register traffic,
/// the same on every run.
#[cfg(test)]
pub struct XorShift(pub u64);

#[cfg(test)]
impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// COM1's eight registers.
struct SerialPort(Mutex<Serial>);

impl BusDevice for SerialPort {
    fn read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
        data[0] = self.0.lock().unwrap().read(offset as u8);
    }

    fn write(&self, _vcpu: u8, offset: u64, data: &[u8]) -> Action {
        if let Err(e) = self.0.lock().unwrap().write(offset as u8, data[0]) {
            log::warn!("serial write failed: {e}");
        }
        Action::Continue
    }
}

/// The doorbell's page, whose console register writes to the console.
struct DoorbellPage {
    doorbell: Arc<Doorbell>,
    console: Console,
}

impl BusDevice for DoorbellPage {
    fn read(&self, vcpu: u8, offset: u64, data: &mut [u8]) {
        let value = self.doorbell.read(vcpu, offset).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&value[..n]);
    }

    fn write(&self, vcpu: u8, offset: u64, data: &[u8]) -> Action {
        let mut value = [0u8; 8];
        let n = data.len().min(8);
        value[..n].copy_from_slice(&data[..n]);
        self.doorbell.write(vcpu, offset, u64::from_le_bytes(value), &self.console)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doorbell::DoorbellState;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn bare_devices() -> Devices {
        let console = Console::with_sink(Box::new(std::io::sink()));
        let serial = serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), console.clone());
        Devices::new(serial, Doorbell::new(7, 1, 3), Default::default(), console, Vec::new(), false).unwrap()
    }

    #[test]
    fn the_buses_route_each_port_and_page_to_its_device() {
        let devices = bare_devices();
        // The i8042: only its command port takes the reset command.
        assert_eq!(devices.pio_write(0x60, &[0xfe]), Action::Continue);
        assert_eq!(devices.pio_write(0x64, &[0xd1]), Action::Continue);
        assert_eq!(devices.pio_write(0x64, &[0xfe]), Action::EndGuest(GuestEnd::Reset));
        let mut b = [7u8];
        devices.pio_read(0x64, &mut b);
        assert_eq!(b, [0]);
        // Nothing at 0x70 or in the first virtio slot: all ones.
        devices.pio_read(0x70, &mut b);
        assert_eq!(b, [0xff]);
        let mut w = [0u8; 4];
        devices.mmio_read(0, virtio::MMIO_BASE, &mut w);
        assert_eq!(w, [0xff; 4]);
        // The doorbell's console register reaches the console.
        for c in b"ok" {
            devices.mmio_write(0, doorbell::DOORBELL_BASE, &[*c]);
        }
        assert!(devices.console.tail().ends_with("ok"), "{:?}", devices.console.tail());
        // The ACPI PM1 control block: soft-off ends the guest.
        assert_eq!(
            devices.pio_write(0x604, &(5u16 << 10 | 1 << 13).to_le_bytes()),
            Action::EndGuest(GuestEnd::PowerOff)
        );
    }

    /// A guest that did not ask for the doorbell cannot reach it: its page
    /// reads all ones and takes no write, and a snapshot keeps it so.
    #[test]
    fn the_doorbell_is_only_on_the_bus_of_a_guest_that_asks() {
        let console = Console::with_sink(Box::new(std::io::sink()));
        let serial = serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), console.clone());
        let doorbell = Doorbell::new(7, 1, 3).unmapped();
        let devices = Devices::new(serial, doorbell, Default::default(), console, Vec::new(), false).unwrap();
        let mut w = [0u8; 8];
        devices.mmio_read(0, doorbell::DOORBELL_BASE + doorbell::GUEST_ID, &mut w);
        assert_eq!(w, [0xff; 8]);
        devices.mmio_write(0, doorbell::DOORBELL_BASE + doorbell::DONE, &1u64.to_le_bytes());
        devices.mmio_write(0, doorbell::DOORBELL_BASE, b"x");
        assert_eq!(devices.console.tail(), "");
        let saved = devices.doorbell.save();
        assert!(!Doorbell::restore(8, 3, &saved).is_mapped());
        let old: DoorbellState = serde_json::from_str(
            r#"{"progress":[null],"finished_vcpus":0,"mismatches":0,"reported_mismatches":0,"fill_micros":null}"#,
        )
        .unwrap();
        assert!(Doorbell::restore(8, 3, &old).is_mapped(), "an older snapshot's guest lost its doorbell");
    }

    /// Port I/O and MMIO anywhere, with any data, as a hostile guest would:
    /// the serial port, the i8042 and the doorbell take it all.
    #[test]
    fn fuzzed_port_and_mmio_accesses() {
        let console = Console::with_sink(Box::new(std::io::sink()));
        let serial = serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), console.clone());
        let devices =
            Devices::new(serial, Doorbell::new(7, 2, 3), Default::default(), console, Vec::new(), false).unwrap();
        let mut rng = crate::guest::devices::XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..50_000 {
            let x = rng.next_u64();
            let len = [1usize, 2, 4, 8][(x >> 50) as usize % 4];
            let mut data: Vec<u8> = (0..len).map(|i| (x >> (8 * i)) as u8).collect();
            let port = if x.is_multiple_of(3) { 0x3f8 + (x >> 20) as u16 % 8 } else { (x >> 16) as u16 };
            let addr = if x.is_multiple_of(3) { doorbell::DOORBELL_BASE + (x >> 24) % 0x2000 } else { x >> 8 };
            let vcpu = (x >> 60) as u8;
            match (x >> 32) % 4 {
                0 => devices.pio_read(port, &mut data),
                1 => {
                    devices.pio_write(port, &data);
                }
                2 => devices.mmio_read(vcpu, addr, &mut data),
                _ => {
                    devices.mmio_write(vcpu, addr, &data);
                }
            }
        }
    }
}
