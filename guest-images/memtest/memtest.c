/*
 * memtest: a tiny guest that proves its memory is never corrupted.
 *
 * It fills every page of its RAM with content it can recompute, then in each
 * round rewrites a few "volatile" pages and verifies every page against what
 * it last wrote, reporting through the VMM's MMIO doorbell (docs/memtest.md).
 * Page sharing merges its pages underneath it; any lost write, or any write
 * leaking from another guest, shows up as a mismatch.
 *
 * Page kinds (chosen per run of `run=` pages by a hash of seed and position):
 *   zero     (fraction `zero=`)   all zero bytes
 *   shared   (fraction `share=`)  content from (seed, page): the same in every
 *                                 guest started with the same seed
 *   private  (the rest)           content from (seed, guest id, page)
 *   volatile (`volatile=` pages, spread evenly) private content that changes
 *                                 every round
 * Parameters come from the command line: seed= share= zero= volatile=
 * rounds= (0: forever) run=. Unknown words are ignored.
 *
 * Boot: every vCPU enters at _start (entry.S) at CPL 0 with RDI = its index.
 * cpu_setup() builds page tables (vCPU 0; the others wait), a GDT, TSS and
 * IDT, then drops to CPL 3, where all the work happens: on KVM-on-PVM hosts
 * CPL 0 is emulated and slow while CPL 3 runs at native speed, and CPL 3 can
 * reach the VMM through MMIO but not port I/O. Each vCPU tests its own slice
 * of the pages and reports DONE with its mismatch count.
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define PAGE_SIZE 4096UL
#define MAX_VCPUS 32
#define MAX_GIB 64 /* RAM (and identity map) this build supports */
#define USTACK_SIZE 32768
#define MAX_REPORTED 16

/* ---- the doorbell (docs/memtest.md) ---- */

#define DOORBELL 0xd0000000UL
enum {
	DB_CONSOLE = 0x00,
	DB_PROGRESS = 0x08,
	DB_MISMATCH = 0x10,
	DB_DONE = 0x18,
	DB_FAULT = 0x20,
	DB_FAULT_RIP = 0x28,
	DB_GUEST_ID = 0x30,
	DB_VCPU_COUNT = 0x38,
};

static inline void db_write(u64 reg, u64 value)
{
	*(volatile u64 *)(DOORBELL + reg) = value;
}

static inline u64 db_read(u64 reg)
{
	return *(volatile u64 *)(DOORBELL + reg);
}

static void putc(char c)
{
	db_write(DB_CONSOLE, (u8)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void putdec(u64 v)
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

static void puthex(u64 v)
{
	puts("0x");
	for (int shift = 60; shift >= 0; shift -= 4)
		putc("0123456789abcdef"[(v >> shift) & 15]);
}

/* ---- boot parameters (Linux zero page) ---- */

struct e820_entry {
	u64 addr, size;
	u32 type;
} __attribute__((packed));

#define BP_CMDLINE_PTR 0x228
#define BP_E820_ENTRIES 0x1e8
#define BP_E820_TABLE 0x2d0
#define E820_RAM 1

static const u8 *boot_params;

static const struct e820_entry *e820(int i)
{
	return (const struct e820_entry *)(boot_params + BP_E820_TABLE) + i;
}

static int e820_count(void)
{
	return boot_params[BP_E820_ENTRIES];
}

/* ---- parameters ---- */

struct params {
	u64 seed, volatile_pages, rounds, run;
	u64 share, zero; /* fractions, in parts per 2^32 */
};

static int word_is(const char *w, const char *key)
{
	while (*key)
		if (*w++ != *key++)
			return 0;
	return 1;
}

static u64 parse_uint(const char *s)
{
	u64 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}

/* "0.8" or "1" -> fraction of 2^32, clamped to [0, 2^32]. */
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
	if (whole >= 1)
		return 1UL << 32;
	return (frac << 32) / scale;
}

static struct params parse_params(const char *cmdline)
{
	struct params p = { .seed = 1, .volatile_pages = 64, .rounds = 3, .run = 16 };
	p.share = parse_fraction("0.5");
	p.zero = parse_fraction("0.1");
	for (const char *w = cmdline; w && *w;) {
		while (*w == ' ')
			w++;
		if (word_is(w, "seed="))
			p.seed = parse_uint(w + 5);
		else if (word_is(w, "share="))
			p.share = parse_fraction(w + 6);
		else if (word_is(w, "zero="))
			p.zero = parse_fraction(w + 5);
		else if (word_is(w, "volatile="))
			p.volatile_pages = parse_uint(w + 9);
		else if (word_is(w, "rounds="))
			p.rounds = parse_uint(w + 7);
		else if (word_is(w, "run="))
			p.run = parse_uint(w + 4);
		while (*w && *w != ' ')
			w++;
	}
	if (p.run == 0)
		p.run = 1;
	if (p.share + p.zero > (1UL << 32))
		p.share = (1UL << 32) - p.zero;
	return p;
}

/* ---- the pages under test and their expected content ---- */

extern char __image_end[];

/* RAM from the end of our image (2 MiB aligned) up, in e820 order. */
struct range {
	u64 start, pages, first; /* first: global index of its first page */
};

static struct range ranges[16];
static int nranges;
static u64 total_pages;
static struct params params;
static u64 guest_id, vcpu_count;

static void find_test_pages(void)
{
	u64 floor = ((u64)__image_end + (2UL << 20) - 1) & ~((2UL << 20) - 1);
	for (int i = 0; i < e820_count() && nranges < 16; i++) {
		const struct e820_entry *e = e820(i);
		if (e->type != E820_RAM)
			continue;
		u64 start = e->addr < floor ? floor : e->addr;
		u64 end = (e->addr + e->size) & ~(PAGE_SIZE - 1);
		start = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
		if (end <= start)
			continue;
		ranges[nranges++] = (struct range){ start, (end - start) / PAGE_SIZE, total_pages };
		total_pages += (end - start) / PAGE_SIZE;
	}
}

static u64 *page_addr(u64 page)
{
	int r = 0;
	while (r + 1 < nranges && ranges[r + 1].first <= page)
		r++;
	return (u64 *)(ranges[r].start + (page - ranges[r].first) * PAGE_SIZE);
}

static u64 mix(u64 x)
{
	x += 0x9e3779b97f4a7c15UL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
	return x ^ (x >> 31);
}

enum kind { ZERO, SHARED, PRIVATE, VOLATILE };

static int is_volatile(u64 page)
{
	u64 n = params.volatile_pages;
	if (n == 0)
		return 0;
	if (n >= total_pages)
		return 1;
	u64 stride = total_pages / n;
	return page % stride == 0 && page / stride < n;
}

static enum kind kind_of(u64 page)
{
	if (is_volatile(page))
		return VOLATILE;
	u64 u = mix(params.seed * 0x100000001b3UL ^ (page / params.run)) >> 32;
	if (u < params.zero)
		return ZERO;
	if (u < params.zero + params.share)
		return SHARED;
	return PRIVATE;
}

/* The key from which a page's words are generated (0 for a zero page). */
static u64 page_key(u64 page, u64 version)
{
	switch (kind_of(page)) {
	case ZERO:
		return 0;
	case SHARED:
		return mix(params.seed ^ mix(page));
	case PRIVATE:
		return mix(params.seed ^ mix(page ^ (guest_id + 1) << 40));
	default:
		return mix(params.seed ^ mix(page ^ (guest_id + 1) << 40) ^ mix(version + 1));
	}
}

static void fill_page(u64 page, u64 version)
{
	u64 key = page_key(page, version), *p = page_addr(page);
	for (u64 i = 0; i < PAGE_SIZE / 8; i++)
		p[i] = key ? mix(key + i) : 0;
}

/* Returns 1 and reports if the page differs from what was last written. */
static int check_page(u64 page, u64 version, int report)
{
	u64 key = page_key(page, version), *p = page_addr(page);
	for (u64 i = 0; i < PAGE_SIZE / 8; i++) {
		u64 want = key ? mix(key + i) : 0;
		if (p[i] == want)
			continue;
		if (report) {
			db_write(DB_MISMATCH, (u64)p);
			puts("memtest: MISMATCH page ");
			puthex((u64)p);
			puts(" word ");
			putdec(i);
			puts(" expected ");
			puthex(want);
			puts(" found ");
			puthex(p[i]);
			putc('\n');
		}
		return 1;
	}
	return 0;
}

/* ---- CPL 3: the work ---- */

static void print_plan(void)
{
	u64 shared = 0, zero = 0;
	for (u64 page = 0; page < total_pages; page++) {
		enum kind k = kind_of(page);
		shared += k == SHARED;
		zero += k == ZERO;
	}
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
	puts(" volatile=");
	putdec(params.volatile_pages);
	puts(" rounds=");
	putdec(params.rounds);
	puts(" run=");
	putdec(params.run);
	puts("\nmemtest: ideal mergeable pages ");
	putdec(shared + zero);
	puts(" (shared ");
	putdec(shared);
	puts(", zero ");
	putdec(zero);
	puts(")\n");
}

void user_main(u64 vcpu)
{
	u64 first = total_pages * vcpu / vcpu_count, end = total_pages * (vcpu + 1) / vcpu_count;
	u64 mismatches = 0, reported = 0;
	if (vcpu == 0)
		print_plan();
	for (u64 page = first; page < end; page++)
		fill_page(page, 0);
	db_write(DB_PROGRESS, 0);
	for (u64 round = 1; params.rounds == 0 || round <= params.rounds; round++) {
		for (u64 page = first; page < end; page++)
			if (kind_of(page) == VOLATILE)
				fill_page(page, round);
		u64 bad = 0;
		for (u64 page = first; page < end; page++)
			bad += check_page(page, round, reported + bad < MAX_REPORTED);
		mismatches += bad;
		reported += bad;
		if (vcpu == 0 || bad) {
			puts("memtest: vcpu ");
			putdec(vcpu);
			puts(" round ");
			putdec(round);
			puts(bad ? " FAILED: " : " ok: ");
			putdec(bad);
			puts(" bad pages\n");
		}
		db_write(DB_PROGRESS, round);
	}
	db_write(DB_DONE, mismatches);
	for (;;)
		;
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

struct cpu {
	u64 gdt[8]; /* null, kernel code, kernel data, user data, user code, TSS (2) */
	struct tss tss;
} __attribute__((aligned(64)));

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[MAX_GIB][512] __attribute__((aligned(4096)));
static struct idt_gate idt[32] __attribute__((aligned(16)));
static struct cpu cpus[MAX_VCPUS];
static char user_stacks[MAX_VCPUS][USTACK_SIZE] __attribute__((aligned(16)));
static volatile u32 tables_ready;

extern char kernel_stacks[], fault_stubs[];
void reload_segments(void);
void enter_user(void (*rip)(u64), void *rsp, u64 arg) __attribute__((noreturn));

/* Identity map [0, max(end of RAM, 4 GiB)) with user-accessible 2 MiB pages. */
static void build_page_tables(void)
{
	u64 top = 4UL << 30;
	for (int i = 0; i < e820_count(); i++)
		if (e820(i)->addr + e820(i)->size > top)
			top = e820(i)->addr + e820(i)->size;
	u64 gibs = (top + (1UL << 30) - 1) >> 30;
	if (gibs > MAX_GIB)
		gibs = MAX_GIB;
	pml4[0] = (u64)pdpt | 0x7;
	for (u64 g = 0; g < gibs; g++) {
		pdpt[g] = (u64)pd[g] | 0x7;
		for (u64 i = 0; i < 512; i++)
			pd[g][i] = ((g << 30) + (i << 21)) | 0x87; /* present, writable, user, 2 MiB */
	}
}

static void build_idt(void)
{
	for (int v = 0; v < 32; v++) {
		u64 handler = (u64)fault_stubs + 16 * v;
		idt[v] = (struct idt_gate){ (u16)handler, 0x08, 0, 0x8e, (u16)(handler >> 16), (u32)(handler >> 32), 0 };
	}
}

static void load_cpu_tables(u64 index)
{
	struct cpu *c = &cpus[index];
	u64 tss = (u64)&c->tss, limit = sizeof(struct tss) - 1;
	c->gdt[1] = 0x00af9b000000ffffUL; /* kernel code, 64-bit */
	c->gdt[2] = 0x00cf93000000ffffUL; /* kernel data */
	c->gdt[3] = 0x00cff3000000ffffUL; /* user data, DPL 3 */
	c->gdt[4] = 0x00affb000000ffffUL; /* user code, 64-bit, DPL 3 */
	c->gdt[5] = (limit & 0xffff) | ((tss & 0xffffff) << 16) | (0x89UL << 40) | ((tss >> 24 & 0xff) << 56);
	c->gdt[6] = tss >> 32;
	c->tss.rsp[0] = (u64)kernel_stacks + (index + 1) * 16384;
	c->tss.iomap_base = sizeof(struct tss);

	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) gdtr = { sizeof(c->gdt) - 1, (u64)c->gdt }, idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lgdt %0" ::"m"(gdtr));
	reload_segments();
	__asm__ volatile("ltr %w0" ::"r"(0x28));
	__asm__ volatile("lidt %0" ::"m"(idtr));
	__asm__ volatile("mov %0, %%cr3" ::"r"(pml4) : "memory");
}

void cpu_setup(u64 index, const u8 *bp) __attribute__((noreturn));
void cpu_setup(u64 index, const u8 *bp)
{
	if (index == 0) {
		boot_params = bp;
		build_page_tables();
		build_idt();
		tables_ready = 1;
	} else {
		while (!tables_ready)
			__asm__ volatile("pause");
	}
	load_cpu_tables(index);
	if (index == 0) {
		/* Our page tables are in force: now the doorbell is reachable. */
		guest_id = db_read(DB_GUEST_ID);
		vcpu_count = db_read(DB_VCPU_COUNT);
		params = parse_params((const char *)(u64) * (const u32 *)(bp + BP_CMDLINE_PTR));
		find_test_pages();
		tables_ready = 2;
	} else {
		while (tables_ready != 2)
			__asm__ volatile("pause");
	}
	enter_user(user_main, user_stacks[index] + USTACK_SIZE, index);
}

/* Any exception is a failure: say where, and end the guest. */
void fault_entry(u64 vector, const u64 *frame)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
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
