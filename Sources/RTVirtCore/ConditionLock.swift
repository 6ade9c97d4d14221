#if canImport(Glibc)
import Glibc
#endif

/// A mutex with a condition variable, for threads that must sleep until state changes.
///
/// `Synchronization.Mutex` has no condition variable; this wraps pthread's. The pthread
/// objects live in heap memory that never moves, which pthread requires.
public final class ConditionLock<State>: @unchecked Sendable {
    // @unchecked: `state` is only touched while `mutex` is held.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var state: State

    /// A lock protecting `initialState`. The condition variable waits on CLOCK_MONOTONIC.
    public init(_ initialState: State) {
        state = initialState
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    /// Runs `body` with the state locked, then wakes every waiter.
    public func withLockAndBroadcast<R>(_ body: (inout State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer {
            pthread_cond_broadcast(condition)
            pthread_mutex_unlock(mutex)
        }
        return try body(&state)
    }

    /// Runs `body` with the state locked.
    public func withLock<R>(_ body: (inout State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&state)
    }

    /// Waits until `predicate` holds, or until the monotonic `deadline` in nanoseconds passes
    /// (nil: forever), then runs `body` with the state locked. `body` gets whether the
    /// predicate held.
    public func wait<R>(
        until predicate: (State) -> Bool, deadlineNanoseconds: UInt64? = nil,
        then body: (inout State, Bool) throws -> R
    ) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !predicate(state) {
            if let deadlineNanoseconds {
                var deadline = timespec(
                    tv_sec: Int(deadlineNanoseconds / 1_000_000_000),
                    tv_nsec: Int(deadlineNanoseconds % 1_000_000_000))
                if pthread_cond_timedwait(condition, mutex, &deadline) == ETIMEDOUT { break }
            } else {
                pthread_cond_wait(condition, mutex)
            }
        }
        return try body(&state, predicate(state))
    }
}

/// Nanoseconds on CLOCK_MONOTONIC.
public func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
