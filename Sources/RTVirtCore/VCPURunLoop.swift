import Synchronization

/// Why a vCPU's run loop ended.
public enum VCPUStopReason: Equatable, Sendable {
    /// A device asked to stop, with the guest's status (for example the guest's exit port).
    case guestRequested(status: UInt64)
    /// The guest halted with no interrupt controller to wake it.
    case halted
    /// The guest shut down (for example a triple fault).
    case shutdown
    /// `requestStop()` was called.
    case stopRequested
    /// An exit the run loop cannot continue from (failed entry, internal error, unsupported).
    case fatalExit(VCPUExit)
    /// A hypervisor call failed; the message says which and why.
    case hypervisorError(String)
}

/// Counters of one run loop, readable from any thread.
public final class VCPURunStatistics: Sendable {
    /// Exits returned by `run()`.
    public let exits = Atomic<UInt64>(0)
    /// Port-I/O and MMIO accesses no device claimed.
    public let unclaimedAccesses = Atomic<UInt64>(0)
    /// Kicks seen (`.interrupted` exits).
    public let interruptions = Atomic<UInt64>(0)
    /// Zeroed counters.
    public init() {}
}

/// A vCPU's thread as the code around a run loop sees it: work can be run on it at the vCPU's
/// next exit, and it can be asked to stop. `VCPURunLoop` is one; a VMM's own run loop can be.
public protocol VCPUThreadWork: Sendable {
    /// The vCPU the thread runs.
    var vcpu: any VirtualCPU { get }
    /// Runs `work` on the vCPU's thread at its next exit (kicking the vCPU so there is one), or
    /// before the thread stops running the vCPU, whichever comes first. Returns false, without
    /// running `work`, when the thread no longer runs the vCPU.
    @discardableResult
    func performOnThread(_ work: @escaping @Sendable () -> Void) -> Bool
    /// Asks the thread to stop running the vCPU.
    func requestStop()
}

/// Runs one vCPU on the calling thread: enters the guest, routes its port-I/O and MMIO exits
/// to the bus, answers reads, and returns when the guest or the host stops it.
///
/// `requestStop()` is safe from any thread and takes effect even when the guest never exits
/// by itself: it kicks the vCPU out of the guest.
public final class VCPURunLoop: VCPUThreadWork {
    /// The vCPU this loop runs.
    public let vcpu: any VirtualCPU
    /// The devices the guest can reach.
    public let bus: IOBus
    /// Counters.
    public let statistics = VCPURunStatistics()
    /// Where devices park this vCPU for long polls; a stop cancels such a wait too.
    public let dispatcher: (any VCPUParking)?
    private let stopRequested = Atomic<Bool>(false)
    /// Work for the vCPU's thread, and whether the loop still takes work (false once `run()`
    /// returned, until it is called again).
    private let pendingWork = LockedValue<(work: [@Sendable () -> Void], accepting: Bool)>(([], true))

    /// A run loop for `vcpu` over `bus`, whose long polls (if any) go through `dispatcher`.
    public init(vcpu: any VirtualCPU, bus: IOBus, dispatcher: (any VCPUParking)? = nil) {
        self.vcpu = vcpu
        self.bus = bus
        self.dispatcher = dispatcher
    }

    /// Asks the loop to stop: kicks the vCPU out of the guest, or out of a long poll that a
    /// device parked it in. Safe from any thread.
    public func requestStop() {
        stopRequested.store(true, ordering: .sequentiallyConsistent)
        dispatcher?.cancel(vcpu: vcpu.id)
        vcpu.kick()
    }

    /// Runs `work` on the vCPU's thread at its next exit (the vCPU is kicked so that there is
    /// one soon; a vCPU parked in a long poll runs it when the poll returns). Work that is
    /// queued when the loop stops runs on the thread before `run()` returns, so none is lost.
    /// Returns false, without running `work`, once `run()` has returned.
    @discardableResult
    public func performOnThread(_ work: @escaping @Sendable () -> Void) -> Bool {
        let queued = pendingWork.withLock { pending -> Bool in
            guard pending.accepting else { return false }
            pending.work.append(work)
            return true
        }
        if queued { vcpu.kick() }
        return queued
    }

    /// Whether `requestStop()` has been called.
    public var isStopRequested: Bool { stopRequested.load(ordering: .sequentiallyConsistent) }

    /// Runs until the guest stops or `requestStop()` is called. Call on the vCPU's thread.
    /// Before it returns, it runs the work that `performOnThread` queued and no exit ran yet.
    public func run() -> VCPUStopReason {
        pendingWork.withLock { $0.accepting = true }
        let reason = runUntilStopped()
        let leftover = pendingWork.withLock { pending in
            defer { pending = ([], false) }
            return pending.work
        }
        for work in leftover { work() }
        return reason
    }

    private func runUntilStopped() -> VCPUStopReason {
        let id = vcpu.id
        while !stopRequested.load(ordering: .sequentiallyConsistent) {
            let exit: VCPUExit
            dispatcher?.interruptDelivered(vcpu: id) // entering the guest delivers what was injected
            do { exit = try vcpu.run() } catch { return .hypervisorError("\(error)") }
            statistics.exits.wrappingAdd(1, ordering: .relaxed)
            do {
                switch exit {
                case let .portOut(port, size, data):
                    if let stop = handleWrite(.port, UInt64(port), size, data, id) { return stop }
                case let .portIn(port, size):
                    try vcpu.completePortIn(handleRead(.port, UInt64(port), size, id))
                case let .portOutString(port, size, values):
                    for value in values {
                        if let stop = handleWrite(.port, UInt64(port), size, value, id) { return stop }
                    }
                case let .portInString(port, size, count):
                    try vcpu.completePortInString((0..<count).map { _ in handleRead(.port, UInt64(port), size, id) })
                case let .mmioWrite(address, size, data):
                    if let stop = handleWrite(.mmio, address.rawValue, size, data, id) { return stop }
                case let .mmioRead(address, size):
                    try vcpu.completeMMIORead(handleRead(.mmio, address.rawValue, size, id))
                case .interrupted:
                    statistics.interruptions.wrappingAdd(1, ordering: .relaxed)
                    // Re-arm entry first, then re-check the flag at the loop head: a kick
                    // that lands between the two is seen by one or the other.
                    vcpu.acknowledgeKick()
                    for work in pendingWork.withLock({ pending in defer { pending.work.removeAll() }; return pending.work }) { work() }
                case .halt:
                    return .halted
                case .shutdown:
                    return .shutdown
                case .systemEvent, .failedEntry, .internalError, .unsupported:
                    return .fatalExit(exit)
                }
            } catch {
                return .hypervisorError("\(error)")
            }
        }
        return .stopRequested
    }

    private func handleRead(_ space: AddressSpace, _ address: UInt64, _ size: Int, _ id: Int) -> UInt64 {
        if let value = bus.read(space: space, address: address, size: size, vcpuID: id) {
            return value.truncated(toBytes: size)
        }
        statistics.unclaimedAccesses.wrappingAdd(1, ordering: .relaxed)
        return UInt64.max.truncated(toBytes: size) // an empty bus reads all ones
    }

    private func handleWrite(_ space: AddressSpace, _ address: UInt64, _ size: Int, _ data: UInt64, _ id: Int) -> VCPUStopReason? {
        switch bus.write(space: space, address: address, size: size, value: data.truncated(toBytes: size), vcpuID: id) {
        case .stopVCPU(let status)?: return .guestRequested(status: status)
        case .handled?: return nil
        case nil:
            statistics.unclaimedAccesses.wrappingAdd(1, ordering: .relaxed)
            return nil
        }
    }
}
