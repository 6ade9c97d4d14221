import RTVirtCore


/// Wakes a deadline wait early by a margin learned from the host's own wake-up lateness, so
/// that a short spin to the deadline lands on time.
///
/// After each timed block the strategy records how late the block returned against the time
/// it asked for. The margin is a high percentile (default p95) of the recent errors plus a
/// small guard, clamped to `[minimumMargin, maximumMargin]`, and never more than
/// `maximumSpinFraction` of the interval being waited (so it cannot turn into busy-waiting).
public final class DeadlineTimerStrategy: Sendable {
    /// Counters, for reports.
    public struct Statistics: Equatable, Sendable {
        /// CPU nanoseconds spent spinning before deadlines.
        public var spinNanoseconds: UInt64 = 0
        /// Wall nanoseconds spent in deadline waits, spinning included.
        public var waitNanoseconds: UInt64 = 0
        /// Timed blocks observed.
        public var timedWakes: UInt64 = 0
        /// The margin now in use.
        public var marginNanoseconds: UInt64 = 0
        /// Spin time as a fraction of wait time (0 when nothing was waited).
        public var spinFraction: Double { waitNanoseconds == 0 ? 0 : Double(spinNanoseconds) / Double(waitNanoseconds) }
    }

    private struct State {
        var recentErrors: RecentSamples<UInt64>
        var margin: UInt64
        var statistics = Statistics()
    }

    /// Smallest margin, nanoseconds.
    public let minimumMargin: UInt64
    /// Largest margin, nanoseconds.
    public let maximumMargin: UInt64
    /// Largest share of an interval that may be spun.
    public let maximumSpinFraction: Double
    /// The percentile of recent wake errors the margin follows.
    public let percentile: Double
    private let state: LockedValue<State>

    /// A strategy starting at `initialMargin` nanoseconds.
    public init(initialMargin: UInt64 = 50_000, minimumMargin: UInt64 = 2_000, maximumMargin: UInt64 = 200_000,
                maximumSpinFraction: Double = 0.2, percentile: Double = 0.95, window: Int = 128) {
        self.minimumMargin = minimumMargin
        self.maximumMargin = maximumMargin
        self.maximumSpinFraction = maximumSpinFraction
        self.percentile = percentile
        state = LockedValue(State(recentErrors: RecentSamples(capacity: window),
                            margin: min(max(initialMargin, minimumMargin), maximumMargin)))
    }

    /// The margin now in use, nanoseconds.
    public var margin: UInt64 { state.withLock { $0.margin } }

    /// A copy of the counters.
    public var statistics: Statistics {
        state.withLock { state in
            var copy = state.statistics
            copy.marginNanoseconds = state.margin
            return copy
        }
    }

    /// When to stop blocking for `deadline`, given that the wait started at `start`.
    public func wakeTime(forDeadline deadline: UInt64, waitStartedAt start: UInt64) -> UInt64 {
        let interval = deadline > start ? deadline - start : 0
        let spinCap = UInt64(Double(interval) * maximumSpinFraction)
        let early = min(margin, spinCap)
        return deadline > early ? deadline - early : 0
    }

    /// Records that a timed block asked to wake at `requested` and woke at `actual`.
    public func recordTimedWake(requested: UInt64, actual: UInt64) {
        let error = actual > requested ? actual - requested : 0
        state.withLock { state in
            state.statistics.timedWakes += 1
            state.recentErrors.append(error)
            let guardBand: UInt64 = 1_000
            state.margin = min(max((state.recentErrors.percentile(percentile) ?? error) + guardBand, minimumMargin), maximumMargin)
        }
    }

    /// Records CPU time spent spinning.
    public func recordSpin(nanoseconds: UInt64) { state.withLock { $0.statistics.spinNanoseconds += nanoseconds } }

    /// Records the wall time of one deadline wait.
    public func recordWait(nanoseconds: UInt64) { state.withLock { $0.statistics.waitNanoseconds += nanoseconds } }

    /// Clears the counters (not the learned margin).
    public func resetStatistics() { state.withLock { $0.statistics = Statistics() } }
}
