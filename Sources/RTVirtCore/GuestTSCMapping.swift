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

    /// Reads both clocks now: the TSC is the midpoint of two reads around `clock_gettime`.
    public static func now() -> HostClockSample {
        let before = rtv_rdtsc()
        let monotonic = RTVirtCore.monotonicNanoseconds()
        let after = rtv_rdtsc()
        return HostClockSample(hostTSC: before &+ (after &- before) / 2, monotonicNanoseconds: monotonic)
    }
}

/// Maps a vCPU's TSC to host monotonic time: guest TSC = host TSC + `guestOffset`, counting at
/// `frequencyHz`. Conversions re-anchor on a fresh host sample, so a small error in the
/// frequency only matters over the (short) distance to the time converted.
public struct GuestTSCMapping: Equatable, Sendable {
    /// TSC ticks per second.
    public var frequencyHz: UInt64
    /// Guest TSC minus host TSC, in ticks.
    public var guestOffset: Int64

    /// A mapping.
    public init(frequencyHz: UInt64, guestOffset: Int64) {
        self.frequencyHz = frequencyHz
        self.guestOffset = guestOffset
    }

    /// The guest TSC at the instant of `sample`.
    public func guestTSC(at sample: HostClockSample) -> UInt64 {
        sample.hostTSC &+ UInt64(bitPattern: guestOffset)
    }

    /// The monotonic time at which the guest TSC reads `guestTSC`, anchored on `sample`.
    public func monotonicNanoseconds(forGuestTSC guestTSC: UInt64, anchor sample: HostClockSample) -> UInt64 {
        let ticks = Int64(bitPattern: guestTSC &- self.guestTSC(at: sample))
        let nanoseconds = Double(ticks) * 1e9 / Double(frequencyHz)
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
