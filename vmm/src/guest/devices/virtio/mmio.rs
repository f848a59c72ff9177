//! The virtio-mmio transport (virtio 1.x, register layout version 2): the
//! registers a driver uses to negotiate features and set up queues, in
//! front of one device with one or more queues.
//!
//! Registers only, over the state every transport keeps ([`VirtioCore`]):
//! the owner routes MMIO accesses here and acts on what `write` returns
//! (a queue notification, a reset).

use virtio_queue::QueueT;

use super::common::{TransportEvent, VirtioCore};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x554d_4d56; // "VMMU"

pub const MMIO_SIZE: u64 = 0x1000;
/// Where the device's own configuration space starts.
pub const CONFIG_SPACE: u64 = 0x100;
/// The QueueNotify register's offset.
pub const QUEUE_NOTIFY: u64 = 0x50;

pub struct MmioTransport {
    pub core: VirtioCore,
}

impl MmioTransport {
    pub fn new(core: VirtioCore) -> MmioTransport {
        MmioTransport { core }
    }

    /// Reads a register (the owner serves the config space, from
    /// [`CONFIG_SPACE`] on).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let core = &self.core;
        let queue = core.selected();
        let value: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => core.device_id,
            0x00c => VENDOR,
            0x010 => core.device_features_word(),
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => core.interrupt_status,
            0x070 => core.status(),
            0x0fc => core.config_generation(),
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
    pub fn write(&mut self, offset: u64, data: &[u8]) -> TransportEvent {
        if data.len() != 4 {
            log::debug!("virtio-mmio: {}-byte write to register {offset:#x} ignored", data.len());
            return TransportEvent::None;
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        let core = &mut self.core;
        match offset {
            0x014 => core.features_sel = v,
            0x020 => core.set_driver_features_word(v),
            0x024 => core.driver_features_sel = v,
            0x030 => core.queue_sel = v,
            QUEUE_NOTIFY => return core.notify(v),
            0x064 => core.interrupt_status &= !v,
            0x070 => return core.set_status(v),
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.write_queue(offset, v),
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
        TransportEvent::None
    }

    /// A write to the selected queue's registers.
    fn write_queue(&mut self, offset: u64, v: u32) {
        let sel = self.core.queue_sel;
        let Some(queue) = self.core.selected_mut() else {
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
}

#[cfg(test)]
mod tests {
    use super::super::common::*;
    use super::*;

    fn transport(id: u32, features: u64, queues: &[u16]) -> MmioTransport {
        MmioTransport::new(VirtioCore::new(id, features, queues))
    }

    fn read32(t: &MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(t: &mut MmioTransport, offset: u64, v: u32) -> TransportEvent {
        t.write(offset, &v.to_le_bytes())
    }

    #[test]
    fn a_driver_can_negotiate_and_set_up_the_queue() {
        let features = (1u64 << 32) | (1 << 9);
        let mut t = transport(2, features, &[256, 64]);
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
        assert_eq!(t.core.driver_features(), features);
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
        assert!(!t.core.is_live());
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(write32(&mut t, 0x070, ok), TransportEvent::DriverOk(features));
        assert_eq!(write32(&mut t, 0x070, ok), TransportEvent::None, "started twice");
        assert!(t.core.is_live());
        assert_eq!(t.core.queues_mut()[0].desc_table(), 0x1000);
        assert_eq!((t.core.queues_mut()[1].desc_table(), t.core.queues_mut()[1].ready()), (0x5000, true));
        assert_eq!(write32(&mut t, 0x050, 0), TransportEvent::QueueNotify(0));
        assert_eq!(write32(&mut t, 0x050, 1), TransportEvent::QueueNotify(1));
        assert_eq!(write32(&mut t, 0x050, 2), TransportEvent::None);
        t.core.interrupt_status = INT_VRING;
        write32(&mut t, 0x064, INT_VRING);
        assert_eq!(read32(&t, 0x060), 0);
        assert_eq!(write32(&mut t, 0x070, 0), TransportEvent::Reset);
        assert!(!t.core.is_live() && read32(&t, 0x044) == 0);
    }

    /// A transport set up by a driver, saved and restored into a new one,
    /// reads the same; a saved state that does not fit is refused.
    #[test]
    fn its_state_survives_a_round_trip() {
        let mut t = transport(2, 1 << 32, &[256]);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(&mut t, 0x038, 128);
        write32(&mut t, 0x080, 0x1000);
        write32(&mut t, 0x090, 0x2000);
        write32(&mut t, 0x0a0, 0x3000);
        write32(&mut t, 0x044, 1);
        write32(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        t.core.queues_mut()[0].set_next_avail(17);
        let saved = t.core.save();
        let mut back = transport(2, 1 << 32, &[256]);
        back.core.restore(&saved).unwrap();
        assert!(back.core.is_live());
        assert_eq!(back.core.driver_features(), 1 << 32);
        let q = &back.core.queues_mut()[0];
        assert_eq!((q.desc_table(), q.next_avail(), q.ready()), (0x1000, 17, true));
        let mut other = transport(2, 1 << 32, &[64]);
        assert!(other.core.restore(&saved).is_err(), "a queue of another size was taken");
        assert!(transport(2, 1 << 32, &[256, 256]).core.restore(&saved).is_err(), "two queues from one");
        let mut bad = saved.clone();
        bad.queues[0].sizes[1] = 100; // not a power of two
        assert!(transport(2, 1 << 32, &[256]).core.restore(&bad).is_err());
    }

    /// Any offset, any width, any value: the transport never panics, and a
    /// reset afterwards leaves it as new.
    #[test]
    fn fuzzed_register_accesses() {
        let mut t = transport(2, 1 << 32, &[256, 16]);
        let mut rng = crate::guest::devices::XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            let x = rng.next_u64();
            let offset = if x.is_multiple_of(4) { x >> 20 } else { (x >> 8) % 0x100 };
            let len = [0usize, 1, 2, 3, 4, 8, 16][(x >> 40) as usize % 7];
            let mut data: Vec<u8> = (0..len).map(|i| (x >> (i % 8)) as u8).collect();
            if x & 1 == 0 {
                t.write(offset, &data);
            } else {
                t.read(offset, &mut data);
            }
        }
        assert_eq!(write32(&mut t, 0x070, 0), TransportEvent::Reset);
        assert!(!t.core.is_live());
        assert_eq!(read32(&t, 0x000), MAGIC);
    }
}
