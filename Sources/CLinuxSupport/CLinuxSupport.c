#define _GNU_SOURCE
#include "CLinuxSupport.h"

#include <errno.h>
#include <sys/prctl.h>
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
