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
#define GUEST_RPC_SLOTS_ADDRESS  0x300000 /* VMRPC call slot of vCPU n: + n * 4096 */
#define GUEST_DATA_ADDRESS       0x400000 /* vCPU n's buffer shared with the host: + n * GUEST_DATA_SIZE */
#define GUEST_DATA_SIZE          0x100000
#define GUEST_MAX_VCPUS          12       /* stacks, slots and data buffers fit 16 MiB for this many */
#define GUEST_MMIO_TEST_ADDRESS  0xD0000000 /* no RAM here: accesses exit to the VMM */
#define GUEST_MMIO_DOORBELL      0xD0001000 /* VMRPC doorbell as an MMIO write */

/* Ports (outside the in-kernel PIC/PIT ranges). */
#define GUEST_PORT_RESULT 0x510 /* out: a value the guest reports */
#define GUEST_PORT_EXIT   0x511 /* out: the guest is done; the value is its status */
#define GUEST_PORT_INPUT  0x512 /* in: a value the host supplies */
#define GUEST_PORT_DOORBELL 0x518 /* out: VMRPC doorbell */
#define GUEST_PORT_BARE     0x519 /* out: an exit the host ignores (the baseline of rpc-bench) */
#define GUEST_PORT_RING_DOORBELL 0x51A /* out: the ring echo's transmit doorbell (the host sends the new transmit-ring entries) */

/* Modes, passed in RDI at entry; arguments in RSI and RDX; RCX = this vCPU's VMRPC slot;
 * R8 = this vCPU's data buffer. Modes from 6 on are written in C (modes.c). */
#define GUEST_MODE_COMPUTE 1 /* RSI iterations of an LCG from RDX; report low, high 32 bits */
#define GUEST_MODE_PORT_IN 2 /* read 1, 2, 4 bytes from the input port, echo each */
#define GUEST_MODE_MMIO    3 /* MMIO reads and writes of 1, 2, 4, 8 bytes at the test address */
#define GUEST_MODE_SPIN    4 /* loop forever */
#define GUEST_MODE_HALT    5 /* hlt (needs CPL 0) */
#define GUEST_MODE_RPC_DEMO  6 /* VMRPC null, clock.read, then serve reverse calls until told to stop */
#define GUEST_MODE_RPC_BENCH 7 /* RSI pairs of (bare exit, null call), cycles of each into the data buffer */
#define GUEST_MODE_CYCLIC_LONG_POLL  8 /* RSI periods of RDX TSC cycles, waiting with VMRPC timer.sleepUntil (CPL 3) */
#define GUEST_MODE_STRING_IO 10 /* rep outsb of "RTV!" to the result port; rep insw of 3 words from the input port, each reported */
#define GUEST_MODE_CYCLIC_INTERRUPT 9 /* the same with the LAPIC TSC-deadline timer, sti; hlt (CPL 0, needs the irqchip) */
#define GUEST_MODE_INTERRUPTIBLE_SLEEP 20 /* x2APIC on, sti, one interruptible timer.sleepUntil of RSI TSC cycles (CPL 0, needs the irqchip);
                                           * the handler of GUEST_INJECTED_VECTOR reports GUEST_INJECTED_MARK; then the call's status and
                                           * the number of interrupts taken are reported */
#define GUEST_MODE_CYCLIC_LONG_POLL_RAW 11 /* mode 8 with the 8-byte timer.sleepUntil and no guest-side spin (CPL 3) */
#define GUEST_MODE_SLEEP_CHECK 12 /* RSI sleeps of RDX TSC cycles with VMRPC timer.sleepUntil (8-byte form, no guest spin) */
#define GUEST_MODE_UDP_ECHO 13 /* net.*: UDP echo on port RSI & 0xFFFF (IPv6 if RSI bit 16), RDX datagrams per batch (<= 1: receiveFrom/sendTo) */
#define GUEST_MODE_TCP_ECHO 14 /* net.*: TCP echo server on port RSI & 0xFFFF (IPv6 if RSI bit 16), one connection at a time */
#define GUEST_MODE_RPC_BENCH_EXITLESS 21 /* RSI samples per path, in interleaved rounds of (RDX & 0xFFFF) calls per path: bare exit,
                                          * null call with the doorbell, null call exitless with the poller warm, null call exitless
                                          * with the poller asleep; data[4i + path] = TSC cycles. Then one timer.sleepUntil of
                                          * (RDX >> 32) ms (the host measures the idle poller meanwhile). Reports: host features,
                                          * warm calls that rang, asleep waits that timed out, asleep calls answered exitless */
#define GUEST_MODE_RPC_SWITCH 22 /* RSI calls of GUEST_PROC_COUNT switching at random (xorshift seed RDX) between the exitless
                                  * path (long and very short spins), posting and ringing at once, ordinary doorbell calls,
                                  * exitless blocking calls and idle gaps; every count is checked. Reports per path counts;
                                  * exits 0, 0x200 on a count that is not the next (then reports index, got, expected) */
#define GUEST_MODE_UDP_BUSY_POLL 30 /* net.*: UDP echo on port RSI & 0xFFFF (IPv6 if RSI bit 16) that never parks: it spins on
                                    * net.receiveFrom with timeout 0 and sends each datagram back with net.sendTo (CPL 3) */
#define GUEST_MODE_RING_ECHO 31 /* the interrupt-driven UDP echo (virtio-net's shape): x2APIC on, an IDT gate for GUEST_RING_VECTOR,
                                 * reports GUEST_NET_READY, then sti; hlt; each interrupt, it puts every new receive-ring record's
                                 * address into the transmit ring and rings GUEST_PORT_RING_DOORBELL (CPL 0, needs the irqchip).
                                 * The rings are in this vCPU's data buffer (GUEST_RING_*) */

/* The cyclic modes store, per period i, (TSC at resume - deadline i) as a signed 64-bit value:
 * the interrupt mode at data[i]; the long-poll modes at data[2i], with data[2i + 1] the arrival
 * before the guest-side spin (mode 8) or the host's wake-up in guest TSC (mode 11, which does not
 * spin). The sleep-check mode (12) stores (TSC at resume - deadline) of sleep i at data[i].
 * The interrupt mode's timer vector: */
#define GUEST_TIMER_VECTOR 0xEC
/* The vector the host injects in the interruptible-sleep mode, and what its handler reports. */
#define GUEST_INJECTED_VECTOR 0xED
#define GUEST_INJECTED_MARK   0x1A7E

/* The host procedure of the rpc-switch mode: counts its calls per vCPU, returns the count (u64). */
#define GUEST_PROC_COUNT 0x7000
/* What the rpc-switch mode exits with when a count is not the next one. */
#define GUEST_STATUS_COUNT_MISMATCH 0x200
/* What the exitless modes exit with when the host does not offer the exitless feature. */
#define GUEST_STATUS_NO_EXITLESS 0x300

/* Reverse-call procedures the rpc-demo guest serves. */
#define GUEST_REVERSE_ADD  1 /* payload: two u32; reply payload: their sum (u32) */
#define GUEST_REVERSE_STOP 2 /* reply, then exit with status 0 */

#define GUEST_STATUS_BAD_MODE 0xBAD0

/* The echo modes report this on the result port once their socket is bound (and listening),
 * then per connection (TCP) GUEST_NET_ACCEPTED. They exit 0 when the host cancels their wait
 * (the VM stops), 0x100 + a VMRPC status or 0x200 + a socket status on a failure. Each batch
 * record is GUEST_NET_STRIDE bytes. */
#define GUEST_NET_READY    0x4E455452 /* "RTEN" */
#define GUEST_NET_ACCEPTED 0x4E455441
#define GUEST_NET_STRIDE   2048

/* The ring echo's rings (mode 31), at these offsets in the vCPU's data buffer. Indices are free-running
 * u32 counters (slot = index mod GUEST_RING_ENTRIES). The host owns RX_PRODUCED and TX_CONSUMED, the
 * guest RX_CONSUMED and TX_PRODUCED; each in a cache line of its own. A receive record is a
 * struct rtv_net_batch_record (length, flags, source address) and its payload, in a slot of
 * GUEST_RING_SLOT_SIZE bytes; a transmit descriptor is the u64 guest-physical address of such a
 * record (the echo sends a received record back in place: to its address, with its payload). */
#define GUEST_RING_ENTRIES        64
#define GUEST_RING_SLOT_SIZE      2048
#define GUEST_RING_SLOT_SHIFT     11
#define GUEST_RING_RX_PRODUCED    0x00
#define GUEST_RING_RX_CONSUMED    0x40
#define GUEST_RING_TX_PRODUCED    0x80
#define GUEST_RING_TX_CONSUMED    0xC0
#define GUEST_RING_TX_DESCRIPTORS 0x1000
#define GUEST_RING_RX_SLOTS       0x2000
/* The ring echo's interrupt vector. */
#define GUEST_RING_VECTOR 0xEE

#endif
