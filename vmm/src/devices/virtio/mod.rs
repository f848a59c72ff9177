//! virtio devices (virtio 1.x) on the virtio-mmio transport. Linux learns
//! of them from its command line (`virtio_mmio.device=`).

pub mod block;
pub mod mmio;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::io_gate::IoGate;
use crate::disk::{Disk, DiskState};
use block::Block;
use mmio::{MmioEvent, MmioTransport, TransportState, INT_VRING, MMIO_SIZE};

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

    /// Holds the device still until the guard is dropped: its I/O thread
    /// finishes the pass it is in and then waits, writing neither guest
    /// memory nor the disk (a snapshot is taken meanwhile).
    pub fn hold(&self) -> HeldBlock<'_> {
        HeldBlock(self.state.lock().unwrap())
    }

    /// Takes a saved transport state (a restored guest, before it runs).
    pub fn restore(&self, saved: &TransportState) -> Result<(), String> {
        self.state.lock().unwrap().0.restore(saved)
    }

    /// Has the I/O thread look at the queue once: a restored guest's last
    /// kick may have been pending when its snapshot was taken.
    pub fn kick(&self) {
        let _ = self.notify.write(1);
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

/// What a snapshot keeps of the disk device: the transport's registers and
/// queue, and the disk (its overlay's clusters go to a file beside).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub transport: TransportState,
    pub disk: DiskState,
}

pub struct HeldBlock<'a>(MutexGuard<'a, (MmioTransport, Block)>);

impl HeldBlock<'_> {
    /// The device's state, its overlay's clusters written to `overlay`.
    pub fn save(&self, overlay: &std::path::Path) -> std::io::Result<BlockState> {
        Ok(BlockState { transport: self.0 .0.save(), disk: self.0 .1.disk().save(overlay)? })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::BaseImage;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn device(dir: &std::path::Path, mem: &GuestMemoryMmap) -> BlockDevice {
        let path = dir.join("base.img");
        std::fs::write(&path, vec![0x5a; 64 * 512]).unwrap();
        let disk = Disk::with_overlay(BaseImage::open(&path).unwrap(), &dir.join("overlay")).unwrap();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        BlockDevice::new(disk, irq, Arc::new(IoGate::default()), mem.clone()).unwrap()
    }

    fn reg(dev: &BlockDevice, offset: u64, value: u32) {
        dev.write(offset, &value.to_le_bytes());
    }

    /// A guest controls every register value and every byte of its queues:
    /// random register accesses and random descriptor tables and rings,
    /// kicked again and again, never panic or hang the device.
    #[test]
    fn fuzzed_registers_and_queues_never_break_the_device() {
        let dir = std::env::temp_dir().join(format!("vmm-virtio-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let dev = device(&dir, &mem);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..400 {
            // A driver that sets the queue up (sometimes), then garbage.
            let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
            if round % 2 == 0 {
                reg(&dev, 0x070, 0);
                reg(&dev, 0x070, 1 | 2 | 8);
                reg(&dev, 0x038, 16);
                for (offset, addr) in [(0x080, vq.desc_table_addr()), (0x090, vq.avail_addr()), (0x0a0, vq.used_addr())]
                {
                    reg(&dev, offset, addr.0 as u32);
                    reg(&dev, offset + 4, (addr.0 >> 32) as u32);
                }
                reg(&dev, 0x044, 1);
                reg(&dev, 0x070, 1 | 2 | 8 | 4);
            }
            // Random descriptors (addresses, lengths, flags, next) and a
            // random avail ring.
            let garbage: Vec<u8> = (0..16 * 16 + 4 + 2 * 16).map(|_| rng.next() as u8).collect();
            let (desc, avail) = garbage.split_at(16 * 16);
            mem.write_slice(desc, vq.desc_table_addr()).unwrap();
            mem.write_slice(avail, vq.avail_addr()).unwrap();
            for _ in 0..8 {
                let offset = match rng.next() % 3 {
                    0 => rng.next() % 0x1100,
                    _ => (rng.next() % 0x40) * 4,
                };
                let len = [1usize, 2, 4, 8, 3][rng.next() as usize % 5];
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if rng.next().is_multiple_of(2) {
                    dev.write(offset, &data);
                } else {
                    let mut out = vec![0u8; len];
                    dev.read(offset, &mut out);
                }
            }
            reg(&dev, 0x050, 0); // kick
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
