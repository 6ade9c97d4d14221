import RTVirtCore
import Synchronization

/// A clock that moves only when told to, or by a fixed step each time it is read (so that
/// code which spins on the clock terminates).
public final class ManualClock: MonotonicClock {
    private let now: Atomic<UInt64>
    /// Nanoseconds added after every read.
    public let stepPerRead: UInt64

    /// A clock reading `start` nanoseconds that advances `stepPerRead` after each read.
    public init(start: UInt64 = 0, stepPerRead: UInt64 = 0) {
        now = Atomic(start)
        self.stepPerRead = stepPerRead
    }

    public func nowNanoseconds() -> UInt64 {
        stepPerRead == 0 ? now.load(ordering: .acquiring) : now.wrappingAdd(stepPerRead, ordering: .acquiringAndReleasing).oldValue
    }

    /// Moves the clock forward by `nanoseconds`.
    public func advance(by nanoseconds: UInt64) { now.wrappingAdd(nanoseconds, ordering: .releasing) }

    /// Sets the clock; it never goes backwards (a smaller value is ignored).
    public func set(to nanoseconds: UInt64) { now.max(nanoseconds, ordering: .releasing) }
}
