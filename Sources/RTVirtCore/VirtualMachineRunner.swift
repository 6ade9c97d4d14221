/// Runs each vCPU of a VM on its own host thread and stops them all on request.
///
/// ```swift
/// let runner = try VirtualMachineRunner(vcpus: [cpu0, cpu1], bus: bus)
/// let reasons = runner.waitForAll()          // or runner.stop() from elsewhere
/// ```
public final class VirtualMachineRunner: Sendable {
    /// One run loop per vCPU, in the order given.
    public let loops: [VCPURunLoop]
    /// One thread per vCPU, in the same order.
    public let threads: [HostThread]
    private let results: ConditionLock<[VCPUStopReason?]>

    /// Starts one thread per vCPU, named `vcpu<id>`, running a `VCPURunLoop` over `bus`.
    /// `onThreadStart` runs first on each vCPU thread (for example to apply a real-time policy);
    /// `onThreadEnd` runs last on it (for example to restore the thread's policy).
    public init(
        vcpus: [any VirtualCPU], bus: IOBus, dispatcher: (any VCPUParking)? = nil,
        onThreadStart: (@Sendable (any VirtualCPU) -> Void)? = nil,
        onThreadEnd: (@Sendable (any VirtualCPU) -> Void)? = nil
    ) throws(HostThreadError) {
        let loops = vcpus.map { VCPURunLoop(vcpu: $0, bus: bus, dispatcher: dispatcher) }
        let results = ConditionLock<[VCPUStopReason?]>(Array(repeating: nil, count: vcpus.count))
        var threads: [HostThread] = []
        for (index, loop) in loops.enumerated() {
            do {
                threads.append(try HostThread(name: "vcpu\(loop.vcpu.id)") {
                    onThreadStart?(loop.vcpu)
                    let reason = loop.run()
                    onThreadEnd?(loop.vcpu)
                    results.withLockAndBroadcast { $0[index] = reason }
                })
            } catch {
                for started in loops.prefix(index) { started.requestStop() }
                for thread in threads { thread.join() }
                throw error
            }
        }
        self.loops = loops
        self.threads = threads
        self.results = results
    }

    /// Dropping the runner stops the VM as `stop()` does; then the threads are joined.
    deinit {
        stop()
    }

    /// Asks every vCPU to stop (kicking those inside the guest), and closes each vCPU on the
    /// dispatcher: the VM has stopped, so whatever waits on it ends (the VMRPC server fails its
    /// outstanding reverse calls with `vmStopped`). Returns immediately.
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
        return reasons
    }

    /// Stops every vCPU and waits for all threads; returns the reasons.
    @discardableResult
    public func stopAndWait() -> [VCPUStopReason] {
        stop()
        return waitForAll().map { $0 ?? .stopRequested }
    }
}
