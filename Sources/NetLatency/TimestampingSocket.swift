#if canImport(Glibc)
import Glibc
#endif
import CNetLatencySupport
import CSocketsSupport
import RTVirtCore
import VMRPCSockets

/// Why the instrument could not be set up or run.
public enum NetLatencyError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A socket call failed.
    case socket(operation: String, errno: Int32)
    /// The kernel gives no timestamps of the kind needed; the text says why (what failed, on
    /// which interface), so that the reader knows the measurement cannot be made this way.
    case timestampingUnavailable(String)
    /// A namespace or veth could not be set up.
    case namespace(NetworkNamespaceError)
    /// A thread could not be started.
    case thread(HostThreadError)
    /// The plan cannot be run (the text says which value).
    case invalidPlan(String)

    /// A readable form.
    public var description: String {
        switch self {
        case let .socket(operation, code): return "\(operation): \(String(cString: strerror(code)))"
        case .timestampingUnavailable(let why): return "kernel timestamps unavailable: \(why)"
        case .namespace(let error): return "\(error)"
        case .thread(let error): return "\(error)"
        case .invalidPlan(let why): return "invalid probe plan: \(why)"
        }
    }
}

/// Where the timestamps of a measurement come from.
public enum TimestampSource: String, Codable, Sendable, CustomStringConvertible {
    /// The kernel's software timestamps (`CLOCK_REALTIME`): transmit when the driver takes the
    /// packet, receive when the packet enters the stack.
    case software
    /// The NIC's own clock, at the wire.
    case hardware

    /// A readable form.
    public var description: String { rawValue }
}

/// What an interface offers (`ETHTOOL_GET_TS_INFO`).
public struct TimestampingCapabilities: Equatable, Sendable, CustomStringConvertible {
    /// The interface.
    public var interface: String
    /// Software transmit and receive timestamps.
    public var softwareTransmit: Bool
    /// Software receive timestamps.
    public var softwareReceive: Bool
    /// Hardware transmit and receive timestamps with a raw hardware clock.
    public var hardwareTransmit: Bool
    /// Hardware receive timestamps with a raw hardware clock.
    public var hardwareReceive: Bool
    /// The PTP hardware clock's index, nil when there is none.
    public var hardwareClock: Int32?

    /// Whether the NIC can timestamp both directions itself.
    public var supportsHardware: Bool { hardwareTransmit && hardwareReceive && hardwareClock != nil }

    /// A readable form.
    public var description: String {
        var parts: [String] = []
        if softwareTransmit { parts.append("software TX") }
        if softwareReceive { parts.append("software RX") }
        if hardwareTransmit { parts.append("hardware TX") }
        if hardwareReceive { parts.append("hardware RX") }
        let clock = hardwareClock.map { "PTP clock \($0)" } ?? "no PTP clock"
        return "\(interface): \(parts.isEmpty ? "no timestamping" : parts.joined(separator: ", ")) (\(clock))"
    }
}

/// A packet's kernel timestamps in nanoseconds; nil where the kernel gave none of that kind.
public struct PacketTimestamps: Equatable, Sendable {
    /// `CLOCK_REALTIME`, taken by the kernel.
    public var software: Int64?
    /// The NIC's clock.
    public var hardware: Int64?

    init(_ stamp: rtv_ts_stamp) {
        software = stamp.software_ns == 0 ? nil : stamp.software_ns
        hardware = stamp.hardware_ns == 0 ? nil : stamp.hardware_ns
    }

    /// Timestamps as given.
    public init(software: Int64?, hardware: Int64?) { self.software = software; self.hardware = hardware }
}

/// Where a transmit timestamp was taken.
public enum TransmitPoint: UInt32, Sendable {
    /// Handed to the driver (software) or sent by the NIC (hardware): `SCM_TSTAMP_SND`.
    case sent = 0
    /// Entered the queueing discipline, before the driver: `SCM_TSTAMP_SCHED`.
    case scheduled = 1
    /// Acknowledged (TCP only).
    case acknowledged = 2
}

/// A UDP socket whose datagrams the kernel timestamps as they leave and arrive
/// (`SO_TIMESTAMPING`): receive timestamps come with each datagram, transmit timestamps from the
/// socket's error queue, matched to their datagram by an id.
///
/// The socket is created inside a network namespace (the tester's) and bound there.
public final class TimestampingUDPSocket: Sendable {
    /// The descriptor (non-blocking).
    public let descriptor: Int32
    /// The address it is bound to.
    public let local: SocketEndpoint
    /// What the tester's interface offers (nil: not asked, for example on loopback).
    public let capabilities: TimestampingCapabilities?
    /// Hardware when the interface has it and it could be switched on, else software.
    public let source: TimestampSource
    /// Why the source is what it is, for the report.
    public let sourceReason: String
    private let backend: HostSocketBackend
    private struct IDState {
        /// Whether the kernel takes an id per datagram (`SCM_TS_OPT_ID`); nil until the first send.
        var explicitIDs: Bool?
        /// Datagrams sent with the socket's own counter (its next id, when ids are not explicit).
        var counter: UInt32 = 0
    }
    private let ids = LockedValue(IDState())
    private let closed = LockedValue(false)

    /// Opens the socket with `backend` (whose namespace it lives in), binds `local` and switches
    /// timestamping on: software always, hardware too when `interface` supports it and
    /// `preferHardware`.
    /// - Throws: `NetLatencyError.timestampingUnavailable` (with the reason) when the kernel
    ///   refuses `SO_TIMESTAMPING`; `.socket` for other socket failures.
    public init(backend: HostSocketBackend, bind local: SocketEndpoint, interface: String?, preferHardware: Bool = true,
                receiveBufferBytes: Int32 = 4 << 20) throws(NetLatencyError) {
        guard let family = local.address?.family else { throw .invalidPlan("the tester's address has no family") }
        let descriptor: Int32
        do { descriptor = try backend.open(family, .datagram) } catch { throw .socket(operation: "socket", errno: error.rawValue) }
        do throws(NetLatencyError) {
            do { try backend.bind(descriptor, local) } catch { throw NetLatencyError.socket(operation: "bind \(local)", errno: error.rawValue) }
            _ = try? backend.setOption(descriptor, .receiveBuffer, receiveBufferBytes)
            var capabilities: TimestampingCapabilities?
            if let interface {
                var raw: UInt32 = 0
                var clock: Int32 = -1
                let result = rtv_ts_interface_info(descriptor, interface, &raw, &clock)
                if result == 0 {
                    capabilities = TimestampingCapabilities(
                        interface: interface, softwareTransmit: raw & rtv_ts_capability_tx_software() != 0,
                        softwareReceive: raw & rtv_ts_capability_rx_software() != 0,
                        hardwareTransmit: raw & rtv_ts_capability_tx_hardware() != 0 && raw & rtv_ts_capability_raw_hardware() != 0,
                        hardwareReceive: raw & rtv_ts_capability_rx_hardware() != 0 && raw & rtv_ts_capability_raw_hardware() != 0,
                        hardwareClock: clock >= 0 ? clock : nil)
                }
            }
            var kinds = Int32(RTV_TS_SOFTWARE) | Int32(RTV_TS_SCHEDULED)
            var source = TimestampSource.software
            var reason = capabilities.map { "\($0)" } ?? "loopback: software timestamps"
            if preferHardware, let interface, capabilities?.supportsHardware == true {
                let enabled = rtv_ts_enable_hardware(descriptor, interface)
                if enabled == 0 {
                    kinds |= Int32(RTV_TS_HARDWARE)
                    source = .hardware
                } else {
                    reason += "; SIOCSHWTSTAMP failed (\(String(cString: strerror(-enabled)))), using software"
                }
            }
            var flags: UInt32 = 0
            let enabled = rtv_ts_enable(descriptor, kinds, &flags)
            guard enabled == 0 else {
                throw NetLatencyError.timestampingUnavailable("setsockopt(SO_TIMESTAMPING) failed: \(String(cString: strerror(-enabled)))")
            }
            if let capabilities, !capabilities.softwareTransmit {
                reason += "; the interface does not promise software TX timestamps (the scheduler's are used if they come)"
            }
            self.capabilities = capabilities
            self.source = source
            self.sourceReason = reason
        } catch {
            backend.close(descriptor)
            throw error
        }
        self.descriptor = descriptor
        self.local = local
        self.backend = backend
    }

    deinit { close() }

    /// Closes the socket. Idempotent.
    public func close() {
        let first = closed.withLock { closed -> Bool in
            defer { closed = true }
            return !closed
        }
        if first { backend.close(descriptor) }
    }

    /// Sends `bytes` to `destination`; its transmit timestamps will carry an id, which is
    /// returned (`id` itself where the kernel takes explicit ids, else the socket's counter).
    /// - Throws: `.socket` when the send fails (nothing was sent).
    public func send(_ bytes: UnsafeRawBufferPointer, to destination: SocketEndpoint, id: UInt32) throws(NetLatencyError) -> UInt32 {
        var raw = Self.endpoint(destination)
        let explicit = ids.withLock { $0.explicitIDs }
        if explicit != false {
            // Sound: sendmsg reads `bytes.count` bytes of the caller's buffer, during the call.
            let sent = rtv_ts_send(descriptor, bytes.baseAddress, bytes.count, &raw, Int64(id))
            if sent >= 0 {
                ids.withLock { $0.explicitIDs = true }
                return id
            }
            guard sent == -Int(EINVAL), explicit == nil else { throw .socket(operation: "sendmsg", errno: Int32(-sent)) }
            ids.withLock { $0.explicitIDs = false } // a kernel before 6.13: fall back to the counter
        }
        // Sound: as above.
        let sent = rtv_ts_send(descriptor, bytes.baseAddress, bytes.count, &raw, -1)
        guard sent >= 0 else { throw .socket(operation: "sendto", errno: Int32(-sent)) }
        return ids.withLock { state in
            defer { state.counter &+= 1 }
            return state.counter
        }
    }

    /// Whether the kernel took explicit ids (`SCM_TS_OPT_ID`); nil before the first send.
    public var usesExplicitIDs: Bool? { ids.withLock { $0.explicitIDs } }

    /// One received datagram and its receive timestamps.
    public struct Received: Sendable {
        /// Bytes stored.
        public var length: Int
        /// Whether it was longer than the buffer.
        public var truncated: Bool
        /// The sender.
        public var source: SocketEndpoint
        /// When it arrived.
        public var timestamps: PacketTimestamps
    }

    /// Receives one waiting datagram into `buffer`; nil when none is waiting.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(NetLatencyError) -> Received? {
        var source = rtv_sock_endpoint()
        var stamp = rtv_ts_stamp()
        var truncated: UInt32 = 0
        // Sound: recvmsg writes at most `buffer.count` bytes into the caller's buffer, during the call.
        let received = rtv_ts_receive(descriptor, buffer.baseAddress, buffer.count, &source, &stamp, &truncated)
        if received == -Int(EAGAIN) { return nil }
        guard received >= 0 else { throw .socket(operation: "recvmsg", errno: Int32(-received)) }
        return Received(length: min(received, buffer.count), truncated: truncated != 0, source: Self.endpoint(source),
                        timestamps: PacketTimestamps(stamp))
    }

    /// One transmit timestamp from the error queue.
    public struct TransmitStamp: Sendable {
        /// The id the datagram was sent with (`send`'s result).
        public var id: UInt32
        /// Where it was taken.
        public var point: TransmitPoint
        /// The timestamps.
        public var timestamps: PacketTimestamps
    }

    /// Reads one transmit timestamp; nil when the error queue is empty. Entries that are not
    /// timestamps (none are expected on this socket) are skipped.
    public func readTransmitStamp() throws(NetLatencyError) -> TransmitStamp? {
        for _ in 0..<64 {
            var id: UInt32 = 0
            var kind: UInt32 = 0
            var stamp = rtv_ts_stamp()
            let result = rtv_ts_read_transmit(descriptor, &id, &kind, &stamp)
            if result == 0 { return nil }
            if result == -ENOMSG { continue }
            guard result > 0 else { throw .socket(operation: "recvmsg(MSG_ERRQUEUE)", errno: -result) }
            return TransmitStamp(id: id, point: TransmitPoint(rawValue: kind) ?? .acknowledged, timestamps: PacketTimestamps(stamp))
        }
        return nil
    }

    /// Waits until a datagram or a timestamp is there, or until monotonic time `deadline`.
    /// Returns whether something is there.
    @discardableResult
    public func wait(untilMonotonic deadline: UInt64) -> Bool {
        let now = monotonicNanoseconds()
        let timeout = deadline > now ? Int64(deadline - now) : 0
        var events: Int32 = 0
        let result = rtv_ts_wait(descriptor, timeout, &events)
        return result > 0
    }

    static func endpoint(_ value: SocketEndpoint) -> rtv_sock_endpoint {
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

    static func endpoint(_ raw: rtv_sock_endpoint) -> SocketEndpoint {
        var raw = raw
        // Sound: reads the 16-byte C array in place.
        let bytes = withUnsafeBytes(of: &raw.address) { Array($0) }
        switch raw.family {
        case 4: return SocketEndpoint(IPAddress(family: .ipv4, bytes: Array(bytes[0..<4]))!, port: raw.port)
        case 6: return SocketEndpoint(IPAddress(family: .ipv6, bytes: bytes)!, port: raw.port, scopeID: raw.scope_id)
        default: return .none
        }
    }
}
