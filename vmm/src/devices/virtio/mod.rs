//! virtio devices (virtio 1.x). The block device handles requests from a
//! queue; the virtio-mmio transport that connects it to guests is still to
//! come (issue 4).

pub mod block;
pub mod mmio;

/// Feature bit: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
