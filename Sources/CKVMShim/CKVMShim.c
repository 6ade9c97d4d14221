#include "CKVMShim.h"

#include <errno.h>
#include <signal.h>
#include <string.h>

void rtv_exit_decode(const struct kvm_run *run, size_t run_size, struct rtv_exit_info *out) {
    memset(out, 0, sizeof(*out));
    out->reason = run->exit_reason;
    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
        out->io_direction = run->io.direction;
        out->io_size = run->io.size;
        out->io_port = run->io.port;
        out->io_count = run->io.count;
        uint64_t offset = run->io.data_offset;
        size_t size = run->io.size;
        if (size <= 8 && offset <= run_size && size <= run_size - offset) {
            memcpy(&out->io_data, (const uint8_t *)run + offset, size);
        }
        break;
    }
    case KVM_EXIT_MMIO:
        out->mmio_address = run->mmio.phys_addr;
        out->mmio_length = run->mmio.len;
        out->mmio_is_write = run->mmio.is_write;
        if (run->mmio.len <= 8) {
            memcpy(&out->mmio_data, run->mmio.data, run->mmio.len);
        }
        break;
    case KVM_EXIT_FAIL_ENTRY:
        out->fail_reason = run->fail_entry.hardware_entry_failure_reason;
        out->fail_cpu = run->fail_entry.cpu;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        out->internal_suberror = run->internal.suberror;
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        out->system_event_type = run->system_event.type;
        break;
    default:
        break;
    }
}

int rtv_exit_complete_io_in(struct kvm_run *run, size_t run_size, uint64_t value) {
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_IN) return -1;
    uint64_t offset = run->io.data_offset;
    size_t size = run->io.size;
    if (size > 8 || offset > run_size || size > run_size - offset) return -1;
    memcpy((uint8_t *)run + offset, &value, size);
    return 0;
}

static int rtv_io_element_offset(const struct kvm_run *run, size_t run_size, uint32_t index, uint64_t *offset) {
    if (run->exit_reason != KVM_EXIT_IO || run->io.size > 8 || index >= run->io.count) return -1;
    uint64_t start = run->io.data_offset + (uint64_t)index * run->io.size;
    if (start < run->io.data_offset || start > run_size || run->io.size > run_size - start) return -1;
    *offset = start;
    return 0;
}

int rtv_exit_io_element(const struct kvm_run *run, size_t run_size, uint32_t index, uint64_t *value) {
    uint64_t offset;
    if (rtv_io_element_offset(run, run_size, index, &offset) != 0) return -1;
    *value = 0;
    memcpy(value, (const uint8_t *)run + offset, run->io.size);
    return 0;
}

int rtv_exit_set_io_element(struct kvm_run *run, size_t run_size, uint32_t index, uint64_t value) {
    uint64_t offset;
    if (run->io.direction != KVM_EXIT_IO_IN || rtv_io_element_offset(run, run_size, index, &offset) != 0) return -1;
    memcpy((uint8_t *)run + offset, &value, run->io.size);
    return 0;
}

int rtv_exit_complete_mmio_read(struct kvm_run *run, uint64_t value) {
    if (run->exit_reason != KVM_EXIT_MMIO || run->mmio.is_write || run->mmio.len > 8) return -1;
    memcpy(run->mmio.data, &value, run->mmio.len);
    return 0;
}

// Does nothing, which is async-signal-safe; its only job is to interrupt KVM_RUN.
static void rtv_kick_handler(int signo, siginfo_t *info, void *context) {
    (void)signo; (void)info; (void)context;
}

int rtv_kick_install_handler(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = rtv_kick_handler;
    action.sa_flags = SA_SIGINFO; // no SA_RESTART: KVM_RUN must return EINTR
    sigemptyset(&action.sa_mask);
    if (sigaction(signo, &action, NULL) != 0) return errno;
    return 0;
}

void rtv_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

uint8_t rtv_run_get_immediate_exit(const struct kvm_run *run) {
    return __atomic_load_n(&run->immediate_exit, __ATOMIC_SEQ_CST);
}

int rtv_kick_unblock_in_current_thread(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int rtv_kick_thread(pthread_t thread, int signo) { return pthread_kill(thread, signo); }

int rtv_kick_default_signal(void) { return SIGRTMIN + 3; }
