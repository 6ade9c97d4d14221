#if canImport(Glibc)
import Glibc
#endif
import LongPoll
import RTVirtCore
import VMRPCSockets

/// When a service took each request off its socket and when it handed each reply to its socket
/// (`CLOCK_REALTIME` nanoseconds, the clock of the kernel's software timestamps), so that a round
/// trip splits into: request in flight to the service, the service's own time, reply in flight
/// back. A diagnosis of where a path's latency goes; it does not change what the tester measures
/// (two clock reads per request in the service).
public final class ServiceTimeline: Sendable {
    private struct Marks {
        var receives: [Int64] = []
        var sends: [Int64] = []
    }
    private let marks = LockedValue(Marks())

    /// An empty timeline.
    public init() {}

    /// `CLOCK_REALTIME` now.
    public static func now() -> Int64 {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return Int64(time.tv_sec) * 1_000_000_000 + Int64(time.tv_nsec)
    }

    /// A datagram was received now.
    public func markReceive(at time: Int64 = ServiceTimeline.now()) { marks.withLock { $0.receives.append(time) } }
    /// A datagram is being sent now.
    public func markSend(at time: Int64 = ServiceTimeline.now()) { marks.withLock { $0.sends.append(time) } }

    /// Forgets everything (between rounds).
    public func reset() {
        marks.withLock {
            $0.receives.removeAll(keepingCapacity: true)
            $0.sends.removeAll(keepingCapacity: true)
        }
    }

    /// The marks so far.
    public var receives: [Int64] { marks.withLock { $0.receives } }
    /// The send marks so far.
    public var sends: [Int64] { marks.withLock { $0.sends } }

    /// One request's round trip, split at the service's marks (nanoseconds).
    public struct Split: Equatable, Sendable {
        /// Tester's transmit timestamp → the service's receive returned.
        public var toService: Int64
        /// The service's receive → its send.
        public var inService: Int64
        /// The service's send → the tester's receive timestamp.
        public var fromService: Int64
    }

    /// Lines the marks up with a round's requests: the i-th receive and send belong to the i-th
    /// answered request when each request was received and answered once, in order (a
    /// one-thread echo without loss). Nil when the counts do not line up (loss, stale datagrams).
    public func split(_ result: LatencyProbeResult) -> [Split]? {
        let (receives, sends) = marks.withLock { ($0.receives, $0.sends) }
        guard result.lost == 0, result.stale == 0, receives.count == result.transmitTimestamps.count,
              sends.count == receives.count, result.roundTripNanoseconds.count == receives.count else { return nil }
        return (0..<receives.count).map { index in
            let transmit = result.transmitTimestamps[index]
            let arrival = transmit + result.roundTripNanoseconds[index]
            return Split(toService: receives[index] - transmit, inService: sends[index] - receives[index],
                         fromService: arrival - sends[index])
        }
    }
}

/// A `SocketBackend` that marks a `ServiceTimeline` at each successful receive and each send of
/// the backend it wraps, and otherwise passes every call through.
public final class TimelineSocketBackend: SocketBackend {
    /// The backend doing the work.
    public let inner: any SocketBackend
    /// Where the marks go.
    public let timeline: ServiceTimeline

    /// Wraps `inner`.
    public init(_ inner: any SocketBackend, timeline: ServiceTimeline) { self.inner = inner; self.timeline = timeline }

    /// Passes through.
    public func open(_ family: SocketFamily, _ type: SocketType) throws(SocketErrno) -> Int32 { try inner.open(family, type) }
    /// Passes through.
    public func close(_ descriptor: Int32) { inner.close(descriptor) }
    /// Passes through.
    public func bind(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno) { try inner.bind(descriptor, endpoint) }
    /// Passes through.
    public func connect(_ descriptor: Int32, _ endpoint: SocketEndpoint) throws(SocketErrno) { try inner.connect(descriptor, endpoint) }
    /// Passes through.
    public func listen(_ descriptor: Int32, backlog: Int32) throws(SocketErrno) { try inner.listen(descriptor, backlog: backlog) }
    /// Passes through.
    public func accept(_ descriptor: Int32) throws(SocketErrno) -> (descriptor: Int32, peer: SocketEndpoint) { try inner.accept(descriptor) }
    /// Passes through.
    public func shutdown(_ descriptor: Int32, how: Int32) throws(SocketErrno) { try inner.shutdown(descriptor, how: how) }
    /// Passes through.
    public func name(_ descriptor: Int32, peer: Bool) throws(SocketErrno) -> SocketEndpoint { try inner.name(descriptor, peer: peer) }

    /// Marks a send, then sends.
    public func send(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer, to destination: SocketEndpoint?) throws(SocketErrno) -> Int {
        timeline.markSend()
        return try inner.send(descriptor, bytes, to: destination)
    }

    /// Receives, then marks a receive if a datagram came.
    public func receive(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(SocketErrno) -> SocketReceivedDatagram {
        let received = try inner.receive(descriptor, into: buffer)
        timeline.markReceive()
        return received
    }

    /// Receives a batch, then marks one receive per datagram.
    public func receiveBatch(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer, count: Int, stride: Int,
                             headerSize: Int, capacity: Int) throws(SocketErrno) -> [SocketReceivedDatagram] {
        let received = try inner.receiveBatch(descriptor, into: buffer, count: count, stride: stride, headerSize: headerSize, capacity: capacity)
        let now = ServiceTimeline.now()
        for _ in received { timeline.markReceive(at: now) }
        return received
    }

    /// Sends a batch and marks one send per datagram sent.
    public func sendBatch(_ descriptor: Int32, from buffer: UnsafeRawBufferPointer, datagrams: [SocketBatchDatagram]) throws(SocketErrno) -> Int {
        let now = ServiceTimeline.now()
        let sent = try inner.sendBatch(descriptor, from: buffer, datagrams: datagrams)
        for _ in 0..<sent { timeline.markSend(at: now) }
        return sent
    }

    /// Passes through.
    public func setOption(_ descriptor: Int32, _ option: SocketOption, _ value: Int32) throws(SocketErrno) {
        try inner.setOption(descriptor, option, value)
    }

    /// Passes through.
    public func getOption(_ descriptor: Int32, _ option: SocketOption) throws(SocketErrno) -> Int32 { try inner.getOption(descriptor, option) }
    /// Passes through.
    public func readiness(_ descriptors: [PollDescriptor]) -> [PollDescriptor] { inner.readiness(descriptors) }
}
