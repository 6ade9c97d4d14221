#include "CKVMShim.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
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

// What was installed for each signal before the kick handler, when the VMM asked to chain.
// Written under `kick_install_lock` before the kick handler is installed, read by the handler.
static struct sigaction kick_previous[_NSIG];
static int kick_chains[_NSIG];
static pthread_mutex_t kick_install_lock = PTHREAD_MUTEX_INITIALIZER;

// Interrupting KVM_RUN is the whole job; it calls a chained handler, if any, and nothing else.
static void rtv_kick_handler(int signo, siginfo_t *info, void *context) {
    if (signo <= 0 || signo >= _NSIG || !kick_chains[signo]) return;
    const struct sigaction *previous = &kick_previous[signo];
    if (previous->sa_flags & SA_SIGINFO) {
        if (previous->sa_sigaction) previous->sa_sigaction(signo, info, context);
    } else if (previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN && previous->sa_handler) {
        previous->sa_handler(signo);
    }
}

int rtv_kick_install_handler(int signo, int chain) {
    if (signo <= 0 || signo >= _NSIG) return EINVAL;
    pthread_mutex_lock(&kick_install_lock);
    struct sigaction current;
    int result = 0;
    if (sigaction(signo, NULL, &current) != 0) {
        result = errno;
    } else if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == rtv_kick_handler) {
        result = 0; // already ours
    } else {
        int foreign = (current.sa_flags & SA_SIGINFO) ? current.sa_sigaction != NULL
                                                      : (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN);
        if (foreign && !chain) {
            result = EBUSY;
        } else {
            if (foreign) {
                kick_previous[signo] = current;
                __atomic_store_n(&kick_chains[signo], 1, __ATOMIC_SEQ_CST);
            }
            struct sigaction action;
            memset(&action, 0, sizeof(action));
            action.sa_sigaction = rtv_kick_handler;
            action.sa_flags = SA_SIGINFO; // no SA_RESTART: KVM_RUN must return EINTR
            sigemptyset(&action.sa_mask);
            if (sigaction(signo, &action, NULL) != 0) result = errno;
        }
    }
    pthread_mutex_unlock(&kick_install_lock);
    return result;
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

int rtv_kvm_set_gsi_routing(int vmfd, const struct rtv_kvm_route *routes, uint32_t count) {
    if (count > 4096) {
        errno = EINVAL;
        return -1;
    }
    size_t size = sizeof(struct kvm_irq_routing) + (size_t)count * sizeof(struct kvm_irq_routing_entry);
    struct kvm_irq_routing *table = calloc(1, size);
    if (!table) {
        errno = ENOMEM;
        return -1;
    }
    table->nr = count;
    for (uint32_t i = 0; i < count; i++) {
        struct kvm_irq_routing_entry *entry = &table->entries[i];
        entry->gsi = routes[i].gsi;
        if (routes[i].is_msi) {
            entry->type = KVM_IRQ_ROUTING_MSI;
            entry->u.msi.address_lo = (uint32_t)routes[i].msi_address;
            entry->u.msi.address_hi = (uint32_t)(routes[i].msi_address >> 32);
            entry->u.msi.data = routes[i].msi_data;
        } else {
            entry->type = KVM_IRQ_ROUTING_IRQCHIP;
            entry->u.irqchip.irqchip = routes[i].chip;
            entry->u.irqchip.pin = routes[i].pin;
        }
    }
    int result = ioctl(vmfd, KVM_SET_GSI_ROUTING, table);
    int saved = errno;
    free(table);
    errno = saved;
    return result;
}
