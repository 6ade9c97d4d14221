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
    cmp $GUEST_MODE_CYCLIC_INTERRUPT, %rdi
    je mode_cyclic_interrupt
    cmp $GUEST_MODE_STRING_IO, %rdi
    je mode_string_io
    cmp $GUEST_MODE_RING_ECHO, %rdi
    je mode_ring_echo
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

/* String port I/O: four bytes out with rep outsb, three words in with rep insw, each word
 * then reported with a plain out. */
mode_string_io:
    lea string_out(%rip), %rsi
    mov $GUEST_PORT_RESULT, %dx
    mov $4, %ecx
    rep outsb
    lea string_in(%rip), %rdi
    mov $GUEST_PORT_INPUT, %dx
    mov $3, %ecx
    rep insw
    mov $GUEST_PORT_RESULT, %dx
    movzwl string_in(%rip), %eax
    out %eax, %dx
    movzwl string_in+2(%rip), %eax
    out %eax, %dx
    movzwl string_in+4(%rip), %eax
    out %eax, %dx
    xor %eax, %eax
    jmp guest_exit

mode_spin:
1:  jmp 1b

mode_halt:
1:  hlt
    jmp 1b

/* The conventional timer path (the method of kvm-unit-tests' tscdeadline_latency): x2APIC,
 * LVT timer in TSC-deadline mode, IA32_TSC_DEADLINE, sti; hlt, and an interrupt handler that
 * records the TSC. Runs at CPL 0 (hlt and wrmsr need it). RSI = periods, RDX = period in TSC
 * cycles, R8 = data buffer. Written in assembly to keep the emulated CPL 0 path short. */
mode_cyclic_interrupt:
    mov %rdx, %r12                    /* period */
    mov %rsi, %r13                    /* count */
    mov %r8, %r14                     /* data */
    /* IDT gate: 64-bit interrupt gate, kernel code selector, present, DPL 0. */
    lea timer_interrupt(%rip), %rax
    mov $(GUEST_IDT_ADDRESS + GUEST_TIMER_VECTOR * 16), %rdi
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    /* x2APIC on (IA32_APIC_BASE: enable | x2APIC). */
    mov $0x1B, %ecx
    rdmsr
    or $0xC00, %eax
    wrmsr
    /* Spurious-interrupt vector register: APIC software enable (while disabled, every LVT
     * entry stays masked), spurious vector 0xFF. */
    mov $0x80F, %ecx
    mov $0x1FF, %eax
    xor %edx, %edx
    wrmsr
    /* LVT timer: our vector, TSC-deadline mode. */
    mov $0x832, %ecx
    mov $(GUEST_TIMER_VECTOR | (2 << 17)), %eax
    xor %edx, %edx
    wrmsr
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r15                    /* deadline */
    xor %rbx, %rbx                    /* i */
1:  cmp %r13, %rbx
    jae 2f
    add %r12, %r15
    mov %r15, %rax
    mov %r15, %rdx
    shr $32, %rdx
    mov $0x6E0, %ecx                  /* IA32_TSC_DEADLINE */
    wrmsr
    sti
    hlt
    cli
    mov timer_tsc(%rip), %rax
    sub %r15, %rax
    mov %rax, (%r14, %rbx, 8)
    inc %rbx
    jmp 1b
2:  xor %eax, %eax
    jmp guest_exit

timer_interrupt:
    push %rax
    push %rdx
    push %rcx
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, timer_tsc(%rip)
    mov $0x80B, %ecx                  /* x2APIC EOI */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rcx
    pop %rdx
    pop %rax
    iretq

/* The interrupt-driven echo (the shape of virtio-net's receive notification): the host's I/O
 * thread writes each datagram into the receive ring and raises GUEST_RING_VECTOR (an MSI through
 * an irqfd); the guest, halted with interrupts on, wakes, hands every new record back through the
 * transmit ring (the record's own address: a zero-copy echo) and rings the transmit doorbell, whose
 * exit the host handles by sending them. CPL 0, emulated on nested hosts: written in assembly, a
 * few instructions per datagram. R8 = the data buffer with the rings (GUEST_RING_*).
 * r12 = receive records consumed, r13 = transmit descriptors written, r15 = descriptors published. */
mode_ring_echo:
    mov %r8, %r14
    lea ring_interrupt(%rip), %rax
    mov $(GUEST_IDT_ADDRESS + GUEST_RING_VECTOR * 16), %rdi
    mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    mov $0x1B, %ecx                   /* IA32_APIC_BASE: enable, x2APIC */
    rdmsr
    or $0xC00, %eax
    wrmsr
    mov $0x80F, %ecx                  /* spurious-interrupt vector register: software enable */
    mov $0x1FF, %eax
    xor %edx, %edx
    wrmsr
    mov $0x80B, %ecx                  /* EOI: a run stopped inside the handler left its vector in service */
    xor %eax, %eax
    wrmsr
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r15d, %r15d
    movl $0, GUEST_RING_RX_CONSUMED(%r14)
    movl $0, GUEST_RING_TX_PRODUCED(%r14)
    mov $GUEST_NET_READY, %eax
    mov $GUEST_PORT_RESULT, %dx
    out %eax, %dx
1:  mov GUEST_RING_RX_PRODUCED(%r14), %eax
    cmp %eax, %r12d
    je 2f
    mov %r12d, %ecx                   /* the record in slot r12 mod entries ... */
    and $(GUEST_RING_ENTRIES - 1), %ecx
    shl $GUEST_RING_SLOT_SHIFT, %ecx
    lea GUEST_RING_RX_SLOTS(%r14, %rcx), %rdx
    mov %r13d, %ecx                   /* ... goes into transmit descriptor r13 mod entries */
    and $(GUEST_RING_ENTRIES - 1), %ecx
    mov %rdx, GUEST_RING_TX_DESCRIPTORS(%r14, %rcx, 8)
    inc %r12d
    inc %r13d
    jmp 1b
2:  cmp %r15d, %r13d
    je 3f
    mov %r13d, %r15d
    mov %r13d, GUEST_RING_TX_PRODUCED(%r14)
    mov $GUEST_PORT_RING_DOORBELL, %dx
    out %eax, %dx                     /* the host sends them before the guest resumes ... */
    mov %r12d, GUEST_RING_RX_CONSUMED(%r14) /* ... so their receive slots are free again */
    jmp 1b
3:  sti                               /* an interrupt raised since the check is pending: hlt wakes at once */
    hlt
    cli
    jmp 1b

ring_interrupt:
    push %rax
    push %rdx
    push %rcx
    mov $0x80B, %ecx                  /* x2APIC EOI */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rcx
    pop %rdx
    pop %rax
    iretq

/* The handler of the interrupt the host injects in the interruptible-sleep mode: counts it,
 * reports GUEST_INJECTED_MARK (an exit the host timestamps) and signals EOI. */
    .globl injected_interrupt
injected_interrupt:
    push %rax
    push %rdx
    push %rcx
    incq injected_count(%rip)
    mov $GUEST_INJECTED_MARK, %eax
    mov $GUEST_PORT_RESULT, %dx
    out %eax, %dx
    mov $0x80B, %ecx                  /* x2APIC EOI */
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rcx
    pop %rdx
    pop %rax
    iretq

    .data
    .balign 8
    .globl injected_count
injected_count:
    .quad 0
timer_tsc:
    .quad 0
string_out:
    .ascii "RTV!"
string_in:
    .word 0, 0, 0
