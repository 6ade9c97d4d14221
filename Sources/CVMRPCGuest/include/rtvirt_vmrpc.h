/*
 * rtvirt_vmrpc.h — the guest side of VMRPC version 1, freestanding (no libc), for guest
 * kernels and bare guests. Docs/VMRPC.md is the specification.
 *
 * Each vCPU owns a 4096-byte call slot in guest memory (its address comes from the VMM).
 * A call: write the request header and arguments into the slot, write anything to the
 * doorbell port (or MMIO address), then read the response. The vCPU does not run while the
 * host handles the call, so no fence is needed beyond a compiler barrier.
 *
 * Exitless calls (when the host offers RTV_VMRPC_FEATURE_EXITLESS): write the request, post it
 * (`posted` = 1, release), fence, and if `needs_doorbell` is clear spin on `completed` (acquire)
 * for a bounded time; ring the doorbell when `needs_doorbell` is set or the bound passes. The
 * host's poller answers without a VM exit. The control words are C11 atomics (stdatomic.h).
 */
#ifndef RTVIRT_VMRPC_H
#define RTVIRT_VMRPC_H

#include <stdatomic.h>
#include <stdint.h>

#define RTV_VMRPC_MAGIC          0x43565452u /* "RTVC" */
#define RTV_VMRPC_VERSION        1u
#define RTV_VMRPC_HEADER_SIZE    64u
#define RTV_VMRPC_SLOT_SIZE      4096u
#define RTV_VMRPC_ARGS_OFFSET    64u
#define RTV_VMRPC_ARGS_MAX       1984u
#define RTV_VMRPC_RESULTS_OFFSET 2048u
#define RTV_VMRPC_RESULTS_MAX    2048u
/* The exitless control area: three 32-bit words after the 20-byte response. */
#define RTV_VMRPC_POSTED_OFFSET         52u
#define RTV_VMRPC_COMPLETED_OFFSET      56u
#define RTV_VMRPC_NEEDS_DOORBELL_OFFSET 60u

/* Feature bits. */
#define RTV_VMRPC_FEATURE_REVERSE_CALLS (1u << 0)
#define RTV_VMRPC_FEATURE_MMIO_DOORBELL (1u << 1)
#define RTV_VMRPC_FEATURE_INTERRUPTIBLE (1u << 2)
#define RTV_VMRPC_FEATURE_EXITLESS      (1u << 3)

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
    /* the exitless control area */
    uint32_t posted;         /* guest stores 1 (release) after writing a request; the host takes the call by clearing it */
    uint32_t completed;      /* host stores the answered posted call's sequence (release) after writing the response */
    uint32_t needs_doorbell; /* host: non-zero while it will not take a posted call without a doorbell */
};

_Static_assert(sizeof(struct rtv_vmrpc_header) == RTV_VMRPC_HEADER_SIZE, "header is 64 bytes");
_Static_assert(__builtin_offsetof(struct rtv_vmrpc_header, posted) == RTV_VMRPC_POSTED_OFFSET, "posted at 52");
_Static_assert(__builtin_offsetof(struct rtv_vmrpc_header, completed) == RTV_VMRPC_COMPLETED_OFFSET, "completed at 56");
_Static_assert(__builtin_offsetof(struct rtv_vmrpc_header, needs_doorbell) == RTV_VMRPC_NEEDS_DOORBELL_OFFSET, "needs_doorbell at 60");
_Static_assert(sizeof(_Atomic uint32_t) == 4 && _Alignof(_Atomic uint32_t) == 4, "control words are plain 32-bit words");

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

/* --- Exitless calls --------------------------------------------------------------------- */

/* A control word of the slot as a C11 atomic (same size and alignment as uint32_t). */
static inline _Atomic uint32_t *rtv_vmrpc_control_word(volatile uint8_t *slot, uint32_t offset) {
    return (_Atomic uint32_t *)(uintptr_t)(slot + offset);
}

/* The host's feature bits, from the last response in `slot`. */
static inline uint32_t rtv_vmrpc_host_features(volatile const uint8_t *slot) {
    return ((volatile const struct rtv_vmrpc_header *)slot)->host_features;
}

/* Posts the request written in `slot`: `posted` = 1 with release (the request before it), then a
 * full fence, so that the `needs_doorbell` read after it cannot be ordered before the post. */
static inline void rtv_vmrpc_post(volatile uint8_t *slot) {
    atomic_store_explicit(rtv_vmrpc_control_word(slot, RTV_VMRPC_POSTED_OFFSET), 1u, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
}

/* What a guest waiting for posted call `sequence` does next. */
#define RTV_VMRPC_EXITLESS_WAIT 0 /* keep spinning */
#define RTV_VMRPC_EXITLESS_DONE 1 /* `completed` is the call's sequence: the response is there */
#define RTV_VMRPC_EXITLESS_RING 2 /* `needs_doorbell` is set: ring */

static inline int rtv_vmrpc_exitless_state(volatile uint8_t *slot, uint32_t sequence) {
    if (atomic_load_explicit(rtv_vmrpc_control_word(slot, RTV_VMRPC_COMPLETED_OFFSET), memory_order_acquire) == sequence)
        return RTV_VMRPC_EXITLESS_DONE;
    if (atomic_load_explicit(rtv_vmrpc_control_word(slot, RTV_VMRPC_NEEDS_DOORBELL_OFFSET), memory_order_acquire) != 0)
        return RTV_VMRPC_EXITLESS_RING;
    return RTV_VMRPC_EXITLESS_WAIT;
}

/* TSC cycles to spin for a posted call before ringing: about one exit on the nested hosts this
 * project measures (~25 us at 2.4 GHz); guests on bare-metal KVM, where an exit is ~1 us, use less. */
#define RTV_VMRPC_EXITLESS_SPIN_CYCLES 65536u

static inline uint64_t rtv_vmrpc_tsc(void) {
    uint32_t low, high;
    __asm__ __volatile__("rdtsc" : "=a"(low), "=d"(high));
    return ((uint64_t)high << 32) | low;
}

/* How an exitless call ended (rtv_vmrpc_call_exitless_port's *path). */
#define RTV_VMRPC_PATH_EXITLESS   0 /* answered by the poller, no exit */
#define RTV_VMRPC_PATH_NEEDS_BELL 1 /* needs_doorbell was set: rang */
#define RTV_VMRPC_PATH_SPIN_BOUND 2 /* the spin bound passed: rang */

/* Posts a request already written (with RTV_VMRPC_FEATURE_EXITLESS in its features) and waits:
 * spins up to `spin_cycles` TSC cycles on `completed`, rings the doorbell `port` when
 * `needs_doorbell` is set or the bound passes. When it returns, the response for `sequence` is
 * in the slot. Stores how it ended in `*path` (may be 0). */
static inline void rtv_vmrpc_post_and_wait_port(volatile uint8_t *slot, uint16_t port, uint32_t sequence,
                                                uint64_t spin_cycles, int *path) {
    rtv_vmrpc_post(slot);
    int how = RTV_VMRPC_PATH_SPIN_BOUND;
    int state = rtv_vmrpc_exitless_state(slot, sequence);
    if (state == RTV_VMRPC_EXITLESS_WAIT) {
        uint64_t start = rtv_vmrpc_tsc();
        while ((state = rtv_vmrpc_exitless_state(slot, sequence)) == RTV_VMRPC_EXITLESS_WAIT) {
            if (rtv_vmrpc_tsc() - start >= spin_cycles) break;
            __asm__ __volatile__("pause" ::: "memory");
        }
    }
    if (state == RTV_VMRPC_EXITLESS_DONE) {
        how = RTV_VMRPC_PATH_EXITLESS;
    } else {
        if (state == RTV_VMRPC_EXITLESS_RING) how = RTV_VMRPC_PATH_NEEDS_BELL;
        rtv_vmrpc_ring_port(port);
    }
    if (path) *path = how;
}

/* One exitless call through a port doorbell (the host must offer RTV_VMRPC_FEATURE_EXITLESS;
 * `features` gets the bit added). Returns the status; results (up to `capacity`) are copied. */
static inline uint32_t rtv_vmrpc_call_exitless_port(volatile uint8_t *slot, uint16_t port, uint32_t procedure,
                                                    uint32_t sequence, uint32_t features, const void *arguments,
                                                    uint32_t argument_length, void *results, uint32_t capacity,
                                                    uint64_t spin_cycles, int *path) {
    if (rtv_vmrpc_write_request(slot, procedure, sequence, features | RTV_VMRPC_FEATURE_EXITLESS, arguments,
                                argument_length) != 0)
        return RTV_VMRPC_BAD_ARGUMENT_LENGTH;
    rtv_vmrpc_post_and_wait_port(slot, port, sequence, spin_cycles, path);
    uint32_t status = rtv_vmrpc_response_status(slot, sequence);
    if (results && capacity) rtv_vmrpc_read_results(slot, results, capacity);
    return status;
}

/* A call through a port doorbell that is exitless when the host offers it (learned from the last
 * response in the slot: make one ordinary call, such as `null`, first) and ordinary otherwise.
 * Blocking procedures work either way: the poller hands them back and the doorbell parks the vCPU. */
static inline uint32_t rtv_vmrpc_call_auto_port(volatile uint8_t *slot, uint16_t port, uint32_t procedure,
                                                uint32_t sequence, uint32_t features, const void *arguments,
                                                uint32_t argument_length, void *results, uint32_t capacity) {
    if (rtv_vmrpc_host_features(slot) & RTV_VMRPC_FEATURE_EXITLESS)
        return rtv_vmrpc_call_exitless_port(slot, port, procedure, sequence, features, arguments, argument_length,
                                            results, capacity, RTV_VMRPC_EXITLESS_SPIN_CYCLES, 0);
    if (rtv_vmrpc_write_request(slot, procedure, sequence, features, arguments, argument_length) != 0)
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
