//! virtio devices (virtio 1.x) on either transport: virtio-mmio, which
//! Linux learns of from its command line (`virtio_mmio.device=`), or
//! virtio-pci, functions on PCI bus 0 (`crate::guest::devices::pci`) that
//! interrupt by MSI-X.
//!
//! Each device ([`VirtioDevice`]: blk, net, vsock) sits behind one
//! [`VirtioSlot`], which holds the transport's registers, a queue
//! notification per queue (an ioeventfd KVM signals without an exit to
//! user space), the interrupt (an irqfd on a line, or MSI messages) and
//! the snapshot of both halves. Devices take slots in order: on MMIO slot
//! i's registers are the i-th page from [`MMIO_BASE`] and its interrupt
//! line is [`FIRST_GSI`] + i; on PCI slot i is device i + 1 on bus 0.

pub mod balloon;
pub mod block;
pub mod common;
pub mod device;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod vsock;

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{GuestConfig, Transport};
use crate::guest::devices::bus::BusDevice;
use crate::guest::devices::io_gate::IoGate;
use crate::guest::devices::pci::msix::{MsiMessage, MsiSink};
use crate::guest::devices::pci::{self as pci_bus, PciFunction};
use crate::guest::devices::Action;
use crate::guest::vstate::control::VcpuGate;
use crate::memory::GuestMemoryMmap;
use common::{TransportEvent, TransportState, VirtioCore, INT_VRING};
pub use device::{Persist, Queues, Used, VirtioDevice};
use mmio::{MmioTransport, CONFIG_SPACE, MMIO_SIZE, QUEUE_NOTIFY};
use pci::{PciState, PciTransport, Region};

/// Feature bit: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Slot 0's registers: the page after the doorbell.
pub const MMIO_BASE: u64 = 0xD000_1000;
/// Slot 0's interrupt line (COM1 has 4).
pub const FIRST_GSI: u32 = 5;
/// Slots, and so interrupt lines 5 to 10 (11 and up are left to the
/// legacy devices Linux probes for).
pub const MAX_SLOTS: usize = 6;

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
    let vsock = config.vsock.iter().map(|_| vsock::NAME);
    disk.chain(net).chain(vsock).chain(config.balloon.iter().map(|_| balloon::NAME)).collect()
}

/// Checks a snapshot's device states against its guest's configuration
/// (the devices it has, in their slots, on its transport) and each
/// against its backend.
pub fn check_saved(config: &GuestConfig, saved: &[SavedDevice], dir: &Path) -> Result<(), String> {
    let have: Vec<(usize, &str)> = saved.iter().map(|d| (d.slot, d.name.as_str())).collect();
    let want: Vec<(usize, &str)> = planned(config).into_iter().enumerate().collect();
    if have != want {
        return Err(format!("its device states {have:?} do not fit its guest's devices {want:?}"));
    }
    for device in saved {
        if device.pci.is_some() != (config.transport == Some(Transport::Pci)) {
            return Err(format!("{}: its state is not for the {} transport", device.name, config.transport_name()));
        }
        let checked = match (device.name.as_str(), &config.disk) {
            (block::NAME, Some(path)) => block::check_saved(path, &device.state, dir),
            (net::NAME, _) => device::from_value::<net::Net>(&device.state).map(|_| ()),
            (vsock::NAME, _) => {
                device::from_value::<vsock::Vsock>(&device.state).and_then(|state| crate::config::check_cid(state.cid))
            }
            (balloon::NAME, _) => device::from_value::<balloon::Balloon>(&device.state).map(|_| ()),
            (name, _) => Err(format!("no device is called {name}")),
        };
        checked.map_err(|e| format!("{}: {e}", device.name))?;
    }
    Ok(())
}

/// A virtio device on its transport, in its slot.
///
/// Queue kicks reach the guest's I/O thread through the ioeventfds, without
/// an exit to user space; that thread serves them, and the device writes
/// guest memory only inside the guest's [`IoGate`], which a merge freeze
/// closes, so no device write to guest memory overlaps a merge
/// (docs/dedup.md). Without an ioeventfd a kick exits to the vCPU thread,
/// which serves it the same way.
pub struct VirtioSlot {
    slot: usize,
    name: &'static str,
    state: Mutex<Inner>,
    /// One per queue, signalled by KVM when the driver writes the queue's
    /// notification register.
    notify: Vec<EventFd>,
    /// The VM the notifications are wired into and the address they are
    /// wired at (a PCI function's moves with its BAR).
    wired: Mutex<Option<(Arc<VmFd>, u64)>>,
    host_fds: Vec<RawFd>,
    io_gate: Arc<IoGate>,
    /// Told of every interrupt, for vCPUs waiting for one (a polling
    /// guest's halt, the doorbell's WAIT).
    vcpu_gate: Arc<VcpuGate>,
    mem: GuestMemoryMmap,
}

/// How a slot interrupts the guest, which says its transport.
pub enum Irq {
    /// An interrupt line (virtio-mmio): an irqfd.
    Line(EventFd),
    /// MSI-X messages (virtio-pci).
    Msi(Arc<dyn MsiSink>),
}

/// The transport's registers, with how it interrupts.
enum TransportRegs {
    Mmio(MmioTransport, EventFd),
    Pci(Box<PciTransport>, Arc<dyn MsiSink>),
}

impl TransportRegs {
    fn core(&self) -> &VirtioCore {
        match self {
            TransportRegs::Mmio(t, _) => &t.core,
            TransportRegs::Pci(t, _) => &t.core,
        }
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        match self {
            TransportRegs::Mmio(t, _) => &mut t.core,
            TransportRegs::Pci(t, _) => &mut t.core,
        }
    }
}

struct Inner {
    transport: TransportRegs,
    device: Box<dyn VirtioDevice>,
}

/// What a snapshot keeps of a device: its slot and name (to find it
/// again), the transport's registers and queues, the PCI function's (for
/// a device on PCI), and the device's own state ([`Persist`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedDevice {
    pub slot: usize,
    pub name: String,
    pub transport: TransportState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<PciState>,
    pub state: serde_json::Value,
}

impl VirtioSlot {
    /// `device` in `slot`, on virtio-mmio if `irq` is a line, else on PCI.
    pub fn new(
        slot: usize,
        device: Box<dyn VirtioDevice>,
        irq: Irq,
        io_gate: Arc<IoGate>,
        vcpu_gate: Arc<VcpuGate>,
        mem: GuestMemoryMmap,
    ) -> std::io::Result<VirtioSlot> {
        let core = VirtioCore::new(device.device_type(), device.features(), device.queue_max_sizes());
        let transport = match irq {
            Irq::Line(fd) => TransportRegs::Mmio(MmioTransport::new(core), fd),
            Irq::Msi(sink) => TransportRegs::Pci(Box::new(PciTransport::new(core, pci_bus::bar_base(slot + 1))), sink),
        };
        let notify =
            device.queue_max_sizes().iter().map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<_>>()?;
        Ok(VirtioSlot {
            slot,
            name: device.name(),
            host_fds: device.host_fds(),
            state: Mutex::new(Inner { transport, device }),
            notify,
            wired: Mutex::new(None),
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

    /// Where its virtio-mmio registers are, and how many bytes.
    pub fn mmio_range(&self) -> (u64, u64) {
        (slot_base(self.slot), MMIO_SIZE)
    }

    /// Wires each queue's notification register to its eventfd in KVM
    /// (on MMIO one register for all, told apart by the value written; on
    /// PCI one address per queue in the BAR). Kicks that cannot be wired
    /// exit to the vCPU thread, which serves them: the error says why.
    pub fn wire_notifications(&self, vm: &Arc<VmFd>) -> Result<(), kvm_ioctls::Error> {
        let (base, pci) = match &self.state.lock().unwrap().transport {
            TransportRegs::Mmio(..) => (slot_base(self.slot) + QUEUE_NOTIFY, false),
            TransportRegs::Pci(t, _) => (t.notify_base(), true),
        };
        let mut wired = self.wired.lock().unwrap();
        *wired = Some((vm.clone(), base));
        self.register(vm, base, pci, true)
    }

    /// (Un)registers the notifications at `base`: on PCI one address per
    /// queue, on MMIO one for all, told apart by the value written.
    fn register(&self, vm: &VmFd, base: u64, pci: bool, on: bool) -> Result<(), kvm_ioctls::Error> {
        for (i, fd) in self.notify.iter().enumerate() {
            let r = match pci {
                false => {
                    let addr = IoEventAddress::Mmio(base);
                    if on {
                        vm.register_ioevent(fd, &addr, i as u32)
                    } else {
                        vm.unregister_ioevent(fd, &addr, i as u32)
                    }
                }
                true => {
                    let addr = IoEventAddress::Mmio(base + i as u64 * u64::from(pci::NOTIFY_MULTIPLIER));
                    if on {
                        vm.register_ioevent(fd, &addr, NoDatamatch)
                    } else {
                        vm.unregister_ioevent(fd, &addr, NoDatamatch)
                    }
                }
            };
            r?;
        }
        Ok(())
    }

    /// The kernel moved a PCI function's BAR: the notifications follow
    /// to `new`.
    fn rewire(&self, new: u64) {
        let mut wired = self.wired.lock().unwrap();
        let Some((vm, base)) = wired.as_mut() else { return };
        if *base == new {
            return;
        }
        let _ = self.register(vm, *base, true, false);
        if let Err(e) = self.register(vm, new, true, true) {
            log::warn!("{}: notifications not wired at {new:#x} ({e}); serving kicks on vCPU exits", self.name);
        }
        *base = new;
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
        match (&mut inner.transport, &saved.pci) {
            (TransportRegs::Mmio(..), None) => {}
            (TransportRegs::Pci(t, _), Some(pci)) => t.restore(pci)?,
            _ => return Err(format!("the state of {} is for the other transport", saved.name)),
        }
        inner.transport.core_mut().restore(&saved.transport)?;
        if inner.transport.core().is_live() {
            let features = inner.transport.core().driver_features();
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

    /// Has the I/O thread look at queue `index` (the device has something
    /// for it: a balloon's wish for statistics).
    pub fn kick_queue(&self, index: usize) {
        if let Some(fd) = self.notify.get(index) {
            let _ = fd.write(1);
        }
    }

    /// The device's configuration changed (a balloon's target): a new
    /// generation and the configuration interrupt, if the driver is there.
    pub fn config_changed(&self) {
        let mut inner = self.state.lock().unwrap();
        let core = inner.transport.core_mut();
        if !core.is_live() {
            return;
        }
        core.config_changed();
        self.interrupt(&mut inner.transport, PciTransport::raise_config);
    }

    /// Serves queue `index` after a kick.
    fn serve(&self, inner: &mut Inner, index: usize) {
        let Inner { transport, device } = inner;
        let core = transport.core_mut();
        let live = core.is_live();
        let queue = &mut core.queues_mut()[index];
        if !live || !queue.ready() || !queue.is_valid(&self.mem) {
            // Also every guest's first pass at start (a restored guest's
            // last kicks may be pending), before its driver is there.
            log::debug!("{}: queue {index} kicked before the driver set it up; ignored", self.name);
            return;
        }
        let mut q = Queues { mem: &self.mem, queues: core.queues_mut(), gate: &self.io_gate };
        let used = device.process_queue(index, &mut q);
        self.finish(transport, used);
    }

    /// Raises the interrupt for the queues the device used that want one.
    fn finish(&self, transport: &mut TransportRegs, used: Result<Used, virtio_queue::Error>) {
        let used = match used {
            Ok(used) => used,
            Err(e) => return log::warn!("{}: a queue is broken: {e}", self.name),
        };
        let mut wanting = 0u32;
        for (i, queue) in transport.core_mut().queues_mut().iter_mut().enumerate() {
            if used & (1 << i) != 0 && queue.needs_notification(&self.mem).unwrap_or(true) {
                wanting |= 1 << i;
            }
        }
        if wanting == 0 {
            return;
        }
        transport.core_mut().interrupt_status |= INT_VRING;
        self.interrupt(transport, |t| t.raise(wanting));
    }

    /// Raises the slot's interrupt: its line, or on PCI the MSI messages
    /// `messages` picks (a queue's vectors, the configuration's).
    fn interrupt(&self, transport: &mut TransportRegs, messages: impl FnOnce(&mut PciTransport) -> Vec<MsiMessage>) {
        match transport {
            TransportRegs::Mmio(_, fd) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("{}: cannot raise the interrupt: {e}", self.name);
                }
                self.vcpu_gate.device_interrupt();
            }
            TransportRegs::Pci(t, sink) => self.signal(sink.as_ref(), messages(t)),
        }
    }

    /// Sends MSI messages, and tells waiting vCPUs.
    fn signal(&self, sink: &dyn MsiSink, messages: Vec<MsiMessage>) {
        if messages.is_empty() {
            return;
        }
        for message in messages {
            sink.signal(message);
        }
        self.vcpu_gate.device_interrupt();
    }

    /// Acts on a transport register write.
    fn on_event(&self, inner: &mut Inner, event: TransportEvent) {
        match event {
            TransportEvent::QueueNotify(index) => self.serve(inner, index),
            TransportEvent::Reset => inner.device.reset(),
            TransportEvent::DriverOk(features) => inner.device.activate(features),
            TransportEvent::None => {}
        }
    }
}

/// The vCPUs' side on virtio-mmio: register accesses.
impl BusDevice for VirtioSlot {
    fn read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
        let inner = self.state.lock().unwrap();
        let TransportRegs::Mmio(transport, _) = &inner.transport else { return data.fill(0xff) };
        match offset.checked_sub(CONFIG_SPACE) {
            Some(at) => inner.device.read_config(at, data),
            None => transport.read(offset, data),
        }
    }

    fn write(&self, _vcpu: u8, offset: u64, data: &[u8]) -> Action {
        let mut inner = self.state.lock().unwrap();
        let TransportRegs::Mmio(transport, _) = &mut inner.transport else { return Action::Continue };
        if let Some(at) = offset.checked_sub(CONFIG_SPACE) {
            inner.device.write_config(at, data);
            return Action::Continue;
        }
        let event = transport.write(offset, data);
        self.on_event(&mut inner, event);
        Action::Continue
    }
}

/// The vCPUs' side on PCI: configuration space and the BAR.
impl PciFunction for VirtioSlot {
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        match &self.state.lock().unwrap().transport {
            TransportRegs::Pci(t, _) => t.config_read(offset, data),
            TransportRegs::Mmio(..) => data.fill(0xff),
        }
    }

    fn config_write(&self, offset: u64, data: &[u8]) {
        log::trace!("{}: config write {offset:#x} {data:02x?}", self.name);
        let mut inner = self.state.lock().unwrap();
        let TransportRegs::Pci(t, sink) = &mut inner.transport else { return };
        let released = t.config_write(offset, data);
        self.signal(sink.as_ref(), released);
        // Only where it decodes (a kernel sizing the BAR turns decoding
        // off), and only inside the window: a BAR a guest points elsewhere
        // reaches nothing, and its kicks no KVM device.
        if t.bar().is_some_and(|(address, size)| pci_bus::in_window(address, size)) {
            self.rewire(t.notify_base());
        }
    }

    fn bar(&self) -> Option<(u64, u64)> {
        match &self.state.lock().unwrap().transport {
            TransportRegs::Pci(t, _) => t.bar(),
            TransportRegs::Mmio(..) => None,
        }
    }

    fn bar_read(&self, _vcpu: u8, offset: u64, data: &mut [u8]) {
        let mut inner = self.state.lock().unwrap();
        let Inner { transport: TransportRegs::Pci(t, _), device } = &mut *inner else { return data.fill(0xff) };
        match PciTransport::region(offset) {
            Region::Common(at) => t.read_common(at, data),
            Region::Isr => t.read_isr(data),
            Region::DeviceConfig(at) => device.read_config(at, data),
            Region::MsixTable(at) => t.msix().read_table(at, data),
            Region::MsixPba(at) => t.msix().read_pba(at, data),
            Region::Notify(_) | Region::None => data.fill(0),
        }
        log::trace!("{}: BAR read {offset:#x} -> {data:02x?}", self.name);
    }

    fn bar_write(&self, _vcpu: u8, offset: u64, data: &[u8]) -> Action {
        log::trace!("{}: BAR write {offset:#x} {data:02x?}", self.name);
        let mut inner = self.state.lock().unwrap();
        let Inner { transport: TransportRegs::Pci(t, sink), device } = &mut *inner else { return Action::Continue };
        let event = match PciTransport::region(offset) {
            Region::Common(at) => t.write_common(at, data),
            Region::DeviceConfig(at) => {
                device.write_config(at, data);
                TransportEvent::None
            }
            Region::Notify(at) => t.notify(at),
            Region::MsixTable(at) => {
                let released = t.msix_mut().write_table(at, data);
                self.signal(sink.as_ref(), released);
                TransportEvent::None
            }
            Region::Isr | Region::MsixPba(_) | Region::None => TransportEvent::None,
        };
        self.on_event(&mut inner, event);
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
        let pci = match &self.inner.transport {
            TransportRegs::Pci(t, _) => Some(t.save()),
            TransportRegs::Mmio(..) => None,
        };
        Ok(SavedDevice {
            slot: self.slot,
            name: self.inner.device.name().into(),
            transport: self.inner.transport.core().save(),
            pci,
            state: self.inner.device.save(files)?,
        })
    }
}

/// The I/O thread's side: a kick serves its queue, a ready host descriptor
/// goes to the device.
impl EventSubscriber for VirtioSlot {
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
        } else if self.host_fds.contains(&fd) && inner.transport.core().is_live() {
            let Inner { transport, device } = &mut *inner;
            let mut q = Queues { mem: &self.mem, queues: transport.core_mut().queues_mut(), gate: &self.io_gate };
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

    fn device(dir: &std::path::Path, mem: &GuestMemoryMmap) -> VirtioSlot {
        let path = dir.join("base.img");
        std::fs::write(&path, vec![0x5a; 64 * 512]).unwrap();
        let disk = Disk::with_overlay(BaseImage::open(&path).unwrap(), &dir.join("overlay")).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        VirtioSlot::new(
            0,
            Box::new(block::Block::new(disk)),
            Irq::Line(irq),
            Arc::new(IoGate::default()),
            Arc::new(VcpuGate::new(1)),
            mem.clone(),
        )
        .unwrap()
    }

    fn reg(dev: &VirtioSlot, offset: u64, value: u32) {
        dev.write(0, offset, &value.to_le_bytes());
    }

    /// Records the MSI messages a slot sends.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<MsiMessage>>);

    impl MsiSink for Recorder {
        fn signal(&self, message: MsiMessage) {
            self.0.lock().unwrap().push(message);
        }
    }

    /// A disk on PCI, driven as Linux's virtio-pci does: found by its ID
    /// through configuration space, its BAR moved, MSI-X enabled with a
    /// vector for its queue, the queue set up through the common
    /// configuration; a read request kicked at its notification address is
    /// served and answered with the vector's message, and the whole state
    /// comes back in a clone.
    #[test]
    fn a_disk_on_pci_serves_a_request_and_interrupts_by_msix() {
        use crate::guest::devices::pci::{BarWindow, Ecam, PciBus, WINDOW_BASE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        let dir = std::env::temp_dir().join(format!("vmm-virtio-pci-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let path = dir.join("base.img");
        std::fs::write(&path, vec![0x5a; 64 * 512]).unwrap();
        let disk = Disk::read_only(BaseImage::open(&path).unwrap());
        let recorder = Arc::new(Recorder::default());
        let slot = Arc::new(
            VirtioSlot::new(
                0,
                Box::new(block::Block::new(disk)),
                Irq::Msi(recorder.clone()),
                Arc::new(IoGate::default()),
                Arc::new(VcpuGate::new(1)),
                mem.clone(),
            )
            .unwrap(),
        );
        let bus = Arc::new(PciBus::new(vec![slot.clone() as Arc<dyn PciFunction>]).unwrap());
        let (ecam, window) = (Ecam(bus.clone()), BarWindow(bus));
        let cfg = |offset: u64, v: u32| ecam.write(0, 1 << 15 | offset, &v.to_le_bytes());
        let mut id = [0u8; 4];
        ecam.read(0, 1 << 15, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4, "virtio-blk, modern");
        let bar = 0xc040_0000u64;
        cfg(0x10, bar as u32);
        cfg(0x04, 0x6); // memory decoding, bus mastering
        cfg(0x40, u32::from(crate::guest::devices::pci::msix::CONTROL_ENABLE) << 16);
        let at = |offset: u64| bar - WINDOW_BASE + offset;
        let w = |offset: u64, data: &[u8]| window.write(0, at(offset), data);
        // Vector 1: its message, unmasked.
        w(pci::MSIX_TABLE_AT + 16, &0xfee0_0000u32.to_le_bytes());
        w(pci::MSIX_TABLE_AT + 24, &0x41u32.to_le_bytes());
        w(pci::MSIX_TABLE_AT + 28, &0u32.to_le_bytes());
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        w(0x14, &[1 | 2]);
        w(0x08, &1u32.to_le_bytes());
        w(0x0c, &1u32.to_le_bytes()); // VIRTIO_F_VERSION_1
        w(0x14, &[1 | 2 | 8]);
        w(0x16, &0u16.to_le_bytes());
        w(0x18, &16u16.to_le_bytes());
        w(0x1a, &1u16.to_le_bytes());
        for (offset, addr) in [(0x20, vq.desc_table_addr()), (0x28, vq.avail_addr()), (0x30, vq.used_addr())] {
            w(offset, &(addr.0 as u32).to_le_bytes());
            w(offset + 4, &((addr.0 >> 32) as u32).to_le_bytes());
        }
        w(0x1c, &1u16.to_le_bytes());
        w(0x14, &[1 | 2 | 8 | 4]);
        // A read of sector 0 into 0x8000.
        mem.write_slice(&[0u8; 16], GuestAddress(0x6000)).unwrap();
        vq.build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(0x6000, 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(0x8000, 512, 2, 0)),
            RawDescriptor::from(Descriptor::new(0x7000, 1, 2, 0)),
        ])
        .unwrap();
        w(pci::NOTIFY, &0u16.to_le_bytes());
        let mut sector = [0u8; 512];
        mem.read_slice(&mut sector, GuestAddress(0x8000)).unwrap();
        assert_eq!(sector, [0x5a; 512], "the request was not served");
        assert_eq!(*recorder.0.lock().unwrap(), vec![MsiMessage { address: 0xfee0_0000, data: 0x41 }]);
        let mut isr = [0u8];
        window.read(0, at(pci::ISR), &mut isr);
        assert_eq!(isr, [1]);

        // A clone's slot comes back with the BAR, vectors and queue.
        let snap = dir.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let files = crate::snapshot::SnapshotFiles::create(&snap, true).unwrap();
        let saved = slot.hold().save(&files).unwrap();
        assert!(saved.pci.is_some());
        let disk = Disk::read_only(BaseImage::open(&path).unwrap());
        let recorder = Arc::new(Recorder::default());
        let gates = (Arc::new(IoGate::default()), Arc::new(VcpuGate::new(1)));
        let clone =
            VirtioSlot::new(0, Box::new(block::Block::new(disk)), Irq::Msi(recorder), gates.0, gates.1, mem.clone())
                .unwrap();
        clone.restore(&saved).unwrap();
        assert_eq!(clone.bar(), Some((bar, u64::from(pci::BAR_SIZE))));
        let mut status = [0u8];
        clone.bar_read(0, pci::COMMON + 0x14, &mut status);
        assert_eq!(status, [1 | 2 | 8 | 4]);
        let mmio = device(&dir, &mem);
        assert!(mmio.restore(&saved).is_err(), "a PCI state went to an MMIO slot");
        std::fs::remove_dir_all(dir).unwrap();
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
        let again = VirtioSlot::new(
            0,
            Box::new(back),
            Irq::Line(irq),
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
        let elsewhere = VirtioSlot::new(
            1,
            Box::new(block::Block::new(Disk::read_only(BaseImage::open(&dir.join("base.img")).unwrap()))),
            Irq::Line(irq),
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
        let mut rng = crate::guest::devices::XorShift(0x2545_f491_4f6c_dd1d);
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
            let garbage: Vec<u8> = (0..16 * 16 + 4 + 2 * 16).map(|_| rng.next_u64() as u8).collect();
            let (desc, avail) = garbage.split_at(16 * 16);
            mem.write_slice(desc, vq.desc_table_addr()).unwrap();
            mem.write_slice(avail, vq.avail_addr()).unwrap();
            for _ in 0..8 {
                let offset = match rng.next_u64() % 3 {
                    0 => rng.next_u64() % 0x1100,
                    _ => (rng.next_u64() % 0x40) * 4,
                };
                let len = [1usize, 2, 4, 8, 3][rng.next_u64() as usize % 5];
                let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                if rng.next_u64().is_multiple_of(2) {
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
