// Internal C shim of NetLatency: kernel packet timestamps (SO_TIMESTAMPING) of UDP sockets,
// their control messages and error queue, and the interface's timestamping capabilities
// (ethtool). Addresses cross as CSocketsSupport's endpoint. Each call returns >= 0 or -errno.
#ifndef RTVIRT_CNETLATENCYSUPPORT_H
#define RTVIRT_CNETLATENCYSUPPORT_H

#include <stdint.h>
#include <stddef.h>
#include "CSocketsSupport.h"

/// A packet's kernel timestamps, nanoseconds of CLOCK_REALTIME (software) or of the NIC's clock
/// (hardware); 0 when the kernel gave none of that kind.
struct rtv_ts_stamp {
    int64_t software_ns;
    int64_t hardware_ns;
};

/// Which timestamps to ask for (rtv_ts_enable's `kinds`).
enum {
    RTV_TS_SOFTWARE = 1,  /* TX (driver hand-off) and RX (entry into the stack), CLOCK_REALTIME */
    RTV_TS_HARDWARE = 2,  /* TX and RX by the NIC (raw hardware clock) */
    RTV_TS_SCHEDULED = 4, /* TX also when the packet enters the queueing discipline */
};

/// What a transmit timestamp from the error queue marks (rtv_ts_read_transmit's `*kind`).
enum {
    RTV_TS_KIND_SENT = 0,      /* SCM_TSTAMP_SND: handed to the driver (software) or sent (hardware) */
    RTV_TS_KIND_SCHEDULED = 1, /* SCM_TSTAMP_SCHED: entered the packet scheduler */
    RTV_TS_KIND_ACKNOWLEDGED = 2,
};

/// setsockopt(SO_TIMESTAMPING) with OPT_ID, OPT_TSONLY and the report flags for `kinds`.
/// `*flags` gets what was set. 0 or -errno.
int rtv_ts_enable(int fd, int kinds, uint32_t *flags);

/// ETHTOOL_GET_TS_INFO of interface `name` in the namespace of socket `fd`: the interface's
/// SOF_TIMESTAMPING_* capabilities and its PTP hardware clock index (-1: none). 0 or -errno.
int rtv_ts_interface_info(int fd, const char *name, uint32_t *capabilities, int32_t *phc_index);

/// SIOCSHWTSTAMP on interface `name`: hardware TX timestamps on, RX timestamps of all packets.
/// 0 or -errno (EOPNOTSUPP / EINVAL on interfaces without hardware timestamping).
int rtv_ts_enable_hardware(int fd, const char *name);

/// SOF_TIMESTAMPING_* bits (for Swift, which cannot see the kernel's enum by name).
uint32_t rtv_ts_capability_tx_software(void);
uint32_t rtv_ts_capability_rx_software(void);
uint32_t rtv_ts_capability_software(void);
uint32_t rtv_ts_capability_tx_hardware(void);
uint32_t rtv_ts_capability_rx_hardware(void);
uint32_t rtv_ts_capability_raw_hardware(void);

/// sendmsg of `length` bytes to `destination` (MSG_DONTWAIT). With `id` >= 0 the datagram's
/// transmit timestamps carry that id (the SCM_TS_OPT_ID control message, Linux 6.13+); a kernel
/// without it answers -EINVAL, and the caller then sends with `id` -1 (the socket's counter).
long rtv_ts_send(int fd, const void *data, size_t length, const struct rtv_sock_endpoint *destination, int64_t id);

/// recvmsg (MSG_DONTWAIT) of one datagram with its receive timestamps. Bytes received (at most
/// `capacity`), or -errno (-EAGAIN: none waiting). `*truncated` is set for longer datagrams.
long rtv_ts_receive(int fd, void *data, size_t capacity, struct rtv_sock_endpoint *source, struct rtv_ts_stamp *stamp,
                    uint32_t *truncated);

/// Reads one transmit timestamp from the error queue (MSG_ERRQUEUE | MSG_DONTWAIT): its id
/// (SCM_TS_OPT_ID's, or the socket's counter), kind (RTV_TS_KIND_*) and stamps. 1 when one was
/// read, 0 when the queue is empty, -errno otherwise (an error-queue entry that is not a
/// timestamp reads as -ENOMSG).
int rtv_ts_read_transmit(int fd, uint32_t *id, uint32_t *kind, struct rtv_ts_stamp *stamp);

/// ppoll on `fd` for input until `timeout_ns` (< 0: forever); `*events` gets POLLIN (1) when a
/// datagram waits and POLLERR (8) when the error queue holds timestamps. 0 on timeout, > 0 when
/// ready, or -errno (-EINTR included).
int rtv_ts_wait(int fd, int64_t timeout_ns, int *events);

/// A blocking recvfrom (the host-native echo's receive; SO_RCVTIMEO bounds it). Bytes received
/// (at most `capacity`) or -errno (-EAGAIN at the receive timeout).
long rtv_udp_receive_blocking(int fd, void *data, size_t capacity, struct rtv_sock_endpoint *source);

/// A blocking sendto. Bytes sent or -errno.
long rtv_udp_send_blocking(int fd, const void *data, size_t length, const struct rtv_sock_endpoint *destination);

/// Makes `fd` blocking with receives bounded by `timeout_ns` (SO_RCVTIMEO). 0 or -errno.
int rtv_udp_make_blocking(int fd, int64_t timeout_ns);

/// CLOCK_REALTIME now, nanoseconds (what software timestamps are taken with).
int64_t rtv_ts_realtime_ns(void);

#endif
