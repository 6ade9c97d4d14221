/* Entry point and the simple test modes of the bundled guest.
 * The host enters in 64-bit mode with paging on, at CPL 3 (IOPL 3) or CPL 0,
 * RDI = mode, RSI/RDX = arguments, RSP = this vCPU's stack. */
#include "layout.h"

    .code64
    .section .text.start, "ax"
    .globl _start
_start:
    cmp $GUEST_MODE_COMPUTE, %rdi
    je mode_compute
    cmp $GUEST_MODE_PORT_IN, %rdi
    je mode_port_in
    cmp $GUEST_MODE_MMIO, %rdi
    je mode_mmio
    cmp $GUEST_MODE_SPIN, %rdi
    je mode_spin
    cmp $GUEST_MODE_HALT, %rdi
    je mode_halt
    call guest_c_main     /* SysV: rdi mode, rsi, rdx, rcx slot, r8 data; returns the status */
    jmp guest_exit

    .text
/* Exit with status EAX; if the host resumes us anyway, exit again. */
    .globl guest_exit
guest_exit:
    mov $GUEST_PORT_EXIT, %dx
1:  out %eax, %dx
    jmp 1b

/* x = x * 6364136223846793005 + 1442695040888963407, RSI times, from x = RDX. */
mode_compute:
    mov %rdx, %rax
    movabs $6364136223846793005, %r8
    movabs $1442695040888963407, %r9
    mov %rsi, %rcx
    test %rcx, %rcx
    jz 2f
1:  imul %r8, %rax
    add %r9, %rax
    dec %rcx
    jnz 1b
2:  mov %rax, %r10
    mov $GUEST_PORT_RESULT, %dx
    out %eax, %dx          /* low 32 bits */
    shr $32, %rax
    out %eax, %dx          /* high 32 bits */
    xor %eax, %eax
    jmp guest_exit

/* Read 1, 2 and 4 bytes from the input port and echo each to the result port.
 * Exits with the 4-byte value still in EAX, so the host can check the register too. */
mode_port_in:
    mov $GUEST_PORT_INPUT, %dx
    in %dx, %al
    mov $GUEST_PORT_RESULT, %dx
    out %al, %dx
    mov $GUEST_PORT_INPUT, %dx
    in %dx, %ax
    mov $GUEST_PORT_RESULT, %dx
    out %ax, %dx
    mov $GUEST_PORT_INPUT, %dx
    in %dx, %eax
    mov $GUEST_PORT_RESULT, %dx
    out %eax, %dx
    jmp guest_exit

/* At the MMIO test address T: read 4 bytes at T, write them + 1 at T+4; read 8 at T+8,
 * write + 1 at T+16; read 1 at T+24, write + 1 at T+25; read 2 at T+26, write + 1 at T+28. */
mode_mmio:
    mov $GUEST_MMIO_TEST_ADDRESS, %rbx
    movl (%rbx), %eax
    inc %eax
    movl %eax, 4(%rbx)
    movq 8(%rbx), %rax
    inc %rax
    movq %rax, 16(%rbx)
    movb 24(%rbx), %al
    inc %al
    movb %al, 25(%rbx)
    movw 26(%rbx), %ax
    inc %ax
    movw %ax, 28(%rbx)
    xor %eax, %eax
    jmp guest_exit

mode_spin:
1:  jmp 1b

mode_halt:
1:  hlt
    jmp 1b
