//! virtio devices (virtio 1.x) on the virtio-mmio transport. Linux learns
//! of them from its command line (`virtio_mmio.device=`).

pub mod block;
pub mod mmio;

use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::disk::Disk;
use crate::vstate::control::IoGate;
use block::Block;
use mmio::{MmioEvent, MmioTransport, INT_VRING, MMIO_SIZE};

/// Feature bit: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

const VIRTIO_ID_BLOCK: u32 = 2;
/// Where the disk's registers are (the page after the doorbell) and its
/// interrupt line.
pub const BLOCK_MMIO_BASE: u64 = 0xD000_1000;
pub const BLOCK_GSI: u32 = 5;
const QUEUE_SIZE: u16 = 256;
/// The QueueNotify register, which KVM turns into an ioeventfd signal.
pub const BLOCK_QUEUE_NOTIFY: u64 = BLOCK_MMIO_BASE + 0x50;

/// A guest's disk: the virtio-mmio registers, the request handler, the
/// queue notification (an ioeventfd) and the interrupt (an irqfd).
///
/// Queue kicks reach the guest's I/O thread through the ioeventfd, without
/// an exit to user space; that thread serves the requests, writing guest
/// memory only inside the guest's [`IoGate`], which a merge freeze closes,
/// so no device write to guest memory overlaps a merge (docs/dedup.md).
/// Without an ioeventfd the kick exits to the vCPU thread, which serves it
/// the same way.
pub struct BlockDevice {
    state: Mutex<(MmioTransport, Block)>,
    irq: EventFd,
    /// Signalled by KVM when the guest writes QueueNotify.
    pub notify: EventFd,
    io_gate: Arc<IoGate>,
    mem: GuestMemoryMmap,
}

impl BlockDevice {
    pub fn new(disk: Disk, irq: EventFd, io_gate: Arc<IoGate>, mem: GuestMemoryMmap) -> std::io::Result<BlockDevice> {
        let block = Block::new(disk);
        let transport =
            MmioTransport::new(VIRTIO_ID_BLOCK, block.features(), block.config_space().to_vec(), QUEUE_SIZE);
        let notify = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        Ok(BlockDevice { state: Mutex::new((transport, block)), irq, notify, io_gate, mem })
    }

    /// The kernel parameter that announces the device to Linux.
    pub fn cmdline_arg() -> String {
        format!("virtio_mmio.device=4K@{BLOCK_MMIO_BASE:#x}:{BLOCK_GSI}")
    }

    /// The register offset of `addr`, if it is this device's.
    pub fn offset(addr: u64) -> Option<u64> {
        (BLOCK_MMIO_BASE..BLOCK_MMIO_BASE + MMIO_SIZE).contains(&addr).then(|| addr - BLOCK_MMIO_BASE)
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        self.state.lock().unwrap().0.read(offset, data);
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut state = self.state.lock().unwrap();
        let (transport, block) = &mut *state;
        if transport.write(offset, data) == MmioEvent::QueueNotify {
            self.serve(transport, block);
        }
    }

    fn serve(&self, transport: &mut MmioTransport, block: &mut Block) {
        if !transport.is_live() || !transport.queue_mut().is_valid(&self.mem) {
            log::warn!("virtio-blk: queue kicked before the driver set it up; ignored");
            return;
        }
        match block.process_queue(&self.mem, transport.queue_mut(), &self.io_gate) {
            Ok(false) => {}
            Ok(true) => {
                if transport.queue_mut().needs_notification(&self.mem).unwrap_or(true) {
                    transport.interrupt_status |= INT_VRING;
                    if let Err(e) = self.irq.write(1) {
                        log::warn!("virtio-blk: cannot raise the interrupt: {e}");
                    }
                }
            }
            Err(e) => log::warn!("virtio-blk: the queue is broken: {e}"),
        }
    }
}

/// The I/O thread's side: a kick on the ioeventfd serves the queue.
impl EventSubscriber for BlockDevice {
    fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.notify, EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the queue notification: {e}");
        }
    }

    fn process(&self, events: Events, _ops: &mut EventOps) {
        if events.fd() != std::os::fd::AsRawFd::as_raw_fd(&self.notify) {
            return;
        }
        // Reading resets the counter: several kicks, one pass over the queue.
        let _ = self.notify.read();
        let mut state = self.state.lock().unwrap();
        let (transport, block) = &mut *state;
        self.serve(transport, block);
    }
}
