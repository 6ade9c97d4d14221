import RTVirtCore
import Synchronization

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
    /// The VM stopped before the guest answered.
    case vmStopped
    /// The guest's channel is broken (it sent too many malformed calls).
    case channelBroken(vcpu: Int)

    public var description: String {
        switch self {
        case let .queueFull(vcpu, capacity): return "vCPU \(vcpu) already has \(capacity) reverse calls outstanding"
        case let .noSuchVCPU(vcpu): return "no vCPU \(vcpu)"
        case let .payloadTooLarge(length): return "a reverse-call payload of \(length) bytes is too large"
        case .vmStopped: return "the VM stopped before the guest answered"
        case let .channelBroken(vcpu): return "the VMRPC channel of vCPU \(vcpu) is broken"
        }
    }
}

/// Outstanding reverse calls of one vCPU: small ids with a generation, so a stale or forged
/// id from the guest never matches a newer call in the same slot. Id 0 is never issued.
final class ReverseCallTable: Sendable {
    typealias Completion = @Sendable (Result<VMRPCReverseCallReply, VMRPCReverseCallError>) -> Void

    private struct Entry {
        var generation: UInt32 = 0
        var completion: Completion?
    }
    private let entries: Mutex<[Entry]>
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        entries = Mutex(Array(repeating: Entry(), count: capacity))
    }

    /// Reserves an id for `completion`, or nil when every entry is in use.
    func reserve(_ completion: @escaping Completion) -> UInt64? {
        entries.withLock { entries in
            guard let index = entries.firstIndex(where: { $0.completion == nil }) else { return nil }
            entries[index].generation &+= 1
            if entries[index].generation == 0 { entries[index].generation = 1 }
            entries[index].completion = completion
            return UInt64(entries[index].generation) << 32 | UInt64(index + 1)
        }
    }

    /// Removes and returns the completion for `id` if it is outstanding.
    func take(_ id: UInt64) -> Completion? {
        let index = Int(id & 0xFFFF_FFFF) - 1, generation = UInt32(id >> 32)
        return entries.withLock { entries in
            guard entries.indices.contains(index), entries[index].generation == generation,
                  let completion = entries[index].completion else { return nil }
            entries[index].completion = nil
            return completion
        }
    }

    /// Removes and returns every outstanding completion.
    func takeAll() -> [Completion] {
        entries.withLock { entries in
            var taken: [Completion] = []
            for index in entries.indices {
                if let completion = entries[index].completion { taken.append(completion) }
                entries[index].completion = nil
            }
            return taken
        }
    }

    /// Calls outstanding.
    var outstanding: Int { entries.withLock { $0.filter { $0.completion != nil }.count } }
}
