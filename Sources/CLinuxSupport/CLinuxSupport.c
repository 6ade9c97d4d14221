#define _GNU_SOURCE
#include "CLinuxSupport.h"

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

pid_t rtv_gettid(void) { return (pid_t)syscall(SYS_gettid); }

int rtv_set_timer_slack(unsigned long nanoseconds) {
    return prctl(PR_SET_TIMERSLACK, nanoseconds, 0, 0, 0) == 0 ? 0 : errno;
}

long rtv_get_timer_slack(void) {
    int r = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    return r >= 0 ? r : -errno;
}

int rtv_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, name, 0, 0, 0) == 0 ? 0 : errno;
}

int rtv_rlimit_rtprio(void) { return RLIMIT_RTPRIO; }

int rtv_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

int rtv_ppoll(struct pollfd *fds, unsigned long count, int64_t timeout_ns) {
    if (timeout_ns < 0) return ppoll(fds, count, NULL, NULL);
    struct timespec timeout = { .tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000 };
    return ppoll(fds, count, &timeout, NULL);
}

int rtv_set_affinity(pid_t tid, const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) return EINVAL;
        CPU_SET(cpus[i], &set);
    }
    return sched_setaffinity(tid, sizeof(set), &set) == 0 ? 0 : errno;
}

int rtv_get_affinity(pid_t tid, int *cpus, int capacity) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(tid, sizeof(set), &set) != 0) return -errno;
    int count = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && count < capacity; cpu++) {
        if (CPU_ISSET(cpu, &set)) cpus[count++] = cpu;
    }
    return count;
}

/* The kernel's struct sched_attr (include/uapi/linux/sched/types.h), version 0 (48 bytes). */
struct rtv_sched_attr {
    uint32_t size;
    uint32_t sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime;
    uint64_t sched_deadline;
    uint64_t sched_period;
};

#ifndef SCHED_DEADLINE
#define SCHED_DEADLINE 6
#endif

int rtv_sched_deadline(void) { return SCHED_DEADLINE; }

#ifndef SCHED_FLAG_RESET_ON_FORK
#define SCHED_FLAG_RESET_ON_FORK 0x01
#endif

int rtv_sched_reset_on_fork(void) { return SCHED_RESET_ON_FORK; }

int rtv_set_deadline(pid_t tid, uint64_t runtime, uint64_t deadline, uint64_t period, int reset_on_fork) {
    struct rtv_sched_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.size = sizeof(attr);
    attr.sched_policy = SCHED_DEADLINE;
    attr.sched_flags = reset_on_fork ? SCHED_FLAG_RESET_ON_FORK : 0;
    attr.sched_runtime = runtime;
    attr.sched_deadline = deadline;
    attr.sched_period = period;
    return syscall(SYS_sched_setattr, tid, &attr, 0) == 0 ? 0 : errno;
}

int rtv_get_deadline(pid_t tid, uint32_t *policy, uint64_t *runtime, uint64_t *deadline, uint64_t *period) {
    struct rtv_sched_attr attr;
    memset(&attr, 0, sizeof(attr));
    if (syscall(SYS_sched_getattr, tid, &attr, sizeof(attr), 0) != 0) return errno;
    *policy = attr.sched_policy;
    *runtime = attr.sched_runtime;
    *deadline = attr.sched_deadline;
    *period = attr.sched_period;
    return 0;
}

int rtv_get_reset_on_fork(pid_t tid, int *reset_on_fork) {
    struct rtv_sched_attr attr;
    memset(&attr, 0, sizeof(attr));
    if (syscall(SYS_sched_getattr, tid, &attr, sizeof(attr), 0) != 0) return errno;
    *reset_on_fork = (attr.sched_flags & SCHED_FLAG_RESET_ON_FORK) != 0;
    return 0;
}

int rtv_mlockall(void) { return mlockall(MCL_CURRENT | MCL_FUTURE) == 0 ? 0 : errno; }
