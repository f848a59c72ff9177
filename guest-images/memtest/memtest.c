/*
 * memtest: a tiny guest that proves its memory is never corrupted.
 *
 * It fills every page of its RAM with content it can recompute, then in every
 * round rewrites a few "volatile" pages and verifies every page against what
 * it last wrote. Nothing is stored: the expected words are recomputed from a
 * per-page key. The VMM merges identical pages underneath it (page sharing);
 * a lost write, a write leaking in from another guest or a page merged with
 * the wrong one shows up as a mismatch. docs/memtest.md has the boot contract
 * and the doorbell protocol.
 *
 * Boot: every vCPU enters _start (entry.S) in 64-bit mode at CPL 0 with
 * RDI = its index and RSI = the Linux boot params. On KVM-on-PVM hosts CPL 0
 * is emulated (about 1.3 us an instruction), so cpu_setup() does the minimum:
 * vCPU 0 builds identity page tables (user-accessible 2 MiB pages) and the
 * IDT while the others wait, then each vCPU loads its own GDT and TSS and
 * drops to CPL 3 with iretq. Everything else runs at CPL 3, at native speed,
 * and talks to the VMM only through the MMIO doorbell (port I/O from CPL 3
 * faults on such hosts).
 *
 * Test pages: every 4 KiB page of e820 RAM above the image and its page
 * tables (2 MiB aligned), numbered 0..P-1 over the guest; vCPU v owns the
 * v-th of vcpu_count contiguous slices. A page's kind comes from a hash of the
 * seed and its run of `run=` pages, so all guests of one seed share a layout:
 *   zero     (fraction `zero=`)   all zero bytes
 *   shared   (fraction `share=`)  words from (seed, page): the same in every
 *                                 guest with the same seed
 *   private  (the rest)           words from (seed, guest id, page)
 *   volatile (`volatile=` pages spread evenly; never zero or shared)
 *                                 words from (seed, guest id, page, round)
 *   churn    (`churn=` pages spread evenly)  words from (seed, page, round
 *                                 mod 3): the same in every guest, changing
 *                                 from round to round among three values
 *   near     (fraction `near=` of the shared pages)  a shared page with one
 *                                 byte changed by guest id: never mergeable
 *                                 across guests
 *
 * Rounds: each vCPU fills its slice (PROGRESS 0), then in round n rewrites its
 * volatile pages, verifies every page it owns and reports PROGRESS n. After
 * `rounds=` rounds (0: forever) it writes DONE with its mismatch count.
 * Command line: seed= share= zero= volatile= churn= near= rounds= run= idle=
 * (ms to idle after each round, like a mostly idle OS; 0 by default) free=
 * report=; other words are ignored (a Linux-style command line may hold
 * anything).
 *
 * Holding memory unused (`hold=F`, with a balloon device): about F of the
 * pages (never volatile or churn pages) are written once with content of
 * the guest's own and then left alone, like an OS's freed page cache: not
 * verified, counted as free memory in the balloon's statistics, and given
 * to the balloon (inflating) when the host's target asks for them, taken
 * back (deflating) when it lowers it. vCPU 0 follows the target after
 * every round and while idle.
 *
 * Giving memory back (`free=F`, with a balloon device, balloon.c): at the
 * end of each round each vCPU gives back about F of its pages (in runs of
 * FREE_RUN, never volatile or churn pages) through the balloon, inflating
 * (or, with `report=1`, reporting them free), and takes back the ones it
 * gave the round before: deflating, checking each reads zero (the host
 * freed it), and filling it again. Pages out are not verified; every other
 * page is, every round.
 *
 * Gaps: during the rounds each vCPU reads the TSC after every page and
 * keeps a histogram of the time each page took (8 buckets per power of two
 * of TSC ticks); a page that took long is the vCPU being held (by the host
 * scheduler, a fault, or page sharing). It reports the histogram after each
 * round (GAP), so the VMM can compare what guests feel under each mode.
 *
 * Devices: vCPU 0 finds the virtio devices the command line announces and
 * serves them by polling (virtio.c, net.c): between pages of its rounds, and
 * while idle, waiting on the WAIT doorbell that a device's interrupt ends.
 */

#include "memtest.h"
#include "virtio.h"

#define LARGE_PAGE (2UL << 20)
#define GIB (1UL << 30)
#define MAX_VCPUS 32 /* the VMM's --vcpus limit */
#define MAX_GIB 1024 /* the identity map's limit: the VMM's 1 TiB per guest */
#define KSTACK_SIZE 8192
#define USTACK_SIZE 8192
#define MAX_RANGES 16
#define MAX_REPORTED 16 /* mismatching pages reported per vCPU */

static u64 align_up(u64 x, u64 alignment)
{
	return (x + alignment - 1) & ~(alignment - 1);
}

/* ---- the console ---- */

/* One vCPU writes a line at a time, so lines from different vCPUs stay whole. */
static u32 console_busy;

void console_lock(void)
{
	while (__atomic_exchange_n(&console_busy, 1, __ATOMIC_ACQUIRE))
		__asm__ volatile("pause");
}

void console_unlock(void)
{
	__atomic_store_n(&console_busy, 0, __ATOMIC_RELEASE);
}

/* For the exception handler: the lock if its holder lets go within a while,
 * else the console anyway (the holder may be the faulting vCPU itself). The
 * lock stays taken: the guest is ending. */
static void console_seize(void)
{
	for (int tries = 0; tries < 10000; tries++) {
		if (!__atomic_exchange_n(&console_busy, 1, __ATOMIC_ACQUIRE))
			return;
		__asm__ volatile("pause");
	}
}

void putc(char c)
{
	db_write(DB_CONSOLE, (u8)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void putdec(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = '0' + v % 10;
		v /= 10;
	} while (v);
	puts(buf + i);
}

void puthex(u64 v)
{
	puts("0x");
	for (int shift = 60; shift >= 0; shift -= 4)
		putc("0123456789abcdef"[(v >> shift) & 15]);
}

/* A fraction in parts per 2^32, as a decimal with three digits: 0.500. */
static void put_fraction(u64 f)
{
	u64 thousandths = (f * 1000 + (1UL << 31)) >> 32;
	putdec(thousandths / 1000);
	putc('.');
	for (u64 digit = 100; digit; digit /= 10)
		putc('0' + thousandths / digit % 10);
}

/* ---- boot parameters (the Linux zero page) ---- */

struct e820_entry {
	u64 addr, size;
	u32 type;
} __attribute__((packed));

#define BP_E820_ENTRIES 0x1e8
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMDLINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define E820_RAM 1

static const u8 *boot_params;

static int e820_count(void)
{
	return boot_params[BP_E820_ENTRIES];
}

static const struct e820_entry *e820(int i)
{
	return (const struct e820_entry *)(boot_params + BP_E820_TABLE) + i;
}

/* The initrd the VMM loaded, [start, end) page aligned; empty if none. */
static void initrd_pages(u64 *start, u64 *end)
{
	u64 addr = *(const u32 *)(boot_params + BP_RAMDISK_IMAGE);
	u64 size = *(const u32 *)(boot_params + BP_RAMDISK_SIZE);
	*start = addr & ~(PAGE_SIZE - 1);
	*end = size ? align_up(addr + size, PAGE_SIZE) : *start;
}

const char *cmdline(void)
{
	return (const char *)(u64) * (const u32 *)(boot_params + BP_CMDLINE_PTR);
}

/* ---- parameters ---- */

#define ONE (1UL << 32) /* fractions are in parts per 2^32 */

struct params {
	u64 seed, volatile_pages, churn_pages, rounds, run, idle_ms, abuse, hammer, chatter, report;
	u64 share, zero, near, free, hold;
};

int word_is(const char *w, const char *key)
{
	while (*key)
		if (*w++ != *key++)
			return 0;
	return 1;
}

/* The command line's word after the one at `w` (its end if none). */
const char *next_word(const char *w)
{
	while (*w && *w != ' ')
		w++;
	while (*w == ' ')
		w++;
	return w;
}

u64 parse_uint(const char *s)
{
	u64 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}

/* "0.8" or "1" -> parts per 2^32, at most ONE. */
static u64 parse_fraction(const char *s)
{
	u64 whole = parse_uint(s), frac = 0, scale = 1;
	while (*s >= '0' && *s <= '9')
		s++;
	if (*s == '.')
		for (s++; *s >= '0' && *s <= '9' && scale < 1000000000UL; s++) {
			frac = frac * 10 + (u64)(*s - '0');
			scale *= 10;
		}
	return whole >= 1 ? ONE : (frac << 32) / scale;
}

static struct params parse_params(const char *w)
{
	struct params p = { .seed = 1, .volatile_pages = 64, .rounds = 3, .run = 16, .share = ONE / 2, .zero = ONE / 10 };
	while (w && *w) {
		if (word_is(w, "seed="))
			p.seed = parse_uint(w + 5);
		else if (word_is(w, "share="))
			p.share = parse_fraction(w + 6);
		else if (word_is(w, "zero="))
			p.zero = parse_fraction(w + 5);
		else if (word_is(w, "volatile="))
			p.volatile_pages = parse_uint(w + 9);
		else if (word_is(w, "churn="))
			p.churn_pages = parse_uint(w + 6);
		else if (word_is(w, "near="))
			p.near = parse_fraction(w + 5);
		else if (word_is(w, "rounds="))
			p.rounds = parse_uint(w + 7);
		else if (word_is(w, "run="))
			p.run = parse_uint(w + 4);
		else if (word_is(w, "idle="))
			p.idle_ms = parse_uint(w + 5);
		else if (word_is(w, "abuse="))
			p.abuse = parse_uint(w + 6);
		else if (word_is(w, "hammer="))
			p.hammer = parse_uint(w + 7);
		else if (word_is(w, "chatter="))
			p.chatter = parse_uint(w + 8);
		else if (word_is(w, "free="))
			p.free = parse_fraction(w + 5);
		else if (word_is(w, "report="))
			p.report = parse_uint(w + 7);
		else if (word_is(w, "hold="))
			p.hold = parse_fraction(w + 5);
		w = next_word(w);
	}
	if (p.run == 0)
		p.run = 1;
	if (p.share + p.zero > ONE)
		p.share = ONE - p.zero;
	return p;
}

/* ---- the pages under test and their expected content ---- */

/* A run of RAM pages: guest-physical start, length, index of its first page. */
struct range {
	u64 start, pages, first;
};

static struct range ranges[MAX_RANGES];
static int nranges;
static u64 total_pages;
static struct params params;
static u64 guest_id, vcpu_count, tsc_khz;
static u64 test_floor, mapped_top; /* set by build_page_tables() */

static void add_range(u64 start, u64 end)
{
	if (end <= start || nranges == MAX_RANGES)
		return;
	ranges[nranges++] = (struct range){ start, (end - start) / PAGE_SIZE, total_pages };
	total_pages += (end - start) / PAGE_SIZE;
}

/* The e820 RAM above the image, minus the initrd (left as loaded). */
static void find_test_pages(void)
{
	u64 rd_start, rd_end;
	initrd_pages(&rd_start, &rd_end);
	for (int i = 0; i < e820_count(); i++) {
		const struct e820_entry *e = e820(i);
		if (e->type != E820_RAM)
			continue;
		u64 start = align_up(e->addr > test_floor ? e->addr : test_floor, PAGE_SIZE);
		u64 end = (e->addr + e->size) & ~(PAGE_SIZE - 1);
		if (end > mapped_top)
			end = mapped_top;
		if (rd_start < rd_end && rd_start < end && rd_end > start) {
			add_range(start, rd_start);
			add_range(rd_end, end);
		} else {
			add_range(start, end);
		}
	}
}

static u64 *page_addr(u64 page)
{
	int r = 0;
	while (r + 1 < nranges && ranges[r + 1].first <= page)
		r++;
	return (u64 *)(ranges[r].start + (page - ranges[r].first) * PAGE_SIZE);
}

/* splitmix64's finalizer: a fast, well-mixed hash of one word. */
static u64 mix(u64 x)
{
	x += 0x9e3779b97f4a7c15UL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
	return x ^ (x >> 31);
}

enum kind { ZERO, SHARED, NEAR, PRIVATE, VOLATILE, CHURN };

/* Whether `page` is one of `n` pages spread evenly, `offset` pages after
 * the start of each stride (volatile pages sit at offset 0, churn pages
 * half a stride later, so the two sets never meet). */
static int spread(u64 page, u64 n, u64 offset)
{
	if (n == 0)
		return 0;
	if (n >= total_pages)
		return offset == 0;
	u64 stride = total_pages / n;
	return page % stride == offset % stride && page / stride < n;
}

static enum kind kind_of(u64 page)
{
	if (spread(page, params.volatile_pages, 0))
		return VOLATILE;
	if (params.churn_pages && spread(page, params.churn_pages, total_pages / params.churn_pages / 2) &&
	    !spread(page, params.volatile_pages, 0))
		return CHURN;
	u64 u = mix(params.seed * 0x100000001b3UL ^ (page / params.run)) >> 32;
	if (u < params.zero)
		return ZERO;
	if (u < params.zero + params.share)
		return (mix(params.seed ^ page * 0x9e3779b97f4a7c15UL) >> 32) < params.near ? NEAR : SHARED;
	return PRIVATE;
}

/* The key a page's words are generated from (0 for a zero page). `round`
 * matters for volatile pages, and is the churn phase for churn pages. */
static u64 page_key(u64 page, u64 round)
{
	u64 private = mix(page ^ (guest_id + 1) << 40);
	switch (kind_of(page)) {
	case ZERO:
		return 0;
	case SHARED:
	case NEAR:
		return mix(params.seed ^ mix(page));
	case PRIVATE:
		return mix(params.seed ^ private);
	case CHURN:
		return mix(params.seed ^ mix(page) ^ mix(round % 3 + 7)); /* round: the churn phase */
	default:
		return mix(params.seed ^ private ^ mix(round + 1));
	}
}

/* How a page's words are made: word i is mix(key + i) (0 for a zero page),
 * and a near-duplicate page has one byte of one word changed by guest id. */
struct page_gen {
	u64 key, odd_word, odd_bits;
};

/* hold= (below): whether a page is held unused; the stale pages, and how
 * many of them are in the balloon (the first `stale_out` in page order). */
static int stale(u64 page);
static void hold_follow(void);
static u64 stale_total, stale_out;
/* vCPUs that have filled their pages. */
static u64 vcpus_filled;

static struct page_gen page_gen(u64 page, u64 round)
{
	struct page_gen g = { page_key(page, round), PAGE_SIZE / 8, 0 };
	if (stale(page)) {
		/* Its own content, which page sharing cannot take. */
		g.key = mix(params.seed ^ mix(page ^ (guest_id + 1) << 40) ^ 0x57a1e);
		return g;
	}
	if (kind_of(page) == NEAR) {
		g.odd_word = mix(page) % (PAGE_SIZE / 8);
		g.odd_bits = (guest_id % 255 + 1) << (8 * (mix(page ^ 1) % 8));
	}
	return g;
}

static inline u64 page_word(const struct page_gen *g, u64 i)
{
	u64 w = g->key ? mix(g->key + i) : 0;
	return i == g->odd_word ? w ^ g->odd_bits : w;
}

static void fill_page(u64 page, u64 round)
{
	struct page_gen g = page_gen(page, round);
	u64 *p = page_addr(page);
	for (u64 i = 0; i < PAGE_SIZE / 8; i++)
		p[i] = page_word(&g, i);
}

static void report_mismatch(const u64 *p, u64 word, u64 want)
{
	db_write(DB_MISMATCH, (u64)p);
	console_lock();
	puts("memtest: MISMATCH page ");
	puthex((u64)p);
	puts(" word ");
	putdec(word);
	puts(" expected ");
	puthex(want);
	puts(" found ");
	puthex(p[word]);
	putc('\n');
	console_unlock();
}

/* Returns 1 (and reports it if `report`) if the page is not what the last
 * fill wrote. */
static int check_page(u64 page, u64 round, int report)
{
	struct page_gen g = page_gen(page, round);
	u64 *p = page_addr(page);
	for (u64 i = 0; i < PAGE_SIZE / 8; i++) {
		u64 want = page_word(&g, i);
		if (p[i] != want) {
			if (report)
				report_mismatch(p, i, want);
			return 1;
		}
	}
	return 0;
}

/* The initrd is data the guest keeps but never writes, like an OS's kernel
 * image: identical in every guest. vCPU 0 hashes it once and checks it every
 * round. */
static u64 initrd_hash_at_boot;

static u64 initrd_hash(void)
{
	u64 start, end, h = 0;
	initrd_pages(&start, &end);
	for (const u64 *p = (const u64 *)start; p < (const u64 *)end; p++)
		h = mix(h ^ *p);
	return h;
}

static u64 check_initrd(void)
{
	if (initrd_hash() == initrd_hash_at_boot)
		return 0;
	u64 start, end;
	initrd_pages(&start, &end);
	db_write(DB_MISMATCH, start);
	console_lock();
	puts("memtest: MISMATCH in the initrd: its hash changed\n");
	console_unlock();
	return 1;
}

/* ---- CPL 3: the work ---- */

/* Setup stages: vCPU 0 reaches each, the others wait for it. */
enum { STAGE_BOOT, STAGE_TABLES_BUILT, STAGE_PLANNED };
static u32 stage;

static void set_stage(u32 s)
{
	__atomic_store_n(&stage, s, __ATOMIC_RELEASE);
}

static void wait_for_stage(u32 s)
{
	while (__atomic_load_n(&stage, __ATOMIC_ACQUIRE) < s)
		__asm__ volatile("pause");
}

static void print_plan(void)
{
	u64 shared = 0, zero = 0, near = 0, churn = 0;
	for (u64 page = 0; page < total_pages; page++) {
		enum kind k = kind_of(page);
		shared += k == SHARED;
		zero += k == ZERO;
		near += k == NEAR;
		churn += k == CHURN;
	}
	console_lock();
	puts("memtest: guest ");
	putdec(guest_id);
	puts(", ");
	putdec(vcpu_count);
	puts(" vCPUs, ");
	putdec(total_pages);
	puts(" pages (");
	putdec(total_pages * PAGE_SIZE >> 20);
	puts(" MiB), seed=");
	putdec(params.seed);
	puts(" share=");
	put_fraction(params.share);
	puts(" zero=");
	put_fraction(params.zero);
	puts(" volatile=");
	putdec(params.volatile_pages);
	puts(" churn=");
	putdec(churn);
	puts(" near=");
	put_fraction(params.near);
	puts(" rounds=");
	putdec(params.rounds);
	puts(" run=");
	putdec(params.run);
	puts(" idle=");
	putdec(params.idle_ms);
	u64 rd_start, rd_end;
	initrd_pages(&rd_start, &rd_end);
	u64 image = (rd_end - rd_start) / PAGE_SIZE;
	puts("\nmemtest: ideal mergeable pages ");
	putdec(shared + zero + image);
	puts(" (shared ");
	putdec(shared);
	puts(", zero ");
	putdec(zero);
	puts(", initrd ");
	putdec(image);
	puts(", near-duplicates ");
	putdec(near);
	puts(")\n");
	console_unlock();
}

/* vCPU 0, once: what the VMM and the command line say to test. */
static void plan(void)
{
	guest_id = db_read(DB_GUEST_ID);
	vcpu_count = db_read(DB_VCPU_COUNT);
	params = parse_params(cmdline());
	find_test_pages();
	initrd_hash_at_boot = initrd_hash();
	print_plan();
	tsc_khz = db_read(DB_TSC_KHZ);
	devices_init();
	for (u64 page = 0; page < total_pages; page++)
		stale_total += stale(page);
	if (params.hold) {
		console_lock();
		puts(balloon_present() ? "memtest: holding " : "memtest: no balloon device: holding ");
		putdec(stale_total);
		puts(" pages unused, given back when the host asks\n");
		console_unlock();
	}
	if (params.free) {
		console_lock();
		puts(balloon_present() ? "memtest: giving back " : "memtest: no balloon device: not giving back ");
		put_fraction(params.free);
		puts(params.report ? " of its pages each round, reported free\n" : " of its pages each round, inflating\n");
		console_unlock();
	}
}

/* ---- gaps: how long each page took, as the vCPU felt it ---- */

#define GAP_BUCKETS 512 /* 8 per power of two of TSC ticks */

struct gaps {
	u64 last;
	u64 count[GAP_BUCKETS];
} __attribute__((aligned(64)));

static struct gaps gaps[MAX_VCPUS];


/* Bucket of `ticks`: 8 * floor(log2) + the next three bits. */
static u64 gap_bucket(u64 ticks)
{
	if (ticks < 8)
		return ticks;
	u64 top = 63 - (u64)__builtin_clzl(ticks);
	return 8 * (top - 2) + ((ticks >> (top - 3)) & 7);
}

/* Starts timing afresh (after talking to the VMM, which is not a gap). */
static void gap_restart(u64 vcpu)
{
	gaps[vcpu].last = rdtsc();
}

static void gap_tick(u64 vcpu)
{
	u64 now = rdtsc(), b = gap_bucket(now - gaps[vcpu].last);
	gaps[vcpu].last = now;
	gaps[vcpu].count[b < GAP_BUCKETS ? b : GAP_BUCKETS - 1]++;
}

/* Sends the histogram since the last report: GAP = bucket << 48 | count. */
static void gap_report(u64 vcpu)
{
	for (u64 b = 0; b < GAP_BUCKETS; b++) {
		u64 n = gaps[vcpu].count[b];
		if (n) {
			db_write(DB_GAP, b << 48 | (n < (1UL << 48) ? n : (1UL << 48) - 1));
			gaps[vcpu].count[b] = 0;
		}
	}
}

/* ---- devices: served by vCPU 0 between pages and while idle ---- */

/* vCPU 0 in a round, every DEVICE_POLL pages: answers what came in, and
 * does not count that time as a gap in its pages. */
#define DEVICE_POLL 64

static void poll_in_round(u64 vcpu, u64 page)
{
	if (vcpu == 0 && page % DEVICE_POLL == 0 && devices_poll())
		gaps[0].last = rdtsc();
}

/* Idles `ms` like a halted CPU; vCPU 0 with devices to serve wakes for
 * each thing that comes in (the WAIT doorbell), answers it and goes back
 * to waiting. */
static void idle(u64 vcpu, u64 ms)
{
	int holding = params.hold && balloon_present();
	if (vcpu != 0 || !(devices_present() || holding) || !tsc_khz) {
		db_write(DB_IDLE, ms);
		return;
	}
	u64 end = rdtsc() + ms * tsc_khz;
	for (;;) {
		devices_poll();
		hold_follow();
		u64 now = rdtsc();
		if (now >= end)
			return;
		u64 left_us = (end - now) * 1000 / tsc_khz;
		db_write(DB_WAIT, left_us ? left_us : 1);
	}
}

/* Each vCPU's churn phase: its churn pages hold the content of this phase
 * (the same in every guest), one of three. */
static u64 churn_phase[MAX_VCPUS];

/* The `round` argument of fill_page and check_page for `page`. */
static u64 round_of(u64 vcpu, u64 page, u64 round)
{
	return kind_of(page) == CHURN ? churn_phase[vcpu] : round;
}

/* ---- free=: pages given back through the balloon and taken again ---- */

#define FREE_RUN 16

/* Whether `page` is one memtest holds unused (`hold=`). */
static int stale(u64 page)
{
	if (!params.hold)
		return 0;
	enum kind k = kind_of(page);
	if (k == VOLATILE || k == CHURN)
		return 0;
	return (mix(params.seed ^ mix(page / FREE_RUN + 0x5eed)) >> 32) < params.hold;
}

/* Whether `page` follows `start` in guest memory, so one request covers
 * both (test pages are numbered across holes in RAM). */
static int in_run(u64 start, u64 page)
{
	return (u64)page_addr(page) == (u64)page_addr(start) + (page - start) * PAGE_SIZE;
}

u64 balloon_free_bytes(void)
{
	return (stale_total - stale_out) * PAGE_SIZE;
}

u64 balloon_total_bytes(void)
{
	return total_pages * PAGE_SIZE;
}

/* vCPU 0: follows the host's target with the stale pages, inflating the
 * next ones or deflating the last ones in; fresh statistics if asked. */
static void hold_follow(void)
{
	/* Not before every vCPU has written its stale pages. */
	if (!params.hold || !balloon_present() || __atomic_load_n(&vcpus_filled, __ATOMIC_ACQUIRE) < vcpu_count)
		return;
	balloon_poll_stats();
	u64 target = balloon_target();
	if (target > stale_total)
		target = stale_total;
	if (target == stale_out)
		return;
	int inflate = target > stale_out;
	u64 from = inflate ? stale_out : target, to = inflate ? target : stale_out, k = 0;
	for (u64 page = 0; page < total_pages && k < to;) {
		if (!stale(page) || k < from) {
			k += stale(page);
			page++;
			continue;
		}
		u64 start = page, addr = (u64)page_addr(start);
		while (page < total_pages && k < to && stale(page) && in_run(start, page)) {
			page++;
			k++;
		}
		balloon_pages(addr, page - start, inflate);
	}
	stale_out = target;
	balloon_poll_stats();
}

/* Whether `page` is given back at the end of round `round` (and taken
 * back at the end of the next). */
static int freed_in(u64 page, u64 round)
{
	if (!params.free || round == 0 || !balloon_present() || stale(page))
		return 0;
	enum kind k = kind_of(page);
	if (k == VOLATILE || k == CHURN)
		return 0;
	return (mix(params.seed ^ mix(page / FREE_RUN + 1) ^ mix(round) * 3) >> 32) < params.free;
}

/* A page taken back must read zero: the host freed it. */
static int check_zero(u64 page, int report)
{
	u64 *p = page_addr(page);
	for (u64 i = 0; i < PAGE_SIZE / 8; i++)
		if (p[i]) {
			if (report)
				report_mismatch(p, i, 0);
			return 1;
		}
	return 0;
}

/* What the end of round `round` does with a page: it stays as it is (in,
 * or out since the last round and this one's share too), is taken back,
 * or is given back. */
enum { KEEP, TAKE, GIVE };

static int balloon_action(u64 page, u64 round)
{
	int was = freed_in(page, round - 1), now = freed_in(page, round);
	return was == now ? KEEP : was ? TAKE : GIVE;
}

/* End of round `round`: takes back what went at the end of the last one
 * (checked zero, filled again) and gives back this round's share, in one
 * walk, run by run, so the guest never holds both shares at once.
 * Returns the pages that did not read zero. */
static u64 balloon_round(u64 vcpu, u64 first, u64 end, u64 round, u64 reported)
{
	u64 bad = 0, count[3] = { 0, 0, 0 };
	for (u64 page = first; page < end;) {
		u64 start = page, addr = (u64)page_addr(start);
		int action = balloon_action(page, round);
		while (page < end && balloon_action(page, round) == action && in_run(start, page))
			page++;
		u64 n = page - start;
		count[action] += n;
		if (action == TAKE) {
			if (!params.report)
				balloon_pages(addr, n, 0);
			for (u64 p = start; p < page; p++) {
				bad += check_zero(p, reported + bad < MAX_REPORTED);
				fill_page(p, round_of(vcpu, p, round));
			}
		} else if (action == GIVE) {
			if (params.report)
				balloon_report(addr, n);
			else
				balloon_pages(addr, n, 1);
		}
	}
	console_lock();
	puts("memtest: vcpu ");
	putdec(vcpu);
	puts(" round ");
	putdec(round);
	puts(params.report ? " reported " : " gave back ");
	putdec(count[GIVE]);
	puts(" pages, took back ");
	putdec(count[TAKE]);
	puts("\n");
	console_unlock();
	return bad;
}

/* Round `round` over pages [first, end): rewrite the volatile and churn
 * ones, verify all but those given back. Returns the pages that differ;
 * reports them while `reported` (those reported before) is under
 * MAX_REPORTED. */
static u64 run_round(u64 vcpu, u64 first, u64 end, u64 round, u64 reported)
{
	gap_restart(vcpu);
	for (u64 page = first; page < end; page++) {
		enum kind k = kind_of(page);
		if (k == VOLATILE || k == CHURN) {
			fill_page(page, k == CHURN ? churn_phase[vcpu] + 1 : round);
			gap_tick(vcpu);
		}
	}
	churn_phase[vcpu]++;
	u64 bad = 0;
	for (u64 page = first; page < end; page++) {
		if (freed_in(page, round - 1) || stale(page))
			continue;
		bad += check_page(page, round_of(vcpu, page, round), reported + bad < MAX_REPORTED);
		gap_tick(vcpu);
		poll_in_round(vcpu, page);
	}
	return bad;
}

/* hammer=K: after each round, 3K sweeps over the vCPU's churn pages, each
 * page checked, then rewritten: with the same content for K sweeps, then
 * with the next phase's. The content stays put long enough for page
 * sharing to merge it while it is being written, and then changes under
 * the merge: a write lost to a merge shows at the page's next check. */
static u64 hammer(u64 vcpu, u64 first, u64 end, u64 reported)
{
	u64 bad = 0;
	for (u64 sweep = 0; sweep < 3 * params.hammer; sweep++) {
		u64 next = churn_phase[vcpu] + (sweep % params.hammer == params.hammer - 1);
		for (u64 page = first; page < end; page++) {
			if (kind_of(page) != CHURN)
				continue;
			bad += check_page(page, churn_phase[vcpu], reported + bad < MAX_REPORTED);
			fill_page(page, next);
		}
		churn_phase[vcpu] = next;
	}
	return bad;
}

static void print_round(u64 vcpu, u64 round, u64 bad)
{
	console_lock();
	puts("memtest: vcpu ");
	putdec(vcpu);
	puts(" round ");
	putdec(round);
	if (bad) {
		puts(" FAILED: ");
		putdec(bad);
		puts(" bad pages\n");
	} else {
		puts(" ok\n");
	}
	console_unlock();
}

/* abuse=1: a hostile guest's doorbell values (the ones that once took the
 * VMM down): progress 0, then 2^32 rounds, then done. */
static void abuse_doorbell(void)
{
	db_write(DB_PROGRESS, 0);
	db_write(DB_PROGRESS, 1UL << 32);
	db_write(DB_GAP, ~0UL);
	db_write(DB_DONE, 0);
}

/* chatter=1: vCPU 0 writes numbered lines to the console for ever, one
 * doorbell (MMIO) write a byte, and verifies nothing; chatter=2: the same
 * at CPL 0 through the serial port (an OUT a byte), before it ever reaches
 * CPL 3. A guest nearly always in the middle of an I/O, to snapshot and
 * clone: a byte written twice shows as a line out of sequence. */
static void chatter(void (*out)(char)) __attribute__((noreturn));
static void chatter(void (*out)(char))
{
	char digits[21];
	for (u64 line = 0;; line++) {
		const char *s = "chatter ";
		while (*s)
			out(*s++);
		int i = 20;
		u64 v = line;
		do {
			digits[--i] = '0' + v % 10;
			v /= 10;
		} while (v);
		while (i < 20)
			out(digits[i++]);
		out('\n');
	}
}

static void locked_putc(char c)
{
	console_lock();
	putc(c);
	console_unlock();
}

static void serial_putc(char c)
{
	__asm__ volatile("outb %b0, %w1" ::"a"(c), "Nd"((u16)0x3f8));
}

/* chatter= as the command line says (the last one wins), at CPL 0. */
static u64 chatter_mode(void)
{
	u64 mode = 0;
	for (const char *w = cmdline(); *w; w = next_word(w))
		if (word_is(w, "chatter="))
			mode = parse_uint(w + 8);
	return mode;
}

void user_main(u64 vcpu) __attribute__((noreturn));
void user_main(u64 vcpu)
{
	if (vcpu == 0) {
		plan();
		set_stage(STAGE_PLANNED);
		if (params.abuse)
			abuse_doorbell();
		if (params.chatter)
			chatter(locked_putc);
	} else {
		wait_for_stage(STAGE_PLANNED);
	}
	u64 first = total_pages * vcpu / vcpu_count, end = total_pages * (vcpu + 1) / vcpu_count;
	for (u64 page = first; page < end; page++)
		fill_page(page, 0);
	__atomic_add_fetch(&vcpus_filled, 1, __ATOMIC_RELEASE);
	db_write(DB_PROGRESS, 0);
	u64 mismatches = 0;
	for (u64 round = 1; params.rounds == 0 || round <= params.rounds; round++) {
		u64 bad = run_round(vcpu, first, end, round, mismatches);
		if (vcpu == 0)
			bad += check_initrd();
		if (params.hammer)
			bad += hammer(vcpu, first, end, mismatches + bad);
		if (params.free && balloon_present())
			bad += balloon_round(vcpu, first, end, round, mismatches + bad);
		if (vcpu == 0)
			hold_follow();
		mismatches += bad;
		print_round(vcpu, round, bad);
		gap_report(vcpu);
		db_write(DB_PROGRESS, round);
		if (params.idle_ms)
			idle(vcpu, params.idle_ms);
	}
	db_write(DB_DONE, mismatches);
	for (;;)
		__asm__ volatile("pause");
}

/* ---- CPL 0: the minimum to get to CPL 3 ---- */

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3, iomap_base;
} __attribute__((packed));

struct idt_gate {
	u16 offset_low, selector;
	u8 ist, type_attr;
	u16 offset_mid;
	u32 offset_high, reserved;
} __attribute__((packed));

/* A GDT per vCPU (each needs its own TSS descriptor: ltr marks it busy). */
struct cpu {
	u64 gdt[7]; /* null, kernel code, kernel data, user data, user code, TSS (2) */
	struct tss tss;
} __attribute__((aligned(64)));

#define SEL_KERNEL_CODE 0x08
#define SEL_TSS 0x28

/* Page-table entry bits. Accessed and dirty are set up front so the CPU never
 * writes to the tables (they stay identical, and mergeable, across guests). */
#define PTE_TABLE 0x27 /* present, writable, user, accessed */
#define PTE_LARGE 0xe7 /* the same, dirty, 2 MiB page */
#define PTE_UNCACHED 0x18 /* write-through, cache-disable */

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[MAX_GIB] __attribute__((aligned(4096)));
static struct idt_gate idt[32] __attribute__((aligned(16)));
static struct cpu cpus[MAX_VCPUS];
static char user_stacks[MAX_VCPUS][USTACK_SIZE] __attribute__((aligned(16)));

/* entry.S starts each vCPU on its kernel stack; it is also the vCPU's RSP0. */
char kernel_stacks[MAX_VCPUS][KSTACK_SIZE] __attribute__((aligned(16)));
const u64 kernel_stack_size = KSTACK_SIZE;

extern char __image_end[], fault_stubs[];
void reload_segments(void);
void enter_user(void (*rip)(u64), void *rsp, u64 arg) __attribute__((noreturn));

/* Identity-maps [0, max(end of RAM, 4 GiB)) with user-accessible 2 MiB pages,
 * the doorbell's uncached. The page directories go right after the image and
 * the test pages start above them. */
static void build_page_tables(void)
{
	u64 top = 4 * GIB;
	for (int i = 0; i < e820_count(); i++)
		if (e820(i)->addr + e820(i)->size > top)
			top = e820(i)->addr + e820(i)->size;
	u64 gibs = align_up(top, GIB) / GIB;
	if (gibs > MAX_GIB)
		gibs = MAX_GIB;
	u64 *pd = (u64 *)align_up((u64)__image_end, PAGE_SIZE);
	for (u64 g = 0; g < gibs; g++) {
		pdpt[g] = (u64)&pd[g * 512] | PTE_TABLE;
		/* The longest loop at CPL 0, where every instruction counts:
		 * unrolled, it takes about 2 per entry instead of 8. */
		u64 *entry = &pd[g * 512], first = g * GIB + PTE_LARGE;
#pragma GCC unroll 8
		for (u64 i = 0; i < 512; i++)
			entry[i] = first + i * LARGE_PAGE;
	}
	pd[DOORBELL / LARGE_PAGE] |= PTE_UNCACHED;
	for (u64 g = 0; g < gibs; g += 512)
		pml4[g / 512] = (u64)&pdpt[g] | PTE_TABLE;
	mapped_top = gibs * GIB;
	test_floor = align_up((u64)&pd[gibs * 512], LARGE_PAGE);
}

static void build_idt(void)
{
	for (int v = 0; v < 32; v++) {
		u64 handler = (u64)fault_stubs + 16 * v;
		idt[v] = (struct idt_gate){ (u16)handler, SEL_KERNEL_CODE, 0, 0x8e, (u16)(handler >> 16),
					    (u32)(handler >> 32), 0 };
	}
}

struct descriptor_table_register {
	u16 limit;
	u64 base;
} __attribute__((packed));

/* Loads this vCPU's GDT and TSS, the shared IDT and the page tables. */
static void load_cpu_tables(u64 index, u64 kernel_stack_top)
{
	struct cpu *c = &cpus[index];
	u64 tss = (u64)&c->tss, limit = sizeof(struct tss) - 1;
	c->gdt[1] = 0x00af9b000000ffffUL; /* kernel code, 64-bit */
	c->gdt[2] = 0x00cf93000000ffffUL; /* kernel data */
	c->gdt[3] = 0x00cff3000000ffffUL; /* user data, DPL 3 */
	c->gdt[4] = 0x00affb000000ffffUL; /* user code, 64-bit, DPL 3 */
	c->gdt[5] = limit | (tss & 0xffffff) << 16 | 0x89UL << 40 | (tss >> 24 & 0xff) << 56;
	c->gdt[6] = tss >> 32;
	c->tss.rsp[0] = kernel_stack_top;
	c->tss.iomap_base = sizeof(struct tss); /* no I/O bitmap */

	struct descriptor_table_register gdtr = { sizeof(c->gdt) - 1, (u64)c->gdt };
	struct descriptor_table_register idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lgdt %0" ::"m"(gdtr));
	reload_segments();
	__asm__ volatile("ltr %w0" ::"r"(SEL_TSS));
	__asm__ volatile("lidt %0" ::"m"(idtr));
	__asm__ volatile("mov %0, %%cr3" ::"r"(pml4) : "memory");
}

/* Called by entry.S on every vCPU, on its kernel stack. */
void cpu_setup(u64 index, const u8 *bp, u64 kernel_stack_top) __attribute__((noreturn));
void cpu_setup(u64 index, const u8 *bp, u64 kernel_stack_top)
{
	if (index == 0) {
		boot_params = bp;
		build_page_tables();
		build_idt();
		set_stage(STAGE_TABLES_BUILT);
	} else {
		wait_for_stage(STAGE_TABLES_BUILT);
	}
	load_cpu_tables(index, kernel_stack_top);
	if (index == 0 && chatter_mode() == 2)
		chatter(serial_putc);
	enter_user(user_main, user_stacks[index] + USTACK_SIZE, index);
}

/* Called by the exception stubs (entry.S) at CPL 0: any exception is a
 * failure. Say where, then end the guest. */
void fault_entry(u64 vector, const u64 *frame)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	console_seize();
	puts("memtest: exception ");
	putdec(vector);
	puts(" at rip ");
	puthex(frame[2]);
	puts(" error ");
	puthex(frame[1]);
	puts(" cr2 ");
	puthex(cr2);
	putc('\n');
	db_write(DB_FAULT_RIP, frame[2]);
	db_write(DB_FAULT, vector);
}
