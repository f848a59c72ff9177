/* The virtio-mmio transport (virtio 1.x, "modern") and split virtqueues,
 * driven by polling from CPL 3: memtest takes no interrupts. Each queue's
 * descriptor i always points at its driver's buffer i, so a buffer is
 * posted again by its index. */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "memtest.h"

#define VQ_SIZE 32 /* descriptors per queue: the device offers more, we ask for this many */

#define VIRTIO_F_VERSION_1 (1UL << 32)
#define VIRTQ_DESC_F_WRITE 2

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags, next;
};

/* One queue's rings, in the image (never a test page). */
struct vring {
	struct vring_desc desc[VQ_SIZE];
	struct {
		u16 flags, idx, ring[VQ_SIZE], used_event;
	} avail;
	struct {
		u16 flags, idx;
		struct {
			u32 id, len;
		} ring[VQ_SIZE];
		u16 avail_event;
	} used __attribute__((aligned(4)));
} __attribute__((aligned(4096)));

struct vq {
	struct vring *ring;
	u64 base; /* the device's registers */
	u32 index;
	u16 avail_idx, last_used;
};

/* Resets the device at `base`, negotiates `wanted` (VERSION_1 is always
 * asked for) and returns the features agreed, or 0 if the device refused. */
u64 virtio_start(u64 base, u64 wanted);
/* Sets queue `index` up on `ring` (zeroed here). */
void vq_setup(struct vq *q, u64 base, u32 index, struct vring *ring);
/* DRIVER_OK: the device may use the queues. */
void virtio_ready(u64 base);
/* Hands buffer `id` (len bytes at buf) to the device; `device_writes` for a
 * receive buffer. The device sees it at the next vq_kick. */
void vq_post(struct vq *q, u16 id, void *buf, u32 len, int device_writes);
void vq_kick(struct vq *q);
/* The next buffer the device has used: 1 with its id and the bytes it
 * wrote, or 0 if none. */
int vq_used(struct vq *q, u32 *id, u32 *len);
/* The device-specific configuration space, byte `offset`. */
u8 virtio_config8(u64 base, u64 offset);

/* The drivers (net.c, vsock.c): set up the device found at `base`. */
void net_setup(u64 base);
u64 net_poll(void);
int net_present(void);

#endif
