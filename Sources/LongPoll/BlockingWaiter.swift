#if canImport(Glibc)
import RTVirtCore
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

/// A CPU hint for spin loops (`pause` on x86).
@inline(__always)
func spinLoopHint() {
    #if arch(x86_64)
    rtv_cpu_relax()
    #endif
}
