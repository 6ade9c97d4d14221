#define _GNU_SOURCE
#include "CNetLatencySupport.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/errqueue.h>
#include <linux/ethtool.h>
#include <linux/net_tstamp.h>
#include <linux/sockios.h>

#ifndef SCM_TS_OPT_ID
#define SCM_TS_OPT_ID 81 /* asm-generic/socket.h, Linux 6.13 */
#endif
#ifndef SCM_TSTAMP_SND
#define SCM_TSTAMP_SND 0
#define SCM_TSTAMP_SCHED 1
#define SCM_TSTAMP_ACK 2
#endif

int rtv_ts_enable(int fd, int kinds, uint32_t *flags) {
    uint32_t value = SOF_TIMESTAMPING_OPT_ID | SOF_TIMESTAMPING_OPT_TSONLY;
    if (kinds & RTV_TS_SOFTWARE)
        value |= SOF_TIMESTAMPING_TX_SOFTWARE | SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE;
    if (kinds & RTV_TS_HARDWARE)
        value |= SOF_TIMESTAMPING_TX_HARDWARE | SOF_TIMESTAMPING_RX_HARDWARE | SOF_TIMESTAMPING_RAW_HARDWARE;
    if (kinds & RTV_TS_SCHEDULED) value |= SOF_TIMESTAMPING_TX_SCHED;
    if (setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPING, &value, sizeof(value)) != 0) return -errno;
    *flags = value;
    return 0;
}

int rtv_ts_interface_info(int fd, const char *name, uint32_t *capabilities, int32_t *phc_index) {
    struct ethtool_ts_info info;
    struct ifreq request;
    memset(&info, 0, sizeof(info));
    memset(&request, 0, sizeof(request));
    if (strlen(name) >= sizeof(request.ifr_name)) return -EINVAL;
    info.cmd = ETHTOOL_GET_TS_INFO;
    strncpy(request.ifr_name, name, sizeof(request.ifr_name) - 1);
    request.ifr_data = (void *)&info;
    if (ioctl(fd, SIOCETHTOOL, &request) != 0) return -errno;
    *capabilities = info.so_timestamping;
    *phc_index = info.phc_index;
    return 0;
}

int rtv_ts_enable_hardware(int fd, const char *name) {
    struct hwtstamp_config config;
    struct ifreq request;
    memset(&config, 0, sizeof(config));
    memset(&request, 0, sizeof(request));
    if (strlen(name) >= sizeof(request.ifr_name)) return -EINVAL;
    config.tx_type = HWTSTAMP_TX_ON;
    config.rx_filter = HWTSTAMP_FILTER_ALL;
    strncpy(request.ifr_name, name, sizeof(request.ifr_name) - 1);
    request.ifr_data = (void *)&config;
    if (ioctl(fd, SIOCSHWTSTAMP, &request) != 0) return -errno;
    return 0;
}

uint32_t rtv_ts_capability_tx_software(void) { return SOF_TIMESTAMPING_TX_SOFTWARE; }
uint32_t rtv_ts_capability_rx_software(void) { return SOF_TIMESTAMPING_RX_SOFTWARE; }
uint32_t rtv_ts_capability_software(void) { return SOF_TIMESTAMPING_SOFTWARE; }
uint32_t rtv_ts_capability_tx_hardware(void) { return SOF_TIMESTAMPING_TX_HARDWARE; }
uint32_t rtv_ts_capability_rx_hardware(void) { return SOF_TIMESTAMPING_RX_HARDWARE; }
uint32_t rtv_ts_capability_raw_hardware(void) { return SOF_TIMESTAMPING_RAW_HARDWARE; }


static int64_t nanoseconds(const struct timespec *time) {
    return (int64_t)time->tv_sec * 1000000000 + time->tv_nsec;
}

static void read_stamp(struct msghdr *message, struct rtv_ts_stamp *stamp) {
    stamp->software_ns = 0;
    stamp->hardware_ns = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(message); c; c = CMSG_NXTHDR(message, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPING &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct scm_timestamping))) {
            struct scm_timestamping value;
            memcpy(&value, CMSG_DATA(c), sizeof(value));
            stamp->software_ns = nanoseconds(&value.ts[0]);
            stamp->hardware_ns = nanoseconds(&value.ts[2]);
        }
    }
}

long rtv_ts_send(int fd, const void *data, size_t length, const struct rtv_sock_endpoint *destination, int64_t id) {
    struct sockaddr_storage storage;
    socklen_t address_length;
    int r = rtv_sock_to_sockaddr(destination, &storage, &address_length);
    if (r) return r;
    struct iovec vector = { .iov_base = (void *)data, .iov_len = length };
    union { char buffer[CMSG_SPACE(sizeof(uint32_t))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof(control));
    struct msghdr message = { .msg_name = &storage, .msg_namelen = address_length, .msg_iov = &vector, .msg_iovlen = 1 };
    if (id >= 0) {
        message.msg_control = control.buffer;
        message.msg_controllen = sizeof(control.buffer);
        struct cmsghdr *c = CMSG_FIRSTHDR(&message);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_TS_OPT_ID;
        c->cmsg_len = CMSG_LEN(sizeof(uint32_t));
        uint32_t key = (uint32_t)id;
        memcpy(CMSG_DATA(c), &key, sizeof(key));
    }
    ssize_t sent = sendmsg(fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL);
    return sent >= 0 ? (long)sent : -errno;
}

long rtv_ts_receive(int fd, void *data, size_t capacity, struct rtv_sock_endpoint *source, struct rtv_ts_stamp *stamp,
                    uint32_t *truncated) {
    struct sockaddr_storage storage;
    memset(&storage, 0, sizeof(storage));
    union { char buffer[512]; struct cmsghdr align; } control;
    struct iovec vector = { .iov_base = data, .iov_len = capacity };
    struct msghdr message = { .msg_name = &storage, .msg_namelen = sizeof(storage), .msg_iov = &vector, .msg_iovlen = 1,
                              .msg_control = control.buffer, .msg_controllen = sizeof(control.buffer) };
    ssize_t received = recvmsg(fd, &message, MSG_DONTWAIT);
    if (received < 0) return -errno;
    rtv_sock_from_sockaddr(&storage, message.msg_namelen, source);
    read_stamp(&message, stamp);
    *truncated = (message.msg_flags & MSG_TRUNC) ? 1 : 0;
    return (long)received;
}

int rtv_ts_read_transmit(int fd, uint32_t *id, uint32_t *kind, struct rtv_ts_stamp *stamp) {
    char data[64];
    union { char buffer[512]; struct cmsghdr align; } control;
    struct iovec vector = { .iov_base = data, .iov_len = sizeof(data) };
    struct msghdr message = { .msg_iov = &vector, .msg_iovlen = 1, .msg_control = control.buffer,
                              .msg_controllen = sizeof(control.buffer) };
    if (recvmsg(fd, &message, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return errno == EAGAIN ? 0 : -errno;
    read_stamp(&message, stamp);
    int found = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c)) {
        if (((c->cmsg_level == SOL_IP && c->cmsg_type == IP_RECVERR) ||
             (c->cmsg_level == SOL_IPV6 && c->cmsg_type == IPV6_RECVERR)) &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct sock_extended_err))) {
            struct sock_extended_err error;
            memcpy(&error, CMSG_DATA(c), sizeof(error));
            if (error.ee_errno == ENOMSG && error.ee_origin == SO_EE_ORIGIN_TIMESTAMPING) {
                *id = error.ee_data;
                *kind = error.ee_info;
                found = 1;
            }
        }
    }
    return found ? 1 : -ENOMSG;
}

int rtv_ts_wait(int fd, int64_t timeout_ns, int *events) {
    struct pollfd entry = { .fd = fd, .events = POLLIN, .revents = 0 };
    struct timespec timeout;
    struct timespec *limit = NULL;
    if (timeout_ns >= 0) {
        timeout.tv_sec = timeout_ns / 1000000000;
        timeout.tv_nsec = timeout_ns % 1000000000;
        limit = &timeout;
    }
    int r = ppoll(&entry, 1, limit, NULL);
    if (r < 0) return -errno;
    *events = entry.revents;
    return r;
}

long rtv_udp_receive_blocking(int fd, void *data, size_t capacity, struct rtv_sock_endpoint *source) {
    struct sockaddr_storage storage;
    socklen_t length = sizeof(storage);
    memset(&storage, 0, sizeof(storage));
    ssize_t received = recvfrom(fd, data, capacity, 0, (struct sockaddr *)&storage, &length);
    if (received < 0) return -errno;
    rtv_sock_from_sockaddr(&storage, length, source);
    return (long)received;
}

long rtv_udp_send_blocking(int fd, const void *data, size_t length, const struct rtv_sock_endpoint *destination) {
    struct sockaddr_storage storage;
    socklen_t address_length;
    int r = rtv_sock_to_sockaddr(destination, &storage, &address_length);
    if (r) return r;
    ssize_t sent = sendto(fd, data, length, MSG_NOSIGNAL, (struct sockaddr *)&storage, address_length);
    return sent >= 0 ? (long)sent : -errno;
}

int rtv_udp_make_blocking(int fd, int64_t timeout_ns) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) return -errno;
    struct timeval timeout = { .tv_sec = timeout_ns / 1000000000, .tv_usec = (timeout_ns % 1000000000) / 1000 };
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)) != 0) return -errno;
    return 0;
}

int64_t rtv_ts_realtime_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return nanoseconds(&now);
}
