/*
 * A polled virtio-vsock driver: memtest listens on port 1234 and echoes
 * every byte a host program sends it there. Bytes wait in their
 * connection's buffer (PENDING, the credit memtest gives the host) until
 * the host's credit lets them go back, so the receive queue never stalls
 * behind a slow peer; a peer that takes no echo for 2 s is reset. With
 * `vsock_hello=PORT` it also connects once to the host's PORT, says
 * "memtest guest N says hello" and closes. A transport reset event (a
 * restored clone) drops every connection, as Linux's driver does.
 */

#include "virtio.h"

#define HDR 44
#define BUF 2048
#define BUFS 16
#define HOST_CID 2
#define ECHO_PORT 1234
#define HELLO_PORT 1025 /* our side of the hello connection */
#define PENDING 8192 /* per connection: what the host may send ahead */
#define MAX_CONNS 4
#define STALL_SECONDS 2 /* a peer that takes no echo for this long is reset */
enum { RX = 0, TX = 1, EVENT = 2 };
enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };

struct hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct conn {
	int used;
	u32 local_port, peer_port;
	u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt, fwd_cnt;
	/* Received bytes not echoed yet, in pending[this one]: a ring. */
	u32 head, count;
	u64 stuck_since; /* since when its bytes could not move, or 0 */
};

static struct vring rx_ring, tx_ring, ev_ring;
static u8 rx_buf[BUFS][BUF] __attribute__((aligned(64)));
static u8 tx_buf[BUFS][BUF] __attribute__((aligned(64)));
static u32 ev_buf[4];
/* Connection i's received bytes not echoed yet: a ring. */
static u8 pending[MAX_CONNS][PENDING];

static struct {
	int present;
	u64 cid;
	struct vq rx, ev;
	struct txq tx;
	struct conn conns[MAX_CONNS];
	int sent;
	u64 tsc_khz;
} vs;

int vsock_present(void)
{
	return vs.present;
}

static struct conn *find(u32 local, u32 peer)
{
	for (int i = 0; i < MAX_CONNS; i++)
		if (vs.conns[i].used && vs.conns[i].local_port == local && vs.conns[i].peer_port == peer)
			return &vs.conns[i];
	return 0;
}

static struct conn *open_conn(u32 local, u32 peer)
{
	for (int i = 0; i < MAX_CONNS; i++)
		if (!vs.conns[i].used) {
			struct conn *c = &vs.conns[i];
			c->used = 1;
			c->local_port = local;
			c->peer_port = peer;
			c->peer_buf_alloc = c->peer_fwd_cnt = c->tx_cnt = c->fwd_cnt = 0;
			c->head = c->count = 0;
			c->stuck_since = 0;
			return c;
		}
	return 0;
}

static u32 credit(const struct conn *c)
{
	u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;
	return in_flight < c->peer_buf_alloc ? c->peer_buf_alloc - in_flight : 0;
}

/* Sends a packet on `c` with `len` bytes of `data`; 0 if no buffer is free. */
static int send(struct conn *c, u16 op, u32 flags, const u8 *data, u32 len)
{
	int id = txq_take(&vs.tx);
	if (id < 0)
		return 0;
	struct hdr *h = (struct hdr *)tx_buf[id];
	h->src_cid = vs.cid;
	h->dst_cid = HOST_CID;
	h->src_port = c->local_port;
	h->dst_port = c->peer_port;
	h->len = len;
	h->type = 1; /* stream */
	h->op = op;
	h->flags = flags;
	h->buf_alloc = PENDING;
	h->fwd_cnt = c->fwd_cnt;
	copy(tx_buf[id] + HDR, data, len);
	vq_post(&vs.tx.q, (u16)id, tx_buf[id], HDR + len, 0);
	c->tx_cnt += len;
	vs.sent = 1;
	return 1;
}

static void say_hello(struct conn *c)
{
	static const char text[] = "memtest guest ";
	u8 msg[64];
	u32 n = 0;
	for (const char *p = text; *p; p++)
		msg[n++] = (u8)*p;
	u64 id = db_read(DB_GUEST_ID), digits = 1;
	for (u64 v = id; v >= 10; v /= 10)
		digits *= 10;
	for (; digits; digits /= 10)
		msg[n++] = (u8)('0' + id / digits % 10);
	for (const char *p = " says hello\n"; *p; p++)
		msg[n++] = (u8)*p;
	send(c, OP_RW, 0, msg, n);
	send(c, OP_SHUTDOWN, 3, 0, 0);
}

/* Echoes what `c` holds, as the host's credit and free buffers allow. */
static void echo(struct conn *c)
{
	int moved = 0;
	while (c->count) {
		u32 n = c->count, room = credit(c);
		if (c->head + n > PENDING)
			n = PENDING - c->head; /* up to the ring's end */
		if (n > BUF - HDR)
			n = BUF - HDR;
		if (n > room)
			n = room;
		if (!n || !send(c, OP_RW, 0, pending[c - vs.conns] + c->head, n))
			break;
		c->head = (c->head + n) % PENDING;
		c->count -= n;
		c->fwd_cnt += n;
		moved = 1;
	}
	/* A host peer that takes no echo for a while: give up on it. */
	if (!c->count || moved)
		c->stuck_since = 0;
	else if (!c->stuck_since)
		c->stuck_since = rdtsc();
	else if (rdtsc() - c->stuck_since > STALL_SECONDS * 1000 * vs.tsc_khz && send(c, OP_RST, 0, 0, 0))
		c->used = 0;
}

/* One packet from the host. */
static void handle(const struct hdr *h, const u8 *data, u32 len)
{
	if (h->dst_cid != vs.cid || h->src_cid != HOST_CID || h->type != 1 || h->len > len)
		return;
	struct conn *c = find(h->dst_port, h->src_port);
	struct conn stray = { .used = 1, .local_port = h->dst_port, .peer_port = h->src_port };
	if (c) {
		c->peer_buf_alloc = h->buf_alloc;
		c->peer_fwd_cnt = h->fwd_cnt;
	}
	switch (h->op) {
	case OP_REQUEST:
		if (!c && h->dst_port == ECHO_PORT && (c = open_conn(h->dst_port, h->src_port))) {
			c->peer_buf_alloc = h->buf_alloc;
			c->peer_fwd_cnt = h->fwd_cnt;
			if (!send(c, OP_RESPONSE, 0, 0, 0))
				c->used = 0;
		} else {
			send(&stray, OP_RST, 0, 0, 0);
		}
		break;
	case OP_RESPONSE:
		if (c && c->local_port == HELLO_PORT)
			say_hello(c);
		break;
	case OP_RW:
		if (!c || c->count + h->len > PENDING) { /* no such stream, or past our credit */
			if (c)
				c->used = 0;
			send(&stray, OP_RST, 0, 0, 0);
			break;
		}
		for (u32 i = 0; i < h->len; i++)
			pending[c - vs.conns][(c->head + c->count + i) % PENDING] = data[i];
		c->count += h->len;
		echo(c);
		break;
	case OP_CREDIT_REQUEST:
		if (c)
			send(c, OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case OP_SHUTDOWN:
		if (c) {
			send(c, OP_RST, 0, 0, 0);
			c->used = 0;
		}
		break;
	case OP_RST:
		if (c)
			c->used = 0;
		break;
	default:
		break;
	}
}

void vsock_setup(u64 base)
{
	if (!virtio_start(base, 0)) {
		puts("memtest: virtio-vsock refused our features: not used\n");
		return;
	}
	for (int i = 0; i < 8; i++)
		vs.cid |= (u64)virtio_config8(base, (u64)i) << (8 * i);
	vq_setup(&vs.rx, base, RX, &rx_ring);
	txq_setup(&vs.tx, base, TX, &tx_ring, BUFS);
	vq_setup(&vs.ev, base, EVENT, &ev_ring);
	virtio_ready(base);
	for (u16 i = 0; i < BUFS; i++)
		vq_post(&vs.rx, i, rx_buf[i], BUF, 1);
	for (u16 i = 0; i < 4; i++)
		vq_post(&vs.ev, i, &ev_buf[i], sizeof(ev_buf[i]), 1);
	vq_kick(&vs.rx);
	vq_kick(&vs.ev);
	vs.present = 1;
	vs.tsc_khz = db_read(DB_TSC_KHZ);
	console_lock();
	puts("memtest: virtio-vsock at ");
	puthex(base);
	puts(", CID ");
	putdec(vs.cid);
	puts(", echo on port 1234\n");
	console_unlock();
	for (const char *w = cmdline(); w && *w;) {
		if (word_is(w, "vsock_hello=")) {
			struct conn *c = open_conn(HELLO_PORT, (u32)parse_uint(w + 12));
			if (c)
				send(c, OP_REQUEST, 0, 0, 0);
			vq_kick(&vs.tx.q);
		}
		w = next_word(w);
	}
}

u64 vsock_poll(void)
{
	if (!vs.present)
		return 0;
	u64 handled = 0;
	u32 id, len;
	while (vq_used(&vs.ev, &id, &len)) {
		if (len >= 4 && ev_buf[id % 4] == 0) /* transport reset */
			for (int i = 0; i < MAX_CONNS; i++)
				vs.conns[i].used = 0;
		vq_post(&vs.ev, (u16)(id % 4), &ev_buf[id % 4], sizeof(ev_buf[0]), 1);
		vq_kick(&vs.ev);
		handled++;
	}
	while (vq_used(&vs.rx, &id, &len)) {
		id %= BUFS;
		if (len >= HDR && len <= BUF)
			handle((const struct hdr *)rx_buf[id], rx_buf[id] + HDR, len - HDR);
		vq_post(&vs.rx, (u16)id, rx_buf[id], BUF, 1);
		handled++;
	}
	/* Echoes that waited for credit (it comes with the host's packets). */
	for (int i = 0; i < MAX_CONNS; i++)
		if (vs.conns[i].used && vs.conns[i].count)
			echo(&vs.conns[i]);
	if (vs.sent)
		vq_kick(&vs.tx.q);
	vs.sent = 0;
	if (handled)
		vq_kick(&vs.rx);
	return handled;
}
