import Dispatch
import RTVirtCore

/// The guest's answer to a reverse call.
public struct VMRPCReverseCallReply: Equatable, Sendable {
    /// The guest's status.
    public var status: UInt32
    /// The guest's payload.
    public var payload: [UInt8]

    /// A reply.
    public init(status: UInt32, payload: [UInt8]) { self.status = status; self.payload = payload }
}

/// Why a reverse call failed.
public enum VMRPCReverseCallError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The vCPU already has the most calls it may have outstanding.
    case queueFull(vcpu: Int, capacity: Int)
    /// No such vCPU.
    case noSuchVCPU(Int)
    /// The payload is longer than a `poll` result can carry.
    case payloadTooLarge(Int)
    /// The timeout is 0 or longer than `VMRPCLimits.maximumReverseCallTimeoutNanoseconds`.
    case invalidTimeout(nanoseconds: UInt64)
    /// The VM stopped (or its server went away) before the guest answered.
    case vmStopped
    /// The guest did not answer within the call's timeout.
    case timedOut
    /// The host cancelled the call (`cancelReverseCall`, or the awaiting task was cancelled).
    case cancelled
    /// The guest's channel is broken (it sent too many malformed calls).
    case channelBroken(vcpu: Int)

    public var description: String {
        switch self {
        case let .queueFull(vcpu, capacity): return "the reverse-call queue of vCPU \(vcpu) is full (\(capacity) calls)"
        case let .noSuchVCPU(vcpu): return "no vCPU \(vcpu)"
        case let .payloadTooLarge(length): return "a reverse-call payload of \(length) bytes is too large"
        case let .invalidTimeout(nanoseconds): return "a reverse-call timeout of \(nanoseconds) ns is out of range"
        case .vmStopped: return "the VM stopped before the guest answered"
        case .timedOut: return "the guest did not answer the reverse call in time"
        case .cancelled: return "the reverse call was cancelled"
        case let .channelBroken(vcpu): return "the VMRPC channel of vCPU \(vcpu) is broken"
        }
    }
}

/// A reverse call that was started: what `cancelReverseCall(_:)` takes.
public struct VMRPCReverseCallHandle: Hashable, Sendable {
    /// The vCPU the call went to.
    public let vcpu: Int
    /// The call's id as the guest sees it.
    public let callID: UInt64
}

/// The reverse calls of one vCPU, each in one entry of a fixed table.
///
/// An entry's life, every transition atomic under one lock:
///
/// ```
/// free ──reserve──▶ reserved ──markQueued──▶ queued ──deliver──▶ delivered ──answer──▶ free
///                     │  ╰──────────────deliver──────────────────▲    │
///                     ├─release (the post failed; nobody saw it)─▶ free
///                     ╰─end (timeout, cancel, stop), from any live phase ─▶ free
/// ```
///
/// Only `answer` and `end` hand out the completion, and both take it out of the entry, so a
/// call has exactly one outcome and its completion runs at most once. `release` never hands
/// it out: its caller throws instead. Only a delivered call can be answered, so a guest
/// cannot answer a call it was never given. Ids are `generation << 32 | (index + 1)` with a
/// random, non-zero generation that differs from the entry's previous one: a guest can
/// predict neither the next id nor one that was handed to another vCPU.
final class ReverseCallTable: Sendable {
    typealias Completion = @Sendable (Result<VMRPCReverseCallReply, VMRPCReverseCallError>) -> Void

    /// Where a call is in its life.
    enum Phase: Equatable, Sendable {
        /// No call.
        case free
        /// An id is taken; the message is being queued.
        case reserved
        /// The message waits in the vCPU's queue.
        case queued
        /// A `poll` handed the call to the guest; only now may the guest reply.
        case delivered
    }

    /// What `markQueued` found.
    enum QueueingOutcome: Equatable, Sendable {
        /// The call is queued.
        case queued
        /// A `poll` took the message already (it may be delivered before it is marked queued).
        case alreadyDelivered
        /// The call ended (timeout, cancel, stop) meanwhile; its message is stale.
        case ended
    }

    private struct Entry {
        var generation: UInt32 = 0
        var phase: Phase = .free
        var completion: Completion?
        var timer: TimeoutTimer?

        /// Ends the entry's call: frees it and stops its timer. Returns the completion.
        mutating func free() -> Completion? {
            timer?.source.cancel()
            timer = nil
            phase = .free
            defer { completion = nil }
            return completion
        }
    }

    /// The timer that ends a call at its timeout.
    final class TimeoutTimer: @unchecked Sendable {
        // Sendable: a dispatch source may be cancelled from any thread, and nothing else is
        // done with it after it is made and activated.
        let source: any DispatchSourceTimer
        init(_ source: any DispatchSourceTimer) { self.source = source }
    }

    private let entries: LockedValue<[Entry]>
    /// Entries: calls that can be outstanding at once.
    let capacity: Int

    /// The largest table: indices must fit the id's low 32 bits with room to spare.
    static let maximumCapacity = 65_535

    /// A table of `capacity` entries (1 ... `maximumCapacity`, checked by the server).
    init(capacity: Int) {
        self.capacity = capacity
        entries = LockedValue(Array(repeating: Entry(), count: capacity))
    }

    private static func index(of id: UInt64) -> (index: Int, generation: UInt32) {
        (Int(id & 0xFFFF_FFFF) - 1, UInt32(truncatingIfNeeded: id >> 32))
    }

    /// Runs `body` on the live entry that `id` names, if any.
    private func withEntry<R: Sendable>(_ id: UInt64, _ body: @Sendable (inout Entry) -> R?) -> R? {
        let (index, generation) = Self.index(of: id)
        return entries.withLock { entries in
            guard entries.indices.contains(index), entries[index].generation == generation,
                  entries[index].phase != .free else { return nil }
            return body(&entries[index])
        }
    }

    /// free → reserved. Returns the new call's id, or nil when every entry is in use.
    func reserve(_ completion: @escaping Completion) -> UInt64? {
        entries.withLock { entries in
            guard let index = entries.firstIndex(where: { $0.phase == .free }) else { return nil }
            let previous = entries[index].generation
            var generation = previous
            while generation == previous || generation == 0 { generation = UInt32.random(in: 1...UInt32.max) }
            entries[index] = Entry(generation: generation, phase: .reserved, completion: completion)
            return UInt64(generation) << 32 | UInt64(index + 1)
        }
    }

    /// Gives the live call `id` the timer that ends it; false (the caller cancels the timer)
    /// when the call already ended.
    func attach(timer: TimeoutTimer, to id: UInt64) -> Bool {
        withEntry(id) { entry in
            entry.timer = timer
            return true
        } ?? false
    }

    /// reserved → queued.
    func markQueued(_ id: UInt64) -> QueueingOutcome {
        withEntry(id) { entry -> QueueingOutcome in
            switch entry.phase {
            case .reserved: entry.phase = .queued; return .queued
            case .queued: return .queued
            case .delivered: return .alreadyDelivered
            case .free: return .ended
            }
        } ?? .ended
    }

    /// reserved → free, without an outcome: the message never reached the queue. False when
    /// the call already ended (its completion has its outcome), so the caller must not throw.
    func release(_ id: UInt64) -> Bool {
        withEntry(id) { entry -> Bool? in
            guard entry.phase == .reserved else { return nil }
            entry.completion = nil
            _ = entry.free()
            return true
        } ?? false
    }

    /// reserved or queued → delivered: a `poll` hands the call to the guest. False for a call
    /// that ended while its message was queued (the message is then dropped).
    func deliver(_ id: UInt64) -> Bool {
        withEntry(id) { entry -> Bool? in
            guard entry.phase == .reserved || entry.phase == .queued else { return nil }
            entry.phase = .delivered
            return true
        } ?? false
    }

    /// delivered → free: the guest's reply. Nil when `id` is not a call delivered on this vCPU
    /// and still outstanding (stale, forged, answered, never delivered, another vCPU's).
    func answer(_ id: UInt64) -> Completion? {
        withEntry(id) { entry -> Completion? in
            guard entry.phase == .delivered else { return nil }
            return entry.free()
        }
    }

    /// Any live phase → free: a timeout, a cancellation, a stop. Nil when it already ended.
    func end(_ id: UInt64) -> Completion? {
        withEntry(id) { $0.free() }
    }

    /// Ends every live call; returns their ids and completions.
    func endAll() -> [(id: UInt64, completion: Completion)] {
        entries.withLock { entries in
            var ended: [(id: UInt64, completion: Completion)] = []
            for index in entries.indices where entries[index].phase != .free {
                let id = UInt64(entries[index].generation) << 32 | UInt64(index + 1)
                if let completion = entries[index].free() { ended.append((id, completion)) }
            }
            return ended
        }
    }

    /// The phase of `id` (`.free` when it names no live call).
    func phase(of id: UInt64) -> Phase { withEntry(id) { $0.phase } ?? .free }

    /// Calls outstanding.
    var outstanding: Int { entries.withLock { $0.filter { $0.phase != .free }.count } }
}
