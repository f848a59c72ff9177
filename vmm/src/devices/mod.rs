//! Emulated devices. Each guest has one `Devices`; its vCPU threads route
//! port I/O and MMIO exits here.

pub mod console;
pub mod doorbell;
pub mod i8042;
pub mod io_gate;
pub mod serial;
pub mod virtio;

use std::sync::Mutex;

use crate::outcome::GuestEnd;
use console::Console;
use doorbell::Doorbell;
use serial::Serial;

/// What the vCPU does after a device handled an access.
#[derive(Debug, PartialEq)]
pub enum Action {
    Continue,
    /// This vCPU idles for up to this long (a pause or stop cuts it short).
    Idle(std::time::Duration),
    /// This vCPU has finished its work and must not run again.
    VcpuFinished,
    /// The whole guest ends.
    EndGuest(GuestEnd),
}

/// The devices of one guest.
pub struct Devices {
    serial: Mutex<Serial>,
    pub doorbell: Doorbell,
    pub console: Console,
    pub disk: Option<std::sync::Arc<virtio::BlockDevice>>,
}

impl Devices {
    pub fn new(
        serial: Serial,
        doorbell: Doorbell,
        console: Console,
        disk: Option<std::sync::Arc<virtio::BlockDevice>>,
    ) -> Self {
        Devices { serial: Mutex::new(serial), doorbell, console, disk }
    }

    /// The serial port's registers, for a snapshot.
    pub fn serial_state(&self) -> serial::SerialSnapshot {
        self.serial.lock().unwrap().state().into()
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Some(offset) = serial::offset(port) {
            data[0] = self.serial.lock().unwrap().read(offset);
        } else if i8042::handles(port) {
            data.fill(0);
        } else {
            // Nothing here: reads float high, as on real hardware.
            data.fill(0xff);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> Action {
        if let Some(offset) = serial::offset(port) {
            if let Err(e) = self.serial.lock().unwrap().write(offset, data[0]) {
                log::warn!("serial write failed: {e}");
            }
        } else if i8042::is_reset(port, data) {
            return Action::EndGuest(GuestEnd::Reset);
        }
        Action::Continue
    }

    pub fn mmio_read(&self, vcpu: u8, addr: u64, data: &mut [u8]) {
        if let Some(offset) = doorbell::offset(addr) {
            let value = self.doorbell.read(vcpu, offset).to_le_bytes();
            let n = data.len().min(8);
            data[..n].copy_from_slice(&value[..n]);
        } else if let (Some(disk), Some(offset)) = (&self.disk, virtio::BlockDevice::offset(addr)) {
            disk.read(offset, data);
        } else {
            log::debug!("guest read of unknown MMIO address {addr:#x}");
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, vcpu: u8, addr: u64, data: &[u8]) -> Action {
        if let Some(offset) = doorbell::offset(addr) {
            let mut value = [0u8; 8];
            let n = data.len().min(8);
            value[..n].copy_from_slice(&data[..n]);
            return self.doorbell.write(vcpu, offset, u64::from_le_bytes(value), &self.console);
        }
        if let (Some(disk), Some(offset)) = (&self.disk, virtio::BlockDevice::offset(addr)) {
            disk.write(offset, data);
            return Action::Continue;
        }
        log::debug!("guest write to unknown MMIO address {addr:#x}");
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Port I/O and MMIO anywhere, with any data, as a hostile guest would:
    /// the serial port, the i8042 and the doorbell take it all.
    #[test]
    fn fuzzed_port_and_mmio_accesses() {
        let console = Console::with_sink(Box::new(std::io::sink()));
        let serial = serial::new(EventFd::new(EFD_NONBLOCK).unwrap(), console.clone());
        let devices = Devices::new(serial, Doorbell::new(7, 2), console, None);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
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
