import RTVirtCore

/// Where `clock.read` and `timer.sleepUntil` get each vCPU's TSC mapping and host time.
public protocol GuestClockSource: Sendable {
    /// The TSC mapping of `vcpu`, or nil when unknown.
    func mapping(forVCPU vcpu: Int) -> GuestTSCMapping?
    /// The host TSC and monotonic time now. The monotonic time must be on the dispatcher's clock.
    func sampleHost() -> HostClockSample
}

/// Guest clocks of real vCPUs: fixed mappings measured at setup, and the real host clocks.
public struct HostGuestClockSource: GuestClockSource {
    /// One mapping per vCPU id.
    public var mappings: [GuestTSCMapping]
    /// A source with the given mappings.
    public init(mappings: [GuestTSCMapping]) { self.mappings = mappings }
    public func mapping(forVCPU vcpu: Int) -> GuestTSCMapping? { mappings.indices.contains(vcpu) ? mappings[vcpu] : nil }
    public func sampleHost() -> HostClockSample { HostClockSample.now() }
}

/// The standard procedures of `Docs/VMRPC.md` (besides `poll` and `reply`, which the server
/// provides itself).
public enum VMRPCStandardProcedures {
    /// `null` (1): no arguments, no results.
    public static func null() -> VMRPCProcedure {
        VMRPCProcedure(id: VMRPCProcedureID.null, name: "null", argumentLength: 0...0) { _, _ in .done(status: .ok, results: []) }
    }

    /// `clock.read` (2): results are a `VMRPCClockReading` for the calling vCPU.
    public static func clockRead(_ source: any GuestClockSource) -> VMRPCProcedure {
        VMRPCProcedure(id: VMRPCProcedureID.clockRead, name: "clock.read", argumentLength: 0...0) { context, _ in
            guard let mapping = source.mapping(forVCPU: context.vcpuID) else { return .failed(.internalError) }
            let sample = source.sampleHost()
            return .ok(VMRPCClockReading(hostMonotonicNanoseconds: sample.monotonicNanoseconds,
                                         guestTSC: mapping.guestTSC(at: sample),
                                         tscFrequencyHz: mapping.frequencyHz, guestTSCOffset: mapping.guestOffset))
        }
    }

    /// `timer.sleepUntil` (3): parks the vCPU until its TSC reaches the deadline; results are a
    /// `VMRPCWakeUp`. A deadline beyond the dispatcher's park limit answers `timedOut` at the
    /// limit (the guest calls again); a cancelled wait answers `cancelled`.
    public static func timerSleepUntil(_ source: any GuestClockSource) -> VMRPCProcedure {
        .typed(id: VMRPCProcedureID.timerSleepUntil, name: "timer.sleepUntil", argumentLength: 8...8,
               arguments: VMRPCSleepUntil.self) { context, sleep in
            guard let mapping = source.mapping(forVCPU: context.vcpuID) else { return .failed(.internalError) }
            let deadline = mapping.monotonicNanoseconds(forGuestTSC: sleep.deadlineGuestTSC, anchor: source.sampleHost())
            return .wait(LongPollRequest(deadline: deadline)) { result in
                switch result {
                case .deadlineReached:
                    return .ok(VMRPCWakeUp(guestTSC: mapping.guestTSC(at: source.sampleHost())))
                case .cancelled:
                    return .failed(.cancelled)
                case .parkLimitReached, .descriptorsReady, .hostMessage:
                    return .failed(.timedOut)
                }
            }
        }
    }

    /// `null`, `clock.read` and `timer.sleepUntil`.
    public static func all(clock source: any GuestClockSource) -> [VMRPCProcedure] {
        [null(), clockRead(source), timerSleepUntil(source)]
    }
}
