//! What a virtio device is to the transport: its type, features, queues,
//! configuration space, how it serves a queue and the host descriptors it
//! waits on, and what a snapshot keeps of it. Its slot
//! ([`super::VirtioSlot`], on either transport) does the rest: registers,
//! notifications, interrupts, the I/O thread and the transport's half of a
//! snapshot, the same for every device.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use virtio_queue::Queue;

use crate::guest::devices::io_gate::IoGate;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::SnapshotFiles;

/// What a device works with while it serves its queues: guest memory,
/// its queues (set up and checked by the transport), and the guest's I/O
/// gate, inside which every write into guest memory must happen so that no
/// device write overlaps a merge (docs/dedup.md).
pub struct Queues<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub queues: &'a mut [Queue],
    pub gate: &'a IoGate,
}

/// Which queues' used rings a device added to (bit i: queue i): the
/// transport asks each of them whether the driver wants an interrupt.
pub type Used = u32;

pub trait VirtioDevice: Send {
    /// For logs, and to match a snapshot's state to its device.
    fn name(&self) -> &'static str;
    /// The virtio device ID (virtio 1.x 5).
    fn device_type(&self) -> u32;
    /// The largest size of each of its queues (powers of two).
    fn queue_max_sizes(&self) -> &'static [u16];
    fn features(&self) -> u64;
    /// Reads its configuration space (what a driver reads from offset 0x100
    /// of the registers on); bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver's write to its configuration space; ignored unless the
    /// device has writable fields.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("{}: write to read-only config space at {offset:#x} ignored", self.name());
    }
    /// The driver set it up and negotiated `features`: it may start (a
    /// restored guest's live device is told so when its transport is).
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device: forget everything in flight.
    fn reset(&mut self) {}
    /// The driver kicked queue `index`: serve what it made available.
    fn process_queue(&mut self, index: usize, q: &mut Queues) -> Result<Used, virtio_queue::Error>;
    /// Host descriptors whose readiness needs the device (a TAP, a socket);
    /// the I/O thread waits on them beside the queue kicks, edge-triggered:
    /// serve one until it would block or the guest has no room, and go on
    /// when the guest kicks the queue that lacked room.
    fn host_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `fd`, one of [`Self::host_fds`], is ready.
    fn process_host(&mut self, _fd: RawFd, _q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        Ok(0)
    }
    /// The device's own state for a snapshot, its files (a disk's overlay)
    /// written into `files` (the transport's state is saved beside it):
    /// see [`Persist`].
    fn save(&self, files: &SnapshotFiles) -> io::Result<serde_json::Value>;
}

/// A device's state in a snapshot, and how a device is built again from
/// it. A device restored from a state file must check it as it would check
/// any input: the file may be damaged or hostile.
pub trait Persist: Sized {
    type State: Serialize + DeserializeOwned;
    /// What building the device needs beside its state (its backend).
    type Args;
    fn save_state(&self, files: &SnapshotFiles) -> io::Result<Self::State>;
    fn restore(args: Self::Args, state: &Self::State, dir: &Path) -> Result<Self, String>;
}

/// A device's state as a snapshot holds it.
pub fn to_value<P: Persist>(device: &P, files: &SnapshotFiles) -> io::Result<serde_json::Value> {
    serde_json::to_value(device.save_state(files)?).map_err(io::Error::other)
}

/// A device's state back from a snapshot's.
pub fn from_value<P: Persist>(value: &serde_json::Value) -> Result<P::State, String> {
    serde_json::from_value(value.clone()).map_err(|e| format!("a damaged device state: {e}"))
}

/// Copies `config` from `offset` into `data`, zeros past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset).ok().and_then(|o| config.get(o.checked_add(i)?)).copied().unwrap_or(0);
    }
}
