import RTVirtCore

/// The bundled guest's three ports: results it reports, the exit it requests, input it reads.
///
/// Register it at `GuestLayout.resultPort` with length 3 (the result, exit and input ports
/// are consecutive). Thread-safe; results are kept per vCPU.
public final class BundledGuestPorts: BusDevice {
    private struct State {
        var results: [Int: [UInt64]] = [:]
        var resultTimes: [Int: [UInt64]] = [:]
        var inputs: [UInt64] = []
        var inputReads: [(vcpu: Int, size: Int)] = []
    }
    private let state = LockedValue(State())

    /// Ports with no queued input; reads of an empty queue return 0.
    public init() {}

    /// Queues values the guest reads from the input port, in order.
    public func queueInput(_ values: [UInt64]) { state.withLock { $0.inputs.append(contentsOf: values) } }

    /// What vCPU `id` reported on the result port, in order.
    public func results(ofVCPU id: Int) -> [UInt64] { state.withLock { $0.results[id] ?? [] } }

    /// When (monotonic nanoseconds) each of vCPU `id`'s results reached the host, in order.
    public func resultTimes(ofVCPU id: Int) -> [UInt64] { state.withLock { $0.resultTimes[id] ?? [] } }

    /// The (vCPU, size) of every input-port read so far.
    public var inputReads: [(vcpu: Int, size: Int)] { state.withLock { $0.inputReads } }

    public func read(_ access: BusAccess) -> UInt64 {
        guard access.offset == UInt64(GuestLayout.inputPort - GuestLayout.resultPort) else { return UInt64.max }
        return state.withLock { state in
            state.inputReads.append((access.vcpuID, access.size))
            return state.inputs.isEmpty ? 0 : state.inputs.removeFirst()
        }
    }

    public func write(_ access: BusAccess, value: UInt64) -> BusWriteResult {
        switch access.offset {
        case UInt64(GuestLayout.exitPort - GuestLayout.resultPort):
            return .stopVCPU(status: value)
        case UInt64(GuestLayout.resultPort - GuestLayout.resultPort):
            let now = monotonicNanoseconds()
            state.withLock { state in
                state.results[access.vcpuID, default: []].append(value)
                state.resultTimes[access.vcpuID, default: []].append(now)
            }
        default:
            break
        }
        return .handled
    }
}
