#if canImport(Glibc)
import Glibc
#endif
import CLinuxSupport
import SystemPackage

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
