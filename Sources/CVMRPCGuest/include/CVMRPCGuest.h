/* Host-side wrappers over rtvirt_vmrpc.h, so Swift tests can check the C encoding. */
#ifndef RTVIRT_CVMRPCGUEST_H
#define RTVIRT_CVMRPCGUEST_H
#include <stdint.h>
#include "rtvirt_vmrpc.h"
#include "rtvirt_sockets.h"

/* Encodes a request into `slot` (4096 bytes) with the header's inline function. */
int rtv_test_encode_request(uint8_t *slot, uint32_t procedure, uint32_t sequence, uint32_t features,
                            const void *arguments, uint32_t argument_length);
/* Decodes a response from `slot`: status for `sequence`, and the result length. */
uint32_t rtv_test_response_status(const uint8_t *slot, uint32_t sequence);
uint32_t rtv_test_read_results(const uint8_t *slot, void *results, uint32_t capacity);
/* net.*: the C structs a guest fills, written as bytes, and results read from bytes, so Swift
 * tests can check rtvirt_sockets.h against the vectors of Docs/Sockets.md. Each encoder returns
 * the argument length. */
uint32_t rtv_test_net_open(uint8_t *out, uint16_t family, uint16_t type);
uint32_t rtv_test_net_bind_ipv4(uint8_t *out, uint64_t handle, const uint8_t *address4, uint16_t port);
uint32_t rtv_test_net_send_to_ipv4(uint8_t *out, uint64_t handle, uint64_t timeout_ns, const uint8_t *address4, uint16_t port,
                                   const uint8_t *payload, uint32_t length);
uint32_t rtv_test_net_receive(uint8_t *out, uint64_t handle, uint64_t timeout_ns, uint32_t capacity, uint64_t buffer_address);
uint32_t rtv_test_net_batch(uint8_t *out, uint64_t handle, uint64_t timeout_ns, uint32_t count, uint64_t buffer_address,
                            uint32_t buffer_length, uint32_t stride);
uint32_t rtv_test_net_wait_one(uint8_t *out, uint64_t timeout_ns, uint64_t handle, uint32_t events);
/* Reads a receive result: status, length, source family and port; returns the payload offset. */
uint32_t rtv_test_net_read_receive(const uint8_t *results, uint32_t *status, uint32_t *length, uint16_t *family, uint16_t *port);
/* Reads an open result: status and handle. */
void rtv_test_net_read_open(const uint8_t *results, uint32_t *status, uint64_t *handle);
/* Exitless: posts the request in `slot` (posted = 1, release, then a full fence). */
void rtv_test_post(uint8_t *slot);
/* What the guest does next for posted call `sequence`: RTV_VMRPC_EXITLESS_WAIT, _DONE or _RING. */
int rtv_test_exitless_state(uint8_t *slot, uint32_t sequence);
/* A control word (RTV_VMRPC_POSTED_OFFSET, _COMPLETED_OFFSET, _NEEDS_DOORBELL_OFFSET), loaded with acquire. */
uint32_t rtv_test_control_word(uint8_t *slot, uint32_t offset);
#endif
