/*
 * The tiny-linux init: a static, libc-free program that proves user space
 * runs. It prints a marker on the console, then asks for a restart, which
 * the VMM (Linux booted with reboot=k) sees as an i8042 reset: the guest's
 * clean way out.
 *
 * On KVM-on-PVM hosts user space cannot make system calls, so this program
 * dies at its first `syscall` and the kernel panics (panic=-1 also resets):
 * there the boot test looks for the kernel's "Run /init" line instead.
 */

#define SYS_write 1
#define SYS_reboot 169
#define LINUX_REBOOT_MAGIC1 0xfee1deadL
#define LINUX_REBOOT_MAGIC2 672274793L
#define LINUX_REBOOT_CMD_RESTART 0x01234567L

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

void _start(void)
{
	syscall3(SYS_write, 1, (long)marker, sizeof(marker) - 1);
	syscall4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0);
	for (;;)
		;
}
