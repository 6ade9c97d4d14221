import RTVirtCore
import Synchronization
import LongPoll

/// A `BlockingWaiter` for a `ManualClock`: instead of sleeping it moves the clock to the time
/// asked for (plus `lateness`), unless a descriptor in `readyDescriptors` is marked ready.
public final class ManualClockWaiter: BlockingWaiter {
    /// The clock it moves.
    public let clock: ManualClock
    /// How late each timed block "wakes", nanoseconds.
    public let lateness: UInt64
    /// Descriptors reported ready on every block.
    public let readyDescriptors = LockedValue<Set<Int32>>([])
    /// Blocks so far.
    public let blockCount = Atomic<Int>(0)
    /// Runs at the start of each block, on the blocking thread: what happens "while" a vCPU is
    /// parked (another vCPU's call, a datagram arriving). Nil: nothing.
    public let whileBlocked = LockedValue<(@Sendable () -> Void)?>(nil)

    /// A waiter that moves `clock`.
    public init(clock: ManualClock, lateness: UInt64 = 0) {
        self.clock = clock
        self.lateness = lateness
    }

    public func block(descriptors: inout [PollDescriptor], untilNanoseconds: UInt64?, clock _: any MonotonicClock) {
        blockCount.wrappingAdd(1, ordering: .relaxed)
        whileBlocked.withLock { $0 }?()
        let ready = readyDescriptors.withLock { $0 }
        var any = false
        for index in descriptors.indices where ready.contains(descriptors[index].fd) {
            descriptors[index].returnedEvents = descriptors[index].events
            any = true
        }
        if !any, let untilNanoseconds { clock.set(to: untilNanoseconds + lateness) }
    }
}
