//! virtio devices (virtio 1.x) on the virtio-mmio transport. Linux learns
//! of them from its command line (`virtio_mmio.device=`).
//!
//! Each device ([`VirtioDevice`]: blk, net, vsock) sits behind one
//! [`MmioDevice`], which holds the transport's registers, a queue
//! notification per queue (an ioeventfd KVM signals without an exit to
//! user space), the interrupt (an irqfd) and the snapshot of both halves.
//! Devices take slots in order: slot i's registers are the i-th page from
//! [`MMIO_BASE`] and its interrupt line is [`FIRST_GSI`] + i.

pub mod block;
pub mod device;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::GuestConfig;
use crate::guest::devices::bus::BusDevice;
use crate::guest::devices::io_gate::IoGate;
use crate::guest::devices::Action;
use crate::guest::vstate::control::VcpuGate;
use crate::memory::GuestMemoryMmap;
pub use device::{Persist, Queues, Used, VirtioDevice};
use mmio::{MmioEvent, MmioTransport, TransportState, CONFIG_SPACE, INT_VRING, MMIO_SIZE};

/// Feature bit: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Slot 0's registers: the page after the doorbell.
pub const MMIO_BASE: u64 = 0xD000_1000;
/// Slot 0's interrupt line (COM1 has 4).
pub const FIRST_GSI: u32 = 5;
/// Slots, and so interrupt lines 5 to 10 (11 and up are left to the
/// legacy devices Linux probes for).
pub const MAX_SLOTS: usize = 6;
/// The QueueNotify register's offset.
const QUEUE_NOTIFY: u64 = 0x50;

/// Where slot `slot`'s registers are.
pub fn slot_base(slot: usize) -> u64 {
    MMIO_BASE + slot as u64 * MMIO_SIZE
}

/// The kernel parameter that announces slot `slot`'s device to Linux.
pub fn cmdline_arg(slot: usize) -> String {
    format!("virtio_mmio.device=4K@{:#x}:{}", slot_base(slot), FIRST_GSI + slot as u32)
}

/// The virtio devices a guest of `config` has, by name, in slot order.
pub fn planned(config: &GuestConfig) -> Vec<&'static str> {
    let disk = config.disk.iter().map(|_| block::NAME);
    let net = config.net.iter().map(|_| net::NAME);
    disk.chain(net).chain(config.vsock.iter().map(|_| vsock::NAME)).collect()
}

/// Checks a snapshot's device states against its guest's configuration
/// (the devices it has, in their slots) and each against its backend.
pub fn check_saved(config: &GuestConfig, saved: &[SavedDevice], dir: &Path) -> Result<(), String> {
    let have: Vec<(usize, &str)> = saved.iter().map(|d| (d.slot, d.name.as_str())).collect();
    let want: Vec<(usize, &str)> = planned(config).into_iter().enumerate().collect();
    if have != want {
        return Err(format!("its device states {have:?} do not fit its guest's devices {want:?}"));
    }
    for device in saved {
        let checked = match (device.name.as_str(), &config.disk) {
            (block::NAME, Some(path)) => block::check_saved(path, &device.state, dir),
            (net::NAME, _) => device::from_value::<net::Net>(&device.state).map(|_| ()),
            (vsock::NAME, _) => {
                device::from_value::<vsock::Vsock>(&device.state).and_then(|state| crate::config::check_cid(state.cid))
            }
            (name, _) => Err(format!("no device is called {name}")),
        };
        checked.map_err(|e| format!("{}: {e}", device.name))?;
    }
    Ok(())
}

/// A virtio device on the virtio-mmio transport, in its slot.
///
/// Queue kicks reach the guest's I/O thread through the ioeventfds, without
/// an exit to user space; that thread serves them, and the device writes
/// guest memory only inside the guest's [`IoGate`], which a merge freeze
/// closes, so no device write to guest memory overlaps a merge
/// (docs/dedup.md). Without an ioeventfd a kick exits to the vCPU thread,
/// which serves it the same way.
pub struct MmioDevice {
    slot: usize,
    name: &'static str,
    state: Mutex<Inner>,
    irq: EventFd,
    /// One per queue, signalled by KVM when the driver writes the queue's
    /// index to QueueNotify.
    notify: Vec<EventFd>,
    host_fds: Vec<RawFd>,
    io_gate: Arc<IoGate>,
    /// Told of every interrupt, for vCPUs waiting for one (a polling
    /// guest's halt, the doorbell's WAIT).
    vcpu_gate: Arc<VcpuGate>,
    mem: GuestMemoryMmap,
}

struct Inner {
    transport: MmioTransport,
    device: Box<dyn VirtioDevice>,
}

/// What a snapshot keeps of a device: its slot and name (to find it
/// again), the transport's registers and queues, and the device's own
/// state ([`Persist`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedDevice {
    pub slot: usize,
    pub name: String,
    pub transport: TransportState,
    pub state: serde_json::Value,
}

impl MmioDevice {
    pub fn new(
        slot: usize,
        device: Box<dyn VirtioDevice>,
        irq: EventFd,
        io_gate: Arc<IoGate>,
        vcpu_gate: Arc<VcpuGate>,
        mem: GuestMemoryMmap,
    ) -> std::io::Result<MmioDevice> {
        let transport = MmioTransport::new(device.device_type(), device.features(), device.queue_max_sizes());
        let notify =
            device.queue_max_sizes().iter().map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<_>>()?;
        Ok(MmioDevice {
            slot,
            name: device.name(),
            host_fds: device.host_fds(),
            state: Mutex::new(Inner { transport, device }),
            irq,
            notify,
            io_gate,
            vcpu_gate,
            mem,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Where its registers are, and how many bytes.
    pub fn range(&self) -> (u64, u64) {
        (slot_base(self.slot), MMIO_SIZE)
    }

    /// Each queue's notification, with the address and value of the
    /// register write that signals it (for KVM's ioeventfds).
    pub fn notifications(&self) -> impl Iterator<Item = (&EventFd, u64, u32)> {
        let addr = slot_base(self.slot) + QUEUE_NOTIFY;
        self.notify.iter().enumerate().map(move |(i, fd)| (fd, addr, i as u32))
    }

    /// Holds the device still until the guard is dropped: its I/O thread
    /// finishes the pass it is in and then waits, writing neither guest
    /// memory nor its backend (a snapshot is taken meanwhile).
    pub fn hold(&self) -> HeldDevice<'_> {
        HeldDevice { slot: self.slot, inner: self.state.lock().unwrap() }
    }

    /// Takes its transport's saved state (a restored guest, before it
    /// runs); the device itself was built from its part.
    pub fn restore(&self, saved: &SavedDevice) -> Result<(), String> {
        if saved.name != self.name || saved.slot != self.slot {
            return Err(format!(
                "the state of {} in slot {} is not for {} in slot {}",
                saved.name, saved.slot, self.name, self.slot
            ));
        }
        let mut inner = self.state.lock().unwrap();
        inner.transport.restore(&saved.transport)?;
        if inner.transport.is_live() {
            let features = inner.transport.driver_features();
            inner.device.activate(features);
        }
        Ok(())
    }

    /// Has the I/O thread look at every queue once: a restored guest's
    /// last kicks may have been pending when its snapshot was taken.
    pub fn kick(&self) {
        for fd in &self.notify {
            let _ = fd.write(1);
        }
    }

    /// Serves queue `index` after a kick.
    fn serve(&self, inner: &mut Inner, index: usize) {
        let Inner { transport, device } = inner;
        let live = transport.is_live();
        let queue = &mut transport.queues_mut()[index];
        if !live || !queue.ready() || !queue.is_valid(&self.mem) {
            log::warn!("{}: queue {index} kicked before the driver set it up; ignored", self.name);
            return;
        }
        let mut q = Queues { mem: &self.mem, queues: transport.queues_mut(), gate: &self.io_gate };
        let used = device.process_queue(index, &mut q);
        self.finish(transport, used);
    }

    /// Raises the interrupt if a queue the device used wants one.
    fn finish(&self, transport: &mut MmioTransport, used: Result<Used, virtio_queue::Error>) {
        let used = match used {
            Ok(used) => used,
            Err(e) => return log::warn!("{}: a queue is broken: {e}", self.name),
        };
        let mut raise = false;
        for (i, queue) in transport.queues_mut().iter_mut().enumerate() {
            if used & (1 << i) != 0 {
                raise |= queue.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if raise {
            transport.interrupt_status |= INT_VRING;
            if let Err(e) = self.irq.write(1) {
                log::warn!("{}: cannot raise the interrupt: {e}", self.name);
            }
            self.vcpu_gate.device_interrupt();
        }
    }
}

/// The vCPUs' side: register accesses.
impl BusDevice for MmioDevice {
    fn read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
        let inner = self.state.lock().unwrap();
        match offset.checked_sub(CONFIG_SPACE) {
            Some(at) => inner.device.read_config(at, data),
            None => inner.transport.read(offset, data),
        }
    }

    fn write(&self, _vcpu: u8, offset: u64, data: &[u8]) -> Action {
        let mut inner = self.state.lock().unwrap();
        if let Some(at) = offset.checked_sub(CONFIG_SPACE) {
            inner.device.write_config(at, data);
            return Action::Continue;
        }
        match inner.transport.write(offset, data) {
            MmioEvent::QueueNotify(index) => self.serve(&mut inner, index),
            MmioEvent::Reset => inner.device.reset(),
            MmioEvent::DriverOk(features) => inner.device.activate(features),
            MmioEvent::None => {}
        }
        Action::Continue
    }
}

pub struct HeldDevice<'a> {
    slot: usize,
    inner: MutexGuard<'a, Inner>,
}

impl HeldDevice<'_> {
    /// The device's state, its files (a disk's overlay) written into `files`.
    pub fn save(&self, files: &crate::snapshot::SnapshotFiles) -> std::io::Result<SavedDevice> {
        Ok(SavedDevice {
            slot: self.slot,
            name: self.inner.device.name().into(),
            transport: self.inner.transport.save(),
            state: self.inner.device.save(files)?,
        })
    }
}

/// The I/O thread's side: a kick serves its queue, a ready host descriptor
/// goes to the device.
impl EventSubscriber for MmioDevice {
    fn init(&self, ops: &mut EventOps) {
        // Host descriptors are edge-triggered: a device serves one until it
        // is drained or the guest has no room, and goes on at the next kick.
        let kicks = self.notify.iter().map(|fd| (fd.as_raw_fd(), EventSet::IN));
        let host = self.host_fds.iter().map(|&fd| (fd, EventSet::IN | EventSet::EDGE_TRIGGERED));
        for (fd, set) in kicks.chain(host) {
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                log::error!("{}: cannot watch descriptor {fd}: {e}", self.name);
            }
        }
    }

    fn process(&self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let mut inner = self.state.lock().unwrap();
        if let Some(index) = self.notify.iter().position(|n| n.as_raw_fd() == fd) {
            // Reading resets the counter: several kicks, one pass.
            let _ = self.notify[index].read();
            self.serve(&mut inner, index);
        } else if self.host_fds.contains(&fd) && inner.transport.is_live() {
            let Inner { transport, device } = &mut *inner;
            let mut q = Queues { mem: &self.mem, queues: transport.queues_mut(), gate: &self.io_gate };
            let used = device.process_host(fd, &mut q);
            self.finish(transport, used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::disk::Disk;
    use crate::image::BaseImage;
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

    fn device(dir: &std::path::Path, mem: &GuestMemoryMmap) -> MmioDevice {
        let path = dir.join("base.img");
        std::fs::write(&path, vec![0x5a; 64 * 512]).unwrap();
        let disk = Disk::with_overlay(BaseImage::open(&path).unwrap(), &dir.join("overlay")).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        MmioDevice::new(
            0,
            Box::new(block::Block::new(disk)),
            irq,
            Arc::new(IoGate::default()),
            Arc::new(VcpuGate::new(1)),
            mem.clone(),
        )
        .unwrap()
    }

    fn reg(dev: &MmioDevice, offset: u64, value: u32) {
        dev.write(0, offset, &value.to_le_bytes());
    }

    /// A disk device set up by a driver, saved and built again from its
    /// state as a clone's would be, reads the same registers and data; a
    /// snapshot's devices that do not fit its guest are refused.
    #[test]
    fn a_saved_device_comes_back_and_must_fit_its_guest() {
        let dir = std::env::temp_dir().join(format!("vmm-virtio-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let dev = device(&dir, &mem);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        reg(&dev, 0x070, 1 | 2 | 8);
        reg(&dev, 0x038, 16);
        reg(&dev, 0x080, vq.desc_table_addr().0 as u32);
        reg(&dev, 0x044, 1);
        reg(&dev, 0x070, 1 | 2 | 8 | 4);
        let snap = dir.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let files = crate::snapshot::SnapshotFiles::create(&snap, true).unwrap();
        let saved = dev.hold().save(&files).unwrap();
        assert_eq!((saved.slot, saved.name.as_str()), (0, block::NAME));

        let state = device::from_value::<block::Block>(&saved.state).unwrap();
        let base = BaseImage::open(&dir.join("base.img")).unwrap();
        let back = block::Block::restore((base, Some(dir.join("overlay2"))), &state, &snap).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let again = MmioDevice::new(
            0,
            Box::new(back),
            irq,
            Arc::new(IoGate::default()),
            Arc::new(VcpuGate::new(1)),
            mem.clone(),
        )
        .unwrap();
        again.restore(&saved).unwrap();
        for offset in [0x000, 0x008, 0x034, 0x044, 0x070, 0x100, 0x104] {
            let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
            dev.read(0, offset, &mut a);
            again.read(0, offset, &mut b);
            assert_eq!(a, b, "register {offset:#x}");
        }
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let elsewhere = MmioDevice::new(
            1,
            Box::new(block::Block::new(Disk::read_only(BaseImage::open(&dir.join("base.img")).unwrap()))),
            irq,
            Arc::new(IoGate::default()),
            Arc::new(VcpuGate::new(1)),
            mem.clone(),
        )
        .unwrap();
        assert!(elsewhere.restore(&saved).is_err(), "slot 0's state went to slot 1");

        let mut config = GuestConfig::new("kernel".into());
        assert!(check_saved(&config, std::slice::from_ref(&saved), &snap).is_err(), "a disk state for no disk");
        config.disk = Some(dir.join("base.img"));
        check_saved(&config, std::slice::from_ref(&saved), &snap).unwrap();
        assert!(check_saved(&config, &[], &snap).is_err(), "a disk without its state");
        let mut damaged = saved.clone();
        damaged.state = serde_json::json!({"clusters": "many"});
        assert!(check_saved(&config, &[damaged], &snap).is_err(), "a damaged state");
        std::fs::write(dir.join("base.img"), vec![0x5a; 128 * 512]).unwrap();
        let changed = check_saved(&config, &[saved], &snap).unwrap_err();
        assert!(changed.contains("changed"), "{changed}");
        std::fs::remove_dir_all(dir).unwrap();
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
                    dev.write(0, offset, &data);
                } else {
                    let mut out = vec![0u8; len];
                    dev.read(0, offset, &mut out);
                }
            }
            reg(&dev, 0x050, 0); // kick
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
