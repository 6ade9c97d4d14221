/* The MinimalVMM guest: a freestanding x86-64 program that runs at CPL 3 (IOPL 3) and talks
 * to its VMM only through port I/O and VMRPC (RTVirt's rtvirt_vmrpc.h, a public freestanding
 * header of the wire protocol, Docs/VMRPC.md).
 *
 * Entered at _start (the image's first byte) in 64-bit mode with
 *   RDI = this vCPU's VMRPC call slot, RSI = number of sleeps, RDX = sleep period in µs.
 * It calls `null`, then `clock.read` (for the TSC frequency), then sleeps RSI periods with
 * `timer.sleepUntil`, each deadline one period after the previous one, and reports per sleep
 * two signed 32-bit values on PORT_REPORT, in nanoseconds by its own TSC:
 *   - arrival: TSC when the call returned minus the deadline (negative: the host released
 *     the vCPU early, by the return latency it learned, and the guest spins the rest);
 *   - lateness: TSC after the guest's spin to the deadline minus the deadline (never negative).
 * It exits through PORT_EXIT with status 0, or 0x100 * step + the VMRPC status of the call
 * that failed (step 1: null, 2: clock.read, 3: timer.sleepUntil). */
#include <stdint.h>

#include "../../../Sources/CVMRPCGuest/include/rtvirt_vmrpc.h"

/* The VMM's ports (Sources/MinimalVMM/main.swift has the same numbers). */
#define PORT_REPORT   0x510 /* out: one signed 32-bit value for the VMM */
#define PORT_EXIT     0x511 /* out: the guest is done; the value is its exit status */
#define PORT_DOORBELL 0x512 /* out: VMRPC doorbell */

static inline void out32(uint16_t port, uint32_t value) {
    __asm__ __volatile__("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

/* Reports TSC ticks as nanoseconds, clamped to what 32 bits hold. */
static void report_ns(int64_t ticks, uint64_t tsc_hz) {
    if (ticks > (int64_t)tsc_hz) ticks = (int64_t)tsc_hz;   /* ±1 s is plenty */
    if (ticks < -(int64_t)tsc_hz) ticks = -(int64_t)tsc_hz;
    out32(PORT_REPORT, (uint32_t)(int32_t)(ticks * 1000000000 / (int64_t)tsc_hz));
}

uint32_t guest_main(volatile uint8_t *slot, uint64_t sleeps, uint64_t period_us) {
    uint32_t sequence = 0;
    uint32_t status = rtv_vmrpc_call_port(slot, PORT_DOORBELL, RTV_VMRPC_PROC_NULL, ++sequence, 0, 0, 0, 0);
    if (status != RTV_VMRPC_OK) return 0x100 + status;

    struct rtv_vmrpc_clock_reading clock;
    status = rtv_vmrpc_call_port(slot, PORT_DOORBELL, RTV_VMRPC_PROC_CLOCK_READ, ++sequence, 0, 0, &clock, sizeof clock);
    if (status != RTV_VMRPC_OK || clock.tsc_hz == 0) return 0x200 + status;

    uint64_t period = clock.tsc_hz / 1000000 * period_us;
    uint64_t deadline = rtv_vmrpc_rdtsc();
    int64_t arrival = 0; /* the 16-byte form tells the host how late the previous sleep returned */
    for (uint64_t i = 0; i < sleeps; i++) {
        deadline += period;
        status = rtv_vmrpc_sleep_until_port(slot, PORT_DOORBELL, ++sequence, deadline, &arrival);
        int64_t lateness = (int64_t)(rtv_vmrpc_rdtsc() - deadline);
        if (status != RTV_VMRPC_OK) return 0x300 + status;
        report_ns(arrival, clock.tsc_hz);
        report_ns(lateness, clock.tsc_hz);
    }
    return 0;
}

/* The entry: first in the image (guest.ld puts .text.start first). RSP is 16-byte aligned, so
 * after the call guest_main sees the stack the SysV ABI expects. Exits with its return value;
 * if the VMM resumes the vCPU anyway, it exits again. */
__attribute__((naked, section(".text.start"))) void _start(void) {
    __asm__ __volatile__(
        "call guest_main\n"
        "1: mov %0, %%dx\n"
        "   out %%eax, %%dx\n"
        "   jmp 1b\n" : : "i"(PORT_EXIT));
}
