//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! registers a driver uses to negotiate features and set up queues, in
//! front of one device with one queue.
//!
//! State only: the owner routes MMIO accesses here and acts on what
//! `write` returns (a queue notification, a reset).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4d56; // "VMMU"

pub const MMIO_SIZE: u64 = 0x1000;

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
    /// The driver kicked the queue (when not wired to an ioeventfd).
    QueueNotify,
    /// The driver wrote status 0: the device must forget its state.
    Reset,
}

pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    config: Vec<u8>,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    pub interrupt_status: u32,
    queue: Queue,
    queue_max: u16,
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
    /// max size, size, next avail, next used.
    queue_sizes: [u16; 4],
    queue_ready: bool,
    queue_event_idx: bool,
    /// Descriptor table, available ring, used ring.
    queue_addresses: [u64; 3],
}

impl MmioTransport {
    pub fn save(&self) -> TransportState {
        let q = self.queue.state();
        TransportState {
            features_sel: self.features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            queue_sizes: [q.max_size, q.size, q.next_avail, q.next_used],
            queue_ready: q.ready,
            queue_event_idx: q.event_idx_enabled,
            queue_addresses: [q.desc_table, q.avail_ring, q.used_ring],
        }
    }

    /// Takes a saved state, checked as the registers would check it (a
    /// state file is input like any other).
    pub fn restore(&mut self, saved: &TransportState) -> Result<(), String> {
        let [max_size, size, next_avail, next_used] = saved.queue_sizes;
        if max_size != self.queue_max {
            return Err(format!("the saved queue has {max_size} entries, the device {}", self.queue_max));
        }
        let [desc_table, avail_ring, used_ring] = saved.queue_addresses;
        let state = QueueState {
            max_size,
            next_avail,
            next_used,
            event_idx_enabled: saved.queue_event_idx,
            size,
            ready: saved.queue_ready,
            desc_table,
            avail_ring,
            used_ring,
        };
        self.queue = Queue::try_from(state).map_err(|e| format!("the saved queue: {e:?}"))?;
        self.features_sel = saved.features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.driver_features = saved.driver_features & self.device_features;
        self.status = saved.status;
        self.interrupt_status = saved.interrupt_status;
        Ok(())
    }

    pub fn new(device_id: u32, device_features: u64, config: Vec<u8>, queue_max: u16) -> MmioTransport {
        MmioTransport {
            device_id,
            device_features,
            config,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            queue: Queue::new(queue_max).expect("a power-of-two queue size"),
            queue_max,
        }
    }

    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Whether the driver finished setting up and may use the queue.
    pub fn is_live(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0 && self.queue.ready()
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let at = (offset - 0x100) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(at + i).copied().unwrap_or(0);
            }
            return;
        }
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
            0x034 => u32::from(self.queue_max),
            0x044 => u32::from(self.queue.ready()),
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

    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        if offset >= 0x100 {
            log::debug!("virtio-mmio: write to read-only config space ignored");
            return MmioEvent::None;
        }
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
            0x030 => {
                if v != 0 {
                    log::debug!("virtio-mmio: queue {v} selected; this device has one queue");
                }
            }
            0x038 => self.queue.set_size(v as u16),
            0x044 => self.queue.set_ready(v == 1),
            0x050 => return MmioEvent::QueueNotify,
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                    return MmioEvent::Reset;
                }
                self.status = v;
            }
            0x080 => self.queue.set_desc_table_address(Some(v), None),
            0x084 => self.queue.set_desc_table_address(None, Some(v)),
            0x090 => self.queue.set_avail_ring_address(Some(v), None),
            0x094 => self.queue.set_avail_ring_address(None, Some(v)),
            0x0a0 => self.queue.set_used_ring_address(Some(v), None),
            0x0a4 => self.queue.set_used_ring_address(None, Some(v)),
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
        MmioEvent::None
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.interrupt_status = 0;
        self.features_sel = 0;
        self.driver_features_sel = 0;
        self.queue.reset();
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
        let mut t = MmioTransport::new(2, features, 1024u64.to_le_bytes().to_vec(), 256);
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
        assert!(!t.is_live());
        write32(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(t.is_live());
        assert_eq!(t.queue_mut().desc_table(), 0x1000);
        assert_eq!(write32(&mut t, 0x050, 0), MmioEvent::QueueNotify);
        // Config space: capacity 1024 sectors, little endian.
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 1024);
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
        let mut t = MmioTransport::new(2, 1 << 32, vec![0; 8], 256);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(&mut t, 0x038, 128);
        write32(&mut t, 0x080, 0x1000);
        write32(&mut t, 0x090, 0x2000);
        write32(&mut t, 0x0a0, 0x3000);
        write32(&mut t, 0x044, 1);
        write32(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        t.queue_mut().set_next_avail(17);
        let saved = t.save();
        let mut back = MmioTransport::new(2, 1 << 32, vec![0; 8], 256);
        back.restore(&saved).unwrap();
        assert!(back.is_live());
        assert_eq!(back.driver_features(), 1 << 32);
        assert_eq!((back.queue_mut().desc_table(), back.queue_mut().next_avail()), (0x1000, 17));
        let mut other = MmioTransport::new(2, 1 << 32, vec![0; 8], 64);
        assert!(other.restore(&saved).is_err(), "a queue of another size was taken");
        let mut bad = saved.clone();
        bad.queue_sizes[1] = 100; // not a power of two
        assert!(MmioTransport::new(2, 1 << 32, vec![0; 8], 256).restore(&bad).is_err());
    }

    /// Any offset, any width, any value: the transport never panics, and a
    /// reset afterwards leaves it as new.
    #[test]
    fn fuzzed_register_accesses() {
        let mut t = MmioTransport::new(2, 1 << 32, 1024u64.to_le_bytes().to_vec(), 256);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = if x.is_multiple_of(4) { x >> 20 } else { (x >> 8) % 0x200 };
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
