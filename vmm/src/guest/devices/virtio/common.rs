//! What every virtio transport keeps alike (virtio 1.x 2 and 4): the
//! device's identity and features, the driver's negotiated features and
//! status, the queues being set up, and the interrupt status. The
//! transports ([`super::mmio`], [`super::pci`]) only lay these out as
//! registers.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// Device status bits (virtio 1.x 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

/// The interrupt status bits for "the used ring changed" and "the
/// configuration changed".
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// What the owner must do after a register write.
#[derive(Debug, PartialEq, Eq)]
pub enum TransportEvent {
    None,
    /// The driver kicked this queue (when not wired to an ioeventfd).
    QueueNotify(usize),
    /// The driver wrote status 0: the device must forget its state.
    Reset,
    /// The driver set DRIVER_OK: the device may start, with the features
    /// it negotiated.
    DriverOk(u64),
}

pub struct VirtioCore {
    pub device_id: u32,
    device_features: u64,
    pub features_sel: u32,
    pub driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    pub interrupt_status: u32,
    pub queue_sel: u32,
    queues: Vec<Queue>,
    /// Changes with every change of the device's configuration, so a
    /// driver reading several fields can tell it read them at once.
    config_generation: u32,
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
    pub(super) queues: Vec<QueueRegs>,
    #[serde(default)]
    config_generation: u32,
}

/// Where one queue stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueRegs {
    /// max size, size, next avail, next used.
    pub(super) sizes: [u16; 4],
    ready: bool,
    event_idx: bool,
    /// Descriptor table, available ring, used ring.
    addresses: [u64; 3],
}

impl VirtioCore {
    /// A device of type `device_id` offering `device_features`, with a
    /// queue of each of `queue_max` sizes (powers of two).
    pub fn new(device_id: u32, device_features: u64, queue_max: &[u16]) -> VirtioCore {
        VirtioCore {
            device_id,
            device_features,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            queue_sel: 0,
            queues: queue_max.iter().map(|&n| Queue::new(n).expect("a power-of-two queue size")).collect(),
            config_generation: 0,
        }
    }

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
            config_generation: self.config_generation,
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
        self.config_generation = saved.config_generation;
        Ok(())
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// The queue the driver selected, if it exists.
    pub fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    pub fn selected_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The device changed its configuration: a new generation, and the
    /// interrupt status says so (the transport raises the interrupt).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= INT_CONFIG;
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Whether the driver finished setting up and may use the device.
    pub fn is_live(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The 32 bits of the device's features that `features_sel` selects.
    pub fn device_features_word(&self) -> u32 {
        match self.features_sel {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 bits of the driver's features that `driver_features_sel`
    /// selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver accepts features (of the word `driver_features_sel`
    /// selects): only what the device offers is taken.
    pub fn set_driver_features_word(&mut self, v: u32) {
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | (u64::from(v) & self.device_features),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | ((u64::from(v) << 32) & self.device_features)
            }
            _ => {}
        }
    }

    /// The driver writes the device status.
    pub fn set_status(&mut self, v: u32) -> TransportEvent {
        if v == 0 {
            self.reset();
            return TransportEvent::Reset;
        }
        let starting = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if starting && v & STATUS_FAILED == 0 {
            return TransportEvent::DriverOk(self.driver_features);
        }
        TransportEvent::None
    }

    /// A kick of queue `v`, if the device has it.
    pub fn notify(&self, v: u32) -> TransportEvent {
        if (v as usize) < self.queues.len() {
            return TransportEvent::QueueNotify(v as usize);
        }
        log::debug!("virtio: kick of queue {v}, which the device does not have");
        TransportEvent::None
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
