#if canImport(Glibc)
import Glibc
#endif
import CLinuxSupport
import SystemPackage

/// The primitive a long poll blocks in: sleep until a descriptor is ready, a wake-up is
/// signalled, or a monotonic time passes. Swappable so that the dispatcher's logic can be
/// tested without real time.
public protocol BlockingWaiter: Sendable {
    /// Blocks until `descriptors` (plus `wakeDescriptor`, when not nil) have events or until
    /// `untilNanoseconds` (monotonic; nil: indefinitely). Fills `returnedEvents`.
    func block(descriptors: inout [PollDescriptor], untilNanoseconds: UInt64?, clock: any MonotonicClock)
}

/// `ppoll(2)` with a relative timeout computed from the monotonic deadline.
public struct PollingWaiter: BlockingWaiter {
    /// The real waiter.
    public init() {}

    public func block(descriptors: inout [PollDescriptor], untilNanoseconds: UInt64?, clock: any MonotonicClock) {
        var fds = descriptors.map { pollfd(fd: $0.fd, events: $0.events, revents: 0) }
        var timeout: Int64 = -1
        if let untilNanoseconds {
            let now = clock.nowNanoseconds()
            timeout = untilNanoseconds > now ? Int64(clamping: untilNanoseconds - now) : 0
        }
        let result = fds.withUnsafeMutableBufferPointer { rtv_ppoll($0.baseAddress, UInt($0.count), timeout) }
        if result > 0 {
            for index in descriptors.indices { descriptors[index].returnedEvents = fds[index].revents }
        }
    }
}

/// An `eventfd(2)`: a counter that wakes a poller. Owns the descriptor.
public final class EventNotifier: Sendable {
    /// The descriptor.
    public let fd: Int32

    /// Creates a non-blocking, close-on-exec eventfd.
    public init() throws(Errno) {
        let fd = rtv_eventfd()
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Adds one to the counter (wakes pollers).
    public func signal() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { write(fd, $0.baseAddress, 8) }
    }

    /// Resets the counter to zero; returns whether it was signalled.
    @discardableResult
    public func drain() -> Bool {
        var value: UInt64 = 0
        return withUnsafeMutableBytes(of: &value) { read(fd, $0.baseAddress, 8) } == 8
    }
}

/// A CPU hint for spin loops (`pause` on x86).
@inline(__always)
func spinLoopHint() {
    #if arch(x86_64)
    rtv_cpu_relax()
    #endif
}
