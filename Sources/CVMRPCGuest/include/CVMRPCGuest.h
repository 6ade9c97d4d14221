/* Host-side wrappers over rtvirt_vmrpc.h, so Swift tests can check the C encoding. */
#ifndef RTVIRT_CVMRPCGUEST_H
#define RTVIRT_CVMRPCGUEST_H
#include <stdint.h>
#include "rtvirt_vmrpc.h"

/* Encodes a request into `slot` (4096 bytes) with the header's inline function. */
int rtv_test_encode_request(uint8_t *slot, uint32_t procedure, uint32_t sequence, uint32_t features,
                            const void *arguments, uint32_t argument_length);
/* Decodes a response from `slot`: status for `sequence`, and the result length. */
uint32_t rtv_test_response_status(const uint8_t *slot, uint32_t sequence);
uint32_t rtv_test_read_results(const uint8_t *slot, void *results, uint32_t capacity);
/* Exitless: posts the request in `slot` (posted = 1, release, then a full fence). */
void rtv_test_post(uint8_t *slot);
/* What the guest does next for posted call `sequence`: RTV_VMRPC_EXITLESS_WAIT, _DONE or _RING. */
int rtv_test_exitless_state(uint8_t *slot, uint32_t sequence);
/* A control word (RTV_VMRPC_POSTED_OFFSET, _COMPLETED_OFFSET, _NEEDS_DOORBELL_OFFSET), loaded with acquire. */
uint32_t rtv_test_control_word(uint8_t *slot, uint32_t offset);
#endif
