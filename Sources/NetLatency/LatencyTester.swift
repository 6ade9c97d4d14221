#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import VMRPCSockets

/// One round of requests: where to, how fast, how big, how many.
public struct LatencyProbePlan: Equatable, Sendable {
    /// The echo service.
    public var target: SocketEndpoint
    /// Requests per second (one per period of 1/rate).
    public var requestsPerSecond: Double
    /// Payload bytes per request (and reply), at least `LatencyProbeWire.headerSize`.
    public var payloadSize: Int
    /// Requests in the round.
    public var requests: Int
    /// Marks this round's requests; replies with another tag (late replies of an earlier round)
    /// are counted as stale, never as answers.
    public var tag: UInt32
    /// How long after the last request the tester still waits for replies and timestamps.
    /// A request without a reply by then is lost.
    public var replyGraceNanoseconds: UInt64
    /// Seeds the random phases (the same seed, the same send times).
    public var seed: UInt64

    /// A plan.
    public init(target: SocketEndpoint, requestsPerSecond: Double = 1000, payloadSize: Int = 64, requests: Int,
                tag: UInt32, replyGraceNanoseconds: UInt64 = 200_000_000, seed: UInt64 = 1) {
        self.target = target; self.requestsPerSecond = requestsPerSecond; self.payloadSize = payloadSize
        self.requests = requests; self.tag = tag; self.replyGraceNanoseconds = replyGraceNanoseconds; self.seed = seed
    }

    /// Throws `invalidPlan` for a rate outside 1 ... 100,000 per second, a payload outside
    /// `LatencyProbeWire.headerSize` ... 65,000 bytes, or a request count outside 1 ... 2^20.
    public func validate() throws(NetLatencyError) {
        guard requestsPerSecond >= 1, requestsPerSecond <= 100_000 else { throw .invalidPlan("rate \(requestsPerSecond)/s is not in 1...100000") }
        guard payloadSize >= LatencyProbeWire.headerSize, payloadSize <= 65_000 else {
            throw .invalidPlan("payload \(payloadSize) bytes is not in \(LatencyProbeWire.headerSize)...65000")
        }
        guard requests >= 1, requests <= LatencyProbeWire.maximumRequests else { throw .invalidPlan("\(requests) requests is not in 1...\(LatencyProbeWire.maximumRequests)") }
        guard target.address != nil, target.port != 0 else { throw .invalidPlan("no target address") }
    }

    /// The send times of the round, nanoseconds after its start: request `i` leaves at a random
    /// moment in the first half of its own period `[i/rate, (i + 1/2)/rate)`. The rate is exact
    /// (one request per period), consecutive requests are at least half a period apart (a
    /// request never queues behind the previous one's reply), and the phase against any timer
    /// of the service changes from request to request, so the tester cannot lock onto it.
    public func sendOffsets() -> [UInt64] {
        var random = SplitMix64(seed: seed ^ UInt64(tag) &* 0x9E37_79B9_7F4A_7C15)
        let period = 1e9 / requestsPerSecond
        return (0..<requests).map { index in
            UInt64(Double(index) * period + random.nextUnit() * period / 2)
        }
    }
}

/// The request and reply payload: `magic` u32, `tag` u32, `sequence` u64 (little-endian), then
/// filler up to the payload size. An echo service returns it unchanged.
public enum LatencyProbeWire {
    /// "RNLT".
    public static let magic: UInt32 = 0x544C_4E52
    /// Bytes of the header; the smallest payload.
    public static let headerSize = 16
    /// The most requests in one round (ids carry 12 bits of tag and 20 of sequence).
    public static let maximumRequests = 1 << 20

    /// Writes request `sequence` of round `tag` into `buffer` (its whole length).
    public static func write(tag: UInt32, sequence: UInt64, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= headerSize, "payload shorter than the probe header")
        // Sound: the three stores end at byte 16, inside the buffer (checked above); unaligned raw stores are allowed.
        buffer.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
        buffer.storeBytes(of: tag.littleEndian, toByteOffset: 4, as: UInt32.self)
        buffer.storeBytes(of: sequence.littleEndian, toByteOffset: 8, as: UInt64.self)
        for index in headerSize..<buffer.count { buffer[index] = UInt8(truncatingIfNeeded: index &* 31 &+ Int(sequence)) }
    }

    /// The tag and sequence of a reply, nil when it is not a probe.
    public static func read(_ buffer: UnsafeRawBufferPointer) -> (tag: UInt32, sequence: UInt64)? {
        // Sound: every load ends at byte 16 or before, and the guard checks the buffer has 16 bytes.
        guard buffer.count >= headerSize,
              UInt32(littleEndian: buffer.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic else { return nil }
        return (UInt32(littleEndian: buffer.loadUnaligned(fromByteOffset: 4, as: UInt32.self)),
                UInt64(littleEndian: buffer.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
    }

    /// The transmit-timestamp id of request `sequence` of round `tag`.
    static func id(tag: UInt32, sequence: Int) -> UInt32 { (tag & 0xFFF) << 20 | UInt32(sequence) }
}

/// What one round measured. Every request sent is accounted for: answered (with a round-trip
/// time, or counted under a missing timestamp) or lost. Nothing is dropped silently.
public struct LatencyProbeResult: Equatable, Sendable {
    /// Round-trip times from the kernel's timestamps (reply arrived − request left), nanoseconds,
    /// one per answered request that had both timestamps, in request order.
    public var roundTripNanoseconds: [Int64] = []
    /// The transmit timestamp of each of those requests (same order; `CLOCK_REALTIME` nanoseconds
    /// for software timestamps), to line the round trips up with traces of the service.
    public var transmitTimestamps: [Int64] = []
    /// Requests sent.
    public var sent = 0
    /// Requests not sent because the send failed (counted, not lost).
    public var sendFailures = 0
    /// Requests answered (once).
    public var answered = 0
    /// Requests with no reply by the end of the round's grace period.
    public var lost = 0
    /// Replies that came after a reply to a later request.
    public var reordered = 0
    /// Second and later replies to one request.
    public var duplicates = 0
    /// Replies of an earlier round (late beyond its grace period; that round counted them lost).
    public var stale = 0
    /// Datagrams that were not replies to probes (wrong source, length or header).
    public var foreign = 0
    /// Answered requests without a transmit timestamp, or without a receive timestamp (no RTT).
    public var missingTransmitTimestamps = 0
    /// Answered requests without a receive timestamp (no RTT).
    public var missingReceiveTimestamps = 0
    /// Round-trip times measured with the NIC's clock, and with the kernel's software clock.
    public var hardwareSamples = 0
    /// Round-trip times measured with the kernel's software clock.
    public var softwareSamples = 0
    /// Round-trip times whose transmit timestamp is the scheduler's (no driver timestamp came).
    public var scheduledTransmitSamples = 0
    /// Monotonic time of the first and last send (for CPU fractions over the round).
    public var firstSendMonotonic: UInt64 = 0
    /// Monotonic time of the last send.
    public var lastSendMonotonic: UInt64 = 0
    /// Whether the round was cut short by a cancellation.
    public var cancelled = false

    /// An empty result.
    public init() {}

    /// Lost over sent (0 when nothing was sent).
    public var lossFraction: Double { sent == 0 ? 0 : Double(lost) / Double(sent) }
}

/// The instrument's interface: a generator that sends timestamped UDP requests at a fixed rate
/// to an echo service and reports the round-trip times from timestamps taken outside the
/// measured system.
///
/// `KernelTimestampingTester` implements it over a socket with `SO_TIMESTAMPING`. A generator on
/// a DPDK or AF_XDP capable interface fits behind the same protocol (see Docs/NetLatency.md):
/// it keeps the plan's payload format, send times and accounting, and takes its timestamps
/// from the NIC (or the XDP metadata) instead of the socket's error queue.
public protocol NetLatencyTester: AnyObject, Sendable {
    /// Where its timestamps come from.
    var timestampSource: TimestampSource { get }
    /// A sentence on why (the interface's capabilities).
    var timestampReason: String { get }
    /// Runs one round on the calling thread (which it does not reschedule); returns early, with
    /// `cancelled` set, when `isCancelled` becomes true.
    func probe(_ plan: LatencyProbePlan, isCancelled: () -> Bool) throws(NetLatencyError) -> LatencyProbeResult
}

/// The tester over a `TimestampingUDPSocket` in the tester's namespace: kernel timestamps of
/// each request leaving (driver hand-off) and each reply arriving (entry into the stack), so
/// the tester's own scheduling is not in the round-trip time.
public final class KernelTimestampingTester: NetLatencyTester {
    /// The socket.
    public let socket: TimestampingUDPSocket
    /// Where the socket's timestamps come from.
    public var timestampSource: TimestampSource { socket.source }
    /// The interface's capabilities and why the source is what it is.
    public var timestampReason: String { socket.sourceReason }

    /// A tester on `socket` (which it closes when it goes away).
    public init(socket: TimestampingUDPSocket) { self.socket = socket }

    deinit { socket.close() }

    /// Runs one round (see `NetLatencyTester.probe`).
    public func probe(_ plan: LatencyProbePlan, isCancelled: () -> Bool) throws(NetLatencyError) -> LatencyProbeResult {
        try plan.validate()
        let offsets = plan.sendOffsets()
        var result = LatencyProbeResult()
        var transmitSent = [Int64](repeating: 0, count: plan.requests)
        var transmitScheduled = [Int64](repeating: 0, count: plan.requests)
        var transmitHardware = [Int64](repeating: 0, count: plan.requests)
        var receiveSoftware = [Int64](repeating: 0, count: plan.requests)
        var receiveHardware = [Int64](repeating: 0, count: plan.requests)
        var answered = [Bool](repeating: false, count: plan.requests)
        var sentFlags = [Bool](repeating: false, count: plan.requests)
        // The request of each transmit id (the socket's counter when the kernel takes no explicit ids).
        var requestOfID: [UInt32: Int] = [:]
        requestOfID.reserveCapacity(plan.requests)
        // Sound: both buffers are allocated here, used only in this call, and freed by the defer.
        let request = UnsafeMutableRawBufferPointer.allocate(byteCount: plan.payloadSize, alignment: 16)
        let reply = UnsafeMutableRawBufferPointer.allocate(byteCount: max(plan.payloadSize, 2048) + 64, alignment: 16)
        defer { request.deallocate(); reply.deallocate() }
        var highestAnswered = -1
        var next = 0
        var stampsNeeded = 0 // requests sent whose driver (or hardware) transmit timestamp has not come
        let start = monotonicNanoseconds() + 1_000_000

        func takeStamps() throws(NetLatencyError) {
            while let stamp = try socket.readTransmitStamp() {
                guard let index = requestOfID[stamp.id] else { continue } // an earlier round's
                switch stamp.point {
                case .sent:
                    if transmitSent[index] == 0, transmitHardware[index] == 0 { stampsNeeded -= 1 }
                    if let software = stamp.timestamps.software { transmitSent[index] = software }
                    if let hardware = stamp.timestamps.hardware { transmitHardware[index] = hardware }
                case .scheduled:
                    if let software = stamp.timestamps.software { transmitScheduled[index] = software }
                case .acknowledged:
                    break
                }
            }
        }

        func takeReplies() throws(NetLatencyError) {
            while let received = try socket.receive(into: reply) {
                guard received.source == plan.target, received.length == plan.payloadSize, !received.truncated,
                      // Sound: `received.length` is at most the buffer's size (the receive caps it).
                      let (tag, sequence) = LatencyProbeWire.read(UnsafeRawBufferPointer(rebasing: reply[0..<received.length])) else {
                    result.foreign += 1
                    continue
                }
                guard tag == plan.tag else {
                    result.stale += 1
                    continue
                }
                guard sequence < UInt64(plan.requests), sentFlags[Int(sequence)] else {
                    result.foreign += 1
                    continue
                }
                let index = Int(sequence)
                if answered[index] {
                    result.duplicates += 1
                    continue
                }
                answered[index] = true
                result.answered += 1
                if index < highestAnswered { result.reordered += 1 }
                highestAnswered = max(highestAnswered, index)
                receiveSoftware[index] = received.timestamps.software ?? 0
                receiveHardware[index] = received.timestamps.hardware ?? 0
            }
        }

        while true {
            if isCancelled() {
                result.cancelled = true
                break
            }
            let now = monotonicNanoseconds()
            if next < plan.requests, now >= start + offsets[next] {
                LatencyProbeWire.write(tag: plan.tag, sequence: UInt64(next), into: request)
                do {
                    let id = try socket.send(UnsafeRawBufferPointer(request), to: plan.target,
                                             id: LatencyProbeWire.id(tag: plan.tag, sequence: next))
                    requestOfID[id] = next
                    sentFlags[next] = true
                    result.sent += 1
                    stampsNeeded += 1
                    if result.firstSendMonotonic == 0 { result.firstSendMonotonic = now }
                    result.lastSendMonotonic = now
                } catch {
                    result.sendFailures += 1
                }
                next += 1
                continue
            }
            let graceEnd = (result.lastSendMonotonic == 0 ? now : result.lastSendMonotonic) + plan.replyGraceNanoseconds
            if next >= plan.requests {
                if result.answered == result.sent && stampsNeeded <= 0 { break }
                if now >= graceEnd { break }
            }
            socket.wait(untilMonotonic: next < plan.requests ? start + offsets[next] : graceEnd)
            try takeStamps()
            try takeReplies()
        }
        // A last look: what arrived while the loop decided to end.
        try takeStamps()
        try takeReplies()

        result.lost = result.sent - result.answered
        result.roundTripNanoseconds.reserveCapacity(result.answered)
        for index in 0..<plan.requests where answered[index] {
            if transmitHardware[index] != 0, receiveHardware[index] != 0 {
                result.roundTripNanoseconds.append(receiveHardware[index] - transmitHardware[index])
                result.transmitTimestamps.append(transmitHardware[index])
                result.hardwareSamples += 1
                continue
            }
            guard receiveSoftware[index] != 0 else {
                result.missingReceiveTimestamps += 1
                continue
            }
            let transmit = transmitSent[index] != 0 ? transmitSent[index] : transmitScheduled[index]
            guard transmit != 0 else {
                result.missingTransmitTimestamps += 1
                continue
            }
            if transmitSent[index] == 0 { result.scheduledTransmitSamples += 1 }
            result.roundTripNanoseconds.append(receiveSoftware[index] - transmit)
            result.transmitTimestamps.append(transmit)
            result.softwareSamples += 1
        }
        return result
    }
}

/// A small, fast, seedable generator (SplitMix64) for the send phases.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    mutating func nextUnit() -> Double { Double(next() >> 11) / Double(1 << 53) }
}
