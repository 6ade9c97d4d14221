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

void rtv_test_post(uint8_t *slot) { rtv_vmrpc_post(slot); }

int rtv_test_exitless_state(uint8_t *slot, uint32_t sequence) { return rtv_vmrpc_exitless_state(slot, sequence); }

uint32_t rtv_test_control_word(uint8_t *slot, uint32_t offset) {
    return atomic_load_explicit(rtv_vmrpc_control_word(slot, offset), memory_order_acquire);
}
