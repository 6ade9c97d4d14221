/* The bundled guest's ABI with the host: memory layout, ports and modes.
 * RTVirtGuestImage/GuestLayout.swift mirrors these numbers; a unit test checks they agree. */
#ifndef RTVIRT_GUEST_LAYOUT_H
#define RTVIRT_GUEST_LAYOUT_H

/* Guest-physical memory (identity-mapped, so also guest-virtual). */
#define GUEST_GDT_ADDRESS        0x1000
#define GUEST_IDT_ADDRESS        0x2000
#define GUEST_PAGE_TABLE_ADDRESS 0x3000   /* PML4, then PDPT, then 4 page directories */
#define GUEST_TSS_ADDRESS        0xA000   /* 104 bytes + an all-open I/O permission bitmap */
#define GUEST_KERNEL_STACK_TOP   0xF000   /* RSP0 for interrupts taken at CPL 3 */
#define GUEST_IMAGE_ADDRESS      0x10000  /* the image is loaded and entered here */
#define GUEST_STACK_TOP          0x200000 /* vCPU n uses GUEST_STACK_TOP - n * GUEST_STACK_SIZE */
#define GUEST_STACK_SIZE         0x10000
#define GUEST_DATA_ADDRESS       0x200000 /* shared buffers between guest and host */
#define GUEST_MMIO_TEST_ADDRESS  0xD0000000 /* no RAM here: accesses exit to the VMM */

/* Ports (outside the in-kernel PIC/PIT ranges). */
#define GUEST_PORT_RESULT 0x510 /* out: a value the guest reports */
#define GUEST_PORT_EXIT   0x511 /* out: the guest is done; the value is its status */
#define GUEST_PORT_INPUT  0x512 /* in: a value the host supplies */

/* Modes, passed in RDI at entry; arguments in RSI and RDX. */
#define GUEST_MODE_COMPUTE 1 /* RSI iterations of an LCG from RDX; report low, high 32 bits */
#define GUEST_MODE_PORT_IN 2 /* read 1, 2, 4 bytes from the input port, echo each */
#define GUEST_MODE_MMIO    3 /* MMIO reads and writes of 1, 2, 4, 8 bytes at the test address */
#define GUEST_MODE_SPIN    4 /* loop forever */
#define GUEST_MODE_HALT    5 /* hlt (needs CPL 0) */

#define GUEST_STATUS_BAD_MODE 0xBAD0

#endif
