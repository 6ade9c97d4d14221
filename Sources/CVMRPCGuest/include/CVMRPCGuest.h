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
#endif
