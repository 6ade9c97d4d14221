/// A source of monotonic time in nanoseconds, injectable so that time-dependent logic can be
/// tested with a manual clock.
public protocol MonotonicClock: Sendable {
    /// Nanoseconds since an arbitrary fixed point; never decreases.
    func nowNanoseconds() -> UInt64
}

/// `CLOCK_MONOTONIC`.
public struct SystemMonotonicClock: MonotonicClock {
    /// The system clock.
    public init() {}
    public func nowNanoseconds() -> UInt64 { monotonicNanoseconds() }
}
