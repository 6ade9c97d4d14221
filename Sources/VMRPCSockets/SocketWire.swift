#if canImport(Glibc)
import Glibc
#endif
import VMRPC

/// The `net.*` procedures of `Docs/Sockets.md` (ids 0x100 ... 0x111 of the range VMRPC
/// reserves for them).
public enum SocketProcedureID {
    /// `net.open`: a socket of a family and type.
    public static let open: UInt32 = 0x100
    /// `net.close`: closes a handle.
    public static let close: UInt32 = 0x101
    /// `net.bind`: a local address and port.
    public static let bind: UInt32 = 0x102
    /// `net.connect`: a remote address and port (blocks for TCP unless the timeout is 0).
    public static let connect: UInt32 = 0x103
    /// `net.listen`: a stream socket takes connections.
    public static let listen: UInt32 = 0x104
    /// `net.accept`: the next connection (blocks unless the timeout is 0).
    public static let accept: UInt32 = 0x105
    /// `net.send`: bytes on a connected socket.
    public static let send: UInt32 = 0x106
    /// `net.sendTo`: a datagram to an address.
    public static let sendTo: UInt32 = 0x107
    /// `net.receive`: bytes or a datagram (blocks unless the timeout is 0).
    public static let receive: UInt32 = 0x108
    /// `net.receiveFrom`: the same, with the source address.
    public static let receiveFrom: UInt32 = 0x109
    /// `net.shutdown`: ends reading, writing or both.
    public static let shutdown: UInt32 = 0x10A
    /// `net.getsockname`: the local address.
    public static let getSocketName: UInt32 = 0x10B
    /// `net.getpeername`: the remote address.
    public static let getPeerName: UInt32 = 0x10C
    /// `net.setOption`: `SO_RCVBUF`, `SO_SNDBUF`, `TCP_NODELAY`, `SO_PRIORITY`.
    public static let setOption: UInt32 = 0x10D
    /// `net.getOption`: the same, and `SO_ERROR`.
    public static let getOption: UInt32 = 0x10E
    /// `net.wait`: the first of several sockets readable or writable, or a deadline.
    public static let wait: UInt32 = 0x10F
    /// `net.receiveBatch`: up to 64 datagrams into a guest buffer.
    public static let receiveBatch: UInt32 = 0x110
    /// `net.sendBatch`: up to 64 datagrams from a guest buffer.
    public static let sendBatch: UInt32 = 0x111

    /// Every `net.*` procedure with its name, in id order.
    public static let all: [(id: UInt32, name: String)] = [
        (open, "net.open"), (close, "net.close"), (bind, "net.bind"), (connect, "net.connect"),
        (listen, "net.listen"), (accept, "net.accept"), (send, "net.send"), (sendTo, "net.sendTo"),
        (receive, "net.receive"), (receiveFrom, "net.receiveFrom"), (shutdown, "net.shutdown"),
        (getSocketName, "net.getsockname"), (getPeerName, "net.getpeername"), (setOption, "net.setOption"),
        (getOption, "net.getOption"), (wait, "net.wait"), (receiveBatch, "net.receiveBatch"),
        (sendBatch, "net.sendBatch"),
    ]
}

/// The outcome of a socket operation: the first 4 bytes of every `net.*` result. The VMRPC
/// status says whether the procedure ran (`ok`), or why not (`badArguments`, `timedOut`,
/// `cancelled`, ...); this says what the operation did. Every host `errno` a guest can meet
/// maps to one of these (`init(hostErrno:)`), never to a raw errno.
public enum SocketStatus: UInt32, Error, Sendable, CaseIterable {
    case ok = 0
    /// The handle is not one of this VM's open sockets (forged, stale or closed).
    case badHandle = 1
    /// The VM's socket policy refused the call; nothing was sent or changed.
    case denied = 2
    /// The VM has its policy's maximum number of sockets open.
    case tooManySockets = 3
    /// A non-blocking call found nothing to do (`EAGAIN`).
    case wouldBlock = 4
    /// A connection is being made (`EINPROGRESS`, `EALREADY`).
    case inProgress = 5
    /// `EADDRINUSE`.
    case addressInUse = 6
    /// `EADDRNOTAVAIL`.
    case addressNotAvailable = 7
    /// `ECONNREFUSED`.
    case connectionRefused = 8
    /// `ECONNRESET`, `EPIPE`.
    case connectionReset = 9
    /// `ECONNABORTED`.
    case connectionAborted = 10
    /// `ENOTCONN`, `EDESTADDRREQ`.
    case notConnected = 11
    /// `EISCONN`.
    case alreadyConnected = 12
    /// `ENETUNREACH`, `ENETDOWN`, `ENONET`.
    case networkUnreachable = 13
    /// `EHOSTUNREACH`, `EHOSTDOWN`.
    case hostUnreachable = 14
    /// `ETIMEDOUT`: the peer did not answer (TCP).
    case connectionTimedOut = 15
    /// `EMSGSIZE`.
    case messageTooLarge = 16
    /// `ENOBUFS`, `ENOMEM`, `EMFILE`, `ENFILE`.
    case noResources = 17
    /// The operation does not apply to this socket or value (`EINVAL`, `EOPNOTSUPP`,
    /// `ENOPROTOOPT`, `EAFNOSUPPORT`, `EPROTONOSUPPORT`, `EPROTOTYPE`, ...).
    case invalidArgument = 18
    /// `EACCES`, `EPERM`.
    case notPermitted = 19
    /// The guest buffer named by the call is not wholly inside guest memory.
    case bufferOutOfRange = 20
    /// Any other host error (counted by the host; never expected).
    case hostError = 21

    /// The status for a host `errno`. Unknown values map to `hostError`.
    public init(hostErrno: Int32) {
        switch hostErrno {
        case EAGAIN, EWOULDBLOCK: self = .wouldBlock
        case EINPROGRESS, EALREADY: self = .inProgress
        case EADDRINUSE: self = .addressInUse
        case EADDRNOTAVAIL: self = .addressNotAvailable
        case ECONNREFUSED: self = .connectionRefused
        case ECONNRESET, EPIPE, ENETRESET: self = .connectionReset
        case ECONNABORTED: self = .connectionAborted
        case ENOTCONN, EDESTADDRREQ, ESHUTDOWN: self = .notConnected
        case EISCONN: self = .alreadyConnected
        case ENETUNREACH, ENETDOWN, ENONET: self = .networkUnreachable
        case EHOSTUNREACH, EHOSTDOWN: self = .hostUnreachable
        case ETIMEDOUT: self = .connectionTimedOut
        case EMSGSIZE: self = .messageTooLarge
        case ENOBUFS, ENOMEM, EMFILE, ENFILE: self = .noResources
        case EINVAL, EOPNOTSUPP, ENOPROTOOPT, EAFNOSUPPORT, EPROTONOSUPPORT, EPROTOTYPE, ESOCKTNOSUPPORT,
             EPFNOSUPPORT, ENOTSOCK, EFAULT:
            self = .invalidArgument
        case EACCES, EPERM: self = .notPermitted
        default: self = .hostError
        }
    }

    /// The errnos that map to something other than `hostError` (for tests and documentation).
    public static let mappedErrnos: [Int32] = [
        EAGAIN, EINPROGRESS, EALREADY, EADDRINUSE, EADDRNOTAVAIL, ECONNREFUSED, ECONNRESET, EPIPE, ENETRESET,
        ECONNABORTED, ENOTCONN, EDESTADDRREQ, ESHUTDOWN, EISCONN, ENETUNREACH, ENETDOWN, ENONET, EHOSTUNREACH,
        EHOSTDOWN, ETIMEDOUT, EMSGSIZE, ENOBUFS, ENOMEM, EMFILE, ENFILE, EINVAL, EOPNOTSUPP, ENOPROTOOPT,
        EAFNOSUPPORT, EPROTONOSUPPORT, EPROTOTYPE, ESOCKTNOSUPPORT, EPFNOSUPPORT, ENOTSOCK, EFAULT, EACCES, EPERM,
    ]
}

/// An address family on the wire: 4 or 6.
public enum SocketFamily: UInt16, Sendable, CaseIterable, Hashable {
    case ipv4 = 4
    case ipv6 = 6
}

/// A socket type on the wire.
public enum SocketType: UInt16, Sendable, CaseIterable, Hashable {
    /// TCP.
    case stream = 1
    /// UDP.
    case datagram = 2
}

/// Flags of the data calls (`send`, `sendTo`, `receive`, `receiveFrom`).
public struct SocketCallFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    /// Flags as on the wire.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The payload is in guest memory at the call's `buffer_address`, not in the slot.
    public static let guestBuffer = SocketCallFlags(rawValue: 1 << 0)
    /// Every flag this version knows; others make the call fail with `badArguments`.
    public static let known: SocketCallFlags = [.guestBuffer]
}

/// Readiness bits of `net.wait`.
public struct SocketEvents: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    /// Bits as on the wire.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Data, a connection or end-of-stream is waiting.
    public static let readable = SocketEvents(rawValue: 1 << 0)
    /// Sending would not block.
    public static let writable = SocketEvents(rawValue: 1 << 1)
    /// An error or hang-up (results only).
    public static let error = SocketEvents(rawValue: 1 << 2)
    /// The handle is not an open socket (results only; counts as ready).
    public static let invalid = SocketEvents(rawValue: 1 << 3)
    /// What a guest may ask for.
    public static let requestable: SocketEvents = [.readable, .writable]
}

/// The options of `net.setOption` and `net.getOption`.
public enum SocketOption: UInt32, Sendable, CaseIterable {
    /// `SO_RCVBUF` (the kernel caps it at `net.core.rmem_max` and reports double).
    case receiveBuffer = 1
    /// `SO_SNDBUF` (capped at `net.core.wmem_max`).
    case sendBuffer = 2
    /// `TCP_NODELAY` (0 or 1; stream sockets).
    case tcpNoDelay = 3
    /// `SO_PRIORITY`, 0 ... 6 (higher values need `CAP_NET_ADMIN` and are refused).
    case priority = 4
    /// `SO_ERROR` (get only; read and cleared): a `SocketStatus` value.
    case error = 5
}

/// Sizes of the `net.*` wire format.
public enum SocketWire {
    /// Bytes of an encoded address.
    public static let addressSize = 24
    /// Largest payload carried in the slot (arguments of `send`/`sendTo`, results of
    /// `receive`/`receiveFrom`).
    public static let maximumInlinePayload = 1920
    /// Largest payload of one `send`/`receive` through a guest buffer.
    public static let maximumBufferPayload = 65_536
    /// Most datagrams of one `receiveBatch`/`sendBatch`.
    public static let maximumBatchCount = 64
    /// Bytes of a batch record's header (length, flags, address); the payload follows.
    public static let batchRecordHeaderSize = 32
    /// Largest stride of a batch record (header + the largest UDP payload, rounded to 8).
    public static let maximumBatchStride = 65_544
    /// Most entries of one `net.wait`.
    public static let maximumWaitEntries = 64
    /// Largest `listen` backlog (larger values are lowered to it).
    public static let maximumBacklog: UInt32 = 128
}
