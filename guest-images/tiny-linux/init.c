/*
 * The tiny-linux init: a static, libc-free program with two modes.
 *
 * By default it proves user space runs: it prints a marker on the console,
 * then asks for a restart, which the VMM (Linux booted with reboot=k) sees
 * as an i8042 reset: the guest's clean way out. On KVM-on-PVM hosts user
 * space cannot make system calls, so there it dies at its first `syscall`
 * and the kernel panics (panic=-1 also resets): the boot test looks for the
 * kernel's "Run /init" line instead.
 *
 * With `tiny_init=idle` on the kernel command line (the kernel hands such
 * words to init in its environment, on its stack: reading them needs no
 * system call) it spins forever without a single system call, so the kernel
 * stays up on any host and answers the network (ping, through the address
 * `ip=` gave it) from its interrupt and softirq work. The spin keeps the
 * vCPU busy at user level: the guest never idles.
 */

#define SYS_write 1
#define SYS_open 2
#define SYS_reboot 169
#define LINUX_REBOOT_MAGIC1 0xfee1deadL
#define LINUX_REBOOT_MAGIC2 672274793L
#define LINUX_REBOOT_CMD_RESTART 0x01234567L
#define O_WRONLY 01
#define O_NOCTTY 0400

static long syscall3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

static long syscall4(long nr, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return ret;
}

static const char marker[] = "VMM-TINY-LINUX: init reached user space\n";

static const char idle_word[] = "tiny_init=idle";

static int is_idle_word(const char *s)
{
	const char *w = idle_word;

	while (*w && *s == *w)
		s++, w++;
	return *w == 0 && *s == 0;
}

/*
 * The entry point: the kernel leaves argc, argv[], NULL, envp[], NULL at
 * the stack pointer. Hand that to start_c(), with the stack aligned as a
 * call would leave it (start_c() never returns).
 */
__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start_c\n"
	"	ud2\n");

void start_c(long *sp);

void start_c(long *sp)
{
	char **envp = (char **)(sp + 1 + sp[0] + 1); /* past argc, argv[], NULL */

	for (; *envp; envp++) {
		if (is_idle_word(*envp)) {
			for (;;)
				__asm__ volatile("pause");
		}
	}
	/*
	 * The kernel opens /dev/console (in our initramfs) as fds 0, 1 and 2;
	 * should fd 1 be unusable anyway, open the console ourselves.
	 */
	if (syscall3(SYS_write, 1, (long)marker, sizeof(marker) - 1) < 0) {
		long fd = syscall3(SYS_open, (long)"/dev/console", O_WRONLY | O_NOCTTY, 0);
		if (fd >= 0)
			syscall3(SYS_write, fd, (long)marker, sizeof(marker) - 1);
	}
	syscall4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0);
	for (;;)
		;
}
