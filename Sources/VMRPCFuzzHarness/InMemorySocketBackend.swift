#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import VMRPCSockets
import LongPoll

/// A `SocketBackend` that opens no real socket: descriptors are numbers from 1000 on, a
/// datagram sent is recorded in `sent`, a datagram to receive is queued with `deliver`, a
/// connection to accept with `queueConnection`. For unit tests and fuzzing of the `net.*`
/// procedures. Deterministic; thread-safe.
public final class InMemorySocketBackend: SocketBackend {
    /// A datagram or stream write that the guest sent.
    public struct Sent: Equatable, Sendable {
        public var descriptor: Int32
        public var destination: SocketEndpoint?
        public var bytes: [UInt8]
        /// A record.
        public init(descriptor: Int32, destination: SocketEndpoint?, bytes: [UInt8]) {
            self.descriptor = descriptor; self.destination = destination; self.bytes = bytes
        }
    }

    struct Socket {
        var family: SocketFamily
        var type: SocketType
        var local: SocketEndpoint?
        var peer: SocketEndpoint?
        var listening = false
        var shutDown = false
        var inbound: [(bytes: [UInt8], source: SocketEndpoint)] = []
        var connections: [SocketEndpoint] = []
        var options: [SocketOption: Int32] = [:]
    }

    struct State {
        var sockets: [Int32: Socket] = [:]
        var next: Int32 = 1000
        var sent: [Sent] = []
        var closed = 0
        var sendBufferFull = false
        var failNextOpen: Int32?
    }

    let state = LockedValue(State())

    /// A backend with no sockets.
    public init() {}

    /// What the guest sent, in order.
    public var sent: [Sent] { state.withLock { $0.sent } }
    /// Descriptors open now.
    public var openDescriptors: [Int32] { state.withLock { $0.sockets.keys.sorted() } }
    /// Descriptors closed so far.
    public var closedCount: Int { state.withLock { $0.closed } }
    /// While true, sends fail with `EAGAIN` (a full socket buffer).
    public func setSendBufferFull(_ full: Bool) { state.withLock { $0.sendBufferFull = full } }
    /// The next `open` fails with `errno`.
    public func failNextOpen(errno: Int32) { state.withLock { $0.failNextOpen = errno } }

    /// Queues a datagram (or stream bytes) for the socket bound to `port`. Returns false when
    /// no socket is bound there.
    @discardableResult
    public func deliver(_ bytes: [UInt8], toPort port: UInt16, from source: SocketEndpoint) -> Bool {
        state.withLock { state in
            guard let descriptor = state.sockets.first(where: { $0.value.local?.port == port && !$0.value.listening })?.key else { return false }
            state.sockets[descriptor]?.inbound.append((bytes, source))
            return true
        }
    }

    /// Queues a connection from `peer` for the socket listening on `port`.
    @discardableResult
    public func queueConnection(toPort port: UInt16, from peer: SocketEndpoint) -> Bool {
        state.withLock { state in
            guard let descriptor = state.sockets.first(where: { $0.value.local?.port == port && $0.value.listening })?.key else { return false }
            state.sockets[descriptor]?.connections.append(peer)
            return true
        }
    }

    private func withSocket<R>(_ descriptor: Int32, _ body: (inout Socket, inout State) throws(SocketErrno) -> R) throws(SocketErrno) -> R {
        try state.withLock { (state) throws(SocketErrno) -> R in
            guard var socket = state.sockets[descriptor] else { throw SocketErrno(EBADF) }
            defer { state.sockets[descriptor] = socket }
            return try body(&socket, &state)
        }
    }

    public func open(_ family: SocketFamily, _ type: SocketType) throws(SocketErrno) -> Int32 {
        try state.withLock { (state) throws(SocketErrno) -> Int32 in
            if let error = state.failNextOpen {
                state.failNextOpen = nil
                throw SocketErrno(error)
            }
            defer { state.next += 1 }
            state.sockets[state.next] = Socket(family: family, type: type)
            return state.next
        }
    }

    public func close(_ descriptor: Int32) {
        state.withLock { state in
            if state.sockets.removeValue(forKey: descriptor) != nil { state.closed += 1 }
        }
    }

    public func bind(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno) {
        try withSocket(descriptor) { (socket, state) throws(SocketErrno) in
            guard socket.local == nil else { throw SocketErrno(EINVAL) }
            if endpoint.port != 0, state.sockets.values.contains(where: { $0.local?.port == endpoint.port && $0.type == socket.type }) {
                throw SocketErrno(EADDRINUSE)
            }
            var local = endpoint
            if local.port == 0 { local.port = UInt16(40000 + descriptor % 20000) }
            socket.local = local
        }
    }

    public func connect(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno) {
        try withSocket(descriptor) { (socket, _) throws(SocketErrno) in
            guard socket.peer == nil || socket.type == .datagram else { throw SocketErrno(EISCONN) }
            socket.peer = endpoint
        }
    }

    public func listen(_ descriptor: Int32, backlog: Int32) throws(SocketErrno) {
        try withSocket(descriptor) { (socket, _) throws(SocketErrno) in
            guard socket.type == .stream else { throw SocketErrno(EOPNOTSUPP) }
            socket.listening = true
        }
    }

    public func accept(_ descriptor: Int32) throws(SocketErrno) -> (descriptor: Int32, peer: SocketEndpoint) {
        try withSocket(descriptor) { (socket, state) throws(SocketErrno) in
            guard socket.listening else { throw SocketErrno(EINVAL) }
            guard !socket.connections.isEmpty else { throw SocketErrno(EAGAIN) }
            let peer = socket.connections.removeFirst()
            defer { state.next += 1 }
            state.sockets[state.next] = Socket(family: socket.family, type: .stream, local: socket.local, peer: peer)
            return (state.next, peer)
        }
    }

    public func shutdown(_ descriptor: Int32, how: Int32) throws(SocketErrno) {
        try withSocket(descriptor) { (socket, _) throws(SocketErrno) in
            guard (0...2).contains(how) else { throw SocketErrno(EINVAL) }
            socket.shutDown = true
            if socket.peer == nil { throw SocketErrno(ENOTCONN) }
        }
    }

    public func name(_ descriptor: Int32, peer: Bool) throws(SocketErrno) -> SocketEndpoint {
        try withSocket(descriptor) { (socket, _) throws(SocketErrno) in
            if peer {
                guard let endpoint = socket.peer else { throw SocketErrno(ENOTCONN) }
                return endpoint
            }
            return socket.local ?? SocketEndpoint(IPAddress.any(socket.family), port: 0)
        }
    }

    public func send(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer, to destination: SocketEndpoint?) throws(SocketErrno) -> Int {
        try withSocket(descriptor) { (socket, state) throws(SocketErrno) in
            guard !state.sendBufferFull else { throw SocketErrno(EAGAIN) }
            guard let target = destination ?? socket.peer else { throw SocketErrno(EDESTADDRREQ) }
            if socket.type == .datagram, bytes.count > 65_507 { throw SocketErrno(EMSGSIZE) }
            state.sent.append(Sent(descriptor: descriptor, destination: target, bytes: Array(bytes)))
            return bytes.count
        }
    }

    public func receive(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(SocketErrno) -> SocketReceivedDatagram {
        try withSocket(descriptor) { (socket, _) throws(SocketErrno) in
            guard !socket.inbound.isEmpty else {
                if socket.shutDown { return SocketReceivedDatagram(length: 0, truncated: false, source: .none) }
                throw SocketErrno(EAGAIN)
            }
            let (bytes, source) = socket.inbound.removeFirst()
            let count = min(bytes.count, buffer.count)
            buffer.copyBytes(from: bytes.prefix(count))
            return SocketReceivedDatagram(length: count, truncated: count < bytes.count, source: source)
        }
    }

    public func receiveBatch(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer, count: Int, stride: Int,
                             headerSize: Int, capacity: Int) throws(SocketErrno) -> [SocketReceivedDatagram] {
        guard count > 0, count * stride <= buffer.count, headerSize + capacity <= stride else { throw SocketErrno(EINVAL) }
        return try withSocket(descriptor) { (socket, _) throws(SocketErrno) in
            guard !socket.inbound.isEmpty else { throw SocketErrno(EAGAIN) }
            var received: [SocketReceivedDatagram] = []
            while received.count < count, !socket.inbound.isEmpty {
                let (bytes, source) = socket.inbound.removeFirst()
                let length = min(bytes.count, capacity)
                let start = received.count * stride + headerSize
                // Sound: start + length ≤ received.count·stride + header + capacity ≤ count·stride ≤ buffer.count (checked above).
                UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + length]).copyBytes(from: bytes.prefix(length))
                received.append(SocketReceivedDatagram(length: length, truncated: length < bytes.count, source: source))
            }
            return received
        }
    }

    public func sendBatch(_ descriptor: Int32, from buffer: UnsafeRawBufferPointer, datagrams: [SocketBatchDatagram]) throws(SocketErrno) -> Int {
        guard datagrams.allSatisfy({ $0.offset >= 0 && $0.length >= 0 && $0.offset + $0.length <= buffer.count }) else {
            throw SocketErrno(EINVAL)
        }
        return try withSocket(descriptor) { (socket, state) throws(SocketErrno) in
            guard !state.sendBufferFull else { throw SocketErrno(EAGAIN) }
            for datagram in datagrams {
                guard let target = datagram.destination ?? socket.peer else { throw SocketErrno(EDESTADDRREQ) }
                state.sent.append(Sent(descriptor: descriptor, destination: target,
                                       bytes: Array(buffer[datagram.offset..<datagram.offset + datagram.length])))
            }
            return datagrams.count
        }
    }

    public func setOption(_ descriptor: Int32, _ option: SocketOption, _ value: Int32) throws(SocketErrno) {
        try withSocket(descriptor) { (socket, _) throws(SocketErrno) in
            if option == .tcpNoDelay, socket.type != .stream { throw SocketErrno(EOPNOTSUPP) }
            socket.options[option] = value
        }
    }

    public func getOption(_ descriptor: Int32, _ option: SocketOption) throws(SocketErrno) -> Int32 {
        try withSocket(descriptor) { (socket, _) throws(SocketErrno) in socket.options[option] ?? 0 }
    }

    public func readiness(_ descriptors: [PollDescriptor]) -> [PollDescriptor] {
        state.withLock { state in
            descriptors.map { descriptor in
                var result = descriptor
                guard let socket = state.sockets[descriptor.fd] else {
                    result.returnedEvents = Int16(POLLNVAL)
                    return result
                }
                var events: Int16 = 0
                if !socket.inbound.isEmpty || !socket.connections.isEmpty || socket.shutDown { events |= Int16(POLLIN) }
                if !state.sendBufferFull { events |= Int16(POLLOUT) }
                result.returnedEvents = events & (descriptor.events | Int16(POLLERR | POLLHUP | POLLNVAL))
                return result
            }
        }
    }
}
