//! The part of the i8042 keyboard controller a guest uses to reset the
//! machine: Linux with `reboot=k` writes 0xfe (pulse reset line) to port 0x64.

const DATA_PORT: u16 = 0x60;
const COMMAND_PORT: u16 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

pub fn handles(port: u16) -> bool {
    port == DATA_PORT || port == COMMAND_PORT
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
