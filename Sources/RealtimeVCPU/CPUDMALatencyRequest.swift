#if canImport(Glibc)
import RTVirtCore
import Glibc
#endif
import SystemPackage

/// Holds a PM QoS request on `/dev/cpu_dma_latency` (as `cyclictest` does): while it is held,
/// CPUs avoid idle states whose exit latency exceeds the requested bound, which otherwise add
/// tens of microseconds to every timer wake-up. Released when the value is dropped.
public final class CPUDMALatencyRequest: Sendable {
    private let fd: Int32
    /// The bound in microseconds.
    public let microseconds: Int32

    /// Requests a wake-up latency bound of `microseconds` (0: stay out of idle states).
    public init(microseconds: Int32 = 0, path: String = "/dev/cpu_dma_latency") throws(Errno) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        var value = microseconds
        guard withUnsafeBytes(of: &value, { write(fd, $0.baseAddress, 4) }) == 4 else {
            let code = errno
            close(fd)
            throw Errno(rawValue: code)
        }
        self.fd = fd
        self.microseconds = microseconds
    }

    deinit { close(fd) }
}
