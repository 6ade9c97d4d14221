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

static void copy_out(uint8_t *out, const void *from, uint32_t length) {
    for (uint32_t i = 0; i < length; i++) out[i] = ((const uint8_t *)from)[i];
}

uint32_t rtv_test_net_open(uint8_t *out, uint16_t family, uint16_t type) {
    struct rtv_net_open_args arguments = { family, type, 0 };
    copy_out(out, &arguments, sizeof(arguments));
    return sizeof(arguments);
}

uint32_t rtv_test_net_bind_ipv4(uint8_t *out, uint64_t handle, const uint8_t *a, uint16_t port) {
    struct rtv_net_bind_args arguments = { handle, rtv_net_ipv4(a[0], a[1], a[2], a[3], port) };
    copy_out(out, &arguments, sizeof(arguments));
    return sizeof(arguments);
}

uint32_t rtv_test_net_send_to_ipv4(uint8_t *out, uint64_t handle, uint64_t timeout_ns, const uint8_t *a, uint16_t port,
                                   const uint8_t *payload, uint32_t length) {
    struct rtv_net_send_to_args arguments = { { handle, timeout_ns, 0, length, 0 }, rtv_net_ipv4(a[0], a[1], a[2], a[3], port) };
    copy_out(out, &arguments, sizeof(arguments));
    copy_out(out + sizeof(arguments), payload, length);
    return sizeof(arguments) + length;
}

uint32_t rtv_test_net_receive(uint8_t *out, uint64_t handle, uint64_t timeout_ns, uint32_t capacity, uint64_t buffer_address) {
    struct rtv_net_receive_args arguments = { handle, timeout_ns, buffer_address ? RTV_NET_FLAG_GUEST_BUFFER : 0, capacity, buffer_address };
    copy_out(out, &arguments, sizeof(arguments));
    return sizeof(arguments);
}

uint32_t rtv_test_net_batch(uint8_t *out, uint64_t handle, uint64_t timeout_ns, uint32_t count, uint64_t buffer_address,
                            uint32_t buffer_length, uint32_t stride) {
    struct rtv_net_batch_args arguments = { handle, timeout_ns, 0, count, buffer_address, buffer_length, stride };
    copy_out(out, &arguments, sizeof(arguments));
    return sizeof(arguments);
}

uint32_t rtv_test_net_wait_one(uint8_t *out, uint64_t timeout_ns, uint64_t handle, uint32_t events) {
    struct { struct rtv_net_wait_args header; struct rtv_net_wait_entry entry; } arguments = {
        { timeout_ns, 1, 0 }, { handle, events, 0 } };
    copy_out(out, &arguments, sizeof(arguments));
    return sizeof(arguments);
}

uint32_t rtv_test_net_read_receive(const uint8_t *results, uint32_t *status, uint32_t *length, uint16_t *family, uint16_t *port) {
    struct rtv_net_receive_result result;
    for (uint32_t i = 0; i < sizeof(result); i++) ((uint8_t *)&result)[i] = results[i];
    *status = result.status;
    *length = result.length;
    *family = result.source.family;
    *port = result.source.port;
    return sizeof(result);
}

void rtv_test_net_read_open(const uint8_t *results, uint32_t *status, uint64_t *handle) {
    struct rtv_net_open_result result;
    for (uint32_t i = 0; i < sizeof(result); i++) ((uint8_t *)&result)[i] = results[i];
    *status = result.status;
    *handle = result.handle;
}

void rtv_test_post(uint8_t *slot) { rtv_vmrpc_post(slot); }

int rtv_test_exitless_state(uint8_t *slot, uint32_t sequence) { return rtv_vmrpc_exitless_state(slot, sequence); }

uint32_t rtv_test_control_word(uint8_t *slot, uint32_t offset) {
    return atomic_load_explicit(rtv_vmrpc_control_word(slot, offset), memory_order_acquire);
}
