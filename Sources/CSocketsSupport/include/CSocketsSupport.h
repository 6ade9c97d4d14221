// Internal C shim of VMRPCSockets: the socket calls whose arguments Swift handles awkwardly
// (sockaddr unions, msghdr arrays, setns). Addresses cross this boundary as an endpoint of
// plain fields. Every call is non-blocking; each returns >= 0, or -errno.
#ifndef RTVIRT_CSOCKETSSUPPORT_H
#define RTVIRT_CSOCKETSSUPPORT_H

#include <stdint.h>
#include <stddef.h>

/// An IPv4 or IPv6 endpoint. `family` is 4, 6, or 0 (none). IPv4 uses address[0..4).
struct rtv_sock_endpoint {
    uint16_t family;
    uint16_t port;
    uint32_t scope_id;
    uint8_t address[16];
};

/// One datagram of a batch: `data` points to `length` bytes (send) or `capacity` bytes (receive).
struct rtv_sock_datagram {
    uint8_t *data;
    uint32_t capacity;
    uint32_t length;     /* bytes sent, or bytes received (before truncation: see truncated) */
    uint32_t truncated;  /* receive: the datagram was longer than capacity */
    uint32_t reserved;
    struct rtv_sock_endpoint endpoint;
};

/// setns(fd, CLONE_NEWNET) on the calling thread. 0 or -errno.
int rtv_sock_setns_net(int fd);
/// unshare(CLONE_NEWNET) on the calling thread. 0 or -errno.
int rtv_sock_unshare_net(void);
/// socket(family 4/6, type 1 stream / 2 datagram) with SOCK_NONBLOCK | SOCK_CLOEXEC; IPv6
/// sockets get IPV6_V6ONLY. The descriptor or -errno.
int rtv_sock_open(int family, int type);
int rtv_sock_close(int fd);
int rtv_sock_bind(int fd, const struct rtv_sock_endpoint *endpoint);
int rtv_sock_connect(int fd, const struct rtv_sock_endpoint *endpoint);
int rtv_sock_listen(int fd, int backlog);
/// accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC; fills `peer`.
int rtv_sock_accept(int fd, struct rtv_sock_endpoint *peer);
/// `how`: 0 read, 1 write, 2 both.
int rtv_sock_shutdown(int fd, int how);
/// getsockname (peer = 0) or getpeername (peer = 1).
int rtv_sock_name(int fd, int peer, struct rtv_sock_endpoint *endpoint);
/// send (endpoint NULL) or sendto, with MSG_DONTWAIT | MSG_NOSIGNAL. Bytes sent or -errno.
long rtv_sock_send(int fd, const void *data, size_t length, const struct rtv_sock_endpoint *endpoint);
/// recvfrom with MSG_DONTWAIT; fills `source` (family 0 when none) and `*truncated` for
/// datagrams longer than `capacity`. Bytes received (at most capacity) or -errno.
long rtv_sock_receive(int fd, void *data, size_t capacity, struct rtv_sock_endpoint *source, uint32_t *truncated);
/// recvmmsg with MSG_DONTWAIT of up to `count` datagrams. How many or -errno.
int rtv_sock_receive_batch(int fd, struct rtv_sock_datagram *datagrams, unsigned count);
/// sendmmsg with MSG_DONTWAIT | MSG_NOSIGNAL (endpoint family 0: the connected peer). How many or -errno.
int rtv_sock_send_batch(int fd, struct rtv_sock_datagram *datagrams, unsigned count);
/// Options: 1 SO_RCVBUF, 2 SO_SNDBUF, 3 TCP_NODELAY, 4 SO_PRIORITY, 5 SO_ERROR (get only).
int rtv_sock_set_option(int fd, int option, int value);
/// The option's value (>= 0) or -errno.
int rtv_sock_get_option(int fd, int option, int *value);

struct sockaddr_storage;
/// Fills `storage` (and `*length`) from an endpoint of family 4 or 6; 0, or -EAFNOSUPPORT.
int rtv_sock_to_sockaddr(const struct rtv_sock_endpoint *endpoint, struct sockaddr_storage *storage, unsigned int *length);
/// Reads an IPv4 or IPv6 socket address into an endpoint (zeroed for other families).
void rtv_sock_from_sockaddr(const struct sockaddr_storage *storage, unsigned int length, struct rtv_sock_endpoint *endpoint);

#endif
