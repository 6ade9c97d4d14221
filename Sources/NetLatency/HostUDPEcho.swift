#if canImport(Glibc)
import Glibc
#endif
import CNetLatencySupport
import CSocketsSupport
import RTVirtCore
import VMRPCSockets

/// A host-native UDP echo: one thread, a blocking `recvfrom`, then `sendto` of the same bytes to
/// the sender. The baseline a guest's echo is compared with, and the tester's calibration echo.
///
/// The socket is made with `backend` (so it lives in the backend's namespace) and bound to
/// `endpoint`; the thread runs `onThreadStart` first (a real-time policy, for example).
public final class HostUDPEcho: Sendable {
    /// Counters.
    public struct Statistics: Equatable, Sendable {
        /// Datagrams received.
        public var received: UInt64 = 0
        /// Datagrams sent back.
        public var echoed: UInt64 = 0
        /// Datagrams the drop rule discarded.
        public var dropped: UInt64 = 0
        /// Sends that failed.
        public var sendFailures: UInt64 = 0
    }

    /// Where it listens.
    public let endpoint: SocketEndpoint
    private let backend: HostSocketBackend
    private let descriptor: Int32
    private let stopping = LockedValue(false)
    private let counters = LockedValue(Statistics())
    private let thread: HostThread

    /// Starts the echo.
    /// - Parameters:
    ///   - backend: the sockets' backend (in the VM's network namespace).
    ///   - endpoint: the address and port to echo on.
    ///   - name: the thread's name.
    ///   - onThreadStart: runs first on the echo thread (for example to apply a real-time policy).
    ///   - drop: called with each datagram's number (0, 1, ...); true discards it unanswered (a
    ///     service that loses requests, for tests of the instrument's loss accounting).
    ///   - timeline: marked when each receive returns and before each send (a diagnosis).
    /// - Throws: `NetLatencyError.socket` or `.thread`.
    public init(backend: HostSocketBackend, at endpoint: SocketEndpoint, name: String = "host-echo",
                onThreadStart: (@Sendable () -> Void)? = nil,
                drop: (@Sendable (UInt64) -> Bool)? = nil, timeline: ServiceTimeline? = nil) throws(NetLatencyError) {
        guard let family = endpoint.address?.family else { throw .invalidPlan("the echo's address has no family") }
        let descriptor: Int32
        do { descriptor = try backend.open(family, .datagram) } catch { throw .socket(operation: "socket", errno: error.rawValue) }
        do throws(NetLatencyError) {
            do { try backend.bind(descriptor, endpoint) } catch { throw NetLatencyError.socket(operation: "bind \(endpoint)", errno: error.rawValue) }
            // Blocking receives, bounded so that a stop is seen within 100 ms even if no wake-up comes.
            let blocking = rtv_udp_make_blocking(descriptor, 100_000_000)
            guard blocking == 0 else { throw NetLatencyError.socket(operation: "fcntl/SO_RCVTIMEO", errno: -blocking) }
        } catch {
            backend.close(descriptor)
            throw error
        }
        self.endpoint = endpoint
        self.backend = backend
        self.descriptor = descriptor
        let (stopping, counters) = (stopping, counters)
        do {
            thread = try HostThread(name: name) {
                onThreadStart?()
                var buffer = [UInt8](repeating: 0, count: 65_536)
                var number: UInt64 = 0
                while !stopping.withLock({ $0 }) {
                    var source = rtv_sock_endpoint()
                    // Sound: recvfrom writes at most `count` bytes into the array's storage, during the call.
                    let received = buffer.withUnsafeMutableBytes { rtv_udp_receive_blocking(descriptor, $0.baseAddress, $0.count, &source) }
                    guard received >= 0, source.family != 0 else { continue } // timeout, EINTR, or the stop's shutdown
                    timeline?.markReceive()
                    defer { number &+= 1 }
                    if let drop, drop(number) {
                        counters.withLock { $0.received += 1; $0.dropped += 1 }
                        continue
                    }
                    timeline?.markSend()
                    // Sound: sendto reads `received` bytes of the array, during the call.
                    let sent = buffer.withUnsafeBytes { rtv_udp_send_blocking(descriptor, $0.baseAddress, received, &source) }
                    counters.withLock {
                        $0.received += 1
                        if sent >= 0 { $0.echoed += 1 } else { $0.sendFailures += 1 }
                    }
                }
            }
        } catch {
            backend.close(descriptor)
            throw .thread(error)
        }
    }

    /// The thread's kernel id.
    public var threadID: pid_t { thread.kernelThreadID }

    /// The counters so far.
    public var statistics: Statistics { counters.withLock { $0 } }

    /// Stops the thread (a shutdown wakes its receive), waits for it and closes the socket. Idempotent.
    public func stop() {
        let first = stopping.withLock { stopping -> Bool in
            defer { stopping = true }
            return !stopping
        }
        guard first else { return }
        try? backend.shutdown(descriptor, how: 2)
        thread.join()
        backend.close(descriptor)
    }

    deinit { stop() }
}
