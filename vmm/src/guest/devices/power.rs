//! The ACPI PM registers (`boot::acpi`): the PM1a event block (status,
//! enable), the PM1a control block, whose soft-off ends the guest,
//! cleanly, and the ACPI PM timer, which a kernel can calibrate its TSC
//! against. No event of ours raises the SCI, so the status block always
//! reads clear; other sleep states are not offered (`_S5_` is the only one
//! named) and writes asking for them are ignored.
//!
//! The timer counts the host's monotonic clock at 3.579545 MHz (32 bits).
//! A clone's timer moves as its TSC does, so the kernel's clocks agree
//! (Linux's clocksource watchdog compares them, and drops a TSC that skews
//! from the PM timer): where the restore sets the TSC to its saved value
//! the timer goes on from its saved value too; on PVM hosts, where the
//! guest's TSC is the host's and has moved on by however long the
//! snapshot waited, the timer is the host's clock again and has moved on
//! as much.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::bus::BusDevice;
use super::Action;
use crate::guest::boot::acpi::{self, PM1_CONTROL, PM1_EVENT, PM_BASE, PM_TIMER, PM_TIMER_HZ};
use crate::outcome::GuestEnd;

/// The block's registers, by offset from [`PM_BASE`].
const ENABLE: u64 = (PM1_EVENT - PM_BASE) as u64 + 2;
const CONTROL: u64 = (PM1_CONTROL - PM_BASE) as u64;
const TIMER: u64 = (PM_TIMER - PM_BASE) as u64;

#[derive(Default)]
pub struct PmRegisters {
    /// PM1 enable and control as the guest last wrote them.
    regs: Mutex<(u16, u16)>,
    /// Added to the host clock's ticks to make the guest's timer.
    timer_offset: AtomicU32,
}

/// The registers in a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PmState {
    enable: u16,
    control: u16,
    timer: u32,
}

impl PmRegisters {
    /// Registers that go on from `saved`; the timer counts on from its
    /// saved value if `timer_from_saved` (the clone's TSC does too), else
    /// from the host's clock.
    pub fn restore(saved: &PmState, timer_from_saved: bool) -> Self {
        let offset = if timer_from_saved { saved.timer.wrapping_sub(host_ticks()) } else { 0 };
        PmRegisters { regs: Mutex::new((saved.enable, saved.control)), timer_offset: AtomicU32::new(offset) }
    }

    pub fn save(&self) -> PmState {
        let (enable, control) = *self.regs.lock().unwrap();
        PmState { enable, control, timer: self.timer() }
    }

    fn timer(&self) -> u32 {
        host_ticks().wrapping_add(self.timer_offset.load(Ordering::Relaxed))
    }

    /// The registers as they read now, little endian from [`PM_BASE`].
    fn image(&self) -> [u8; acpi::PM_LEN as usize] {
        let (enable, control) = *self.regs.lock().unwrap();
        let mut image = [0u8; acpi::PM_LEN as usize];
        image[ENABLE as usize..][..2].copy_from_slice(&enable.to_le_bytes());
        image[CONTROL as usize..][..2].copy_from_slice(&(control | acpi::SCI_ENABLED).to_le_bytes());
        image[TIMER as usize..][..4].copy_from_slice(&self.timer().to_le_bytes());
        image
    }
}

/// The host's monotonic clock in PM timer ticks (wrapping at 32 bits).
fn host_ticks() -> u32 {
    let nanos = u128::from(crate::proc::monotonic_ns());
    (nanos * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u32
}

impl BusDevice for PmRegisters {
    fn read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
        let image = self.image();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = image.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&self, _vcpu: u8, offset: u64, data: &[u8]) -> Action {
        let mut regs = self.regs.lock().unwrap();
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            let (reg, shift) = match at {
                ENABLE | 3 => (&mut regs.0, (at - ENABLE) * 8),
                CONTROL | 5 => (&mut regs.1, (at - CONTROL) * 8),
                _ => continue, // status bits clear on write; the timer is read-only
            };
            *reg = *reg & !(0xff << shift) | u16::from(byte) << shift;
        }
        if acpi::is_power_off(regs.1) {
            return Action::EndGuest(GuestEnd::PowerOff);
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pm: &PmRegisters, port: u16, len: usize) -> u64 {
        let mut data = [0u8; 8];
        pm.read(0, u64::from(port - PM_BASE), &mut data[..len]);
        u64::from_le_bytes(data)
    }

    #[test]
    fn soft_off_ends_the_guest_and_nothing_else_does() {
        let pm = PmRegisters::default();
        let control = u64::from(PM1_CONTROL - PM_BASE);
        assert_eq!(pm.write(0, control, &(3u16 << 10 | 1 << 13).to_le_bytes()), Action::Continue, "S3");
        assert_eq!(pm.write(0, control, &(5u16 << 10).to_le_bytes()), Action::Continue, "no SLP_EN");
        assert_eq!(pm.write(0, control, &(5u16 << 10 | 1 << 13).to_le_bytes()), Action::EndGuest(GuestEnd::PowerOff));
        // Byte by byte, as a guest may write it.
        let pm = PmRegisters::default();
        assert_eq!(pm.write(0, control, &[0]), Action::Continue);
        assert_eq!(pm.write(0, control + 1, &[(5 << 2) | (1 << 5)]), Action::EndGuest(GuestEnd::PowerOff));
    }

    #[test]
    fn acpi_is_on_the_status_clear_and_the_timer_runs_at_its_rate() {
        let pm = PmRegisters::default();
        assert_eq!(read(&pm, PM1_CONTROL, 2) & 1, 1, "SCI_EN");
        assert_eq!(read(&pm, PM1_EVENT, 2), 0);
        pm.write(0, 2, &0x0120u16.to_le_bytes());
        assert_eq!(read(&pm, PM1_EVENT + 2, 2), 0x0120);
        let (t0, start) = (read(&pm, PM_TIMER, 4) as u32, std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (t1, took) = (read(&pm, PM_TIMER, 4) as u32, start.elapsed());
        let ticks = u64::from(t1.wrapping_sub(t0));
        let expected = took.as_nanos() as u64 * PM_TIMER_HZ / 1_000_000_000;
        assert!(ticks <= expected + 10 && ticks + 10_000 >= expected, "{ticks} ticks in {took:?}");
        let mut beyond = [0u8; 2];
        pm.read(0, 11, &mut beyond);
        assert_eq!(beyond, [read(&pm, PM_TIMER + 3, 1) as u8, 0xff]);
    }

    /// A restored timer goes on from its saved value, however long the
    /// snapshot waited, and the registers come back as they were saved.
    #[test]
    fn a_restored_timer_goes_on_from_its_saved_value() {
        let pm = PmRegisters::default();
        pm.write(0, 2, &0x0100u16.to_le_bytes());
        let saved = pm.save();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let clone = PmRegisters::restore(&saved, true);
        let ticks = (read(&clone, PM_TIMER, 4) as u32).wrapping_sub(saved.timer);
        // 200 ms would be 715,909 ticks.
        assert!(ticks < PM_TIMER_HZ as u32 / 20, "the clone's timer jumped {ticks} ticks");
        assert_eq!(read(&clone, PM1_EVENT + 2, 2), 0x0100);
        let restored = clone.save();
        assert_eq!((restored.enable, restored.control), (saved.enable, saved.control));
        // Following the host's clock (a PVM host's clone), it has moved on.
        let on_host_clock = PmRegisters::restore(&saved, false);
        let moved = (read(&on_host_clock, PM_TIMER, 4) as u32).wrapping_sub(saved.timer);
        assert!(moved >= PM_TIMER_HZ as u32 / 10, "{moved} ticks after 200 ms");
        assert_eq!(read(&on_host_clock, PM1_EVENT + 2, 2), 0x0100);
        // Across the 32-bit wrap too.
        let near_wrap = PmRegisters::restore(&PmState { timer: u32::MAX - 5, ..saved }, true);
        assert!((read(&near_wrap, PM_TIMER, 4) as u32).wrapping_sub(u32::MAX - 5) < PM_TIMER_HZ as u32 / 20);
    }
}
