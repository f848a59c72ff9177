//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! registers a driver uses to negotiate features and set up queues, in
//! front of one device with one or more queues.
//!
//! State only: the owner routes MMIO accesses here and acts on what
//! `write` returns (a queue notification, a reset).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4d56; // "VMMU"

pub const MMIO_SIZE: u64 = 0x1000;
/// Where the device's own configuration space starts.
pub const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.x 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// The interrupt status bit for "the used ring changed".
pub const INT_VRING: u32 = 1;

/// What the owner must do after a register write.
#[derive(Debug, PartialEq, Eq)]
pub enum MmioEvent {
    None,
    /// The driver kicked this queue (when not wired to an ioeventfd).
    QueueNotify(usize),
    /// The driver wrote status 0: the device must forget its state.
    Reset,
    /// The driver set DRIVER_OK: the device may start, with the features
    /// it negotiated.
    DriverOk(u64),
}

pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    pub interrupt_status: u32,
    queue_sel: u32,
    queues: Vec<Queue>,
}

/// What a snapshot keeps of the transport: what the driver negotiated and
/// set up, and where the queue stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportState {
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
}

/// Where one queue stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueRegs {
    /// max size, size, next avail, next used.
    sizes: [u16; 4],
    ready: bool,
    event_idx: bool,
    /// Descriptor table, available ring, used ring.
    addresses: [u64; 3],
}

impl MmioTransport {
    pub fn save(&self) -> TransportState {
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let q = q.state();
                QueueRegs {
                    sizes: [q.max_size, q.size, q.next_avail, q.next_used],
                    ready: q.ready,
                    event_idx: q.event_idx_enabled,
                    addresses: [q.desc_table, q.avail_ring, q.used_ring],
                }
            })
            .collect();
        TransportState {
            features_sel: self.features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            queue_sel: self.queue_sel,
            queues,
        }
    }

    /// Takes a saved state, checked as the registers would check it (a
    /// state file is input like any other).
    pub fn restore(&mut self, saved: &TransportState) -> Result<(), String> {
        if saved.queues.len() != self.queues.len() {
            return Err(format!("{} saved queues for a device with {}", saved.queues.len(), self.queues.len()));
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (regs, queue)) in saved.queues.iter().zip(&self.queues).enumerate() {
            let [max_size, size, next_avail, next_used] = regs.sizes;
            if max_size != queue.max_size() {
                return Err(format!("saved queue {i} has {max_size} entries, the device's {}", queue.max_size()));
            }
            let [desc_table, avail_ring, used_ring] = regs.addresses;
            let state = QueueState {
                max_size,
                next_avail,
                next_used,
                event_idx_enabled: regs.event_idx,
                size,
                ready: regs.ready,
                desc_table,
                avail_ring,
                used_ring,
            };
            queues.push(Queue::try_from(state).map_err(|e| format!("saved queue {i}: {e:?}"))?);
        }
        self.queues = queues;
        self.queue_sel = saved.queue_sel;
        self.features_sel = saved.features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.driver_features = saved.driver_features & self.device_features;
        self.status = saved.status;
        self.interrupt_status = saved.interrupt_status;
        Ok(())
    }

    /// A transport for a device of type `device_id` offering
    /// `device_features`, with a queue of each of `queue_max` sizes (powers
    /// of two).
    pub fn new(device_id: u32, device_features: u64, queue_max: &[u16]) -> MmioTransport {
        MmioTransport {
            device_id,
            device_features,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            queue_sel: 0,
            queues: queue_max.iter().map(|&n| Queue::new(n).expect("a power-of-two queue size")).collect(),
        }
    }

    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// Whether the driver finished setting up and may use the device.
    pub fn is_live(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Reads a register (the owner serves the config space, from
    /// [`CONFIG_SPACE`] on).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let queue = self.queues.get(self.queue_sel as usize);
        let value: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device_id,
            0x00c => VENDOR,
            0x010 => match self.features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0, // config generation: the config never changes
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Writes a register (the owner serves the config space).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        if data.len() != 4 {
            log::debug!("virtio-mmio: {}-byte write to register {offset:#x} ignored", data.len());
            return MmioEvent::None;
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        match offset {
            0x014 => self.features_sel = v,
            0x020 => match self.driver_features_sel {
                // Only what the device offers can be accepted.
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (u64::from(v) & self.device_features)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | ((u64::from(v) << 32) & self.device_features)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x050 => {
                if (v as usize) < self.queues.len() {
                    return MmioEvent::QueueNotify(v as usize);
                }
                log::debug!("virtio-mmio: kick of queue {v}, which the device does not have");
            }
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                    return MmioEvent::Reset;
                }
                let starting = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
                self.status = v;
                if starting && v & STATUS_FAILED == 0 {
                    return MmioEvent::DriverOk(self.driver_features);
                }
            }
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.write_queue(offset, v),
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
        MmioEvent::None
    }

    /// A write to the selected queue's registers.
    fn write_queue(&mut self, offset: u64, v: u32) {
        let sel = self.queue_sel;
        let Some(queue) = self.selected() else {
            return log::debug!("virtio-mmio: write to register {offset:#x} of queue {sel}, which does not exist");
        };
        match offset {
            0x038 => queue.set_size(v as u16),
            0x044 => queue.set_ready(v == 1),
            0x080 => queue.set_desc_table_address(Some(v), None),
            0x084 => queue.set_desc_table_address(None, Some(v)),
            0x090 => queue.set_avail_ring_address(Some(v), None),
            0x094 => queue.set_avail_ring_address(None, Some(v)),
            0x0a0 => queue.set_used_ring_address(Some(v), None),
            _ => queue.set_used_ring_address(None, Some(v)),
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.interrupt_status = 0;
        self.features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queues.iter_mut().for_each(Queue::reset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(t: &MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(t: &mut MmioTransport, offset: u64, v: u32) -> MmioEvent {
        t.write(offset, &v.to_le_bytes())
    }

    #[test]
    fn a_driver_can_negotiate_and_set_up_the_queue() {
        let features = (1u64 << 32) | (1 << 9);
        let mut t = MmioTransport::new(2, features, &[256, 64]);
        assert_eq!(read32(&t, 0x000), MAGIC);
        assert_eq!(read32(&t, 0x004), 2);
        assert_eq!(read32(&t, 0x008), 2);
        write32(&mut t, 0x014, 1);
        assert_eq!(read32(&t, 0x010), 1);
        write32(&mut t, 0x014, 0);
        assert_eq!(read32(&t, 0x010), 1 << 9);
        // The driver asks for more than offered: it gets what was offered.
        write32(&mut t, 0x024, 0);
        write32(&mut t, 0x020, 0xffff_ffff);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        assert_eq!(t.driver_features(), features);
        assert_eq!(read32(&t, 0x034), 256);
        write32(&mut t, 0x038, 128);
        write32(&mut t, 0x080, 0x1000);
        write32(&mut t, 0x090, 0x2000);
        write32(&mut t, 0x0a0, 0x3000);
        write32(&mut t, 0x044, 1);
        // The second queue, set up through the selector.
        write32(&mut t, 0x030, 1);
        assert_eq!((read32(&t, 0x034), read32(&t, 0x044)), (64, 0));
        write32(&mut t, 0x080, 0x5000);
        write32(&mut t, 0x044, 1);
        write32(&mut t, 0x030, 2);
        assert_eq!(read32(&t, 0x034), 0, "a queue that does not exist has size 0");
        write32(&mut t, 0x080, 0x6000);
        assert!(!t.is_live());
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(write32(&mut t, 0x070, ok), MmioEvent::DriverOk(features));
        assert_eq!(write32(&mut t, 0x070, ok), MmioEvent::None, "started twice");
        assert!(t.is_live());
        assert_eq!(t.queues_mut()[0].desc_table(), 0x1000);
        assert_eq!((t.queues_mut()[1].desc_table(), t.queues_mut()[1].ready()), (0x5000, true));
        assert_eq!(write32(&mut t, 0x050, 0), MmioEvent::QueueNotify(0));
        assert_eq!(write32(&mut t, 0x050, 1), MmioEvent::QueueNotify(1));
        assert_eq!(write32(&mut t, 0x050, 2), MmioEvent::None);
        t.interrupt_status = INT_VRING;
        write32(&mut t, 0x064, INT_VRING);
        assert_eq!(read32(&t, 0x060), 0);
        assert_eq!(write32(&mut t, 0x070, 0), MmioEvent::Reset);
        assert!(!t.is_live() && read32(&t, 0x044) == 0);
    }

    /// A transport set up by a driver, saved and restored into a new one,
    /// reads the same; a saved state that does not fit is refused.
    #[test]
    fn its_state_survives_a_round_trip() {
        let mut t = MmioTransport::new(2, 1 << 32, &[256]);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(&mut t, 0x038, 128);
        write32(&mut t, 0x080, 0x1000);
        write32(&mut t, 0x090, 0x2000);
        write32(&mut t, 0x0a0, 0x3000);
        write32(&mut t, 0x044, 1);
        write32(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        t.queues_mut()[0].set_next_avail(17);
        let saved = t.save();
        let mut back = MmioTransport::new(2, 1 << 32, &[256]);
        back.restore(&saved).unwrap();
        assert!(back.is_live());
        assert_eq!(back.driver_features(), 1 << 32);
        let q = &back.queues_mut()[0];
        assert_eq!((q.desc_table(), q.next_avail(), q.ready()), (0x1000, 17, true));
        let mut other = MmioTransport::new(2, 1 << 32, &[64]);
        assert!(other.restore(&saved).is_err(), "a queue of another size was taken");
        assert!(MmioTransport::new(2, 1 << 32, &[256, 256]).restore(&saved).is_err(), "two queues from one");
        let mut bad = saved.clone();
        bad.queues[0].sizes[1] = 100; // not a power of two
        assert!(MmioTransport::new(2, 1 << 32, &[256]).restore(&bad).is_err());
    }

    /// Any offset, any width, any value: the transport never panics, and a
    /// reset afterwards leaves it as new.
    #[test]
    fn fuzzed_register_accesses() {
        let mut t = MmioTransport::new(2, 1 << 32, &[256, 16]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = if x.is_multiple_of(4) { x >> 20 } else { (x >> 8) % 0x100 };
            let len = [0usize, 1, 2, 3, 4, 8, 16][(x >> 40) as usize % 7];
            let mut data: Vec<u8> = (0..len).map(|i| (x >> (i % 8)) as u8).collect();
            if x & 1 == 0 {
                t.write(offset, &data);
            } else {
                t.read(offset, &mut data);
            }
        }
        assert_eq!(write32(&mut t, 0x070, 0), MmioEvent::Reset);
        assert!(!t.is_live());
        assert_eq!(read32(&t, 0x000), MAGIC);
    }
}
