import LongPoll
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
    ///
    /// In the 16-byte form the guest reports its previous arrival and spins to its deadline
    /// itself; the host then releases the vCPU early by the return latency it learns for each of
    /// the first `compensatedVCPUs` vCPUs (`ReturnLatencyEstimator`), so the guest arrives at
    /// its deadline instead of one return trip after it. `earlyReleasePercentile` is the
    /// percentile of the recent return latencies released early by (0 ... 1, clamped): higher
    /// values make late arrivals rarer and cost more guest-side spinning.
    /// `maximumEarlyReleaseNanoseconds` caps the early release (default 100 µs).
    public static func timerSleepUntil(_ source: any GuestClockSource, compensatedVCPUs: Int = 64,
                                       earlyReleasePercentile: Double = 0.9,
                                       maximumEarlyReleaseNanoseconds: Double = 100_000) -> VMRPCProcedure {
        let percentile = earlyReleasePercentile.isFinite ? min(max(earlyReleasePercentile, 0), 1) : 0.9
        let cap = maximumEarlyReleaseNanoseconds.isFinite ? max(maximumEarlyReleaseNanoseconds, 0) : 100_000
        let estimators = (0..<max(compensatedVCPUs, 0)).map { _ in
            ReturnLatencyEstimator(percentile: percentile, maximumNanoseconds: cap)
        }
        return .typed(id: VMRPCProcedureID.timerSleepUntil, name: "timer.sleepUntil", argumentLength: 8...16,
                      blocking: true, arguments: VMRPCSleepUntil.self) { context, sleep in
            guard let mapping = source.mapping(forVCPU: context.vcpuID) else { return .failed(.internalError) }
            let deadline = mapping.monotonicNanoseconds(forGuestTSC: sleep.deadlineGuestTSC, anchor: source.sampleHost())
            var release = deadline
            if let arrival = sleep.previousArrival, estimators.indices.contains(context.vcpuID) {
                let estimator = estimators[context.vcpuID]
                estimator.record(arrivalNanoseconds: Double(arrival) * 1e9 / Double(max(mapping.frequencyHz, 1)))
                release = deadline - min(deadline, estimator.earlyRelease(forDeadline: deadline))
            }
            return .wait(LongPollRequest(deadline: release)) { result in
                switch result {
                case .deadlineReached:
                    return .ok(VMRPCWakeUp(guestTSC: mapping.guestTSC(at: source.sampleHost())))
                case .cancelled:
                    return .failed(.cancelled)
                case .interrupted:
                    return .failed(.interrupted)
                case .parkLimitReached, .descriptorsReady, .hostMessage:
                    return .failed(.timedOut)
                }
            }
        }
    }

    /// `null`, `clock.read` and `timer.sleepUntil` (with `earlyReleasePercentile` and
    /// `maximumEarlyReleaseNanoseconds`).
    public static func all(clock source: any GuestClockSource, earlyReleasePercentile: Double = 0.9,
                           maximumEarlyReleaseNanoseconds: Double = 100_000) -> [VMRPCProcedure] {
        [null(), clockRead(source), timerSleepUntil(source, earlyReleasePercentile: earlyReleasePercentile,
                                                    maximumEarlyReleaseNanoseconds: maximumEarlyReleaseNanoseconds)]
    }
}

/// Learns how long the return from a long poll into the guest takes, from the arrivals the guest
/// reports (its TSC at return minus its deadline, before spinning), and says how early to
/// release the next sleep. Used by one vCPU's calls only.
public final class ReturnLatencyEstimator: Sendable {
    private struct State {
        var samples: RecentSamples<Double>
        var lastEarlyRelease: Double = 0
        var earlyRelease: Double = 0
    }
    private let state: LockedValue<State>
    /// Samples kept.
    public let window: Int
    /// The percentile of return latencies released early by: higher makes late arrivals rarer
    /// and costs more guest-side spinning (the default, 0.9, measured best with `rtvirt cyclictest`).
    public let percentile: Double
    /// Largest early release, nanoseconds.
    public let maximumNanoseconds: Double

    /// An estimator.
    public init(window: Int = 64, percentile: Double = 0.9, maximumNanoseconds: Double = 100_000) {
        self.window = max(window, 1)
        self.percentile = percentile
        self.maximumNanoseconds = maximumNanoseconds
        state = LockedValue(State(samples: RecentSamples(capacity: window)))
    }

    /// Records the guest's arrival for the previous sleep (negative: it arrived early).
    public func record(arrivalNanoseconds: Double) {
        state.withLock { state in
            // What the return took = how late it arrived + how early it was released.
            let sample = arrivalNanoseconds + state.lastEarlyRelease
            guard sample.isFinite, sample > -1e9, sample < 1e9 else { return }
            state.samples.append(sample)
            state.earlyRelease = min(max(0, state.samples.percentile(percentile) ?? sample), maximumNanoseconds)
        }
    }

    /// How many nanoseconds before `deadline` to release the vCPU; remembered for the next sample.
    public func earlyRelease(forDeadline deadline: UInt64) -> UInt64 {
        state.withLock { state in
            state.lastEarlyRelease = state.earlyRelease
            return UInt64(state.earlyRelease)
        }
    }

    /// The current early release, nanoseconds.
    public var currentEarlyReleaseNanoseconds: Double { state.withLock { $0.earlyRelease } }
}
