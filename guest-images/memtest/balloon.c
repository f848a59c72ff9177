/*
 * virtio-balloon for memtest: any vCPU gives pages back to the host and
 * takes them again, one request at a time under a lock, waiting for the
 * device (polled: memtest takes no interrupts). Inflating sends frame
 * numbers on queue 0 and deflating on queue 1; free page reporting (the
 * `report=1` word) sends each run as one range on the reporting queue
 * (queue 3). A request returns once the device has used its buffer, so
 * the host has freed the pages by then: a page memtest writes after that
 * is never thrown away. Statistics (queue 2): one buffer saying how much
 * memory memtest holds unused (`hold=`), posted again whenever the device
 * hands it back.
 */

#include "virtio.h"

#define F_STATS_VQ (1UL << 1)
#define F_REPORTING (1UL << 5)
#define STAT_MEMFREE 4
#define STAT_MEMTOT 5
#define PFNS 256 /* frame numbers per request, as Linux sends */
#define CONFIG_ACTUAL 4

enum { Q_INFLATE, Q_DEFLATE, Q_STATS, Q_REPORT };

static u64 base;
static int reporting;
static struct vq queues[4];
static struct vring rings[4];
/* struct virtio_balloon_stat: tag, then value, packed (10 bytes). */
static u8 stats[2][10];
static u32 pfns[PFNS];
static u32 busy, actual;

static void lock(void)
{
	while (__atomic_exchange_n(&busy, 1, __ATOMIC_ACQUIRE))
		__asm__ volatile("pause");
}

static void unlock(void)
{
	__atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
}

static void put_stat(u8 *to, u16 tag, u64 value)
{
	to[0] = (u8)tag;
	to[1] = (u8)(tag >> 8);
	for (int i = 0; i < 8; i++)
		to[2 + i] = (u8)(value >> (8 * i));
}

/* Posts the statistics: memory held unused and memory in all. */
static void post_stats(void)
{
	put_stat(stats[0], STAT_MEMFREE, balloon_free_bytes());
	put_stat(stats[1], STAT_MEMTOT, balloon_total_bytes());
	vq_post(&queues[Q_STATS], 0, stats, sizeof(stats), 0);
	vq_kick(&queues[Q_STATS]);
}

void balloon_setup(u64 at)
{
	u64 agreed = virtio_start(at, F_REPORTING | F_STATS_VQ);
	if (!agreed || !(agreed & F_STATS_VQ))
		return;
	reporting = (agreed & F_REPORTING) != 0;
	for (u32 q = 0; q < (reporting ? 4u : 3u); q++)
		vq_setup(&queues[q], at, q, &rings[q]);
	virtio_ready(at);
	base = at;
	post_stats();
}

u32 balloon_target(void)
{
	return base ? *(volatile u32 *)(base + 0x100) : 0;
}

void balloon_poll_stats(void)
{
	u32 id, len;
	if (!base)
		return;
	lock();
	if (vq_used(&queues[Q_STATS], &id, &len))
		post_stats();
	unlock();
}

int balloon_present(void)
{
	return base != 0;
}

int balloon_reporting(void)
{
	return reporting;
}

/* Posts buffer 0 on queue `q` and waits until the device has used it. */
static void request(u32 q, void *buf, u32 len, int device_writes)
{
	u32 id, used_len;
	vq_post(&queues[q], 0, buf, len, device_writes);
	vq_kick(&queues[q]);
	while (!vq_used(&queues[q], &id, &used_len))
		__asm__ volatile("pause");
}

/* Inflates (or deflates) by the `n` pages from guest-physical `addr`. */
void balloon_pages(u64 addr, u64 n, int inflate)
{
	lock();
	for (u64 done = 0; done < n;) {
		u32 k = 0;
		for (; k < PFNS && done < n; k++, done++)
			pfns[k] = (u32)((addr >> 12) + done);
		request(inflate ? Q_INFLATE : Q_DEFLATE, pfns, k * 4, 0);
		actual = inflate ? actual + k : actual - k;
	}
	*(volatile u32 *)(base + 0x100 + CONFIG_ACTUAL) = actual;
	unlock();
}

/* Reports the `n` pages from guest-physical `addr` free. */
void balloon_report(u64 addr, u64 n)
{
	lock();
	request(Q_REPORT, (void *)addr, (u32)(n * PAGE_SIZE), 1);
	unlock();
}
