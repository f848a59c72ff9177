//! The 8250 UART on COM1 (0x3f8, IRQ 4), from vm-superio, writing to the
//! guest's console. Its interrupt is an eventfd wired to the in-kernel
//! irqchip (irqfd).

use std::io;

use vm_superio::serial::NoEvents;
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

/// The register offset for `port`, if it belongs to COM1.
pub fn offset(port: u16) -> Option<u8> {
    (COM1_BASE..COM1_BASE + 8).contains(&port).then(|| (port - COM1_BASE) as u8)
}
