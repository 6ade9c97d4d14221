/* The bundled guest's modes written in C: freestanding, at CPL 3, talking VMRPC through
 * rtvirt_vmrpc.h. Entered from entry.S as guest_c_main(mode, arg0, arg1, slot, data). */
#include <stdint.h>

#include "layout.h"
#include "rtvirt_vmrpc.h"
#include "rtvirt_sockets.h"

/* The compiler may emit calls to these for struct copies. */
void *memcpy(void *to, const void *from, unsigned long length) {
    for (unsigned long i = 0; i < length; i++) ((uint8_t *)to)[i] = ((const uint8_t *)from)[i];
    return to;
}
void *memset(void *to, int value, unsigned long length) {
    for (unsigned long i = 0; i < length; i++) ((uint8_t *)to)[i] = (uint8_t)value;
    return to;
}

static inline uint64_t rdtsc(void) {
    uint32_t low, high;
    __asm__ __volatile__("lfence; rdtsc" : "=a"(low), "=d"(high) :: "memory");
    return ((uint64_t)high << 32) | low;
}

static inline void port_out32(uint16_t port, uint32_t value) {
    __asm__ __volatile__("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static void report(uint32_t value) { port_out32(GUEST_PORT_RESULT, value); }

static void report64(uint64_t value) {
    report((uint32_t)value);
    report((uint32_t)(value >> 32));
}

static uint32_t sequence;

/* One call: through the MMIO doorbell when `features` asks for it; otherwise through the port,
 * exitless when the host offers it (rtv_vmrpc_call_auto_port). */
static uint32_t call(volatile uint8_t *slot, uint32_t features, uint32_t procedure, const void *arguments,
                     uint32_t length, void *results, uint32_t capacity) {
    uint32_t this_sequence = ++sequence;
    if (!(features & RTV_VMRPC_FEATURE_MMIO_DOORBELL))
        return rtv_vmrpc_call_auto_port(slot, GUEST_PORT_DOORBELL, procedure, this_sequence, features, arguments, length,
                                        results, capacity);
    if (rtv_vmrpc_write_request(slot, procedure, this_sequence, features, arguments, length) != 0)
        return RTV_VMRPC_BAD_ARGUMENT_LENGTH;
    rtv_vmrpc_ring_mmio((volatile uint32_t *)GUEST_MMIO_DOORBELL);
    uint32_t status = rtv_vmrpc_response_status(slot, this_sequence);
    if (results && capacity) rtv_vmrpc_read_results(slot, results, capacity);
    return status;
}

/* An ordinary call through the port doorbell (never exitless). */
static uint32_t call_doorbell(volatile uint8_t *slot, uint32_t procedure, const void *arguments, uint32_t length,
                              void *results, uint32_t capacity) {
    return rtv_vmrpc_call_port(slot, GUEST_PORT_DOORBELL, procedure, ++sequence, arguments, length, results, capacity);
}

/* An exitless call through the port doorbell, spinning up to `spin` TSC cycles; *path says how it ended. */
static uint32_t call_exitless(volatile uint8_t *slot, uint32_t procedure, const void *arguments, uint32_t length,
                              void *results, uint32_t capacity, uint64_t spin, int *path) {
    return rtv_vmrpc_call_exitless_port(slot, GUEST_PORT_DOORBELL, procedure, ++sequence, 0, arguments, length,
                                        results, capacity, spin, path);
}

/* Spins until `needs_doorbell` is `value` or `cycles` pass; returns whether it got there. */
static int wait_needs_doorbell(volatile uint8_t *slot, uint32_t value, uint64_t cycles) {
    uint64_t start = rdtsc();
    while ((atomic_load_explicit(rtv_vmrpc_control_word(slot, RTV_VMRPC_NEEDS_DOORBELL_OFFSET), memory_order_acquire) != 0)
           != (value != 0)) {
        if (rdtsc() - start >= cycles) return 0;
        __asm__ __volatile__("pause" ::: "memory");
    }
    return 1;
}

/* The host's TSC rate, from clock.read (ordinary call); 0 on failure. */
static uint64_t tsc_hz(volatile uint8_t *slot) {
    struct rtv_vmrpc_clock_reading clock;
    if (call_doorbell(slot, RTV_VMRPC_PROC_CLOCK_READ, 0, 0, &clock, sizeof(clock)) != RTV_VMRPC_OK) return 0;
    return clock.tsc_hz;
}

/* null (port doorbell); clock.read (MMIO doorbell); then poll for reverse calls and answer them until STOP.
 * Reports: null status, clock.read status, host_monotonic_ns, guest_tsc, tsc_hz, and for each
 * served call its procedure; exits 0, or the first unexpected status + 0x100. */
static uint32_t rpc_demo(volatile uint8_t *slot) {
    report(call(slot, 0, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0));
    struct rtv_vmrpc_clock_reading clock;
    uint32_t status = call(slot, RTV_VMRPC_FEATURE_MMIO_DOORBELL, RTV_VMRPC_PROC_CLOCK_READ, 0, 0, &clock, sizeof(clock));
    report(status);
    report64(clock.host_monotonic_ns);
    report64(clock.guest_tsc);
    report64(clock.tsc_hz);
    report64(rdtsc());
    for (int round = 0; round < 1000; round++) {
        uint64_t timeout = 1000000000ull;
        uint8_t results[64];
        status = call(slot, RTV_VMRPC_FEATURE_REVERSE_CALLS, RTV_VMRPC_PROC_POLL, &timeout, 8, results, sizeof(results));
        if (status == RTV_VMRPC_TIMED_OUT) continue;
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        struct rtv_vmrpc_delivery delivery;
        memcpy(&delivery, results, sizeof(delivery));
        report(delivery.procedure);
        struct { struct rtv_vmrpc_reply header; uint32_t value; } reply;
        reply.header.call_id = delivery.call_id;
        reply.header.status = 0;
        reply.header.payload_length = 0;
        if (delivery.procedure == GUEST_REVERSE_ADD && delivery.payload_length == 8) {
            uint32_t a, b;
            memcpy(&a, results + sizeof(delivery), 4);
            memcpy(&b, results + sizeof(delivery) + 4, 4);
            reply.value = a + b;
            reply.header.payload_length = 4;
        } else if (delivery.procedure != GUEST_REVERSE_STOP) {
            reply.header.status = 1; /* unknown request */
        }
        status = call(slot, RTV_VMRPC_FEATURE_REVERSE_CALLS, RTV_VMRPC_PROC_REPLY, &reply,
                      sizeof(reply.header) + reply.header.payload_length, 0, 0);
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        if (delivery.procedure == GUEST_REVERSE_STOP) return 0;
    }
    return 0x1FF;
}

/* `pairs` rounds of: a bare exit (out to a port the host ignores), then a null call. The
 * cycles of each go to data[2i] and data[2i + 1]. Exits 0, or 0x100 + a failed call's status. */
static uint32_t rpc_bench(volatile uint8_t *slot, uint64_t pairs, uint64_t *data) {
    uint64_t capacity = GUEST_DATA_SIZE / 16;
    if (pairs > capacity) pairs = capacity;
    for (uint64_t i = 0; i < pairs; i++) {
        uint64_t start = rdtsc();
        port_out32(GUEST_PORT_BARE, 0);
        uint64_t middle = rdtsc();
        uint32_t status = call(slot, 0, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0);
        uint64_t end = rdtsc();
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        data[2 * i] = middle - start;
        data[2 * i + 1] = end - middle;
    }
    return 0;
}

/* Each period: timer.sleepUntil(start + (i + 1) * period) in its 16-byte form (the host learns
 * the return latency from the reported arrivals and releases early; the helper spins the rest),
 * then data[2i] = TSC at resume - deadline and data[2i + 1] = the arrival before the spin (negative:
 * cycles spun). Exits 0, or 0x100 + the status of a failed sleep (cancelled when the host stops it). */
static uint32_t cyclic_longpoll(volatile uint8_t *slot, uint64_t count, uint64_t period, int64_t *data) {
    uint64_t capacity = GUEST_DATA_SIZE / 16;
    if (count > capacity) count = capacity;
    uint64_t deadline = rdtsc();
    int64_t arrival = 0;
    for (uint64_t i = 0; i < count; i++) {
        deadline += period;
        uint32_t status = rtv_vmrpc_sleep_until_port(slot, GUEST_PORT_DOORBELL, ++sequence, deadline, &arrival);
        uint64_t now = rdtsc();
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        data[2 * i] = (int64_t)(now - deadline);
        data[2 * i + 1] = arrival;
    }
    return 0;
}

extern void injected_interrupt(void);
extern volatile uint64_t injected_count;

static inline void wrmsr(uint32_t msr, uint64_t value) {
    __asm__ __volatile__("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)) : "memory");
}

static inline uint64_t rdmsr(uint32_t msr) {
    uint32_t low, high;
    __asm__ __volatile__("rdmsr" : "=a"(low), "=d"(high) : "c"(msr));
    return ((uint64_t)high << 32) | low;
}

/* A 64-bit interrupt gate (kernel code selector, present, DPL 0) for `vector`. */
static void install_interrupt_gate(uint32_t vector, void (*handler)(void)) {
    volatile uint8_t *gate = (volatile uint8_t *)(uintptr_t)(GUEST_IDT_ADDRESS + vector * 16);
    uint64_t address = (uint64_t)(uintptr_t)handler;
    *(volatile uint16_t *)(gate + 0) = (uint16_t)address;
    *(volatile uint16_t *)(gate + 2) = 0x08;
    *(volatile uint16_t *)(gate + 4) = 0x8E00;
    *(volatile uint16_t *)(gate + 6) = (uint16_t)(address >> 16);
    *(volatile uint32_t *)(gate + 8) = (uint32_t)(address >> 32);
    *(volatile uint32_t *)(gate + 12) = 0;
}

/* One interruptible timer.sleepUntil of `cycles`, with interrupts enabled: the host may end it
 * early with `interrupted` when it injects GUEST_INJECTED_VECTOR, whose handler runs as the vCPU
 * re-enters the guest. Reports the call's status and how many interrupts were taken. CPL 0. */
static uint32_t interruptible_sleep(volatile uint8_t *slot, uint64_t cycles) {
    install_interrupt_gate(GUEST_INJECTED_VECTOR, injected_interrupt);
    wrmsr(0x1B, rdmsr(0x1B) | 0xC00); /* IA32_APIC_BASE: enable, x2APIC */
    wrmsr(0x80F, 0x1FF);              /* spurious-interrupt vector register: software enable */
    __asm__ __volatile__("sti" ::: "memory");
    uint64_t deadline = rdtsc() + cycles;
    uint32_t status = call(slot, RTV_VMRPC_FEATURE_INTERRUPTIBLE, RTV_VMRPC_PROC_SLEEP_UNTIL, &deadline, 8, 0, 0);
    __asm__ __volatile__("cli" ::: "memory");
    report(status);
    report((uint32_t)injected_count);
    return 0;
}

/* The bare mechanism: each period timer.sleepUntil(start + (i + 1) * period) in its 8-byte form
 * (no arrival reported, so the host releases at the deadline and learns nothing) and no spin
 * after it; data[2i] = TSC at resume - deadline (negative: resumed early), data[2i + 1] = the
 * guest TSC the host reported at its wake-up (the call's result) - deadline, so that the lateness
 * splits into the host's wake-up and the return into the guest. Exits 0, or 0x100 + a failed
 * sleep's status. */
static uint32_t cyclic_longpoll_raw(volatile uint8_t *slot, uint64_t count, uint64_t period, int64_t *data) {
    uint64_t capacity = GUEST_DATA_SIZE / 16;
    if (count > capacity) count = capacity;
    uint64_t deadline = rdtsc();
    for (uint64_t i = 0; i < count; i++) {
        deadline += period;
        uint64_t host_wake = 0;
        uint32_t status = rtv_vmrpc_call_port(slot, GUEST_PORT_DOORBELL, RTV_VMRPC_PROC_SLEEP_UNTIL, ++sequence,
                                              &deadline, 8, &host_wake, sizeof(host_wake));
        int64_t late = (int64_t)(rdtsc() - deadline);
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        data[2 * i] = late;
        data[2 * i + 1] = (int64_t)(host_wake - deadline);
    }
    return 0;
}

/* `count` sleeps of `length` TSC cycles each, each deadline taken from the TSC just before its
 * call, with timer.sleepUntil in its 8-byte form: no early release by the host, no spin here, so
 * the guest resumes exactly when the host lets it. data[i] = TSC at resume - deadline (negative:
 * resumed before the deadline by the guest's own TSC, which a correct TSC mapping never allows).
 * Exits 0, or 0x100 + the status of a failed sleep. */
static uint32_t sleep_check(volatile uint8_t *slot, uint64_t count, uint64_t length, int64_t *data) {
    uint64_t capacity = GUEST_DATA_SIZE / 8;
    if (count > capacity) count = capacity;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t deadline = rdtsc() + length;
        uint32_t status = rtv_vmrpc_call_port(slot, GUEST_PORT_DOORBELL, RTV_VMRPC_PROC_SLEEP_UNTIL, ++sequence,
                                              &deadline, 8, 0, 0);
        uint64_t now = rdtsc();
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        data[i] = (int64_t)(now - deadline);
    }
    return 0;
}

/* One net.* call through the port doorbell; *net gets the socket status. */
static uint32_t net_call(volatile uint8_t *slot, uint32_t procedure, const void *arguments, uint32_t length,
                         void *results, uint32_t capacity, uint32_t *net) {
    return rtv_net_call(slot, GUEST_PORT_DOORBELL, ++sequence, procedure, arguments, length, results, capacity, net);
}

#define NET_WAIT_NS 1000000000ull
#define NET_CHECK(call) do { uint32_t s_ = (call); if (s_ == RTV_VMRPC_CANCELLED) return 0; \
                             if (s_ != RTV_VMRPC_OK) return 0x100 + s_; if (net != RTV_NET_OK) return 0x200 + net; } while (0)

/* Opens a socket of `type` and binds it to the unspecified address and `port`. */
static uint32_t net_open_bound(volatile uint8_t *slot, uint16_t family, uint16_t type, uint16_t port, uint64_t *handle) {
    uint32_t net;
    struct rtv_net_open_args open = { family, type, 0 };
    struct rtv_net_open_result opened;
    NET_CHECK(net_call(slot, RTV_NET_PROC_OPEN, &open, sizeof(open), &opened, sizeof(opened), &net));
    struct rtv_net_bind_args bind = { opened.handle, rtv_net_any(family, port) };
    NET_CHECK(net_call(slot, RTV_NET_PROC_BIND, &bind, sizeof(bind), 0, 0, &net));
    *handle = opened.handle;
    return 0;
}

/* UDP echo at CPL 3: long-poll receives (parked in the host until a datagram arrives), each
 * datagram sent back to its source. batch <= 1: net.receiveFrom / net.sendTo with the payload
 * in the slot; otherwise net.receiveBatch / net.sendBatch of up to `batch` records in the data
 * buffer, sent back from the same records (each holds its source address). */
static uint32_t udp_echo(volatile uint8_t *slot, uint64_t arg0, uint64_t batch, uint8_t *data) {
    uint16_t family = (arg0 >> 16) & 1 ? RTV_NET_FAMILY_IPV6 : RTV_NET_FAMILY_IPV4;
    uint64_t handle;
    uint32_t net, status = net_open_bound(slot, family, RTV_NET_TYPE_DATAGRAM, (uint16_t)arg0, &handle);
    if (status) return status;
    if (batch > RTV_NET_BATCH_MAX) batch = RTV_NET_BATCH_MAX;
    report(GUEST_NET_READY);
    uint8_t *send_area = data + (RTV_NET_BATCH_MAX + 1) * GUEST_NET_STRIDE;
    for (;;) {
        if (batch <= 1) {
            struct rtv_net_receive_args receive = { handle, NET_WAIT_NS, 0, RTV_NET_INLINE_MAX, 0 };
            status = net_call(slot, RTV_NET_PROC_RECEIVE_FROM, &receive, sizeof(receive), data,
                              sizeof(struct rtv_net_receive_result) + RTV_NET_INLINE_MAX, &net);
            if (status == RTV_VMRPC_TIMED_OUT) continue;
            NET_CHECK(status);
            struct rtv_net_receive_result received;
            memcpy(&received, data, sizeof(received));
            struct rtv_net_send_to_args send = { { handle, NET_WAIT_NS, 0, received.length, 0 }, received.source };
            memcpy(send_area, &send, sizeof(send));
            memcpy(send_area + sizeof(send), data + sizeof(received), received.length);
            NET_CHECK(net_call(slot, RTV_NET_PROC_SEND_TO, send_area, sizeof(send) + received.length, 0, 0, &net));
        } else {
            struct rtv_net_batch_args receive = { handle, NET_WAIT_NS, 0, (uint32_t)batch, (uint64_t)data,
                                                  (uint32_t)batch * GUEST_NET_STRIDE, GUEST_NET_STRIDE };
            struct rtv_net_result result;
            status = net_call(slot, RTV_NET_PROC_RECEIVE_BATCH, &receive, sizeof(receive), &result, sizeof(result), &net);
            if (status == RTV_VMRPC_TIMED_OUT) continue;
            NET_CHECK(status);
            /* Records come back with flags set only for truncation; send needs them 0. */
            for (uint32_t i = 0; i < result.value; i++) ((struct rtv_net_batch_record *)(data + i * GUEST_NET_STRIDE))->flags = 0;
            struct rtv_net_batch_args send = { handle, NET_WAIT_NS, 0, result.value, (uint64_t)data,
                                               result.value * GUEST_NET_STRIDE, GUEST_NET_STRIDE };
            NET_CHECK(net_call(slot, RTV_NET_PROC_SEND_BATCH, &send, sizeof(send), &result, sizeof(result), &net));
        }
    }
}

/* UDP echo at CPL 3 that never waits in the host: net.receiveFrom with timeout 0 in a loop (each
 * attempt one exit; RTV_NET_WOULD_BLOCK means nothing yet, try again at once), each datagram sent
 * back to its source with net.sendTo. The DPDK poll-mode way: no interrupt, no park, a whole CPU. */
static uint32_t udp_busy_poll(volatile uint8_t *slot, uint64_t arg0, uint8_t *data) {
    uint16_t family = (arg0 >> 16) & 1 ? RTV_NET_FAMILY_IPV6 : RTV_NET_FAMILY_IPV4;
    uint64_t handle;
    uint32_t net, status = net_open_bound(slot, family, RTV_NET_TYPE_DATAGRAM, (uint16_t)arg0, &handle);
    if (status) return status;
    report(GUEST_NET_READY);
    uint8_t *send_area = data + 8192;
    for (;;) {
        struct rtv_net_receive_args receive = { handle, 0, 0, RTV_NET_INLINE_MAX, 0 };
        status = net_call(slot, RTV_NET_PROC_RECEIVE_FROM, &receive, sizeof(receive), data,
                          sizeof(struct rtv_net_receive_result) + RTV_NET_INLINE_MAX, &net);
        if (status == RTV_VMRPC_OK && net == RTV_NET_WOULD_BLOCK) continue;
        NET_CHECK(status);
        struct rtv_net_receive_result received;
        memcpy(&received, data, sizeof(received));
        struct rtv_net_send_to_args send = { { handle, 0, 0, received.length, 0 }, received.source };
        memcpy(send_area, &send, sizeof(send));
        memcpy(send_area + sizeof(send), data + sizeof(received), received.length);
        NET_CHECK(net_call(slot, RTV_NET_PROC_SEND_TO, send_area, sizeof(send) + received.length, 0, 0, &net));
    }
}

/* TCP echo at CPL 3: accept (long poll), then receive and send back until the peer closes. */
static uint32_t tcp_echo(volatile uint8_t *slot, uint64_t arg0, uint8_t *data) {
    uint16_t family = (arg0 >> 16) & 1 ? RTV_NET_FAMILY_IPV6 : RTV_NET_FAMILY_IPV4;
    uint64_t listener;
    uint32_t net, status = net_open_bound(slot, family, RTV_NET_TYPE_STREAM, (uint16_t)arg0, &listener);
    if (status) return status;
    struct rtv_net_control_args listen = { listener, 8, 0 };
    NET_CHECK(net_call(slot, RTV_NET_PROC_LISTEN, &listen, sizeof(listen), 0, 0, &net));
    report(GUEST_NET_READY);
    uint8_t *send_area = data + 8192;
    for (;;) {
        struct rtv_net_accept_args accept = { listener, NET_WAIT_NS };
        struct rtv_net_accept_result accepted;
        status = net_call(slot, RTV_NET_PROC_ACCEPT, &accept, sizeof(accept), &accepted, sizeof(accepted), &net);
        if (status == RTV_VMRPC_TIMED_OUT) continue;
        NET_CHECK(status);
        report(GUEST_NET_ACCEPTED);
        struct rtv_net_control_args nodelay = { accepted.handle, RTV_NET_OPTION_TCP_NODELAY, 1 };
        NET_CHECK(net_call(slot, RTV_NET_PROC_SET_OPTION, &nodelay, sizeof(nodelay), 0, 0, &net));
        for (;;) {
            struct rtv_net_receive_args receive = { accepted.handle, NET_WAIT_NS, 0, RTV_NET_INLINE_MAX, 0 };
            status = net_call(slot, RTV_NET_PROC_RECEIVE, &receive, sizeof(receive), data,
                              sizeof(struct rtv_net_receive_result) + RTV_NET_INLINE_MAX, &net);
            if (status == RTV_VMRPC_TIMED_OUT) continue;
            if (status == RTV_VMRPC_CANCELLED) return 0;
            if (status != RTV_VMRPC_OK) return 0x100 + status;
            struct rtv_net_receive_result received;
            memcpy(&received, data, sizeof(received));
            if (net != RTV_NET_OK || received.length == 0) break; /* reset or closed by the peer */
            uint32_t offset = 0;
            while (offset < received.length) {
                struct rtv_net_send_args send = { accepted.handle, NET_WAIT_NS, 0, received.length - offset, 0 };
                memcpy(send_area, &send, sizeof(send));
                memcpy(send_area + sizeof(send), data + sizeof(received) + offset, send.length);
                struct rtv_net_result sent;
                status = net_call(slot, RTV_NET_PROC_SEND, send_area, sizeof(send) + send.length, &sent, sizeof(sent), &net);
                if (status == RTV_VMRPC_CANCELLED) return 0;
                if (status != RTV_VMRPC_OK || net != RTV_NET_OK || sent.value == 0) break;
                offset += sent.value;
            }
        }
        struct rtv_net_handle_args close = { accepted.handle };
        NET_CHECK(net_call(slot, RTV_NET_PROC_CLOSE, &close, sizeof(close), 0, 0, &net));
    }
}

/* Interleaved rounds of `block` calls per path: bare exits, null calls with the doorbell, null calls
 * exitless with the poller warm (a warm-up call first, then waiting until the poller is awake),
 * null calls exitless with the poller asleep (each after waiting until `needs_doorbell` is set).
 * data[4i + path] = TSC cycles of sample i of each path. Then one ordinary timer.sleepUntil of
 * `idle_ms` (the VM is idle; the host measures its poller meanwhile). Reports: host features,
 * warm calls that rang, asleep waits that timed out, asleep calls answered exitless. Exits 0, or
 * 0x100 + a failed call's status, or GUEST_STATUS_NO_EXITLESS. */
static uint32_t rpc_bench_exitless(volatile uint8_t *slot, uint64_t samples, uint64_t arguments, uint64_t *data) {
    uint64_t block = arguments & 0xFFFF, idle_ms = arguments >> 32;
    uint64_t capacity = GUEST_DATA_SIZE / 32;
    if (samples > capacity) samples = capacity;
    if (block == 0) block = 1;
    uint32_t status = call_doorbell(slot, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0);
    if (status != RTV_VMRPC_OK) return 0x100 + status;
    uint32_t features = rtv_vmrpc_host_features(slot);
    report(features);
    if (!(features & RTV_VMRPC_FEATURE_EXITLESS)) return GUEST_STATUS_NO_EXITLESS;
    uint64_t hz = tsc_hz(slot);
    if (hz == 0) return 0x100 + RTV_VMRPC_INTERNAL_ERROR;
    uint64_t wait_bound = hz / 10; /* 100 ms for the poller to wake or fall asleep */
    uint32_t warm_rang = 0, asleep_timeouts = 0, asleep_exitless = 0;
    for (uint64_t first = 0; first < samples; first += block) {
        uint64_t last = first + block < samples ? first + block : samples;
        for (uint64_t i = first; i < last; i++) {
            uint64_t start = rdtsc();
            port_out32(GUEST_PORT_BARE, 0);
            data[4 * i] = rdtsc() - start;
        }
        for (uint64_t i = first; i < last; i++) {
            uint64_t start = rdtsc();
            status = call_doorbell(slot, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0);
            data[4 * i + 1] = rdtsc() - start;
            if (status != RTV_VMRPC_OK) return 0x100 + status;
        }
        int path;
        status = call_exitless(slot, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0, RTV_VMRPC_EXITLESS_SPIN_CYCLES, &path); /* wakes the poller */
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        wait_needs_doorbell(slot, 0, wait_bound);
        for (uint64_t i = first; i < last; i++) {
            uint64_t start = rdtsc();
            status = call_exitless(slot, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0, RTV_VMRPC_EXITLESS_SPIN_CYCLES, &path);
            data[4 * i + 2] = rdtsc() - start;
            if (status != RTV_VMRPC_OK) return 0x100 + status;
            if (path != RTV_VMRPC_PATH_EXITLESS) warm_rang++;
        }
        for (uint64_t i = first; i < last; i++) {
            if (!wait_needs_doorbell(slot, 1, wait_bound)) asleep_timeouts++;
            uint64_t start = rdtsc();
            status = call_exitless(slot, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0, RTV_VMRPC_EXITLESS_SPIN_CYCLES, &path);
            data[4 * i + 3] = rdtsc() - start;
            if (status != RTV_VMRPC_OK) return 0x100 + status;
            if (path == RTV_VMRPC_PATH_EXITLESS) asleep_exitless++;
        }
    }
    report(warm_rang);
    report(asleep_timeouts);
    report(asleep_exitless);
    if (idle_ms) {
        uint64_t deadline = rdtsc() + idle_ms * (hz / 1000);
        status = call_doorbell(slot, RTV_VMRPC_PROC_SLEEP_UNTIL, &deadline, 8, 0, 0);
        if (status != RTV_VMRPC_OK) return 0x100 + status;
    }
    return 0;
}

/* `calls` calls of GUEST_PROC_COUNT, each through a path drawn at random: exitless with the default
 * spin, exitless with a spin of at most 63 cycles (the doorbell then races the poller), posted and
 * rung at once, an ordinary doorbell call; now and then an exitless timer.sleepUntil (handed back
 * by the poller) or an idle gap of ~100 us (the poller falls asleep). Every count must be the next
 * one. Reports per path: exitless answered, exitless rang, short spins, posted-and-rung, ordinary,
 * blocking, gaps. Exits 0, GUEST_STATUS_COUNT_MISMATCH (after reporting index, got, expected),
 * GUEST_STATUS_NO_EXITLESS, or 0x100 + a failed call's status. */
static uint32_t rpc_switch(volatile uint8_t *slot, uint64_t calls, uint64_t seed) {
    uint32_t status = call_doorbell(slot, RTV_VMRPC_PROC_NULL, 0, 0, 0, 0);
    if (status != RTV_VMRPC_OK) return 0x100 + status;
    if (!(rtv_vmrpc_host_features(slot) & RTV_VMRPC_FEATURE_EXITLESS)) return GUEST_STATUS_NO_EXITLESS;
    uint64_t hz = tsc_hz(slot);
    if (hz == 0) return 0x100 + RTV_VMRPC_INTERNAL_ERROR;
    uint64_t state = seed | 1, expected = 0;
    uint32_t answered = 0, rang = 0, short_spins = 0, at_once = 0, ordinary = 0, blocking = 0, gaps = 0;
    for (uint64_t i = 0; i < calls; i++) {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17;
        uint32_t choice = (uint32_t)(state >> 32);
        if ((choice & 0x3FF) == 1) { /* an idle gap: the poller falls asleep */
            uint64_t until = rdtsc() + hz / 10000;
            while (rdtsc() < until) __asm__ __volatile__("pause");
            gaps++;
        }
        if ((choice & 0xFF) == 2) { /* a blocking call, posted: the poller hands it back */
            uint64_t deadline = rdtsc();
            int path;
            status = call_exitless(slot, RTV_VMRPC_PROC_SLEEP_UNTIL, &deadline, 8, 0, 0, RTV_VMRPC_EXITLESS_SPIN_CYCLES, &path);
            if (status != RTV_VMRPC_OK) return 0x100 + status;
            blocking++;
        }
        uint64_t count = 0;
        int path = RTV_VMRPC_PATH_EXITLESS;
        switch ((choice >> 8) & 7) {
        case 0: case 1: case 2: case 3:
            status = call_exitless(slot, GUEST_PROC_COUNT, 0, 0, &count, 8, RTV_VMRPC_EXITLESS_SPIN_CYCLES, &path);
            if (path == RTV_VMRPC_PATH_EXITLESS) answered++; else rang++;
            break;
        case 4:
            status = call_exitless(slot, GUEST_PROC_COUNT, 0, 0, &count, 8, (choice >> 16) & 63, &path);
            short_spins++;
            break;
        case 5: {
            uint32_t this_sequence = ++sequence;
            rtv_vmrpc_write_request(slot, GUEST_PROC_COUNT, this_sequence, RTV_VMRPC_FEATURE_EXITLESS, 0, 0);
            rtv_vmrpc_post(slot);
            rtv_vmrpc_ring_port(GUEST_PORT_DOORBELL);
            status = rtv_vmrpc_response_status(slot, this_sequence);
            rtv_vmrpc_read_results(slot, &count, 8);
            at_once++;
            break;
        }
        default:
            status = call_doorbell(slot, GUEST_PROC_COUNT, 0, 0, &count, 8);
            ordinary++;
            break;
        }
        if (status != RTV_VMRPC_OK) return 0x100 + status;
        if (count != ++expected) {
            report((uint32_t)i);
            report64(count);
            report64(expected);
            return GUEST_STATUS_COUNT_MISMATCH;
        }
    }
    report(answered);
    report(rang);
    report(short_spins);
    report(at_once);
    report(ordinary);
    report(blocking);
    report(gaps);
    return 0;
}

uint32_t guest_c_main(uint64_t mode, uint64_t arg0, uint64_t arg1, uint8_t *slot, uint64_t *data) {
    switch (mode) {
    case GUEST_MODE_RPC_DEMO: return rpc_demo(slot);
    case GUEST_MODE_RPC_BENCH: return rpc_bench(slot, arg0, data);
    case GUEST_MODE_CYCLIC_LONG_POLL: return cyclic_longpoll(slot, arg0, arg1, (int64_t *)data);
    case GUEST_MODE_INTERRUPTIBLE_SLEEP: return interruptible_sleep(slot, arg0);
    case GUEST_MODE_CYCLIC_LONG_POLL_RAW: return cyclic_longpoll_raw(slot, arg0, arg1, (int64_t *)data);
    case GUEST_MODE_SLEEP_CHECK: return sleep_check(slot, arg0, arg1, (int64_t *)data);
    case GUEST_MODE_UDP_ECHO: return udp_echo(slot, arg0, arg1, (uint8_t *)data);
    case GUEST_MODE_TCP_ECHO: return tcp_echo(slot, arg0, (uint8_t *)data);
    case GUEST_MODE_RPC_BENCH_EXITLESS: return rpc_bench_exitless(slot, arg0, arg1, data);
    case GUEST_MODE_RPC_SWITCH: return rpc_switch(slot, arg0, arg1);
    case GUEST_MODE_UDP_BUSY_POLL: return udp_busy_poll(slot, arg0, (uint8_t *)data);
    default: return GUEST_STATUS_BAD_MODE;
    }
}
