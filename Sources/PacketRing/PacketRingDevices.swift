#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import VMRPCSockets

/// The VMM's I/O thread of the conventional, interrupt-driven path (virtio-net's receive side
/// in miniature, the job vhost-net's worker does): it blocks on a host socket, writes each
/// datagram into the guest's receive ring, publishes the burst and raises one interrupt.
///
/// ```swift
/// let irq = try vm.connectMSI(.localAPIC(apicID: 0, vector: 0xEE))   // KVM: an irqfd routed to an MSI
/// let receiver = try PacketRingReceiver(ring: ring, backend: sockets, descriptor: fd) { irq.signal() }
/// // ... the guest runs ...
/// receiver.stop()
/// ```
public final class PacketRingReceiver: Sendable {
    /// The rings it fills.
    public let ring: PacketRing
    private let stopNotifier: EventNotifier
    private let thread: HostThread

    /// Starts the thread.
    /// - Parameters:
    ///   - ring: the rings to fill.
    ///   - backend: the socket backend the descriptor belongs to.
    ///   - descriptor: the socket to receive from (non-blocking; it must stay open until `stop()`).
    ///   - name: the thread's name.
    ///   - onThreadStart: runs first on the thread (for example to apply a real-time policy).
    ///   - raiseInterrupt: called on the thread after each published burst.
    /// - Throws: `PacketRingReceiverError` when the thread or its stop eventfd cannot be made.
    public init(ring: PacketRing, backend: any SocketBackend, descriptor: Int32, name: String = "ring-io",
                onThreadStart: (@Sendable () -> Void)? = nil,
                raiseInterrupt: @escaping @Sendable () -> Void) throws(PacketRingReceiverError) {
        self.ring = ring
        let stop: EventNotifier
        do { stop = try EventNotifier() } catch { throw .eventNotifier(error.rawValue) }
        stopNotifier = stop
        do {
            thread = try HostThread(name: name) {
                onThreadStart?()
                // Sound: the scratch buffer lives on this thread only and is freed by the defer.
                let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 65_536, alignment: 16)
                defer { scratch.deallocate() }
                let burst = Int(ring.layout.entries)
                while true {
                    var entries = [pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0),
                                   pollfd(fd: stop.fd, events: Int16(POLLIN), revents: 0)]
                    // Sound: poll writes only the two entries of the array, during the call.
                    let ready = entries.withUnsafeMutableBufferPointer { poll($0.baseAddress, 2, -1) }
                    if ready < 0 && errno == EINTR { continue }
                    if ready < 0 || entries[1].revents != 0 { return }
                    if entries[0].revents & Int16(POLLNVAL) != 0 { return }
                    for _ in 0..<burst {
                        let delivery = ring.deliver(scratch: scratch) { buffer in
                            guard let received = try? backend.receive(descriptor, into: buffer) else { return nil }
                            return (received.length, received.truncated, received.source)
                        }
                        if delivery == .nothing { break }
                    }
                    if ring.publish() {
                        ring.countInterrupt()
                        raiseInterrupt()
                    }
                }
            }
        } catch {
            throw .thread(error)
        }
    }

    /// The thread's kernel id (for its CPU time in `/proc/self/task/<tid>/schedstat`).
    public var threadID: pid_t { thread.kernelThreadID }

    /// Stops the thread and waits for it. Idempotent.
    public func stop() {
        stopNotifier.signal()
        thread.join()
    }

    deinit { stop() }
}

/// Why a `PacketRingReceiver` did not start.
public enum PacketRingReceiverError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Its stop eventfd could not be made (errno).
    case eventNotifier(Int32)
    /// Its thread could not be started.
    case thread(HostThreadError)

    /// A readable form.
    public var description: String {
        switch self {
        case .eventNotifier(let code): return "packet ring receiver: eventfd failed (\(String(cString: strerror(code))))"
        case .thread(let error): return "packet ring receiver: \(error)"
        }
    }
}

/// The transmit doorbell: a port (or MMIO) write by the guest after it published transmit
/// descriptors. The vCPU's thread, in the exit, takes them and sends each from guest memory on
/// a host socket (after the policy allowed its destination); the guest resumes after its
/// datagrams left, so it may reuse their buffers at once.
public final class PacketRingTransmitDoorbell: BusDevice {
    /// The rings.
    public let ring: PacketRing
    private let backend: any SocketBackend
    private let descriptor: Int32
    private let policy: SocketPolicy

    /// A doorbell that sends on `descriptor` (which must stay open while the device is on a bus)
    /// to destinations `policy.allowsRemote` accepts.
    public init(ring: PacketRing, backend: any SocketBackend, descriptor: Int32, policy: SocketPolicy) {
        self.ring = ring; self.backend = backend; self.descriptor = descriptor; self.policy = policy
    }

    /// Reads as 0.
    public func read(_ access: BusAccess) -> UInt64 { 0 }

    /// Takes and sends the transmit descriptors the guest published.
    public func write(_ access: BusAccess, value: UInt64) -> BusWriteResult {
        let (memory, backend, descriptor, policy) = (ring.memory, backend, descriptor, policy)
        ring.takeTransmits { transmit in
            guard policy.allowsRemote(transmit.destination) else { return .denied }
            do {
                try memory.withHostPointer(at: transmit.payload, length: UInt64(max(transmit.length, 1))) { pointer in
                    // Sound: `takeTransmits` checked the payload's range in guest memory; the send only reads it.
                    _ = try backend.send(descriptor, UnsafeRawBufferPointer(start: pointer, count: transmit.length), to: transmit.destination)
                }
                return .sent
            } catch {
                return .failed
            }
        }
        return .handled
    }
}
