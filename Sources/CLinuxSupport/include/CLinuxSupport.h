// Internal C shim: Linux calls that Swift cannot import directly (variadic prctl, gettid,
// sched_setattr), plus the TSC.
#ifndef RTVIRT_CLINUXSUPPORT_H
#define RTVIRT_CLINUXSUPPORT_H

#include <stdint.h>
#include <sys/types.h>

/// The kernel thread id of the calling thread.
pid_t rtv_gettid(void);
/// prctl(PR_SET_TIMERSLACK, ns). Returns 0 or an errno value.
int rtv_set_timer_slack(unsigned long nanoseconds);
/// prctl(PR_GET_TIMERSLACK). Returns the slack in nanoseconds, or -errno.
long rtv_get_timer_slack(void);
/// prctl(PR_SET_NAME) on the calling thread (at most 15 bytes are kept). Returns 0 or errno.
int rtv_set_thread_name(const char *name);
/// The RLIMIT_RTPRIO resource number (a macro over an enum that Swift does not import).
int rtv_rlimit_rtprio(void);
/// sched_setaffinity(tid, cpus[0..count)). Returns 0 or an errno value.
int rtv_set_affinity(pid_t tid, const int *cpus, int count);
/// sched_getaffinity(tid): writes up to `capacity` CPU numbers to `cpus`; returns how many or -errno.
int rtv_get_affinity(pid_t tid, int *cpus, int capacity);
/// sched_setattr(tid) for SCHED_DEADLINE with runtime/deadline/period in ns, with
/// SCHED_FLAG_RESET_ON_FORK when `reset_on_fork` is non-zero. Returns 0 or errno.
int rtv_set_deadline(pid_t tid, uint64_t runtime, uint64_t deadline, uint64_t period, int reset_on_fork);
/// Whether thread `tid` has SCHED_FLAG_RESET_ON_FORK (sched_getattr): 0 or 1 in `*reset_on_fork`.
/// Returns 0 or errno.
int rtv_get_reset_on_fork(pid_t tid, int *reset_on_fork);
/// SCHED_RESET_ON_FORK, to OR into a sched_setscheduler policy.
int rtv_sched_reset_on_fork(void);
/// sched_getattr(tid): policy and (for SCHED_DEADLINE) the runtime; returns 0 or errno.
int rtv_get_deadline(pid_t tid, uint32_t *policy, uint64_t *runtime, uint64_t *deadline, uint64_t *period);
/// SCHED_DEADLINE's policy number.
int rtv_sched_deadline(void);
/// mlockall(MCL_CURRENT | MCL_FUTURE). Returns 0 or errno.
int rtv_mlockall(void);

struct pollfd;
/// A non-blocking, close-on-exec eventfd. Returns the descriptor or -1 (errno set).
int rtv_eventfd(void);
/// ppoll(2) with a relative timeout in nanoseconds (negative: no timeout) and no signal mask.
int rtv_ppoll(struct pollfd *fds, unsigned long count, int64_t timeout_ns);
/// Reads the time-stamp counter.
static inline uint64_t rtv_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
/// Atomic accesses to memory shared with a guest (aligned, 4 or 8 bytes). `order` is one of
/// __ATOMIC_RELAXED (0), __ATOMIC_ACQUIRE (2), __ATOMIC_RELEASE (3), __ATOMIC_SEQ_CST (5).
static inline uint32_t rtv_atomic_load_u32(const volatile uint32_t *p, int order) {
    return order == 2 ? __atomic_load_n(p, __ATOMIC_ACQUIRE) : order == 5 ? __atomic_load_n(p, __ATOMIC_SEQ_CST)
                      : __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline uint64_t rtv_atomic_load_u64(const volatile uint64_t *p, int order) {
    return order == 2 ? __atomic_load_n(p, __ATOMIC_ACQUIRE) : order == 5 ? __atomic_load_n(p, __ATOMIC_SEQ_CST)
                      : __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void rtv_atomic_store_u32(volatile uint32_t *p, uint32_t v, int order) {
    if (order == 3) __atomic_store_n(p, v, __ATOMIC_RELEASE);
    else if (order == 5) __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    else __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
static inline void rtv_atomic_store_u64(volatile uint64_t *p, uint64_t v, int order) {
    if (order == 3) __atomic_store_n(p, v, __ATOMIC_RELEASE);
    else if (order == 5) __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    else __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
/// Compare-and-exchange (sequentially consistent); returns the value found.
static inline uint32_t rtv_atomic_cas_u32(volatile uint32_t *p, uint32_t expected, uint32_t desired) {
    __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
/// A full memory fence.
static inline void rtv_atomic_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/// Reads the time-stamp counter with `rdtscp`, fenced so that it is neither executed before
/// earlier instructions nor after later ones (`lfence` after it), and the CPU it ran on
/// (Linux keeps the CPU number in IA32_TSC_AUX).
static inline uint64_t rtv_rdtscp_fenced(uint32_t *cpu) {
    uint32_t lo, hi, aux;
    __asm__ __volatile__("rdtscp; lfence" : "=a"(lo), "=d"(hi), "=c"(aux) :: "memory");
    *cpu = aux & 0xfff;
    return ((uint64_t)hi << 32) | lo;
}
/// A pause instruction for spin loops.
static inline void rtv_cpu_relax(void) { __asm__ __volatile__("pause" ::: "memory"); }

#endif
