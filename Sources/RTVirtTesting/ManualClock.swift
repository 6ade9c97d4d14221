import RTVirtCore
import Synchronization

/// A clock that moves only when told to.
public final class ManualClock: MonotonicClock {
    private let now: Atomic<UInt64>

    /// A clock reading `start` nanoseconds.
    public init(start: UInt64 = 0) { now = Atomic(start) }

    public func nowNanoseconds() -> UInt64 { now.load(ordering: .acquiring) }

    /// Moves the clock forward by `nanoseconds`.
    public func advance(by nanoseconds: UInt64) { now.wrappingAdd(nanoseconds, ordering: .releasing) }

    /// Sets the clock; it never goes backwards (a smaller value is ignored).
    public func set(to nanoseconds: UInt64) { now.max(nanoseconds, ordering: .releasing) }
}
