/*
 * A polled virtio-net driver that answers what a host sends a guest's
 * address: ARP requests, ICMP echo requests (ping) and UDP datagrams, each
 * echoed back to its sender unchanged. The address comes from the same
 * `ip=ADDR::GW:MASK::eth0:off` word a Linux guest reads. Buffers live in the
 * image (not test pages), one 1536-byte buffer per descriptor: no mergeable
 * buffers, no offloads, so every frame arrives whole and checksummed.
 */

#include "virtio.h"

#define VIRTIO_NET_F_MAC (1UL << 5)
#define HDR 12 /* struct virtio_net_hdr with num_buffers (virtio 1.x) */
#define BUF 1536 /* a header and a 1514-byte frame */
enum { RX = 0, TX = 1 };

static struct vring rx_ring, tx_ring;
static u8 rx_buf[VQ_SIZE][BUF] __attribute__((aligned(64)));
static u8 tx_buf[VQ_SIZE][BUF] __attribute__((aligned(64)));

static struct {
	int present;
	struct vq rx;
	struct txq tx;
	u8 mac[6], ip[4];
} net;

int net_present(void)
{
	return net.present;
}

static u16 be16(const u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

static void put_be16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static int same(const u8 *a, const u8 *b, u64 n)
{
	while (n--)
		if (*a++ != *b++)
			return 0;
	return 1;
}

/* The Internet checksum of n bytes. */
static u16 checksum(const u8 *p, u64 n)
{
	u64 sum = 0;
	for (u64 i = 0; i + 1 < n; i += 2)
		sum += be16(p + i);
	if (n & 1)
		sum += (u64)p[n - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

/* "10.0.0.2::..." -> the four bytes; 0 if it is not an address. */
static int parse_ip(const char *s, u8 ip[4])
{
	for (int i = 0; i < 4; i++) {
		if (*s < '0' || *s > '9')
			return 0;
		u64 v = parse_uint(s);
		if (v > 255)
			return 0;
		ip[i] = (u8)v;
		while (*s >= '0' && *s <= '9')
			s++;
		if (i < 3 && *s++ != '.')
			return 0;
	}
	return 1;
}

static void put_ip(const u8 ip[4])
{
	for (int i = 0; i < 4; i++) {
		putdec(ip[i]);
		if (i < 3)
			putc('.');
	}
}

void net_setup(u64 base)
{
	int have_ip = 0;
	for (const char *w = cmdline(); w && *w;) {
		if (word_is(w, "ip="))
			have_ip = parse_ip(w + 3, net.ip);
		w = next_word(w);
	}
	u64 features = virtio_start(base, VIRTIO_NET_F_MAC);
	if (!features || !(features & VIRTIO_NET_F_MAC) || !have_ip) {
		puts(features ? "memtest: virtio-net without a MAC or ip=: not used\n"
			      : "memtest: virtio-net refused our features: not used\n");
		return;
	}
	for (int i = 0; i < 6; i++)
		net.mac[i] = virtio_config8(base, (u64)i);
	vq_setup(&net.rx, base, RX, &rx_ring);
	txq_setup(&net.tx, base, TX, &tx_ring, VQ_SIZE);
	virtio_ready(base);
	for (u16 i = 0; i < VQ_SIZE; i++)
		vq_post(&net.rx, i, rx_buf[i], BUF, 1);
	vq_kick(&net.rx);
	net.present = 1;
	console_lock();
	puts("memtest: virtio-net at ");
	puthex(base);
	puts(", address ");
	put_ip(net.ip);
	puts(", MAC ");
	for (int i = 0; i < 6; i++) {
		putc("0123456789abcdef"[net.mac[i] >> 4]);
		putc("0123456789abcdef"[net.mac[i] & 15]);
		if (i < 5)
			putc(':');
	}
	puts("\n");
	console_unlock();
}

/* Sends `frame` (n bytes) back where it came from: the Ethernet source
 * becomes the destination, after the caller turned the payload round. */
static int reply(const u8 *frame, u64 n)
{
	int id = txq_take(&net.tx);
	if (id < 0)
		return 0; /* a reply dropped, as a busy NIC would */
	u8 *out = tx_buf[id] + HDR;
	for (int i = 0; i < HDR; i++)
		tx_buf[id][i] = 0;
	copy(out, frame + 6, 6);
	copy(out + 6, net.mac, 6);
	copy(out + 12, frame + 12, n - 12);
	vq_post(&net.tx.q, (u16)id, tx_buf[id], (u32)(HDR + n), 0);
	return 1;
}

static int arp(u8 *f, u64 n)
{
	/* Ethernet/IPv4 request for our address */
	if (n < 42 || be16(f + 14) != 1 || be16(f + 16) != 0x0800 || f[18] != 6 || f[19] != 4 || be16(f + 20) != 1 ||
	    !same(f + 38, net.ip, 4))
		return 0;
	put_be16(f + 20, 2);
	copy(f + 32, f + 22, 10); /* target = the asker */
	copy(f + 22, net.mac, 6);
	copy(f + 28, net.ip, 4);
	return reply(f, 42);
}

static int ipv4(u8 *f, u64 n)
{
	if (n < 34 || f[14] >> 4 != 4)
		return 0;
	u64 ihl = (u64)(f[14] & 15) * 4, total = be16(f + 16);
	u8 *ip = f + 14, *payload = ip + ihl;
	/* ours, whole (no fragments), and as long as it says */
	if (ihl < 20 || total < ihl + 8 || 14 + total > n || !same(ip + 16, net.ip, 4) || (be16(ip + 6) & 0x3fff))
		return 0;
	u8 peer[4];
	copy(peer, ip + 12, 4);
	copy(ip + 12, ip + 16, 4); /* swapping the addresses keeps both checksums right */
	copy(ip + 16, peer, 4);
	if (ip[9] == 1 && payload[0] == 8) { /* ICMP echo request */
		payload[0] = 0;
		put_be16(payload + 2, 0);
		put_be16(payload + 2, checksum(payload, total - ihl));
	} else if (ip[9] == 17) { /* UDP: back to the sender's port */
		u8 port[2];
		copy(port, payload, 2);
		copy(payload, payload + 2, 2);
		copy(payload + 2, port, 2);
	} else {
		return 0;
	}
	return reply(f, 14 + total);
}

u64 net_poll(void)
{
	if (!net.present)
		return 0;
	u64 handled = 0, sent = 0;
	u32 id, len;
	while (vq_used(&net.rx, &id, &len)) {
		if (len > HDR && len <= BUF) {
			u8 *f = rx_buf[id] + HDR;
			u64 n = len - HDR;
			if (n >= 14 && be16(f + 12) == 0x0806)
				sent += (u64)arp(f, n);
			else if (n >= 14 && be16(f + 12) == 0x0800)
				sent += (u64)ipv4(f, n);
		}
		vq_post(&net.rx, (u16)id, rx_buf[id], BUF, 1);
		handled++;
	}
	if (sent)
		vq_kick(&net.tx.q);
	if (handled)
		vq_kick(&net.rx);
	return handled;
}
