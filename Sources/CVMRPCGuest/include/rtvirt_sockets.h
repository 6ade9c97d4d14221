/*
 * rtvirt_sockets.h — the guest side of the VMRPC `net.*` procedures (sockets outsourced to the
 * host), freestanding. Docs/Sockets.md is the specification; include rtvirt_vmrpc.h first.
 *
 * A call's VMRPC status says whether the procedure ran; when it is RTV_VMRPC_OK the first four
 * bytes of the results are the socket status (RTV_NET_*). Blocking calls (receive, accept,
 * connect, send on a full socket, wait, batches) take a timeout in nanoseconds: 0 means "do
 * not wait" (RTV_NET_WOULD_BLOCK when nothing is there); otherwise the vCPU stays parked in the
 * host until the socket is ready, and the call ends with RTV_VMRPC_TIMED_OUT at the timeout or
 * RTV_VMRPC_CANCELLED when the host pauses or stops the vCPU. No interrupt is involved.
 */
#ifndef RTVIRT_SOCKETS_H
#define RTVIRT_SOCKETS_H

#include <stdint.h>
#include "rtvirt_vmrpc.h"

/* Procedures. */
#define RTV_NET_PROC_OPEN          0x100u
#define RTV_NET_PROC_CLOSE         0x101u
#define RTV_NET_PROC_BIND          0x102u
#define RTV_NET_PROC_CONNECT       0x103u
#define RTV_NET_PROC_LISTEN        0x104u
#define RTV_NET_PROC_ACCEPT        0x105u
#define RTV_NET_PROC_SEND          0x106u
#define RTV_NET_PROC_SEND_TO       0x107u
#define RTV_NET_PROC_RECEIVE       0x108u
#define RTV_NET_PROC_RECEIVE_FROM  0x109u
#define RTV_NET_PROC_SHUTDOWN      0x10Au
#define RTV_NET_PROC_GETSOCKNAME   0x10Bu
#define RTV_NET_PROC_GETPEERNAME   0x10Cu
#define RTV_NET_PROC_SET_OPTION    0x10Du
#define RTV_NET_PROC_GET_OPTION    0x10Eu
#define RTV_NET_PROC_WAIT          0x10Fu
#define RTV_NET_PROC_RECEIVE_BATCH 0x110u
#define RTV_NET_PROC_SEND_BATCH    0x111u

/* Socket statuses (first u32 of every net.* result). */
#define RTV_NET_OK                    0u
#define RTV_NET_BAD_HANDLE            1u
#define RTV_NET_DENIED                2u
#define RTV_NET_TOO_MANY_SOCKETS      3u
#define RTV_NET_WOULD_BLOCK           4u
#define RTV_NET_IN_PROGRESS           5u
#define RTV_NET_ADDRESS_IN_USE        6u
#define RTV_NET_ADDRESS_NOT_AVAILABLE 7u
#define RTV_NET_CONNECTION_REFUSED    8u
#define RTV_NET_CONNECTION_RESET      9u
#define RTV_NET_CONNECTION_ABORTED    10u
#define RTV_NET_NOT_CONNECTED         11u
#define RTV_NET_ALREADY_CONNECTED     12u
#define RTV_NET_NETWORK_UNREACHABLE   13u
#define RTV_NET_HOST_UNREACHABLE      14u
#define RTV_NET_CONNECTION_TIMED_OUT  15u
#define RTV_NET_MESSAGE_TOO_LARGE     16u
#define RTV_NET_NO_RESOURCES          17u
#define RTV_NET_INVALID_ARGUMENT      18u
#define RTV_NET_NOT_PERMITTED         19u
#define RTV_NET_BUFFER_OUT_OF_RANGE   20u
#define RTV_NET_HOST_ERROR            21u

/* Families, types, flags, events, options. */
#define RTV_NET_FAMILY_NONE 0u
#define RTV_NET_FAMILY_IPV4 4u
#define RTV_NET_FAMILY_IPV6 6u
#define RTV_NET_TYPE_STREAM   1u
#define RTV_NET_TYPE_DATAGRAM 2u
#define RTV_NET_FLAG_GUEST_BUFFER (1u << 0)
#define RTV_NET_EVENT_READABLE (1u << 0)
#define RTV_NET_EVENT_WRITABLE (1u << 1)
#define RTV_NET_EVENT_ERROR    (1u << 2)
#define RTV_NET_EVENT_INVALID  (1u << 3)
#define RTV_NET_OPTION_RCVBUF      1u
#define RTV_NET_OPTION_SNDBUF      2u
#define RTV_NET_OPTION_TCP_NODELAY 3u
#define RTV_NET_OPTION_PRIORITY    4u
#define RTV_NET_OPTION_ERROR       5u
#define RTV_NET_SHUTDOWN_READ  0u
#define RTV_NET_SHUTDOWN_WRITE 1u
#define RTV_NET_SHUTDOWN_BOTH  2u
#define RTV_NET_RECORD_TRUNCATED (1u << 0)

/* Limits. */
#define RTV_NET_INLINE_MAX        1920u
#define RTV_NET_BUFFER_MAX        65536u
#define RTV_NET_BATCH_MAX         64u
#define RTV_NET_BATCH_STRIDE_MAX  65544u
#define RTV_NET_WAIT_MAX          64u

/* An address and port (24 bytes). IPv4: address[0..4), the rest 0, scope_id 0. */
struct rtv_net_address {
    uint16_t family;
    uint16_t port;
    uint32_t scope_id;
    uint8_t address[16];
};

/* Arguments. */
struct rtv_net_open_args { uint16_t family; uint16_t type; uint32_t reserved; };
struct rtv_net_handle_args { uint64_t handle; };
struct rtv_net_bind_args { uint64_t handle; struct rtv_net_address address; };
struct rtv_net_connect_args { uint64_t handle; uint64_t timeout_ns; struct rtv_net_address address; };
/* listen (backlog, 0), shutdown (how, 0), setOption (option, value), getOption (option, 0). */
struct rtv_net_control_args { uint64_t handle; uint32_t first; uint32_t second; };
struct rtv_net_accept_args { uint64_t handle; uint64_t timeout_ns; };
/* send; the inline payload (flags 0) follows, `length` bytes. */
struct rtv_net_send_args { uint64_t handle; uint64_t timeout_ns; uint32_t flags; uint32_t length; uint64_t buffer_address; };
/* sendTo; the inline payload follows. */
struct rtv_net_send_to_args { struct rtv_net_send_args send; struct rtv_net_address address; };
struct rtv_net_receive_args { uint64_t handle; uint64_t timeout_ns; uint32_t flags; uint32_t capacity; uint64_t buffer_address; };
struct rtv_net_wait_entry { uint64_t handle; uint32_t events; uint32_t reserved; };
/* wait; `count` entries follow. */
struct rtv_net_wait_args { uint64_t timeout_ns; uint32_t count; uint32_t reserved; };
struct rtv_net_batch_args {
    uint64_t handle;
    uint64_t timeout_ns;
    uint32_t flags;
    uint32_t count;
    uint64_t buffer_address;
    uint32_t buffer_length;
    uint32_t stride;
};
/* One record of a batch buffer (at buffer + i * stride); the payload follows. */
struct rtv_net_batch_record { uint32_t length; uint32_t flags; struct rtv_net_address address; };

/* Results. */
struct rtv_net_result { uint32_t status; uint32_t value; };
struct rtv_net_open_result { uint32_t status; uint32_t reserved; uint64_t handle; };
struct rtv_net_accept_result { uint32_t status; uint32_t reserved; uint64_t handle; struct rtv_net_address peer; };
struct rtv_net_name_result { uint32_t status; uint32_t reserved; struct rtv_net_address address; };
/* receive / receiveFrom; the inline payload follows. */
struct rtv_net_receive_result { uint32_t status; uint32_t length; uint32_t flags; uint32_t reserved; struct rtv_net_address source; };
/* wait; one u32 of events per entry follows. */
struct rtv_net_wait_result { uint32_t status; uint32_t ready; };

_Static_assert(sizeof(struct rtv_net_address) == 24, "address is 24 bytes");
_Static_assert(sizeof(struct rtv_net_bind_args) == 32, "bind arguments are 32 bytes");
_Static_assert(sizeof(struct rtv_net_connect_args) == 40, "connect arguments are 40 bytes");
_Static_assert(sizeof(struct rtv_net_send_args) == 32, "send arguments are 32 bytes");
_Static_assert(sizeof(struct rtv_net_send_to_args) == 56, "sendTo arguments are 56 bytes");
_Static_assert(sizeof(struct rtv_net_receive_args) == 32, "receive arguments are 32 bytes");
_Static_assert(sizeof(struct rtv_net_batch_args) == 40, "batch arguments are 40 bytes");
_Static_assert(sizeof(struct rtv_net_batch_record) == 32, "batch record header is 32 bytes");
_Static_assert(sizeof(struct rtv_net_receive_result) == 40, "receive results are 40 bytes");
_Static_assert(sizeof(struct rtv_net_accept_result) == 40, "accept results are 40 bytes");

/* An IPv4 address a.b.c.d:port. */
static inline struct rtv_net_address rtv_net_ipv4(uint8_t a, uint8_t b, uint8_t c, uint8_t d, uint16_t port) {
    struct rtv_net_address address;
    for (int i = 0; i < 16; i++) address.address[i] = 0;
    address.family = RTV_NET_FAMILY_IPV4;
    address.port = port;
    address.scope_id = 0;
    address.address[0] = a; address.address[1] = b; address.address[2] = c; address.address[3] = d;
    return address;
}

/* The unspecified address of a family (0.0.0.0 or ::) with a port, for bind. */
static inline struct rtv_net_address rtv_net_any(uint16_t family, uint16_t port) {
    struct rtv_net_address address;
    for (int i = 0; i < 16; i++) address.address[i] = 0;
    address.family = family;
    address.port = port;
    address.scope_id = 0;
    return address;
}

/* One net.* call through a port doorbell: returns the VMRPC status; when it is RTV_VMRPC_OK,
 * `*net_status` gets the socket status and up to `capacity` result bytes are copied. */
static inline uint32_t rtv_net_call(volatile uint8_t *slot, uint16_t port, uint32_t sequence, uint32_t procedure,
                                    const void *arguments, uint32_t length, void *results, uint32_t capacity,
                                    uint32_t *net_status) {
    uint32_t status = rtv_vmrpc_call_port(slot, port, procedure, sequence, arguments, length, results, capacity);
    if (net_status) {
        *net_status = RTV_NET_HOST_ERROR;
        if (status == RTV_VMRPC_OK) {
            volatile const uint8_t *r = slot + RTV_VMRPC_RESULTS_OFFSET;
            *net_status = (uint32_t)r[0] | (uint32_t)r[1] << 8 | (uint32_t)r[2] << 16 | (uint32_t)r[3] << 24;
        }
    }
    return status;
}

#endif
