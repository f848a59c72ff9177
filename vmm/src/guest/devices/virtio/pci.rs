//! The virtio-pci transport (virtio 1.x 4.1, modern only): a PCI function
//! whose capabilities point into its one memory BAR, laid out as
//!
//! | BAR offset | what |
//! | --- | --- |
//! | 0x0000 | common configuration (features, status, queues) |
//! | 0x0800 | ISR status (read clears) |
//! | 0x1000 | the device's own configuration |
//! | 0x2000 | queue notifications, 4 bytes per queue |
//! | 0x3000 | MSI-X table (a vector per queue, one for config changes) |
//! | 0x3800 | MSI-X pending bits |
//!
//! State and decoding only, over [`VirtioCore`]; the owner
//! ([`super::VirtioSlot`]) serves the device's configuration, kicks and
//! the messages the MSI-X table lets go.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::common::{TransportEvent, VirtioCore};
use crate::guest::devices::pci::msix::{MsiMessage, MsixTable, CONTROL_ENABLE, CONTROL_FUNCTION_MASK, NO_VECTOR};
use crate::guest::devices::pci::{Bar, ConfigSpace, BAR0};

/// Red Hat's vendor ID, which virtio devices use; a modern device's ID is
/// 0x1040 plus its virtio type.
const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_DEVICE_BASE: u16 = 0x1040;

pub const BAR_SIZE: u32 = 0x4000;
pub const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
pub const ISR: u64 = 0x0800;
pub const DEVICE_CONFIG: u64 = 0x1000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
pub const NOTIFY: u64 = 0x2000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x3000;
#[cfg(test)]
pub const MSIX_TABLE_AT: u64 = MSIX_TABLE;
const MSIX_PBA: u64 = 0x3800;

/// Capability offsets in configuration space.
const CAP_MSIX: usize = 0x40;
const CAP_COMMON: usize = 0x50;
const CAP_ISR: usize = 0x60;
const CAP_DEVICE: usize = 0x70;
const CAP_NOTIFY: usize = 0x80;
const MSIX_CONTROL: usize = CAP_MSIX + 2;

/// Capability IDs and virtio's configuration types.
const CAP_ID_MSIX: u8 = 0x11;
const CAP_ID_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// Where a BAR access lands.
pub enum Region {
    Common(u64),
    Isr,
    DeviceConfig(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
    None,
}

pub struct PciTransport {
    pub core: VirtioCore,
    config: ConfigSpace,
    bar: Bar,
    msix: MsixTable,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

/// What a snapshot keeps of the function beside the core's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PciState {
    /// The configuration header (only its writable bits are taken back).
    config: Vec<u8>,
    bar: u32,
    msix: MsixTable,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl PciTransport {
    /// The function for `core`'s device, its BAR at `bar_address`.
    pub fn new(core: VirtioCore, bar_address: u64) -> PciTransport {
        let queues = core.queues().len();
        let class = match core.device_id {
            1 => [0x02, 0x00, 0x00], // network controller
            2 => [0x01, 0x80, 0x00], // other mass storage
            _ => [0xff, 0x00, 0x00],
        };
        let device_id = MODERN_DEVICE_BASE + core.device_id as u16;
        let mut config = ConfigSpace::new(VIRTIO_VENDOR, device_id, class, CAP_MSIX as u8);
        config.set16(crate::guest::devices::pci::SUBSYSTEM_VENDOR_ID, VIRTIO_VENDOR);
        config.set16(crate::guest::devices::pci::SUBSYSTEM_VENDOR_ID + 2, device_id);
        let msix = MsixTable::new(queues + 1);
        // MSI-X: message control (enable and function mask writable), then
        // table and pending bits in BAR 0.
        let mut cap = vec![CAP_ID_MSIX, CAP_COMMON as u8];
        cap.extend_from_slice(&msix.control().to_le_bytes());
        cap.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        cap.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        config.put(CAP_MSIX, &cap, &[0, 0, 0, 0xc0]);
        let virtio_caps = [
            (CAP_COMMON, CFG_COMMON, COMMON, COMMON_LEN, CAP_ISR),
            (CAP_ISR, CFG_ISR, ISR, 1, CAP_DEVICE),
            (CAP_DEVICE, CFG_DEVICE, DEVICE_CONFIG, DEVICE_CONFIG_LEN, CAP_NOTIFY),
            (CAP_NOTIFY, CFG_NOTIFY, NOTIFY, queues as u64 * u64::from(NOTIFY_MULTIPLIER), 0),
        ];
        for (at, cfg_type, offset, len, next) in virtio_caps {
            let cap_len = if cfg_type == CFG_NOTIFY { 20 } else { 16 };
            let mut cap = vec![CAP_ID_VENDOR, next as u8, cap_len, cfg_type, 0, 0, 0, 0];
            cap.extend_from_slice(&(offset as u32).to_le_bytes());
            cap.extend_from_slice(&(len as u32).to_le_bytes());
            if cfg_type == CFG_NOTIFY {
                cap.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
            }
            config.put(at, &cap, &[]);
        }
        let bar = Bar { address: bar_address as u32, size: BAR_SIZE };
        PciTransport { core, config, bar, msix, config_vector: NO_VECTOR, queue_vectors: vec![NO_VECTOR; queues] }
    }

    pub fn save(&self) -> PciState {
        PciState {
            config: self.config.bytes().to_vec(),
            bar: self.bar.address,
            msix: self.msix.clone(),
            config_vector: self.config_vector,
            queue_vectors: self.queue_vectors.clone(),
        }
    }

    /// Takes a saved state, checked as the registers would check it.
    pub fn restore(&mut self, saved: &PciState) -> Result<(), String> {
        if saved.queue_vectors.len() != self.queue_vectors.len() {
            return Err(format!(
                "{} saved queue vectors for {} queues",
                saved.queue_vectors.len(),
                self.queue_vectors.len()
            ));
        }
        self.msix.restore(&saved.msix)?;
        self.config.restore(&saved.config);
        self.config.set16(MSIX_CONTROL, self.msix.control());
        self.bar.write(saved.bar);
        let vector = |v: u16| if usize::from(v) < self.msix.vectors() { v } else { NO_VECTOR };
        self.config_vector = vector(saved.config_vector);
        self.queue_vectors = saved.queue_vectors.iter().map(|&v| vector(v)).collect();
        Ok(())
    }

    /// Where the BAR decodes now, if memory decoding is on.
    pub fn bar(&self) -> Option<(u64, u64)> {
        self.config.memory_enabled().then_some((u64::from(self.bar.address), u64::from(self.bar.size)))
    }

    /// Where the queue notifications are in the BAR, decoding or not.
    pub fn notify_base(&self) -> u64 {
        u64::from(self.bar.address) + NOTIFY
    }

    pub fn config_read(&self, offset: u64, data: &mut [u8]) {
        if offset == BAR0 as u64 && data.len() == 4 {
            return data.copy_from_slice(&self.bar.read().to_le_bytes());
        }
        self.config.read(offset, data);
    }

    /// A configuration write; returns the messages an MSI-X unmask let go.
    pub fn config_write(&mut self, offset: u64, data: &[u8]) -> Vec<MsiMessage> {
        if offset == BAR0 as u64 && data.len() == 4 {
            self.bar.write(u32::from_le_bytes(data.try_into().unwrap()));
            return Vec::new();
        }
        let before = self.config.get16(MSIX_CONTROL);
        self.config.write(offset, data);
        let control = self.config.get16(MSIX_CONTROL);
        if control == before {
            return Vec::new();
        }
        let released = self.msix.set_control(control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK));
        self.config.set16(MSIX_CONTROL, self.msix.control());
        released
    }

    pub fn region(offset: u64) -> Region {
        match offset {
            COMMON..0x0800 => Region::Common(offset - COMMON),
            ISR => Region::Isr,
            DEVICE_CONFIG..0x2000 => Region::DeviceConfig(offset - DEVICE_CONFIG),
            NOTIFY..0x3000 => Region::Notify(offset - NOTIFY),
            MSIX_TABLE..MSIX_PBA => Region::MsixTable(offset - MSIX_TABLE),
            MSIX_PBA..0x4000 => Region::MsixPba(offset - MSIX_PBA),
            _ => Region::None,
        }
    }

    pub fn read_common(&self, offset: u64, data: &mut [u8]) {
        let core = &self.core;
        let queue = core.selected();
        let sel = core.queue_sel as usize;
        let value: u64 = match offset {
            0x00 => core.features_sel.into(),
            0x04 => core.device_features_word().into(),
            0x08 => core.driver_features_sel.into(),
            0x0c => core.driver_features_word().into(),
            0x10 => self.config_vector.into(),
            0x12 => core.queues().len() as u64,
            0x14 => core.status().into(),
            0x15 => u64::from(core.config_generation() as u8),
            0x16 => core.queue_sel.into(),
            0x18 => queue.map_or(0, |q| q.size().into()),
            0x1a => self.queue_vectors.get(sel).copied().unwrap_or(NO_VECTOR).into(),
            0x1c => queue.map_or(0, |q| q.ready().into()),
            0x1e => queue.map_or(0, |_| sel as u64), // notify offset: the queue's index
            0x20 => queue.map_or(0, |q| q.desc_table()),
            0x24 => queue.map_or(0, |q| q.desc_table() >> 32),
            0x28 => queue.map_or(0, |q| q.avail_ring()),
            0x2c => queue.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => queue.map_or(0, |q| q.used_ring()),
            0x34 => queue.map_or(0, |q| q.used_ring() >> 32),
            _ => {
                log::debug!("virtio-pci: read of unknown common register {offset:#x}");
                0
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub fn write_common(&mut self, offset: u64, data: &[u8]) -> TransportEvent {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(bytes);
        let (v32, v16) = (v as u32, v as u16);
        let vectors = self.msix.vectors();
        let vector = |v: u16| if usize::from(v) < vectors { v } else { NO_VECTOR };
        let core = &mut self.core;
        let sel = core.queue_sel as usize;
        match offset {
            0x00 => core.features_sel = v32,
            0x08 => core.driver_features_sel = v32,
            0x0c => core.set_driver_features_word(v32),
            0x10 => self.config_vector = vector(v16),
            0x14 => return core.set_status(v32 & 0xff),
            0x16 => core.queue_sel = v16.into(),
            0x1a => {
                if let Some(slot) = self.queue_vectors.get_mut(sel) {
                    *slot = vector(v16);
                }
            }
            0x18 | 0x1c | 0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                let Some(queue) = core.selected_mut() else {
                    log::debug!(
                        "virtio-pci: write to common register {offset:#x} of queue {sel}, which does not exist"
                    );
                    return TransportEvent::None;
                };
                match offset {
                    0x18 => queue.set_size(v16),
                    0x1c => queue.set_ready(v16 == 1),
                    0x20 => queue.set_desc_table_address(Some(v32), (n == 8).then_some((v >> 32) as u32)),
                    0x24 => queue.set_desc_table_address(None, Some(v32)),
                    0x28 => queue.set_avail_ring_address(Some(v32), (n == 8).then_some((v >> 32) as u32)),
                    0x2c => queue.set_avail_ring_address(None, Some(v32)),
                    0x30 => queue.set_used_ring_address(Some(v32), (n == 8).then_some((v >> 32) as u32)),
                    _ => queue.set_used_ring_address(None, Some(v32)),
                }
            }
            _ => log::debug!("virtio-pci: write to read-only or unknown common register {offset:#x}"),
        }
        TransportEvent::None
    }

    /// The ISR: reading it clears it.
    pub fn read_isr(&mut self, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.core.interrupt_status as u8;
        }
        self.core.interrupt_status = 0;
    }

    pub fn notify(&self, offset: u64) -> TransportEvent {
        self.core.notify((offset / u64::from(NOTIFY_MULTIPLIER)) as u32)
    }

    pub fn msix(&self) -> &MsixTable {
        &self.msix
    }

    pub fn msix_mut(&mut self) -> &mut MsixTable {
        &mut self.msix
    }

    /// The messages for the queues in `queues` (bit i: queue i) that may
    /// go now (the rest wait as pending, or go nowhere with MSI-X off).
    /// The message for a configuration change, if the driver set a vector.
    pub fn raise_config(&mut self) -> Vec<MsiMessage> {
        match self.config_vector {
            NO_VECTOR => Vec::new(),
            vector => self.msix.trigger(vector).into_iter().collect(),
        }
    }

    pub fn raise(&mut self, queues: u32) -> Vec<MsiMessage> {
        let mut out = Vec::new();
        for (i, &vector) in self.queue_vectors.iter().enumerate() {
            if queues & (1 << i) != 0 && vector != NO_VECTOR {
                out.extend(self.msix.trigger(vector));
            }
        }
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::devices::virtio::common::*;

    fn transport() -> PciTransport {
        PciTransport::new(VirtioCore::new(2, 1 << 32 | 1 << 9, &[128, 16]), 0xc010_0000)
    }

    fn cfg32(t: &PciTransport, at: u64) -> u32 {
        let mut b = [0u8; 4];
        t.config_read(at, &mut b);
        u32::from_le_bytes(b)
    }

    fn common(t: &mut PciTransport, at: u64, v: u64, len: usize) -> TransportEvent {
        t.write_common(at, &v.to_le_bytes()[..len])
    }

    fn read_common(t: &PciTransport, at: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        t.read_common(at, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Walks the capability list as Linux's virtio-pci does and finds each
    /// structure where the table above says.
    #[test]
    fn the_capabilities_point_at_the_bar_regions() {
        let t = transport();
        assert_eq!(cfg32(&t, 0), 0x1042_1af4);
        assert_eq!(cfg32(&t, 0x2c), 0x1042_1af4, "subsystem");
        assert_eq!(cfg32(&t, 0x04) >> 16 & 0x10, 0x10, "a capabilities list");
        let mut found = Vec::new();
        let mut at = cfg32(&t, 0x34) as u64 & 0xff;
        while at != 0 {
            let head = cfg32(&t, at);
            let (id, next) = (head & 0xff, (head >> 8) & 0xff);
            if id == u32::from(CAP_ID_VENDOR) {
                found.push(((head >> 24) as u8, cfg32(&t, at + 8), cfg32(&t, at + 12)));
            } else {
                assert_eq!(id, u32::from(CAP_ID_MSIX));
                assert_eq!(head >> 16 & 0x7ff, 2, "three vectors: two queues and config");
                assert_eq!(cfg32(&t, at + 4), MSIX_TABLE as u32);
            }
            at = u64::from(next);
        }
        assert_eq!(found, vec![(1, 0, 0x38), (3, 0x800, 1), (4, 0x1000, 0x1000), (2, 0x2000, 8)]);
    }

    #[test]
    fn a_driver_sets_up_queues_and_vectors_through_the_common_config() {
        let mut t = transport();
        assert_eq!(read_common(&t, 0x12, 2), 2, "two queues");
        common(&mut t, 0x00, 1, 4);
        assert_eq!(read_common(&t, 0x04, 4), 1);
        common(&mut t, 0x08, 1, 4);
        common(&mut t, 0x0c, 1, 4);
        common(&mut t, 0x16, 1, 2);
        assert_eq!(read_common(&t, 0x18, 2), 16);
        assert_eq!(read_common(&t, 0x1e, 2), 1, "queue 1 notifies at offset 1");
        common(&mut t, 0x20, 0x1_2345_6000, 8);
        common(&mut t, 0x28, 0x7000, 4);
        common(&mut t, 0x2c, 1, 4);
        common(&mut t, 0x1a, 1, 2);
        assert_eq!(read_common(&t, 0x1a, 2), 1);
        common(&mut t, 0x1a, 9, 2);
        assert_eq!(read_common(&t, 0x1a, 2), u64::from(NO_VECTOR), "a vector the table lacks");
        common(&mut t, 0x1a, 2, 2);
        common(&mut t, 0x1c, 1, 2);
        assert_eq!(read_common(&t, 0x20, 4), 0x2345_6000);
        assert_eq!(read_common(&t, 0x24, 4), 1);
        assert_eq!(t.core.queues()[1].avail_ring(), 0x1_0000_7000);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(common(&mut t, 0x14, ok.into(), 1), TransportEvent::DriverOk(1 << 32));
        assert_eq!(t.notify(4), TransportEvent::QueueNotify(1));
        assert_eq!(t.notify(8), TransportEvent::None);
        // Vector 2 programmed and MSI-X on: queue 1's interrupt goes.
        t.msix_mut().write_table(32, &0xfee0_0000u32.to_le_bytes());
        t.msix_mut().write_table(40, &0x31u32.to_le_bytes());
        t.msix_mut().write_table(44, &0u32.to_le_bytes());
        assert!(t.raise(0b10).is_empty(), "MSI-X still off");
        let control = (CONTROL_ENABLE as u32) << 16;
        t.config_write(CAP_MSIX as u64, &(control | 0x5011).to_le_bytes());
        assert_eq!(cfg32(&t, CAP_MSIX as u64) >> 16, u32::from(CONTROL_ENABLE) | 2, "the table size stays");
        assert_eq!(t.raise(0b10), vec![MsiMessage { address: 0xfee0_0000, data: 0x31 }]);
        assert!(t.raise(0b01).is_empty(), "queue 0 has no vector");
        t.core.interrupt_status = INT_VRING;
        let mut isr = [0u8; 1];
        t.read_isr(&mut isr);
        assert_eq!((isr[0], t.core.interrupt_status), (1, 0), "reading the ISR clears it");
        assert_eq!(common(&mut t, 0x14, 0, 1), TransportEvent::Reset);
    }

    #[test]
    fn its_state_survives_a_round_trip_and_a_bad_one_is_refused() {
        let mut t = transport();
        t.config_write(0x04, &2u16.to_le_bytes());
        t.config_write(BAR0 as u64, &0xc080_0000u32.to_le_bytes());
        common(&mut t, 0x1a, 1, 2);
        t.config_write(CAP_MSIX as u64 + 2, &CONTROL_ENABLE.to_le_bytes());
        let saved = t.save();
        let mut back = transport();
        back.restore(&saved).unwrap();
        assert_eq!(back.bar(), Some((0xc080_0000, u64::from(BAR_SIZE))));
        assert!(back.msix().is_enabled());
        assert_eq!(read_common(&back, 0x1a, 2), 1);
        let mut bad = saved.clone();
        bad.queue_vectors.push(0);
        assert!(transport().restore(&bad).is_err());
        // The read-only header cannot be changed through a state file.
        let mut forged = saved;
        forged.config[0] = 0;
        let mut back = transport();
        back.restore(&forged).unwrap();
        assert_eq!(cfg32(&back, 0), 0x1042_1af4);
    }

    #[test]
    fn fuzzed_bar_and_config_accesses() {
        let mut t = transport();
        let mut rng = crate::guest::devices::XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..100_000 {
            let x = rng.next_u64();
            let len = [1usize, 2, 4, 8][(x >> 40) as usize % 4];
            let mut data: Vec<u8> = (0..len).map(|i| (x >> (8 * i)) as u8).collect();
            let offset = (x >> 8) % 0x4100;
            match (x & 3, PciTransport::region(offset)) {
                (0, Region::Common(at)) => {
                    t.write_common(at, &data);
                }
                (1, Region::Common(at)) => t.read_common(at, &mut data),
                (0, Region::MsixTable(at)) => {
                    t.msix_mut().write_table(at, &data);
                }
                (2, _) => {
                    t.config_write(offset % 0x100, &data);
                }
                (3, _) => t.config_read(offset % 0x100, &mut data),
                _ => {}
            }
            t.raise((x >> 20) as u32);
        }
    }
}
