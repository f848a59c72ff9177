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

static inline void copy(u8 *to, const u8 *from, u64 n)
{
	while (n--)
		*to++ = *from++;
}

/* A transmit queue: its buffers go out and come back (used) in any order. */
struct txq {
	struct vq q;
	u16 free[VQ_SIZE];
	u32 nfree;
};
/* Sets queue `index` up with buffers 0..n-1 free. */
void txq_setup(struct txq *t, u64 base, u32 index, struct vring *ring, u32 n);
/* A free buffer's index (taking back those the device is done with), or
 * -1 if all are in flight. */
int txq_take(struct txq *t);

/* The drivers (net.c, vsock.c): set up the device found at `base`, serve
 * it, say whether it is in use. */
void net_setup(u64 base);
u64 net_poll(void);
int net_present(void);
void vsock_setup(u64 base);
u64 vsock_poll(void);
int vsock_present(void);

/* balloon.c: pages given back to the host and taken again, by any vCPU,
 * each call returning once the device is done. */
void balloon_setup(u64 base);
int balloon_present(void);
int balloon_reporting(void);
void balloon_pages(u64 addr, u64 n, int inflate);
void balloon_report(u64 addr, u64 n);
/* The host's target, in pages; statistics posted again if the device
 * wants fresh ones. memtest.c says what they are. */
u32 balloon_target(void);
void balloon_poll_stats(void);
u64 balloon_free_bytes(void);
u64 balloon_total_bytes(void);

#endif
