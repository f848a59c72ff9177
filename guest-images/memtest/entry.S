/*
 * memtest's entry, its "start every vCPU here" note and the few instructions
 * C cannot express. Every vCPU enters at _start in 64-bit mode at CPL 0
 * (docs/memtest.md): RDI = vCPU index, RSI = boot params, RSP unusable.
 * We switch to the vCPU's kernel stack and call
 * cpu_setup(index, boot_params, kernel_stack_top), which leaves for CPL 3
 * through enter_user and never returns.
 */

    .section .note.vmm, "a"
    .balign 4
    .long 4             /* namesz: "VMM\0" */
    .long 4             /* descsz */
    .long 0x4d4d5601    /* start all vCPUs at the entry point */
    .asciz "VMM"
    .long 0

    .section .text.entry, "ax"
    .globl _start
    .code64
_start:
    cli
    lea 1(%rdi), %rax
    imul kernel_stack_size(%rip), %rax
    lea kernel_stacks(%rip), %rsp
    add %rax, %rsp              /* the top of kernel_stacks[index] */
    mov %rsp, %rdx
    call cpu_setup
1:  hlt
    jmp 1b

/* reload_segments(): CS = 0x08 and data = 0x10 from our own GDT. */
    .globl reload_segments
reload_segments:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    pop %rax                    /* return address */
    push $0x08
    push %rax
    lretq

/* enter_user(rip, rsp, arg): iretq to CPL 3 with IF = 0, IOPL = 0. */
    .globl enter_user
enter_user:
    push $0x1b                  /* SS: user data, RPL 3 */
    push %rsi                   /* RSP */
    push $0x2                   /* RFLAGS */
    push $0x23                  /* CS: user 64-bit code, RPL 3 */
    push %rdi                   /* RIP */
    mov %rdx, %rdi
    mov $0x1b, %ax
    mov %ax, %ds
    mov %ax, %es
    iretq

/* Exception stubs: push a dummy error code where the CPU pushes none, then
 * the vector, and go to fault_entry(vector, frame). */
.macro STUB vector, has_error
    .balign 16
    .if \has_error == 0
    push $0
    .endif
    push $\vector
    jmp fault_common
.endm

    .balign 16
    .globl fault_stubs
fault_stubs:
    STUB 0,0;  STUB 1,0;  STUB 2,0;  STUB 3,0;  STUB 4,0;  STUB 5,0;  STUB 6,0;  STUB 7,0
    STUB 8,1;  STUB 9,0;  STUB 10,1; STUB 11,1; STUB 12,1; STUB 13,1; STUB 14,1; STUB 15,0
    STUB 16,0; STUB 17,1; STUB 18,0; STUB 19,0; STUB 20,0; STUB 21,1; STUB 22,0; STUB 23,0
    STUB 24,0; STUB 25,0; STUB 26,0; STUB 27,0; STUB 28,0; STUB 29,1; STUB 30,1; STUB 31,0

fault_common:
    mov (%rsp), %rdi            /* vector */
    mov %rsp, %rsi              /* frame: vector, error, rip, cs, rflags, rsp, ss */
    and $-16, %rsp
    call fault_entry
2:  hlt
    jmp 2b
