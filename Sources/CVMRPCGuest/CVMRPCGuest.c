#include "CVMRPCGuest.h"

int rtv_test_encode_request(uint8_t *slot, uint32_t procedure, uint32_t sequence, uint32_t features,
                            const void *arguments, uint32_t argument_length) {
    return rtv_vmrpc_write_request(slot, procedure, sequence, features, arguments, argument_length);
}

uint32_t rtv_test_response_status(const uint8_t *slot, uint32_t sequence) {
    return rtv_vmrpc_response_status(slot, sequence);
}

uint32_t rtv_test_read_results(const uint8_t *slot, void *results, uint32_t capacity) {
    return rtv_vmrpc_read_results(slot, results, capacity);
}
