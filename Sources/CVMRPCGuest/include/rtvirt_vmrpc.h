/*
 * rtvirt_vmrpc.h — the guest side of VMRPC version 1, freestanding (no libc), for guest
 * kernels and bare guests. Docs/VMRPC.md is the specification.
 *
 * Each vCPU owns a 4096-byte call slot in guest memory (its address comes from the VMM).
 * A call: write the request header and arguments into the slot, write anything to the
 * doorbell port (or MMIO address), then read the response. The vCPU does not run while the
 * host handles the call, so no fence is needed beyond a compiler barrier.
 */
#ifndef RTVIRT_VMRPC_H
#define RTVIRT_VMRPC_H

#include <stdint.h>

#define RTV_VMRPC_MAGIC          0x43565452u /* "RTVC" */
#define RTV_VMRPC_VERSION        1u
#define RTV_VMRPC_HEADER_SIZE    64u
#define RTV_VMRPC_SLOT_SIZE      4096u
#define RTV_VMRPC_ARGS_OFFSET    64u
#define RTV_VMRPC_ARGS_MAX       1984u
#define RTV_VMRPC_RESULTS_OFFSET 2048u
#define RTV_VMRPC_RESULTS_MAX    2048u

/* Feature bits. */
#define RTV_VMRPC_FEATURE_REVERSE_CALLS (1u << 0)
#define RTV_VMRPC_FEATURE_MMIO_DOORBELL (1u << 1)
#define RTV_VMRPC_FEATURE_INTERRUPTIBLE (1u << 2)

/* Procedures. */
#define RTV_VMRPC_PROC_NULL        1u
#define RTV_VMRPC_PROC_CLOCK_READ  2u
#define RTV_VMRPC_PROC_SLEEP_UNTIL 3u
#define RTV_VMRPC_PROC_POLL        4u
#define RTV_VMRPC_PROC_REPLY       5u

/* Status codes. */
#define RTV_VMRPC_OK                  0u
#define RTV_VMRPC_BAD_MAGIC           1u
#define RTV_VMRPC_BAD_VERSION         2u
#define RTV_VMRPC_BAD_HEADER_SIZE     3u
#define RTV_VMRPC_UNSUPPORTED_FEATURE 4u
#define RTV_VMRPC_RESERVED_NOT_ZERO   5u
#define RTV_VMRPC_BAD_ARGUMENT_LENGTH 6u
#define RTV_VMRPC_UNKNOWN_PROCEDURE   7u
#define RTV_VMRPC_BAD_ARGUMENTS       8u
#define RTV_VMRPC_TIMED_OUT           9u
#define RTV_VMRPC_CANCELLED           10u
#define RTV_VMRPC_CHANNEL_BROKEN      11u
#define RTV_VMRPC_NO_SUCH_CALL        12u
#define RTV_VMRPC_BUSY                13u
#define RTV_VMRPC_INTERNAL_ERROR      14u
#define RTV_VMRPC_INTERRUPTED         15u

/* The slot header. All fields little-endian (x86 is). */
struct rtv_vmrpc_header {
    /* guest-written request */
    uint32_t magic;
    uint16_t version;
    uint16_t header_size;
    uint32_t features;
    uint32_t procedure;
    uint32_t sequence;
    uint32_t argument_length;
    uint64_t reserved;
    /* host-written response */
    uint32_t status;
    uint32_t result_length;
    uint32_t response_sequence;
    uint32_t host_features;
    uint32_t host_version;
    uint32_t response_reserved0;
    uint64_t response_reserved1;
};

_Static_assert(sizeof(struct rtv_vmrpc_header) == RTV_VMRPC_HEADER_SIZE, "header is 64 bytes");

/* Results of clock.read. */
struct rtv_vmrpc_clock_reading {
    uint64_t host_monotonic_ns;
    uint64_t guest_tsc;
    uint64_t tsc_hz;
    int64_t guest_tsc_offset;
};

/* Results of poll when a reverse call arrived; the payload follows. */
struct rtv_vmrpc_delivery {
    uint64_t call_id;
    uint32_t procedure;
    uint32_t payload_length;
};

/* Arguments of reply; the payload follows. */
struct rtv_vmrpc_reply {
    uint64_t call_id;
    uint32_t status;
    uint32_t payload_length;
};

static inline void rtv_vmrpc_copy(volatile uint8_t *to, const uint8_t *from, uint32_t length) {
    for (uint32_t i = 0; i < length; i++) to[i] = from[i];
}

/* Writes a request (header and arguments) into `slot`. Returns 0, or -1 if the arguments are too long. */
static inline int rtv_vmrpc_write_request(volatile uint8_t *slot, uint32_t procedure, uint32_t sequence,
                                          uint32_t features, const void *arguments, uint32_t argument_length) {
    if (argument_length > RTV_VMRPC_ARGS_MAX) return -1;
    volatile struct rtv_vmrpc_header *header = (volatile struct rtv_vmrpc_header *)slot;
    header->magic = RTV_VMRPC_MAGIC;
    header->version = RTV_VMRPC_VERSION;
    header->header_size = RTV_VMRPC_HEADER_SIZE;
    header->features = features;
    header->procedure = procedure;
    header->sequence = sequence;
    header->argument_length = argument_length;
    header->reserved = 0;
    if (argument_length) rtv_vmrpc_copy(slot + RTV_VMRPC_ARGS_OFFSET, (const uint8_t *)arguments, argument_length);
    return 0;
}

/* Rings the doorbell with a 32-bit port write. */
static inline void rtv_vmrpc_ring_port(uint16_t port) {
    __asm__ __volatile__("outl %0, %1" : : "a"(0u), "Nd"(port) : "memory");
}

/* Rings the doorbell with a 32-bit MMIO write. */
static inline void rtv_vmrpc_ring_mmio(volatile uint32_t *doorbell) {
    __asm__ __volatile__("" ::: "memory");
    *doorbell = 0;
    __asm__ __volatile__("" ::: "memory");
}

/* The response status, or RTV_VMRPC_INTERNAL_ERROR if the response is not for `sequence`. */
static inline uint32_t rtv_vmrpc_response_status(volatile const uint8_t *slot, uint32_t sequence) {
    volatile const struct rtv_vmrpc_header *header = (volatile const struct rtv_vmrpc_header *)slot;
    if (header->response_sequence != sequence) return RTV_VMRPC_INTERNAL_ERROR;
    return header->status;
}

/* Copies up to `capacity` result bytes out of `slot`; returns the result length (capped). */
static inline uint32_t rtv_vmrpc_read_results(volatile const uint8_t *slot, void *results, uint32_t capacity) {
    volatile const struct rtv_vmrpc_header *header = (volatile const struct rtv_vmrpc_header *)slot;
    uint32_t length = header->result_length;
    if (length > RTV_VMRPC_RESULTS_MAX) length = RTV_VMRPC_RESULTS_MAX;
    if (length > capacity) length = capacity;
    for (uint32_t i = 0; i < length; i++) ((uint8_t *)results)[i] = slot[RTV_VMRPC_RESULTS_OFFSET + i];
    return length;
}

/* One call through a port doorbell. Returns the status; results (up to `capacity`) are copied. */
static inline uint32_t rtv_vmrpc_call_port(volatile uint8_t *slot, uint16_t port, uint32_t procedure,
                                           uint32_t sequence, const void *arguments, uint32_t argument_length,
                                           void *results, uint32_t capacity) {
    if (rtv_vmrpc_write_request(slot, procedure, sequence, 0, arguments, argument_length) != 0)
        return RTV_VMRPC_BAD_ARGUMENT_LENGTH;
    rtv_vmrpc_ring_port(port);
    uint32_t status = rtv_vmrpc_response_status(slot, sequence);
    if (results && capacity) rtv_vmrpc_read_results(slot, results, capacity);
    return status;
}

/* The TSC, ordered after earlier loads. */
static inline uint64_t rtv_vmrpc_rdtsc(void) {
    uint32_t low, high;
    __asm__ __volatile__("lfence; rdtsc" : "=a"(low), "=d"(high) :: "memory");
    return ((uint64_t)high << 32) | low;
}

/* timer.sleepUntil in its 16-byte form through a port doorbell: passes the previous arrival
 * (`*arrival`, TSC at return minus deadline, 0 at first), lets the host release the vCPU early by
 * the return latency it learns, then spins natively until the TSC reaches `deadline`. Stores this
 * call's arrival (before the spin) in `*arrival`. Returns the status; on success the TSC is at or
 * past `deadline`. */
static inline uint32_t rtv_vmrpc_sleep_until_port(volatile uint8_t *slot, uint16_t port, uint32_t sequence,
                                                  uint64_t deadline, int64_t *arrival) {
    uint64_t arguments[2] = { deadline, (uint64_t)*arrival };
    uint32_t status = rtv_vmrpc_call_port(slot, port, RTV_VMRPC_PROC_SLEEP_UNTIL, sequence, arguments, 16, 0, 0);
    *arrival = (int64_t)(rtv_vmrpc_rdtsc() - deadline);
    if (status == RTV_VMRPC_OK) {
        while ((int64_t)(rtv_vmrpc_rdtsc() - deadline) < 0) __asm__ __volatile__("pause");
    }
    return status;
}

#endif
