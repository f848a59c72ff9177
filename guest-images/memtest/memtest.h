/* What memtest.c shares with the device drivers (virtio.c, net.c). */
#ifndef MEMTEST_H
#define MEMTEST_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define PAGE_SIZE 4096UL

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
	DB_IDLE = 0x40,
	DB_GAP = 0x48,
	DB_WAIT = 0x50,
	DB_TSC_KHZ = 0x58,
};

static inline void db_write(u64 reg, u64 value)
{
	*(volatile u64 *)(DOORBELL + reg) = value;
}

static inline u64 db_read(u64 reg)
{
	return *(volatile u64 *)(DOORBELL + reg);
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

void console_lock(void);
void console_unlock(void);
void putc(char c);
void puts(const char *s);
void putdec(u64 v);
void puthex(u64 v);
const char *cmdline(void);
int word_is(const char *w, const char *key);
const char *next_word(const char *w);
u64 parse_uint(const char *s);

/* virtio.c: finds the devices the command line announces and sets them up
 * (vCPU 0, at CPL 3, after the plan). */
void devices_init(void);
/* Serves every device once: frames and packets that came in are answered.
 * Returns how many were handled. vCPU 0 only. */
u64 devices_poll(void);
/* Whether any device needs polling. */
int devices_present(void);

#endif
