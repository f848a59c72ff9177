/*
 * A guest that triple-faults at once: it loads an empty IDT and executes
 * ud2. The #UD cannot be delivered, nor the double fault that follows, so
 * the CPU shuts down (KVM_EXIT_SHUTDOWN). Entered like our other guests:
 * 64-bit mode at _start (see vmm/src/boot).
 */
    .section .text
    .globl _start
    .code64
_start:
    lidt empty_idt(%rip)
    ud2
1:  jmp 1b

    .section .rodata
empty_idt:
    .word 0                     /* limit */
    .quad 0                     /* base */
