#if canImport(Glibc)
import Glibc
#endif
import CSocketsSupport
import RTVirtCore
import LongPoll

/// A host `errno` from a socket call.
public struct SocketErrno: Error, Equatable, Sendable, CustomStringConvertible {
    /// The errno value.
    public var rawValue: Int32
    /// An errno.
    public init(_ rawValue: Int32) { self.rawValue = rawValue }
    /// What the guest is told.
    public var status: SocketStatus { SocketStatus(hostErrno: rawValue) }
    public var description: String { String(cString: strerror(rawValue)) }
}

/// Where datagram `i` of a batch is in a host buffer, and where it goes.
public struct SocketBatchDatagram: Equatable, Sendable {
    /// Offset of the payload in the buffer.
    public var offset: Int
    /// Payload bytes.
    public var length: Int
    /// The destination; nil: the connected peer.
    public var destination: SocketEndpoint?
    /// A datagram to send.
    public init(offset: Int, length: Int, destination: SocketEndpoint?) {
        self.offset = offset; self.length = length; self.destination = destination
    }
}

/// A datagram received by a batch.
public struct SocketReceivedDatagram: Equatable, Sendable {
    /// Bytes stored (at most the capacity).
    public var length: Int
    /// Whether the datagram was longer than the capacity.
    public var truncated: Bool
    /// The sender.
    public var source: SocketEndpoint
    /// A received datagram.
    public init(length: Int, truncated: Bool, source: SocketEndpoint) {
        self.length = length; self.truncated = truncated; self.source = source
    }
}

/// The host socket calls the `net.*` procedures make, behind a protocol so that the fuzzer and
/// unit tests can use a fake that opens no real socket. Every call is non-blocking: blocking is
/// the long-poll dispatcher's job. Descriptors are the backend's own numbers; the guest never
/// sees them.
public protocol SocketBackend: Sendable {
    /// A new non-blocking socket, created in the backend's network namespace.
    func open(_ family: SocketFamily, _ type: SocketType) throws(SocketErrno) -> Int32
    /// Closes a descriptor this backend returned.
    func close(_ descriptor: Int32)
    func bind(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno)
    func connect(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno)
    func listen(_ descriptor: Int32, backlog: Int32) throws(SocketErrno)
    /// The next connection (a new descriptor, non-blocking) and its peer.
    func accept(_ descriptor: Int32) throws(SocketErrno) -> (descriptor: Int32, peer: SocketEndpoint)
    /// 0 read, 1 write, 2 both.
    func shutdown(_ descriptor: Int32, how: Int32) throws(SocketErrno)
    /// The local (`peer` false) or remote address.
    func name(_ descriptor: Int32, peer: Bool) throws(SocketErrno) -> SocketEndpoint
    /// Sends `bytes` (to `destination`, or the connected peer); returns the bytes sent.
    func send(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer, to destination: SocketEndpoint?) throws(SocketErrno) -> Int
    /// Receives into `buffer`.
    func receive(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(SocketErrno) -> SocketReceivedDatagram
    /// Receives up to `count` datagrams; datagram `i` goes to `buffer[i·stride + headerSize ..< + capacity]`.
    func receiveBatch(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer, count: Int, stride: Int,
                      headerSize: Int, capacity: Int) throws(SocketErrno) -> [SocketReceivedDatagram]
    /// Sends `datagrams` from `buffer`; returns how many were sent.
    func sendBatch(_ descriptor: Int32, from buffer: UnsafeRawBufferPointer, datagrams: [SocketBatchDatagram]) throws(SocketErrno) -> Int
    func setOption(_ descriptor: Int32, _ option: SocketOption, _ value: Int32) throws(SocketErrno)
    func getOption(_ descriptor: Int32, _ option: SocketOption) throws(SocketErrno) -> Int32
    /// The `poll(2)` events of each descriptor now, without waiting.
    func readiness(_ descriptors: [PollDescriptor]) -> [PollDescriptor]
}

/// Real host sockets, created inside a network namespace by a helper thread that joined it
/// with `setns(CLONE_NEWNET)` (a socket belongs to the namespace it was created in, wherever
/// it is used later). No vCPU thread ever changes its namespace.
///
/// The VMM's own namespace is available only through `unconfinedInVMMsOwnNetworkNamespace()`.
public final class HostSocketBackend: SocketBackend {
    private let creator: NamespaceSocketCreator?

    /// Sockets created inside `namespace` (which must stay open while the backend lives).
    /// - Throws: `NetworkNamespaceError` when the helper thread cannot join the namespace.
    public init(namespace: NetworkNamespace) throws(NetworkNamespaceError) {
        creator = try NamespaceSocketCreator(namespace: namespace)
    }

    private init(unconfined: Void) { creator = nil }

    /// **Unconfined**: sockets created in the VMM's own network namespace, so the guest reaches
    /// whatever the VMM process can (within the socket policy). Only for a VMM that has put
    /// itself in a namespace of its own, or knows what that means; prints a warning.
    public static func unconfinedInVMMsOwnNetworkNamespace() -> HostSocketBackend {
        let warning = "rtvirt: WARNING: guest sockets are created in the VMM's own network namespace (unconfined)\n"
        _ = warning.withCString { write(2, $0, strlen($0)) }
        return HostSocketBackend(unconfined: ())
    }

    private static func check(_ result: Int32) throws(SocketErrno) -> Int32 {
        guard result >= 0 else { throw SocketErrno(-result) }
        return result
    }

    private static func endpoint(_ value: SocketEndpoint) -> rtv_sock_endpoint {
        var raw = rtv_sock_endpoint()
        raw.family = value.address?.family.rawValue ?? 0
        raw.port = value.port
        raw.scope_id = value.scopeID
        // Sound: `address` is a 16-byte C array; at most 16 bytes are copied into it.
        withUnsafeMutableBytes(of: &raw.address) { target in
            if let bytes = value.address?.bytes { target.copyBytes(from: bytes.prefix(16)) }
        }
        return raw
    }

    private static func endpoint(_ raw: rtv_sock_endpoint) -> SocketEndpoint {
        var raw = raw
        // Sound: reads the 16-byte C array in place.
        let bytes = withUnsafeBytes(of: &raw.address) { Array($0) }
        switch raw.family {
        case 4: return SocketEndpoint(IPAddress(family: .ipv4, bytes: Array(bytes[0..<4]))!, port: raw.port)
        case 6: return SocketEndpoint(IPAddress(family: .ipv6, bytes: bytes)!, port: raw.port, scopeID: raw.scope_id)
        default: return .none
        }
    }

    public func open(_ family: SocketFamily, _ type: SocketType) throws(SocketErrno) -> Int32 {
        if let creator { return try creator.open(family, type) }
        return try Self.check(rtv_sock_open(Int32(family.rawValue), Int32(type.rawValue)))
    }

    public func close(_ descriptor: Int32) { _ = rtv_sock_close(descriptor) }

    public func bind(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno) {
        var raw = Self.endpoint(endpoint)
        _ = try Self.check(rtv_sock_bind(descriptor, &raw))
    }

    public func connect(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno) {
        var raw = Self.endpoint(endpoint)
        _ = try Self.check(rtv_sock_connect(descriptor, &raw))
    }

    public func listen(_ descriptor: Int32, backlog: Int32) throws(SocketErrno) {
        _ = try Self.check(rtv_sock_listen(descriptor, backlog))
    }

    public func accept(_ descriptor: Int32) throws(SocketErrno) -> (descriptor: Int32, peer: SocketEndpoint) {
        var raw = rtv_sock_endpoint()
        let client = try Self.check(rtv_sock_accept(descriptor, &raw))
        return (client, Self.endpoint(raw))
    }

    public func shutdown(_ descriptor: Int32, how: Int32) throws(SocketErrno) {
        _ = try Self.check(rtv_sock_shutdown(descriptor, how))
    }

    public func name(_ descriptor: Int32, peer: Bool) throws(SocketErrno) -> SocketEndpoint {
        var raw = rtv_sock_endpoint()
        _ = try Self.check(rtv_sock_name(descriptor, peer ? 1 : 0, &raw))
        return Self.endpoint(raw)
    }

    public func send(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer, to destination: SocketEndpoint?) throws(SocketErrno) -> Int {
        let sent: Int
        if let destination {
            var raw = Self.endpoint(destination)
            sent = rtv_sock_send(descriptor, bytes.baseAddress, bytes.count, &raw)
        } else {
            sent = rtv_sock_send(descriptor, bytes.baseAddress, bytes.count, nil)
        }
        guard sent >= 0 else { throw SocketErrno(Int32(-sent)) }
        return sent
    }

    public func receive(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(SocketErrno) -> SocketReceivedDatagram {
        var raw = rtv_sock_endpoint()
        var truncated: UInt32 = 0
        let received = rtv_sock_receive(descriptor, buffer.baseAddress, buffer.count, &raw, &truncated)
        guard received >= 0 else { throw SocketErrno(Int32(-received)) }
        return SocketReceivedDatagram(length: min(received, buffer.count), truncated: truncated != 0, source: Self.endpoint(raw))
    }

    public func receiveBatch(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer, count: Int, stride: Int,
                             headerSize: Int, capacity: Int) throws(SocketErrno) -> [SocketReceivedDatagram] {
        guard count > 0, count * stride <= buffer.count, headerSize + capacity <= stride, let base = buffer.baseAddress else {
            throw SocketErrno(EINVAL)
        }
        // Sound: the guard above keeps every datagram's [i·stride + header, + capacity) inside `buffer`.
        var datagrams = (0..<count).map { index in
            rtv_sock_datagram(data: (base + index * stride + headerSize).assumingMemoryBound(to: UInt8.self),
                              capacity: UInt32(capacity), length: 0, truncated: 0, reserved: 0, endpoint: rtv_sock_endpoint())
        }
        // Sound: the C call fills at most `count` entries of the array, during the call.
        let received = try Self.check(datagrams.withUnsafeMutableBufferPointer {
            rtv_sock_receive_batch(descriptor, $0.baseAddress, UInt32($0.count))
        })
        return datagrams.prefix(Int(received)).map {
            SocketReceivedDatagram(length: min(Int($0.length), capacity), truncated: $0.truncated != 0, source: Self.endpoint($0.endpoint))
        }
    }

    public func sendBatch(_ descriptor: Int32, from buffer: UnsafeRawBufferPointer, datagrams: [SocketBatchDatagram]) throws(SocketErrno) -> Int {
        guard let base = buffer.baseAddress,
              datagrams.allSatisfy({ $0.offset >= 0 && $0.length >= 0 && $0.offset + $0.length <= buffer.count }) else {
            throw SocketErrno(EINVAL)
        }
        // Sound: each datagram's range is checked inside `buffer` above; sendmmsg only reads it.
        var raw = datagrams.map { datagram in
            rtv_sock_datagram(data: UnsafeMutablePointer(mutating: (base + datagram.offset).assumingMemoryBound(to: UInt8.self)),
                              capacity: UInt32(datagram.length), length: UInt32(datagram.length), truncated: 0, reserved: 0,
                              endpoint: datagram.destination.map(Self.endpoint) ?? rtv_sock_endpoint())
        }
        // Sound: the C call reads `count` entries of the array, during the call.
        return Int(try Self.check(raw.withUnsafeMutableBufferPointer { rtv_sock_send_batch(descriptor, $0.baseAddress, UInt32($0.count)) }))
    }

    public func setOption(_ descriptor: Int32, _ option: SocketOption, _ value: Int32) throws(SocketErrno) {
        _ = try Self.check(rtv_sock_set_option(descriptor, Int32(option.rawValue), value))
    }

    public func getOption(_ descriptor: Int32, _ option: SocketOption) throws(SocketErrno) -> Int32 {
        var value: Int32 = 0
        _ = try Self.check(rtv_sock_get_option(descriptor, Int32(option.rawValue), &value))
        return value
    }

    public func readiness(_ descriptors: [PollDescriptor]) -> [PollDescriptor] {
        var fds = descriptors.map { pollfd(fd: $0.fd, events: $0.events, revents: 0) }
        // Sound: poll writes only the `count` entries of the array it is given, during the call.
        let result = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), 0) }
        return descriptors.enumerated().map { index, descriptor in
            PollDescriptor(fd: descriptor.fd, events: descriptor.events, returnedEvents: result > 0 ? fds[index].revents : 0)
        }
    }
}

/// A helper thread inside a network namespace that creates sockets there on request.
final class NamespaceSocketCreator: Sendable {
    private struct State {
        var requests: [(id: UInt64, family: SocketFamily, type: SocketType)] = []
        var results: [UInt64: Int32] = [:]
        var nextID: UInt64 = 1
        var joined: Int32? // 0, or -errno of setns
        var stopping = false
    }
    private let state = ConditionLock(State())
    private let thread: HostThread

    init(namespace: NetworkNamespace) throws(NetworkNamespaceError) {
        let state = self.state
        let descriptor = namespace.descriptor
        do {
            thread = try HostThread(name: "rtvirt-netns") {
                let joined = rtv_sock_setns_net(descriptor)
                state.withLockAndBroadcast { $0.joined = joined }
                guard joined == 0 else { return }
                while true {
                    let work = state.wait(until: { $0.stopping || !$0.requests.isEmpty }) { state, _ in
                        defer { state.requests.removeAll() }
                        return (state.stopping, state.requests)
                    }
                    var done: [UInt64: Int32] = [:]
                    for request in work.1 { done[request.id] = rtv_sock_open(Int32(request.family.rawValue), Int32(request.type.rawValue)) }
                    state.withLockAndBroadcast { $0.results.merge(done) { $1 } }
                    if work.0 { return }
                }
            }
        } catch {
            throw .helperThread(error.code)
        }
        let joined = state.wait(until: { $0.joined != nil }) { state, _ in state.joined ?? 0 }
        if joined != 0 {
            thread.join()
            throw .join(path: namespace.path, errno: -joined)
        }
    }

    deinit {
        state.withLockAndBroadcast { $0.stopping = true }
        thread.join()
        // Sockets made for requests whose caller gave up (never in practice) are closed here.
        for descriptor in state.withLock({ $0.results.values }) where descriptor >= 0 { _ = rtv_sock_close(descriptor) }
    }

    func open(_ family: SocketFamily, _ type: SocketType) throws(SocketErrno) -> Int32 {
        let id = state.withLockAndBroadcast { state in
            defer { state.nextID += 1 }
            state.requests.append((state.nextID, family, type))
            return state.nextID
        }
        // A hang detector only: the helper answers within microseconds.
        let deadline = monotonicNanoseconds() + 10_000_000_000
        let result = state.wait(until: { $0.results[id] != nil }, deadlineNanoseconds: deadline) { state, _ in
            state.results.removeValue(forKey: id)
        }
        guard let result else { throw SocketErrno(EAGAIN) }
        guard result >= 0 else { throw SocketErrno(-result) }
        return result
    }
}
