//! The ACPI sleep control register (`boot::acpi`): a guest that writes
//! soft-off to it has powered itself off, and the guest ends, cleanly.
//! Other sleep states are not offered (`_S5_` is the only one named) and
//! writes asking for them are ignored.

use super::bus::BusDevice;
use super::Action;
use crate::guest::boot::acpi;
use crate::outcome::GuestEnd;

pub struct SleepControl;

impl BusDevice for SleepControl {
    fn read(&self, _vcpu: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _vcpu: u8, _offset: u64, data: &[u8]) -> Action {
        match data.first() {
            Some(&value) if acpi::is_power_off(value) => Action::EndGuest(GuestEnd::PowerOff),
            _ => Action::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_off_ends_the_guest_and_nothing_else_does() {
        let port = SleepControl;
        assert_eq!(port.write(0, 0, &[5 << 2 | 1 << 5]), Action::EndGuest(GuestEnd::PowerOff));
        assert_eq!(port.write(0, 0, &[0]), Action::Continue);
        assert_eq!(port.write(0, 0, &[]), Action::Continue);
    }
}
