import CLinuxSupport

/// A host TSC reading and the `CLOCK_MONOTONIC` time at the same instant.
public struct HostClockSample: Equatable, Sendable {
    /// Host time-stamp counter.
    public var hostTSC: UInt64
    /// Monotonic nanoseconds.
    public var monotonicNanoseconds: UInt64

    /// A sample.
    public init(hostTSC: UInt64, monotonicNanoseconds: UInt64) {
        self.hostTSC = hostTSC
        self.monotonicNanoseconds = monotonicNanoseconds
    }

    /// Reads both clocks now: the TSC is the midpoint of two reads around `clock_gettime`. A
    /// pair of reads that a preemption or a migration split (a window above 2,000 ticks, about
    /// a microsecond, where one is normally a few dozen; or two CPUs) is taken again, up to
    /// eight times, keeping the narrowest.
    public static func now() -> HostClockSample {
        var (best, bestWindow) = bracketedSample()
        var attempts = 1
        while bestWindow > 2_000 && attempts < 8 {
            let (sample, window) = bracketedSample()
            if window < bestWindow { (best, bestWindow) = (sample, window) }
            attempts += 1
        }
        return best
    }

    /// One sample and the TSC window around its `clock_gettime` (UInt64.max across two CPUs).
    private static func bracketedSample() -> (HostClockSample, UInt64) {
        var firstCPU: UInt32 = 0, secondCPU: UInt32 = 0
        let before = rtv_rdtscp_fenced(&firstCPU)
        let monotonic = RTVirtCore.monotonicNanoseconds()
        let after = rtv_rdtscp_fenced(&secondCPU)
        let window = firstCPU == secondCPU ? after &- before : UInt64.max
        return (HostClockSample(hostTSC: before &+ (after &- before) / 2, monotonicNanoseconds: monotonic), window)
    }
}

/// Maps a vCPU's TSC to host monotonic time: guest TSC = host TSC + `guestOffset`, counting at
/// `frequencyHz`. Conversions re-anchor on a fresh host sample, so a small error in the
/// frequency only matters over the (short) distance to the time converted.
///
/// `offsetErrorBound` says how far `guestOffset` may be from the true offset (0 when the
/// hypervisor reported it exactly). Deadlines are converted conservatively, late by that bound,
/// so an error in the offset never makes a timer fire before the guest's deadline.
public struct GuestTSCMapping: Equatable, Sendable {
    /// TSC ticks per second.
    public var frequencyHz: UInt64
    /// Guest TSC minus host TSC, in ticks.
    public var guestOffset: Int64
    /// The most `guestOffset` may differ from the true offset, in ticks.
    public var offsetErrorBound: UInt64

    /// A mapping whose offset is known within `offsetErrorBound` ticks.
    public init(frequencyHz: UInt64, guestOffset: Int64, offsetErrorBound: UInt64 = 0) {
        self.frequencyHz = frequencyHz
        self.guestOffset = guestOffset
        self.offsetErrorBound = offsetErrorBound
    }

    /// The error bound in nanoseconds.
    public var offsetErrorBoundNanoseconds: Double { Double(offsetErrorBound) * 1e9 / Double(max(frequencyHz, 1)) }

    /// The guest TSC at the instant of `sample`.
    public func guestTSC(at sample: HostClockSample) -> UInt64 {
        sample.hostTSC &+ UInt64(bitPattern: guestOffset)
    }

    /// The earliest monotonic time at which the guest TSC has surely reached `guestTSC`,
    /// anchored on `sample`: the time the mapping gives, plus its offset error bound.
    public func monotonicNanoseconds(forGuestTSC guestTSC: UInt64, anchor sample: HostClockSample) -> UInt64 {
        let ticks = Int64(bitPattern: guestTSC &- self.guestTSC(at: sample))
        // A frequency of 0 (a mapping the VMM filled in wrongly) counts as 1 Hz: never a NaN.
        let nanoseconds = (Double(ticks) + Double(offsetErrorBound)) * 1e9 / Double(max(frequencyHz, 1))
        let result = Double(sample.monotonicNanoseconds) + nanoseconds
        return result <= 0 ? 0 : result >= Double(UInt64.max) ? UInt64.max : UInt64(result)
    }

    /// Measures the host TSC frequency against `CLOCK_MONOTONIC` over `nanoseconds`.
    public static func measureHostTSCFrequency(over nanoseconds: UInt64 = 20_000_000) -> UInt64 {
        let start = HostClockSample.now()
        var end = start
        while end.monotonicNanoseconds - start.monotonicNanoseconds < nanoseconds { end = HostClockSample.now() }
        let ticks = Double(end.hostTSC &- start.hostTSC)
        return UInt64(ticks * 1e9 / Double(end.monotonicNanoseconds - start.monotonicNanoseconds))
    }
}
