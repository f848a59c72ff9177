//! The 8250 UART on COM1 (0x3f8, IRQ 4), from vm-superio, writing to the
//! guest's console. Its interrupt is an eventfd wired to the in-kernel
//! irqchip (irqfd).

use std::io;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::console::Console;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

pub type Serial = vm_superio::Serial<IrqLine, NoEvents, Console>;

/// An interrupt line backed by an eventfd registered as an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub fn new(irq: EventFd, console: Console) -> Serial {
    vm_superio::Serial::new(IrqLine(irq), console)
}

/// The UART's registers and input FIFO, as a snapshot keeps them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SerialSnapshot {
    registers: [u8; 9],
    in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }
}

/// The UART of a restored guest: the saved registers, a new console.
pub fn restore(saved: &SerialSnapshot, irq: EventFd, console: Console) -> Result<Serial, String> {
    let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
        saved.registers;
    let state = SerialState {
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer: saved.in_buffer.clone(),
    };
    vm_superio::Serial::from_state(&state, IrqLine(irq), NoEvents, console)
        .map_err(|e| format!("the snapshot's serial port state: {e:?}"))
}
