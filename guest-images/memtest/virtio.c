/*
 * virtio-mmio for memtest: finds the devices the VMM announces on the
 * command line (`virtio_mmio.device=4K@0xd0001000:5`, as Linux reads them),
 * sets each up and serves it by polling. Everything here runs at CPL 3 on
 * vCPU 0: the registers sit in the doorbell's uncached 2 MiB page of the
 * identity map, and each access exits to the VMM (queue kicks are caught
 * by KVM's ioeventfds without one).
 */

#include "virtio.h"

enum {
	MMIO_MAGIC = 0x000, /* "virt" */
	MMIO_VERSION = 0x004,
	MMIO_DEVICE_ID = 0x008,
	MMIO_DEVICE_FEATURES = 0x010,
	MMIO_DEVICE_FEATURES_SEL = 0x014,
	MMIO_DRIVER_FEATURES = 0x020,
	MMIO_DRIVER_FEATURES_SEL = 0x024,
	MMIO_QUEUE_SEL = 0x030,
	MMIO_QUEUE_NUM_MAX = 0x034,
	MMIO_QUEUE_NUM = 0x038,
	MMIO_QUEUE_READY = 0x044,
	MMIO_QUEUE_NOTIFY = 0x050,
	MMIO_STATUS = 0x070,
	MMIO_QUEUE_DESC = 0x080,
	MMIO_QUEUE_DRIVER = 0x090,
	MMIO_QUEUE_DEVICE = 0x0a0,
	MMIO_CONFIG = 0x100,
};

enum { S_ACKNOWLEDGE = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { ID_NET = 1, ID_BALLOON = 5, ID_VSOCK = 19 };

static u32 reg_read(u64 base, u64 offset)
{
	return *(volatile u32 *)(base + offset);
}

static void reg_write(u64 base, u64 offset, u32 value)
{
	*(volatile u32 *)(base + offset) = value;
}

static void reg_write64(u64 base, u64 offset, u64 value)
{
	reg_write(base, offset, (u32)value);
	reg_write(base, offset + 4, (u32)(value >> 32));
}

static void barrier(void)
{
	__asm__ volatile("" ::: "memory");
}

u64 virtio_start(u64 base, u64 wanted)
{
	reg_write(base, MMIO_STATUS, 0);
	reg_write(base, MMIO_STATUS, S_ACKNOWLEDGE);
	reg_write(base, MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	u64 offered = 0;
	for (u32 sel = 0; sel < 2; sel++) {
		reg_write(base, MMIO_DEVICE_FEATURES_SEL, sel);
		offered |= (u64)reg_read(base, MMIO_DEVICE_FEATURES) << (32 * sel);
	}
	u64 agreed = offered & (wanted | VIRTIO_F_VERSION_1);
	if (!(agreed & VIRTIO_F_VERSION_1))
		return 0;
	for (u32 sel = 0; sel < 2; sel++) {
		reg_write(base, MMIO_DRIVER_FEATURES_SEL, sel);
		reg_write(base, MMIO_DRIVER_FEATURES, (u32)(agreed >> (32 * sel)));
	}
	reg_write(base, MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(reg_read(base, MMIO_STATUS) & S_FEATURES_OK))
		return 0;
	return agreed;
}

void vq_setup(struct vq *q, u64 base, u32 index, struct vring *ring)
{
	u8 *p = (u8 *)ring;
	for (u64 i = 0; i < sizeof(*ring); i++)
		p[i] = 0;
	*q = (struct vq){ .ring = ring, .base = base, .index = index };
	reg_write(base, MMIO_QUEUE_SEL, index);
	u32 max = reg_read(base, MMIO_QUEUE_NUM_MAX);
	reg_write(base, MMIO_QUEUE_NUM, max < VQ_SIZE ? max : VQ_SIZE);
	reg_write64(base, MMIO_QUEUE_DESC, (u64)ring->desc);
	reg_write64(base, MMIO_QUEUE_DRIVER, (u64)&ring->avail);
	reg_write64(base, MMIO_QUEUE_DEVICE, (u64)&ring->used);
	reg_write(base, MMIO_QUEUE_READY, 1);
}

void virtio_ready(u64 base)
{
	reg_write(base, MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

void vq_post(struct vq *q, u16 id, void *buf, u32 len, int device_writes)
{
	struct vring *r = q->ring;
	r->desc[id] = (struct vring_desc){ (u64)buf, len, device_writes ? VIRTQ_DESC_F_WRITE : 0, 0 };
	r->avail.ring[q->avail_idx % VQ_SIZE] = id;
	barrier(); /* the entry before the index (x86 keeps stores in order) */
	*(volatile u16 *)&r->avail.idx = ++q->avail_idx;
}

void vq_kick(struct vq *q)
{
	barrier();
	reg_write(q->base, MMIO_QUEUE_NOTIFY, q->index);
}

int vq_used(struct vq *q, u32 *id, u32 *len)
{
	struct vring *r = q->ring;
	if (*(volatile u16 *)&r->used.idx == q->last_used)
		return 0;
	barrier(); /* the index before the entry */
	*id = r->used.ring[q->last_used % VQ_SIZE].id % VQ_SIZE;
	*len = r->used.ring[q->last_used % VQ_SIZE].len;
	q->last_used++;
	return 1;
}

void txq_setup(struct txq *t, u64 base, u32 index, struct vring *ring, u32 n)
{
	vq_setup(&t->q, base, index, ring);
	t->nfree = 0;
	for (u32 i = 0; i < n && i < VQ_SIZE; i++)
		t->free[t->nfree++] = (u16)i;
}

int txq_take(struct txq *t)
{
	u32 id, len;
	while (vq_used(&t->q, &id, &len))
		if (t->nfree < VQ_SIZE) /* a device that returns a buffer twice gets it once */
			t->free[t->nfree++] = (u16)id;
	return t->nfree ? t->free[--t->nfree] : -1;
}

u8 virtio_config8(u64 base, u64 offset)
{
	return *(volatile u8 *)(base + MMIO_CONFIG + offset);
}

/* "0xd0001000" -> the number. */
static u64 parse_hex(const char *s)
{
	u64 v = 0;
	if (s[0] == '0' && s[1] == 'x')
		s += 2;
	for (;; s++) {
		if (*s >= '0' && *s <= '9')
			v = v * 16 + (u64)(*s - '0');
		else if (*s >= 'a' && *s <= 'f')
			v = v * 16 + (u64)(*s - 'a' + 10);
		else
			return v;
	}
}

static int present;

void devices_init(void)
{
	static const char key[] = "virtio_mmio.device=";
	for (const char *w = cmdline(); w && *w;) {
		if (word_is(w, key)) {
			const char *at = w + sizeof(key) - 1;
			while (*at && *at != '@' && *at != ' ')
				at++;
			u64 base = *at == '@' ? parse_hex(at + 1) : 0;
			/* Only the VMM's slots, in the doorbell's uncached page. */
			if (base >= DOORBELL + PAGE_SIZE && base < DOORBELL + (2UL << 20) &&
			    reg_read(base, MMIO_MAGIC) == 0x74726976 && reg_read(base, MMIO_VERSION) == 2) {
				switch (reg_read(base, MMIO_DEVICE_ID)) {
				case ID_NET:
					net_setup(base);
					present |= net_present();
					break;
				case ID_VSOCK:
					vsock_setup(base);
					present |= vsock_present();
					break;
				case ID_BALLOON:
					balloon_setup(base); /* used synchronously: no polling */
					break;
				default:
					break;
				}
			}
		}
		w = next_word(w);
	}
}

int devices_present(void)
{
	return present;
}

u64 devices_poll(void)
{
	return present ? net_poll() + vsock_poll() : 0;
}
