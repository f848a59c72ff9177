//! The part of the i8042 keyboard controller a guest uses to reset the
//! machine: Linux with `reboot=k` writes 0xfe (pulse reset line) to port 0x64.

use super::bus::BusDevice;
use super::Action;
use crate::outcome::GuestEnd;

const DATA_PORT: u16 = 0x60;
const COMMAND_PORT: u16 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

/// Its two ports, each a device of its own on the port bus.
pub const PORTS: [u16; 2] = [DATA_PORT, COMMAND_PORT];

/// One of its ports: it reads as zero, and the reset command on the
/// command port resets the machine.
pub struct Port(pub u16);

impl BusDevice for Port {
    fn read(&self, _vcpu: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _vcpu: u8, _offset: u64, data: &[u8]) -> Action {
        if is_reset(self.0, data) {
            return Action::EndGuest(GuestEnd::Reset);
        }
        Action::Continue
    }
}

pub fn is_reset(port: u16, data: &[u8]) -> bool {
    port == COMMAND_PORT && data.first() == Some(&CMD_RESET_CPU)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fe_on_the_command_port_resets() {
        assert!(is_reset(0x64, &[0xfe]));
        assert!(!is_reset(0x60, &[0xfe]));
        assert!(!is_reset(0x64, &[0xd1]));
    }
}
