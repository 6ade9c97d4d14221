// Internal C shim for KVMBackend: ioctl request numbers (function-like macros that Swift
// cannot import), decoding of `struct kvm_run` exits, and an async-signal-safe kick.
#ifndef RTVIRT_CKVMSHIM_H
#define RTVIRT_CKVMSHIM_H

#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/ioctl.h>

// MARK: ioctl wrappers. Each returns what ioctl(2) returns; errno is left as ioctl set it.

static inline int rtv_kvm_get_api_version(int fd) { return ioctl(fd, KVM_GET_API_VERSION, 0); }
static inline int rtv_kvm_create_vm(int fd, unsigned long type) { return ioctl(fd, KVM_CREATE_VM, type); }
static inline int rtv_kvm_check_extension(int fd, long cap) { return ioctl(fd, KVM_CHECK_EXTENSION, cap); }
static inline int rtv_kvm_get_vcpu_mmap_size(int fd) { return ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0); }
static inline int rtv_kvm_get_supported_cpuid(int fd, struct kvm_cpuid2 *cpuid) {
    return ioctl(fd, KVM_GET_SUPPORTED_CPUID, cpuid);
}

static inline int rtv_kvm_set_user_memory_region(int vmfd, const struct kvm_userspace_memory_region *r) {
    return ioctl(vmfd, KVM_SET_USER_MEMORY_REGION, r);
}
static inline int rtv_kvm_create_vcpu(int vmfd, unsigned long id) { return ioctl(vmfd, KVM_CREATE_VCPU, id); }
static inline int rtv_kvm_create_irqchip(int vmfd) { return ioctl(vmfd, KVM_CREATE_IRQCHIP, 0); }
static inline int rtv_kvm_set_tss_addr(int vmfd, unsigned long addr) { return ioctl(vmfd, KVM_SET_TSS_ADDR, addr); }

static inline int rtv_kvm_run(int vcpufd) { return ioctl(vcpufd, KVM_RUN, 0); }
static inline int rtv_kvm_get_regs(int vcpufd, struct kvm_regs *r) { return ioctl(vcpufd, KVM_GET_REGS, r); }
static inline int rtv_kvm_set_regs(int vcpufd, const struct kvm_regs *r) { return ioctl(vcpufd, KVM_SET_REGS, r); }
static inline int rtv_kvm_get_sregs(int vcpufd, struct kvm_sregs *r) { return ioctl(vcpufd, KVM_GET_SREGS, r); }
static inline int rtv_kvm_set_sregs(int vcpufd, const struct kvm_sregs *r) { return ioctl(vcpufd, KVM_SET_SREGS, r); }
static inline int rtv_kvm_set_cpuid2(int vcpufd, const struct kvm_cpuid2 *c) { return ioctl(vcpufd, KVM_SET_CPUID2, c); }
static inline int rtv_kvm_get_msrs(int vcpufd, struct kvm_msrs *m) { return ioctl(vcpufd, KVM_GET_MSRS, m); }
static inline int rtv_kvm_set_msrs(int vcpufd, const struct kvm_msrs *m) { return ioctl(vcpufd, KVM_SET_MSRS, m); }

// MARK: Capability numbers used by the backend.
enum rtv_kvm_capability {
    RTV_CAP_IRQCHIP = KVM_CAP_IRQCHIP,
    RTV_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY,
    RTV_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR,
    RTV_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID,
    RTV_CAP_PIT2 = KVM_CAP_PIT2,
    RTV_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT,
    RTV_CAP_IOEVENTFD = KVM_CAP_IOEVENTFD,
    RTV_CAP_IRQFD = KVM_CAP_IRQFD,
    RTV_CAP_NR_VCPUS = KVM_CAP_NR_VCPUS,
    RTV_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS,
    RTV_CAP_NR_MEMSLOTS = KVM_CAP_NR_MEMSLOTS,
    RTV_CAP_TSC_DEADLINE_TIMER = KVM_CAP_TSC_DEADLINE_TIMER,
    RTV_CAP_GET_TSC_KHZ = KVM_CAP_GET_TSC_KHZ,
    RTV_CAP_MP_STATE = KVM_CAP_MP_STATE,
    RTV_CAP_SIGNAL_MSI = KVM_CAP_SIGNAL_MSI,
    RTV_CAP_IRQ_ROUTING = KVM_CAP_IRQ_ROUTING,
    RTV_CAP_VCPU_ATTRIBUTES = 127, // KVM_CAP_VCPU_ATTRIBUTES, Linux 5.16 (older headers lack it)
};

static inline int rtv_kvm_get_tsc_khz(int vcpufd) { return ioctl(vcpufd, KVM_GET_TSC_KHZ, 0); }

// MARK: Interrupts and multiprocessing state

static inline int rtv_kvm_get_mp_state(int vcpufd, struct kvm_mp_state *s) { return ioctl(vcpufd, KVM_GET_MP_STATE, s); }
static inline int rtv_kvm_set_mp_state(int vcpufd, const struct kvm_mp_state *s) { return ioctl(vcpufd, KVM_SET_MP_STATE, s); }
static inline int rtv_kvm_interrupt(int vcpufd, uint32_t vector) {
    struct kvm_interrupt interrupt = { .irq = vector };
    return ioctl(vcpufd, KVM_INTERRUPT, &interrupt);
}
static inline int rtv_kvm_signal_msi(int vmfd, uint64_t address, uint32_t data) {
    struct kvm_msi msi = { .address_lo = (uint32_t)address, .address_hi = (uint32_t)(address >> 32), .data = data };
    return ioctl(vmfd, KVM_SIGNAL_MSI, &msi);
}
static inline int rtv_kvm_irq_line(int vmfd, uint32_t gsi, uint32_t level) {
    struct kvm_irq_level line = { .irq = gsi, .level = level };
    return ioctl(vmfd, KVM_IRQ_LINE, &line);
}
static inline int rtv_kvm_irqfd_assign(int vmfd, int eventfd, uint32_t gsi, int deassign) {
    struct kvm_irqfd irqfd = { .fd = (uint32_t)eventfd, .gsi = gsi, .flags = deassign ? KVM_IRQFD_FLAG_DEASSIGN : 0 };
    return ioctl(vmfd, KVM_IRQFD, &irqfd);
}
/// One entry of a GSI routing table: an interrupt line of the in-kernel PIC (chip 0, 1) or
/// IOAPIC (chip 2) with its pin, or an MSI (address, data).
struct rtv_kvm_route {
    uint32_t gsi;
    uint32_t is_msi;
    uint32_t chip;
    uint32_t pin;
    uint64_t msi_address;
    uint32_t msi_data;
    uint32_t reserved;
};

/// KVM_SET_GSI_ROUTING with `count` entries (replacing the whole table). Returns what ioctl(2)
/// returns, or -1 with errno ENOMEM / EINVAL when the table cannot be built.
int rtv_kvm_set_gsi_routing(int vmfd, const struct rtv_kvm_route *routes, uint32_t count);

enum rtv_kvm_mp_state {
    RTV_MP_STATE_RUNNABLE = KVM_MP_STATE_RUNNABLE,
    RTV_MP_STATE_UNINITIALIZED = KVM_MP_STATE_UNINITIALIZED,
    RTV_MP_STATE_INIT_RECEIVED = KVM_MP_STATE_INIT_RECEIVED,
    RTV_MP_STATE_HALTED = KVM_MP_STATE_HALTED,
    RTV_MP_STATE_SIPI_RECEIVED = KVM_MP_STATE_SIPI_RECEIVED,
};
// MARK: The guest TSC offset as a vCPU attribute (Linux 5.16+)

#ifndef KVM_VCPU_TSC_CTRL
#define KVM_VCPU_TSC_CTRL 0
#define KVM_VCPU_TSC_OFFSET 0
#endif

/// Reads the vCPU's TSC offset (guest TSC = host TSC + offset, without TSC scaling) with
/// KVM_HAS_DEVICE_ATTR / KVM_GET_DEVICE_ATTR (KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET).
/// Returns 0, or the errno: ENXIO or ENOTTY when the kernel does not offer the attribute.
static inline int rtv_kvm_get_tsc_offset(int vcpufd, int64_t *offset) {
    uint64_t value = 0;
    struct kvm_device_attr attribute = {
        .group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET, .addr = (uint64_t)(uintptr_t)&value,
    };
    if (ioctl(vcpufd, KVM_HAS_DEVICE_ATTR, &attribute) != 0) return errno;
    if (ioctl(vcpufd, KVM_GET_DEVICE_ATTR, &attribute) != 0) return errno;
    *offset = (int64_t)value;
    return 0;
}

// MARK: Exit decoding

/// A flat copy of the exit-specific part of `struct kvm_run`, taken right after KVM_RUN.
struct rtv_exit_info {
    uint32_t reason;
    // KVM_EXIT_IO
    uint8_t io_direction;
    uint8_t io_size;
    uint16_t io_port;
    uint32_t io_count;
    uint64_t io_data;        // first element, little-endian, zero-extended
    // KVM_EXIT_MMIO
    uint64_t mmio_address;
    uint64_t mmio_data;      // little-endian, zero-extended
    uint32_t mmio_length;
    uint8_t mmio_is_write;
    // KVM_EXIT_FAIL_ENTRY
    uint64_t fail_reason;
    uint32_t fail_cpu;
    // KVM_EXIT_INTERNAL_ERROR
    uint32_t internal_suberror;
    // KVM_EXIT_SYSTEM_EVENT
    uint32_t system_event_type;
};

/// Copies the exit information out of the shared `kvm_run` page once.
/// `run_size` bounds the I/O data offset, which the kernel writes but we do not trust blindly.
void rtv_exit_decode(const struct kvm_run *run, size_t run_size, struct rtv_exit_info *out);

/// Stores the reply to a port-in exit (first element) into the `kvm_run` data area.
/// Returns 0, or -1 when the current exit is not a port-in or the offset is out of range.
int rtv_exit_complete_io_in(struct kvm_run *run, size_t run_size, uint64_t value);

/// Element `index` of a string port I/O exit (`rep ins`/`rep outs`, io.count > 1): reads it into
/// `*value` (out) or, for `rtv_exit_set_io_element`, stores `value` (in). Return 0, or -1 when the
/// exit is not port I/O or the element lies outside the kvm_run area.
int rtv_exit_io_element(const struct kvm_run *run, size_t run_size, uint32_t index, uint64_t *value);
int rtv_exit_set_io_element(struct kvm_run *run, size_t run_size, uint32_t index, uint64_t value);

/// Stores the reply to an MMIO-read exit. Returns 0, or -1 when the exit is not an MMIO read.
int rtv_exit_complete_mmio_read(struct kvm_run *run, uint64_t value);

// MARK: Kick

/// Installs the kick handler for `signo` without SA_RESTART, so that the signal makes a
/// blocked KVM_RUN return EINTR instead of killing the process. The kicker sets
/// `immediate_exit` before it signals, so the handler has nothing to do for kicks. When `signo`
/// already has another handler (not SIG_DFL or SIG_IGN): with `chain` 0 nothing changes and
/// EBUSY is returned; otherwise that handler is kept and called after each delivery. Idempotent.
/// Returns 0 or an errno value.
int rtv_kick_install_handler(int signo, int chain);

/// Unblocks `signo` in the calling thread's signal mask (threads inherit masks: one started
/// from a libdispatch worker has every signal blocked). Returns 0 or an errno value.
int rtv_kick_unblock_in_current_thread(int signo);

/// Sets `immediate_exit` (sequentially consistent store).
void rtv_run_set_immediate_exit(struct kvm_run *run, uint8_t value);

/// Reads `immediate_exit` (sequentially consistent load).
uint8_t rtv_run_get_immediate_exit(const struct kvm_run *run);

/// Sends `signo` to `thread`. Returns 0 or an errno value.
int rtv_kick_thread(pthread_t thread, int signo);

/// The signal RTVirt uses for kicks by default: SIGRTMIN + 3.
int rtv_kick_default_signal(void);

#endif
