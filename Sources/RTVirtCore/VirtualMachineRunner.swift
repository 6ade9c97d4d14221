import Logging

/// Why a `VirtualMachineRunner` did not start.
public enum VirtualMachineRunnerError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A vCPU's host thread could not be created.
    case threadCreationFailed(HostThreadError)
    /// `onThreadStart` threw on vCPU `vcpu`'s thread (for example its real-time policy could not
    /// be applied): no vCPU of the VM entered the guest.
    case threadSetupFailed(vcpu: Int, reason: String)

    public var description: String {
        switch self {
        case let .threadCreationFailed(error): return "\(error)"
        case let .threadSetupFailed(vcpu, reason): return "vCPU \(vcpu) did not start: \(reason)"
        }
    }
}

/// Runs each vCPU of a VM on its own host thread and stops them all on request.
///
/// ```swift
/// let runner = try VirtualMachineRunner(vcpus: [cpu0, cpu1], bus: bus, dispatcher: dispatcher)
/// let reasons = runner.waitForAll()          // or runner.stop() from elsewhere
/// ```
///
/// Starting is all or nothing: every thread first runs `onThreadStart` (for example to apply a
/// real-time policy), and only when it succeeded on every thread do the vCPUs enter the guest.
/// If it throws on any thread, no vCPU runs, the started threads end (running `onThreadEnd`),
/// and the initializer throws `VirtualMachineRunnerError.threadSetupFailed`.
public final class VirtualMachineRunner: Sendable {
    /// One run loop per vCPU, in the order given.
    public let loops: [VCPURunLoop]
    /// One thread per vCPU, in the same order.
    public let threads: [HostThread]
    private let results: ConditionLock<[VCPUStopReason?]>
    private let logger: Logger

    /// Where the start gate is.
    private enum Gate: Equatable { case waiting, open, aborted }

    /// Starts one thread per vCPU, named `vcpu<id>`, running a `VCPURunLoop` over `bus`, and
    /// returns once every vCPU passed `onThreadStart` and entered its loop.
    /// - Parameters:
    ///   - dispatcher: what parks the vCPUs in long polls (a `LongPollDispatcher`); give the same
    ///     one to the devices (the VMRPC server), so that a stop ends their waits and calls.
    ///   - onThreadStart: runs first on each vCPU thread; throwing keeps the whole VM from running.
    ///   - onThreadEnd: runs last on each vCPU thread whose `onThreadStart` succeeded.
    ///   - logger: lifecycle events (start, stop, setup failures); nothing per exit.
    public init(
        vcpus: [any VirtualCPU], bus: IOBus, dispatcher: (any VCPUParking)? = nil,
        onThreadStart: (@Sendable (any VirtualCPU) throws -> Void)? = nil,
        onThreadEnd: (@Sendable (any VirtualCPU) -> Void)? = nil,
        logger: Logger = Logger(label: "rtvirt.runner")
    ) throws(VirtualMachineRunnerError) {
        let loops = vcpus.map { VCPURunLoop(vcpu: $0, bus: bus, dispatcher: dispatcher) }
        let results = ConditionLock<[VCPUStopReason?]>(Array(repeating: nil, count: vcpus.count))
        // Each thread reports its setup (nil: ok), then waits at the gate.
        let setup = ConditionLock<(reports: [String?], reported: Int, gate: Gate)>(
            (Array(repeating: nil, count: vcpus.count), 0, .waiting))
        var threads: [HostThread] = []
        for (index, loop) in loops.enumerated() {
            do {
                threads.append(try HostThread(name: "vcpu\(loop.vcpu.id)") {
                    var failure: String?
                    do { try onThreadStart?(loop.vcpu) } catch { failure = "\(error)" }
                    setup.withLockAndBroadcast { state in
                        state.reports[index] = failure
                        state.reported += 1
                    }
                    let open = setup.wait(until: { $0.gate != .waiting }) { state, _ in state.gate == .open }
                    let reason: VCPUStopReason
                    if failure != nil {
                        reason = .stopRequested
                    } else {
                        reason = open ? loop.run() : .stopRequested
                        onThreadEnd?(loop.vcpu)
                    }
                    results.withLockAndBroadcast { $0[index] = reason }
                })
            } catch {
                setup.withLockAndBroadcast { $0.gate = .aborted }
                for thread in threads { thread.join() }
                throw .threadCreationFailed(error)
            }
        }
        let reports = setup.wait(until: { $0.reported == vcpus.count }) { state, _ -> [String?] in
            state.gate = state.reports.allSatisfy { $0 == nil } ? .open : .aborted
            return state.reports
        }
        setup.withLockAndBroadcast { _ in } // wake the threads waiting at the gate
        if let failed = reports.firstIndex(where: { $0 != nil }) {
            for thread in threads { thread.join() }
            let id = loops[failed].vcpu.id
            logger.error("VM not started: vCPU \(id) failed its thread setup", metadata: ["vcpu": "\(id)", "reason": "\(reports[failed]!)"])
            throw .threadSetupFailed(vcpu: id, reason: reports[failed]!)
        }
        self.loops = loops
        self.threads = threads
        self.results = results
        self.logger = logger
        logger.info("vCPUs started", metadata: ["vcpus": "\(loops.map(\.vcpu.id))"])
    }

    /// Dropping the runner stops the VM as `stop()` does; then the threads are joined.
    deinit {
        stop()
    }

    /// Asks every vCPU to stop (kicking those inside the guest), and closes each vCPU on the
    /// dispatcher: the VM has stopped, so whatever waits on it ends (the VMRPC server fails its
    /// outstanding reverse calls with `vmStopped`). Returns immediately. A dispatcher that is
    /// reused for a new runner needs `resume(vcpu:)` first.
    public func stop() {
        for loop in loops {
            loop.requestStop()
            loop.dispatcher?.closeVCPU(loop.vcpu.id)
        }
    }

    /// The stop reasons so far (nil for vCPUs still running), in vCPU order.
    public var stopReasons: [VCPUStopReason?] { results.withLock { $0 } }

    /// Waits up to `timeoutNanoseconds` (nil: forever) for every vCPU to stop, then joins the
    /// threads of those that did. Returns the reasons; nil where a vCPU is still running.
    @discardableResult
    public func waitForAll(timeoutNanoseconds: UInt64? = nil) -> [VCPUStopReason?] {
        let deadline = timeoutNanoseconds.map { monotonicNanoseconds() + $0 }
        let reasons = results.wait(until: { $0.allSatisfy { $0 != nil } }, deadlineNanoseconds: deadline) { state, _ in state }
        for (thread, reason) in zip(threads, reasons) where reason != nil { thread.join() }
        if reasons.allSatisfy({ $0 != nil }) {
            logger.info("vCPUs stopped", metadata: ["reasons": "\(reasons.map { "\($0!)" })"])
        }
        return reasons
    }

    /// Stops every vCPU and waits for all threads; returns the reasons.
    @discardableResult
    public func stopAndWait() -> [VCPUStopReason] {
        stop()
        return waitForAll().map { $0 ?? .stopRequested }
    }
}
