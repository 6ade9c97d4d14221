#define _GNU_SOURCE
#include "CSocketsSupport.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

int rtv_sock_setns_net(int fd) { return setns(fd, CLONE_NEWNET) == 0 ? 0 : -errno; }

int rtv_sock_unshare_net(void) { return unshare(CLONE_NEWNET) == 0 ? 0 : -errno; }

int rtv_sock_to_sockaddr(const struct rtv_sock_endpoint *endpoint, struct sockaddr_storage *storage, socklen_t *length) {
    memset(storage, 0, sizeof(*storage));
    if (endpoint->family == 4) {
        struct sockaddr_in *in = (struct sockaddr_in *)storage;
        in->sin_family = AF_INET;
        in->sin_port = htons(endpoint->port);
        memcpy(&in->sin_addr, endpoint->address, 4);
        *length = sizeof(*in);
        return 0;
    }
    if (endpoint->family == 6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)storage;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(endpoint->port);
        in6->sin6_scope_id = endpoint->scope_id;
        memcpy(&in6->sin6_addr, endpoint->address, 16);
        *length = sizeof(*in6);
        return 0;
    }
    return -EAFNOSUPPORT;
}

void rtv_sock_from_sockaddr(const struct sockaddr_storage *storage, socklen_t length, struct rtv_sock_endpoint *endpoint) {
    memset(endpoint, 0, sizeof(*endpoint));
    if (storage->ss_family == AF_INET && length >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)storage;
        endpoint->family = 4;
        endpoint->port = ntohs(in->sin_port);
        memcpy(endpoint->address, &in->sin_addr, 4);
    } else if (storage->ss_family == AF_INET6 && length >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)storage;
        endpoint->family = 6;
        endpoint->port = ntohs(in6->sin6_port);
        endpoint->scope_id = in6->sin6_scope_id;
        memcpy(endpoint->address, &in6->sin6_addr, 16);
    }
}

int rtv_sock_open(int family, int type) {
    int domain = family == 4 ? AF_INET : family == 6 ? AF_INET6 : -1;
    int kind = type == 1 ? SOCK_STREAM : type == 2 ? SOCK_DGRAM : -1;
    if (domain < 0 || kind < 0) return -EINVAL;
    int fd = socket(domain, kind | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (domain == AF_INET6) {
        /* No IPv4-mapped addresses: an IPv6 socket reaches only IPv6 peers, so the policy's
         * IPv6 prefixes cannot be bypassed with ::ffff:a.b.c.d. */
        int one = 1;
        if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) != 0) {
            int error = errno;
            close(fd);
            return -error;
        }
    }
    return fd;
}

int rtv_sock_close(int fd) { return close(fd) == 0 ? 0 : -errno; }

int rtv_sock_bind(int fd, const struct rtv_sock_endpoint *endpoint) {
    struct sockaddr_storage storage;
    socklen_t length;
    int r = rtv_sock_to_sockaddr(endpoint, &storage, &length);
    if (r) return r;
    return bind(fd, (struct sockaddr *)&storage, length) == 0 ? 0 : -errno;
}

int rtv_sock_connect(int fd, const struct rtv_sock_endpoint *endpoint) {
    struct sockaddr_storage storage;
    socklen_t length;
    int r = rtv_sock_to_sockaddr(endpoint, &storage, &length);
    if (r) return r;
    return connect(fd, (struct sockaddr *)&storage, length) == 0 ? 0 : -errno;
}

int rtv_sock_listen(int fd, int backlog) { return listen(fd, backlog) == 0 ? 0 : -errno; }

int rtv_sock_accept(int fd, struct rtv_sock_endpoint *peer) {
    struct sockaddr_storage storage;
    socklen_t length = sizeof(storage);
    int client = accept4(fd, (struct sockaddr *)&storage, &length, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (client < 0) return -errno;
    rtv_sock_from_sockaddr(&storage, length, peer);
    return client;
}

int rtv_sock_shutdown(int fd, int how) {
    int mode = how == 0 ? SHUT_RD : how == 1 ? SHUT_WR : how == 2 ? SHUT_RDWR : -1;
    if (mode < 0) return -EINVAL;
    return shutdown(fd, mode) == 0 ? 0 : -errno;
}

int rtv_sock_name(int fd, int peer, struct rtv_sock_endpoint *endpoint) {
    struct sockaddr_storage storage;
    socklen_t length = sizeof(storage);
    int r = peer ? getpeername(fd, (struct sockaddr *)&storage, &length) : getsockname(fd, (struct sockaddr *)&storage, &length);
    if (r != 0) return -errno;
    rtv_sock_from_sockaddr(&storage, length, endpoint);
    return 0;
}

long rtv_sock_send(int fd, const void *data, size_t length, const struct rtv_sock_endpoint *endpoint) {
    ssize_t sent;
    if (endpoint) {
        struct sockaddr_storage storage;
        socklen_t address_length;
        int r = rtv_sock_to_sockaddr(endpoint, &storage, &address_length);
        if (r) return r;
        sent = sendto(fd, data, length, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&storage, address_length);
    } else {
        sent = send(fd, data, length, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    return sent >= 0 ? (long)sent : -errno;
}

long rtv_sock_receive(int fd, void *data, size_t capacity, struct rtv_sock_endpoint *source, uint32_t *truncated) {
    struct sockaddr_storage storage;
    socklen_t length = sizeof(storage);
    memset(&storage, 0, sizeof(storage));
    struct iovec vector = { .iov_base = data, .iov_len = capacity };
    struct msghdr message = { .msg_name = &storage, .msg_namelen = length, .msg_iov = &vector, .msg_iovlen = 1 };
    ssize_t received = recvmsg(fd, &message, MSG_DONTWAIT);
    if (received < 0) return -errno;
    rtv_sock_from_sockaddr(&storage, message.msg_namelen, source);
    *truncated = (message.msg_flags & MSG_TRUNC) ? 1 : 0;
    return (long)received;
}

#define RTV_SOCK_BATCH_MAX 64

/* Zeroes `count` messages and points each at its datagram's buffer: `capacity` bytes to receive
 * into, or `length` bytes to send. */
static void batch_messages(struct mmsghdr *messages, struct iovec *vectors, const struct rtv_sock_datagram *datagrams,
                           unsigned count, int receiving) {
    memset(messages, 0, sizeof(struct mmsghdr) * count);
    for (unsigned i = 0; i < count; i++) {
        vectors[i].iov_base = datagrams[i].data;
        vectors[i].iov_len = receiving ? datagrams[i].capacity : datagrams[i].length;
        messages[i].msg_hdr.msg_iov = &vectors[i];
        messages[i].msg_hdr.msg_iovlen = 1;
    }
}

int rtv_sock_receive_batch(int fd, struct rtv_sock_datagram *datagrams, unsigned count) {
    if (count > RTV_SOCK_BATCH_MAX) count = RTV_SOCK_BATCH_MAX;
    struct mmsghdr messages[RTV_SOCK_BATCH_MAX];
    struct iovec vectors[RTV_SOCK_BATCH_MAX];
    struct sockaddr_storage addresses[RTV_SOCK_BATCH_MAX];
    batch_messages(messages, vectors, datagrams, count, 1);
    for (unsigned i = 0; i < count; i++) {
        messages[i].msg_hdr.msg_name = &addresses[i];
        messages[i].msg_hdr.msg_namelen = sizeof(addresses[i]);
    }
    int received = recvmmsg(fd, messages, count, MSG_DONTWAIT, NULL);
    if (received < 0) return -errno;
    for (int i = 0; i < received; i++) {
        datagrams[i].length = messages[i].msg_len;
        datagrams[i].truncated = (messages[i].msg_hdr.msg_flags & MSG_TRUNC) ? 1 : 0;
        rtv_sock_from_sockaddr(&addresses[i], messages[i].msg_hdr.msg_namelen, &datagrams[i].endpoint);
    }
    return received;
}

int rtv_sock_send_batch(int fd, struct rtv_sock_datagram *datagrams, unsigned count) {
    if (count > RTV_SOCK_BATCH_MAX) count = RTV_SOCK_BATCH_MAX;
    struct mmsghdr messages[RTV_SOCK_BATCH_MAX];
    struct iovec vectors[RTV_SOCK_BATCH_MAX];
    struct sockaddr_storage addresses[RTV_SOCK_BATCH_MAX];
    batch_messages(messages, vectors, datagrams, count, 0);
    for (unsigned i = 0; i < count; i++) {
        if (datagrams[i].endpoint.family != 0) {
            socklen_t length;
            int r = rtv_sock_to_sockaddr(&datagrams[i].endpoint, &addresses[i], &length);
            if (r) return r;
            messages[i].msg_hdr.msg_name = &addresses[i];
            messages[i].msg_hdr.msg_namelen = length;
        }
    }
    int sent = sendmmsg(fd, messages, count, MSG_DONTWAIT | MSG_NOSIGNAL);
    return sent >= 0 ? sent : -errno;
}

static int option_level(int option, int *level, int *name) {
    switch (option) {
    case 1: *level = SOL_SOCKET; *name = SO_RCVBUF; return 0;
    case 2: *level = SOL_SOCKET; *name = SO_SNDBUF; return 0;
    case 3: *level = IPPROTO_TCP; *name = TCP_NODELAY; return 0;
    case 4: *level = SOL_SOCKET; *name = SO_PRIORITY; return 0;
    case 5: *level = SOL_SOCKET; *name = SO_ERROR; return 0;
    default: return -ENOPROTOOPT;
    }
}

int rtv_sock_set_option(int fd, int option, int value) {
    int level, name;
    if (option == 5) return -ENOPROTOOPT;
    int r = option_level(option, &level, &name);
    if (r) return r;
    return setsockopt(fd, level, name, &value, sizeof(value)) == 0 ? 0 : -errno;
}

int rtv_sock_get_option(int fd, int option, int *value) {
    int level, name;
    int r = option_level(option, &level, &name);
    if (r) return r;
    socklen_t length = sizeof(*value);
    return getsockopt(fd, level, name, value, &length) == 0 ? 0 : -errno;
}
