#if canImport(Glibc)
import Glibc
#endif

/// A value that threads share behind a pthread mutex: `withLock` runs a closure with the value
/// locked.
///
/// It does what `Synchronization.Mutex` does, but ThreadSanitizer understands it. On Linux
/// `Mutex` is built on futex system calls, which the sanitizer does not intercept, so every
/// `Mutex` critical section is reported as a data race under `swift test --sanitize=thread`
/// (seen with Swift 6.3.1: two threads appending under one `Mutex` give a report). RTVirt's
/// shared state uses this type so that the sanitizer runs in CI without suppressions.
public final class LockedValue<Value: Sendable>: @unchecked Sendable {
    // @unchecked: `value` is only read or written while `mutex` is held.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    /// A lock around `value`.
    public init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        // The mutex lives in heap memory that never moves, as pthread requires.
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the value locked; returns what it returns.
    public func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }

    /// Runs `body` with the value locked if the lock is free now (`pthread_mutex_trylock`);
    /// returns nil without waiting when another thread holds it.
    public func withLockIfAvailable<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result? {
        guard pthread_mutex_trylock(mutex) == 0 else { return nil }
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
