import Glibc
import RTVirtCore
import XCTest

final class HostThreadTests: XCTestCase {
    /// Waits until kernel task `tid` of this process has ended (bounded: false if it never does).
    private func waitUntilEnded(_ tid: pid_t) -> Bool {
        for _ in 0..<60_000 {
            if access("/proc/self/task/\(tid)", F_OK) != 0 { return true }
            usleep(500)
        }
        return false
    }

    /// A thread that joins itself, or drops the last reference to its `HostThread` (whose
    /// deinit joins), neither deadlocks nor stays unreleased.
    ///
    /// The kernel reaps an ended thread either way, so counting tasks cannot tell. glibc can:
    /// a thread's descriptor (its `pthread_t`) sits in its stack, and an ended thread's stack
    /// goes back for reuse only once the thread was joined or detached. Threads started one
    /// after another, each after the previous one ended, get the same few stacks back when
    /// they are released; a thread left neither joined nor detached keeps its stack for good,
    /// and every later thread gets a new one (a new `pthread_t`).
    func testAThreadThatJoinsOrReleasesItselfIsDetached() throws {
        let rounds = 16
        var handles: Set<pthread_t> = []
        for round in 0..<rounds {
            let holder = LockedValue<HostThread?>(nil)
            let go = ConditionLock(false)
            let handle = LockedValue<pthread_t?>(nil)
            let dropsLastReference = round % 2 == 1
            let tid: pid_t
            do {
                let thread = try HostThread(name: "self-join") {
                    go.wait(until: { $0 }) { _, _ in }
                    handle.withLock { $0 = pthread_self() }
                    if dropsLastReference {
                        holder.withLock { $0 = nil } // the last reference: deinit joins on this thread
                    } else {
                        holder.withLock { $0 }?.join()
                    }
                }
                tid = thread.kernelThreadID
                holder.withLock { $0 = thread }
            }
            go.withLockAndBroadcast { $0 = true }
            XCTAssertTrue(waitUntilEnded(tid), "thread \(round) never ended")
            holder.withLock { $0 = nil }
            handles.insert(try XCTUnwrap(handle.withLock { $0 }))
        }
        XCTAssertLessThanOrEqual(handles.count, rounds / 2,
                                 "\(handles.count) distinct thread descriptors: ended threads were not released")
    }
}
