#if canImport(Glibc)
import Glibc
#endif
import CLinuxSupport

/// Why a host thread could not be started.
public struct HostThreadError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The thread's name.
    public var name: String
    /// What `pthread_create` returned.
    public var code: Int32
    public var description: String { "could not start thread \(name): error \(code)" }
}

/// A POSIX thread that runs one closure, with its pthread handle and kernel thread id, so that
/// its scheduling, affinity and cgroup can be managed from outside and it can be signalled.
public final class HostThread: Sendable {
    private struct State {
        var kernelThreadID: pid_t?
        var finished = false
        var joined = false
    }

    /// The name given at start (at most 15 bytes reach the kernel).
    public let name: String
    private let handle: pthread_t
    private let state: ConditionLock<State>

    private final class Start: @unchecked Sendable {
        // @unchecked: written before pthread_create, read only by the new thread.
        let name: String
        let body: @Sendable () -> Void
        let state: ConditionLock<State>
        init(name: String, body: @escaping @Sendable () -> Void, state: ConditionLock<State>) {
            self.name = name; self.body = body; self.state = state
        }
    }

    /// Starts a thread named `name` that runs `body`; returns once the thread has its id.
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(HostThreadError) {
        self.name = name
        let state = ConditionLock(State())
        self.state = state
        let start = Unmanaged.passRetained(Start(name: name, body: body, state: state))
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { argument in
            // Balanced with passRetained above: the new thread owns the Start box.
            let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
            _ = start.name.withCString { rtv_set_thread_name($0) }
            start.state.withLockAndBroadcast { $0.kernelThreadID = rtv_gettid() }
            start.body()
            start.state.withLockAndBroadcast { $0.finished = true }
            return nil
        }, start.toOpaque())
        guard result == 0 else {
            start.release()
            throw HostThreadError(name: name, code: result)
        }
        handle = thread
        state.wait(until: { $0.kernelThreadID != nil }) { _, _ in }
    }

    /// The kernel thread id (what `gettid()` returns on the thread).
    public var kernelThreadID: pid_t { state.withLock { $0.kernelThreadID ?? 0 } }

    /// The pthread handle. Valid until `join()` returns (or, once the thread detached itself,
    /// until it ends).
    public var pthread: pthread_t { handle }

    /// Whether the closure has returned.
    public var isFinished: Bool { state.withLock { $0.finished } }

    /// Waits up to `timeoutNanoseconds` for the closure to return. Returns whether it did.
    public func waitForFinish(timeoutNanoseconds: UInt64) -> Bool {
        state.wait(until: { $0.finished }, deadlineNanoseconds: monotonicNanoseconds() + timeoutNanoseconds) { _, done in done }
    }

    /// Waits for the thread to end and releases it. Safe to call more than once.
    ///
    /// Called on the thread itself (from its body, or by dropping the last reference to this
    /// object there), it cannot wait for itself: it detaches the thread instead, so that the
    /// thread is released when it ends, and returns at once.
    public func join() {
        let shouldJoin = state.withLock { state -> Bool in
            defer { state.joined = true }
            return !state.joined
        }
        guard shouldJoin else { return }
        if pthread_equal(handle, pthread_self()) != 0 {
            // pthread_join on the calling thread fails with EDEADLK and would leave it unreleased.
            pthread_detach(handle)
        } else {
            pthread_join(handle, nil)
        }
    }

    deinit {
        join()
    }
}
