#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import Synchronization
import VMRPC
import LongPoll

/// Counters of one VM's socket service.
public struct SocketServiceStatistics: Equatable, Sendable {
    /// Calls the policy refused (nothing was sent, bound or connected).
    public var deniedCalls: UInt64
    /// Host errors that mapped to `hostError` (unexpected errnos).
    public var unexpectedHostErrors: UInt64
    /// Datagrams or stream writes sent, and their payload bytes.
    public var sends: UInt64
    public var bytesSent: UInt64
    /// Datagrams or stream reads received, and their payload bytes.
    public var receives: UInt64
    public var bytesReceived: UInt64
    /// Sockets opened or accepted, and closed (by the guest or at teardown).
    public var socketsOpened: UInt64
    public var socketsClosed: UInt64
}

/// The guest's sockets, outsourced to the host: the `net.*` VMRPC procedures of
/// `Docs/Sockets.md` for one VM, over host sockets from a `SocketBackend` (real sockets in the
/// VM's network namespace, or a fake), under a `SocketPolicy` checked on every call.
///
/// ```swift
/// let network = try VMNetwork(VMNetworkConfiguration(
///     hostAddresses: [IPPrefix("198.18.0.1/24")!], guestAddresses: [IPPrefix("198.18.0.2/24")!]))
/// var policy = SocketPolicy()
/// policy.bindPorts = [7777...7777]
/// policy.remotes = [SocketRemoteRule(prefix: IPPrefix("198.18.0.0/24")!)]
/// let sockets = try VMRPCSocketService(backend: HostSocketBackend(namespace: network.namespace),
///                                      policy: policy, memory: vm.guestMemory, dispatcher: dispatcher)
/// let server = try VMRPCServer(memory: vm.guestMemory, slots: slots, dispatcher: dispatcher,
///                              procedures: VMRPCStandardProcedures.all(clock: clock) + sockets.procedures)
/// ```
///
/// The guest holds handles (an index and a random generation), never descriptors. Receive,
/// accept, connect, send on a full buffer, and `wait` block as long polls on the socket's
/// descriptor, with a time limit, ended by cancellation (pause, stop). Payloads travel in the
/// slot up to 1920 bytes, or in a guest buffer named by guest-physical address and length,
/// which is bounds-checked, read once, and written only inside its range.
///
/// Every socket is closed when the VM stops (the dispatcher closing a vCPU, which
/// `VirtualMachineRunner.stop()` does), on `closeAllSockets()`, and when the service goes away.
public final class VMRPCSocketService: Sendable {
    /// The host side of the sockets.
    public let backend: any SocketBackend
    /// What the guest may do.
    public let policy: SocketPolicy
    /// Guest memory (for payloads in guest buffers).
    public let memory: any GuestMemory
    /// Parks vCPUs in blocking calls; its clock measures timeouts.
    public let dispatcher: any LongPollWaiting
    let table: SocketTable
    private let counters = Counters()
    private let closeToken: LongPollCloseHandlerToken

    final class Counters: Sendable {
        let denied = Atomic<UInt64>(0)
        let unexpected = Atomic<UInt64>(0)
        let sends = Atomic<UInt64>(0)
        let bytesSent = Atomic<UInt64>(0)
        let receives = Atomic<UInt64>(0)
        let bytesReceived = Atomic<UInt64>(0)
        let opened = Atomic<UInt64>(0)
        let closed = Atomic<UInt64>(0)
    }

    /// A service for one VM.
    /// - Parameters:
    ///   - backend: where sockets are made (`HostSocketBackend` in the VM's network namespace).
    ///   - policy: what the guest may do, checked on every call.
    ///   - memory: the guest memory named buffers are in.
    ///   - dispatcher: parks vCPUs in blocking calls; closing a vCPU closes the VM's sockets.
    ///   - handleGenerations: where handle generations come from (default: random);
    ///     replaceable for deterministic tests and fuzzing.
    /// - Throws: `SocketConfigurationError` for a policy out of range.
    public init(backend: any SocketBackend, policy: SocketPolicy, memory: any GuestMemory, dispatcher: any LongPollWaiting,
                handleGenerations: (@Sendable () -> UInt32)? = nil) throws(SocketConfigurationError) {
        try policy.validate()
        self.backend = backend
        self.policy = policy
        self.memory = memory
        self.dispatcher = dispatcher
        let table = handleGenerations.map { SocketTable(capacity: policy.maximumOpenSockets, generations: $0) }
            ?? SocketTable(capacity: policy.maximumOpenSockets)
        self.table = table
        let counters = self.counters
        // The VM stopping (the runner closing its vCPUs) closes every socket.
        closeToken = dispatcher.addCloseHandler { _ in Self.closeAll(table, counters) }
    }

    deinit {
        dispatcher.removeCloseHandler(closeToken)
        Self.closeAll(table, counters)
    }

    /// Closes every socket of the VM (parked calls on them end with `badHandle`). The guest may
    /// open new ones afterwards (a restarted VM).
    public func closeAllSockets() { Self.closeAll(table, counters) }

    private static func closeAll(_ table: SocketTable, _ counters: Counters) {
        for socket in table.removeAll() {
            // Wakes any vCPU parked on it; the descriptor closes when the last user lets go.
            try? socket.backend.shutdown(socket.descriptor, how: 2)
            counters.closed.wrappingAdd(1, ordering: .relaxed)
        }
    }

    /// Sockets open now.
    public var openSocketCount: Int { table.count }

    /// The counters.
    public var statistics: SocketServiceStatistics {
        SocketServiceStatistics(
            deniedCalls: counters.denied.load(ordering: .relaxed), unexpectedHostErrors: counters.unexpected.load(ordering: .relaxed),
            sends: counters.sends.load(ordering: .relaxed), bytesSent: counters.bytesSent.load(ordering: .relaxed),
            receives: counters.receives.load(ordering: .relaxed), bytesReceived: counters.bytesReceived.load(ordering: .relaxed),
            socketsOpened: counters.opened.load(ordering: .relaxed), socketsClosed: counters.closed.load(ordering: .relaxed))
    }

    // MARK: The procedures

    /// Every `net.*` procedure, to register on a `VMRPCServer`.
    ///
    /// The ones that wait for the network (connect, accept, the receives, wait) are marked
    /// `blocking`: an exitless poller never runs them, it hands them to the vCPU's doorbell, so a
    /// receive is always a long poll on the vCPU's own thread. Sends and the other calls may be
    /// answered by the poller (a send that must wait for buffer space is handed over too).
    public var procedures: [VMRPCProcedure] {
        let inline = SocketWire.maximumInlinePayload
        return [
            .typed(id: SocketProcedureID.open, name: "net.open", argumentLength: 8...8, arguments: SocketOpenArguments.self) { [self] in open($1) },
            .typed(id: SocketProcedureID.close, name: "net.close", argumentLength: 8...8, arguments: SocketHandleArguments.self) { [self] in close($1) },
            .typed(id: SocketProcedureID.bind, name: "net.bind", argumentLength: 32...32, arguments: SocketBindArguments.self) { [self] in bind($1) },
            .typed(id: SocketProcedureID.connect, name: "net.connect", argumentLength: 40...40, blocking: true, arguments: SocketConnectArguments.self) { [self] in connect($1) },
            .typed(id: SocketProcedureID.listen, name: "net.listen", argumentLength: 16...16, arguments: SocketControlArguments.self) { [self] in listen($1) },
            .typed(id: SocketProcedureID.accept, name: "net.accept", argumentLength: 16...16, blocking: true, arguments: SocketAcceptArguments.self) { [self] in accept($1) },
            VMRPCProcedure(id: SocketProcedureID.send, name: "net.send", argumentLength: 32...(32 + inline)) { [self] _, bytes in
                do throws(VMRPCStatus) { return send(try SocketSendArguments.decode(bytes, withDestination: false)) } catch { return .failed(error) }
            },
            VMRPCProcedure(id: SocketProcedureID.sendTo, name: "net.sendTo", argumentLength: 56...(56 + inline)) { [self] _, bytes in
                do throws(VMRPCStatus) { return send(try SocketSendArguments.decode(bytes, withDestination: true)) } catch { return .failed(error) }
            },
            .typed(id: SocketProcedureID.receive, name: "net.receive", argumentLength: 32...32, blocking: true, arguments: SocketReceiveArguments.self) { [self] in receive($1, withSource: false) },
            .typed(id: SocketProcedureID.receiveFrom, name: "net.receiveFrom", argumentLength: 32...32, blocking: true, arguments: SocketReceiveArguments.self) { [self] in receive($1, withSource: true) },
            .typed(id: SocketProcedureID.shutdown, name: "net.shutdown", argumentLength: 16...16, arguments: SocketControlArguments.self) { [self] in shutdown($1) },
            .typed(id: SocketProcedureID.getSocketName, name: "net.getsockname", argumentLength: 8...8, arguments: SocketHandleArguments.self) { [self] in name($1, peer: false) },
            .typed(id: SocketProcedureID.getPeerName, name: "net.getpeername", argumentLength: 8...8, arguments: SocketHandleArguments.self) { [self] in name($1, peer: true) },
            .typed(id: SocketProcedureID.setOption, name: "net.setOption", argumentLength: 16...16, arguments: SocketControlArguments.self) { [self] in setOption($1) },
            .typed(id: SocketProcedureID.getOption, name: "net.getOption", argumentLength: 16...16, arguments: SocketControlArguments.self) { [self] in getOption($1) },
            .typed(id: SocketProcedureID.wait, name: "net.wait", argumentLength: 32...(16 + 16 * SocketWire.maximumWaitEntries), blocking: true, arguments: SocketWaitArguments.self) { [self] in wait($1) },
            .typed(id: SocketProcedureID.receiveBatch, name: "net.receiveBatch", argumentLength: 40...40, blocking: true, arguments: SocketBatchArguments.self) { [self] in receiveBatch($1) },
            .typed(id: SocketProcedureID.sendBatch, name: "net.sendBatch", argumentLength: 40...40, arguments: SocketBatchArguments.self) { [self] in sendBatch($1) },
        ]
    }

    // MARK: Helpers

    private func status(_ error: SocketErrno) -> SocketStatus {
        let status = error.status
        if status == .hostError { counters.unexpected.wrappingAdd(1, ordering: .relaxed) }
        return status
    }

    private func denied(_ reply: VMRPCReply) -> VMRPCReply {
        counters.denied.wrappingAdd(1, ordering: .relaxed)
        return reply
    }

    /// Whether `[address, address + length)` is wholly inside one region of guest memory.
    private func guestRangeIsValid(_ address: UInt64, _ length: Int) -> Bool {
        guard length > 0 else { return true }
        return (try? memory.withHostPointer(at: GuestAddress(address), length: UInt64(length)) { _ in }) != nil
    }

    private func deadline(_ timeout: UInt64) -> UInt64 {
        let now = dispatcher.clock.nowNanoseconds()
        let (sum, overflow) = now.addingReportingOverflow(min(timeout, policy.maximumBlockNanoseconds))
        return overflow ? UInt64.max : sum
    }

    /// What one attempt of a blocking operation did.
    private enum Attempt {
        case done(VMRPCReply)
        case wouldBlock
    }

    /// Runs `attempt`; if it would block and the timeout is not 0, parks the vCPU on the socket
    /// until `events` (or the deadline, or a cancellation), then tries again. A socket closed
    /// while the vCPU was parked answers `closed`.
    private func blocking(_ socket: HostSocket, handle: UInt64, events: Int16, timeout: UInt64,
                          wouldBlock: VMRPCReply, closed: VMRPCReply,
                          _ attempt: @escaping @Sendable () -> Attempt) -> VMRPCReply {
        if case .done(let reply) = attempt() { return reply }
        guard timeout > 0 else { return wouldBlock }
        let request = LongPollRequest(deadline: deadline(timeout), descriptors: [PollDescriptor(fd: socket.descriptor, events: events)])
        let table = self.table
        @Sendable func park() -> VMRPCReply {
            .wait(request) { result in
                switch result {
                case .descriptorsReady:
                    guard table.lookup(handle) === socket else { return closed }
                    if case .done(let reply) = attempt() { return reply }
                    return park() // readiness without data (another vCPU took it): wait on
                case .cancelled:
                    return .failed(.cancelled)
                case .interrupted:
                    return .failed(.interrupted)
                case .deadlineReached, .parkLimitReached, .hostMessage:
                    return .failed(.timedOut)
                }
            }
        }
        return park()
    }

    // MARK: Operations

    private func open(_ arguments: SocketOpenArguments) -> VMRPCReply {
        guard let family = SocketFamily(rawValue: arguments.family), let type = SocketType(rawValue: arguments.type) else {
            return .ok(SocketOpenResult(.invalidArgument))
        }
        guard policy.allowsOpen(family, type) else { return denied(.ok(SocketOpenResult(.denied))) }
        guard table.count < table.capacity else { return .ok(SocketOpenResult(.tooManySockets)) }
        let descriptor: Int32
        do throws(SocketErrno) { descriptor = try backend.open(family, type) } catch { return .ok(SocketOpenResult(status(error))) }
        let socket = HostSocket(descriptor: descriptor, family: family, type: type, backend: backend)
        guard let handle = table.insert(socket) else { return .ok(SocketOpenResult(.tooManySockets)) }
        counters.opened.wrappingAdd(1, ordering: .relaxed)
        return .ok(SocketOpenResult(.ok, handle: handle))
    }

    private func close(_ arguments: SocketHandleArguments) -> VMRPCReply {
        guard let socket = table.remove(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        try? backend.shutdown(socket.descriptor, how: 2) // wakes vCPUs parked on it
        counters.closed.wrappingAdd(1, ordering: .relaxed)
        return .ok(SocketResult(.ok))
    }

    private func bind(_ arguments: SocketBindArguments) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        guard let address = arguments.endpoint.address, address.family == socket.family else {
            return .ok(SocketResult(.invalidArgument))
        }
        guard policy.allowsBind(arguments.endpoint) else { return denied(.ok(SocketResult(.denied))) }
        do throws(SocketErrno) { try backend.bind(socket.descriptor, arguments.endpoint) } catch { return .ok(SocketResult(status(error))) }
        return .ok(SocketResult(.ok))
    }

    private func connect(_ arguments: SocketConnectArguments) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        guard let address = arguments.endpoint.address, address.family == socket.family else {
            return .ok(SocketResult(.invalidArgument))
        }
        guard policy.allowsRemote(arguments.endpoint) else { return denied(.ok(SocketResult(.denied))) }
        let backend = self.backend
        do throws(SocketErrno) {
            try backend.connect(socket.descriptor, arguments.endpoint)
            return .ok(SocketResult(.ok))
        } catch {
            guard error.status == .inProgress, socket.type == .stream else { return .ok(SocketResult(status(error))) }
        }
        // A TCP handshake under way: wait until the socket is writable, then read its error.
        guard arguments.timeoutNanoseconds > 0 else { return .ok(SocketResult(.inProgress)) }
        let request = LongPollRequest(deadline: deadline(arguments.timeoutNanoseconds),
                                      descriptors: [PollDescriptor(fd: socket.descriptor, events: Int16(POLLOUT))])
        let table = self.table, handle = arguments.handle
        return .wait(request) { result in
            switch result {
            case .descriptorsReady:
                guard table.lookup(handle) === socket else { return .ok(SocketResult(.badHandle)) }
                let error = (try? backend.getOption(socket.descriptor, .error)) ?? EIO
                return .ok(SocketResult(error == 0 ? .ok : SocketStatus(hostErrno: error)))
            case .cancelled: return .failed(.cancelled)
            case .interrupted: return .failed(.interrupted)
            case .deadlineReached, .parkLimitReached, .hostMessage: return .failed(.timedOut)
            }
        }
    }

    private func listen(_ arguments: SocketControlArguments) -> VMRPCReply {
        guard arguments.second == 0 else { return .failed(.badArguments) }
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        do throws(SocketErrno) {
            try backend.listen(socket.descriptor, backlog: Int32(min(arguments.first, SocketWire.maximumBacklog)))
        } catch {
            return .ok(SocketResult(status(error)))
        }
        return .ok(SocketResult(.ok))
    }

    private func accept(_ arguments: SocketAcceptArguments) -> VMRPCReply {
        guard let listener = table.lookup(arguments.handle) else { return .ok(SocketOpenResult(.badHandle, peer: SocketEndpoint.none)) }
        let backend = self.backend, table = self.table, counters = self.counters
        return blocking(listener, handle: arguments.handle, events: Int16(POLLIN), timeout: arguments.timeoutNanoseconds,
                        wouldBlock: .ok(SocketOpenResult(.wouldBlock, peer: SocketEndpoint.none)),
                        closed: .ok(SocketOpenResult(.badHandle, peer: SocketEndpoint.none))) {
            // Take a connection only when there is room for it, so none is accepted and dropped.
            guard table.count < table.capacity else { return .done(.ok(SocketOpenResult(.tooManySockets, peer: SocketEndpoint.none))) }
            let accepted: (descriptor: Int32, peer: SocketEndpoint)
            do throws(SocketErrno) { accepted = try backend.accept(listener.descriptor) } catch {
                if error.status == .wouldBlock { return .wouldBlock }
                return .done(.ok(SocketOpenResult(error.status, peer: SocketEndpoint.none)))
            }
            let socket = HostSocket(descriptor: accepted.descriptor, family: listener.family, type: listener.type, backend: backend)
            guard let handle = table.insert(socket) else { return .done(.ok(SocketOpenResult(.tooManySockets, peer: SocketEndpoint.none))) }
            counters.opened.wrappingAdd(1, ordering: .relaxed)
            return .done(.ok(SocketOpenResult(.ok, handle: handle, peer: accepted.peer)))
        }
    }

    private func send(_ arguments: SocketSendArguments) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        if let destination = arguments.destination {
            guard let address = destination.address, address.family == socket.family else { return .ok(SocketResult(.invalidArgument)) }
            guard policy.allowsRemote(destination) else { return denied(.ok(SocketResult(.denied))) }
        }
        guard Int(arguments.length) <= policy.maximumBytesPerCall else { return denied(.ok(SocketResult(.denied))) }
        var payload = arguments.payload
        if arguments.flags.contains(.guestBuffer) {
            // Read once into host memory; the guest may change its buffer meanwhile, we never look again.
            guard let copy = try? memory.readBytes(count: Int(arguments.length), at: GuestAddress(arguments.bufferAddress)) else {
                return .ok(SocketResult(.bufferOutOfRange))
            }
            payload = copy
        }
        let bytes = payload, destination = arguments.destination, backend = self.backend, counters = self.counters
        return blocking(socket, handle: arguments.handle, events: Int16(POLLOUT), timeout: arguments.timeoutNanoseconds,
                        wouldBlock: .ok(SocketResult(.wouldBlock)), closed: .ok(SocketResult(.badHandle))) {
            let sent: Int
            do throws(SocketErrno) { sent = try withBytes(bytes[...]) { (buffer) throws(SocketErrno) in try backend.send(socket.descriptor, buffer, to: destination) } } catch {
                if error.status == .wouldBlock { return .wouldBlock }
                return .done(.ok(SocketResult(error.status)))
            }
            counters.sends.wrappingAdd(1, ordering: .relaxed)
            counters.bytesSent.wrappingAdd(UInt64(sent), ordering: .relaxed)
            return .done(.ok(SocketResult(.ok, value: UInt32(sent))))
        }
    }

    private func receive(_ arguments: SocketReceiveArguments, withSource: Bool) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketReceiveResult(.badHandle)) }
        let capacity = Int(arguments.capacity)
        guard capacity <= policy.maximumBytesPerCall else { return denied(.ok(SocketReceiveResult(.denied))) }
        let toGuestBuffer = arguments.flags.contains(.guestBuffer)
        if toGuestBuffer, !guestRangeIsValid(arguments.bufferAddress, capacity) {
            return .ok(SocketReceiveResult(.bufferOutOfRange))
        }
        let backend = self.backend, memory = self.memory, counters = self.counters, address = arguments.bufferAddress
        return blocking(socket, handle: arguments.handle, events: Int16(POLLIN), timeout: arguments.timeoutNanoseconds,
                        wouldBlock: .ok(SocketReceiveResult(.wouldBlock)), closed: .ok(SocketReceiveResult(.badHandle))) {
            var buffer = [UInt8](repeating: 0, count: capacity)
            let received: SocketReceivedDatagram
            do throws(SocketErrno) { received = try withMutableBytes(&buffer) { (bytes) throws(SocketErrno) in try backend.receive(socket.descriptor, into: bytes) } } catch {
                if error.status == .wouldBlock { return .wouldBlock }
                return .done(.ok(SocketReceiveResult(error.status)))
            }
            counters.receives.wrappingAdd(1, ordering: .relaxed)
            counters.bytesReceived.wrappingAdd(UInt64(received.length), ordering: .relaxed)
            let data = Array(buffer.prefix(received.length))
            let source = withSource ? received.source : .none
            if toGuestBuffer {
                // Written only inside [address, address + capacity): length ≤ capacity.
                guard (try? memory.write(bytes: data, at: GuestAddress(address))) != nil else {
                    return .done(.ok(SocketReceiveResult(.bufferOutOfRange)))
                }
                return .done(.ok(SocketReceiveResult(.ok, length: UInt32(data.count), truncated: received.truncated, source: source)))
            }
            return .done(.ok(SocketReceiveResult(.ok, length: UInt32(data.count), truncated: received.truncated, source: source, payload: data)))
        }
    }

    private func shutdown(_ arguments: SocketControlArguments) -> VMRPCReply {
        guard arguments.second == 0 else { return .failed(.badArguments) }
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        guard arguments.first <= 2 else { return .ok(SocketResult(.invalidArgument)) }
        do throws(SocketErrno) { try backend.shutdown(socket.descriptor, how: Int32(arguments.first)) } catch { return .ok(SocketResult(status(error))) }
        return .ok(SocketResult(.ok))
    }

    private func name(_ arguments: SocketHandleArguments, peer: Bool) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketNameResult(.badHandle)) }
        do throws(SocketErrno) { return .ok(SocketNameResult(.ok, endpoint: try backend.name(socket.descriptor, peer: peer))) } catch {
            return .ok(SocketNameResult(status(error)))
        }
    }

    private func setOption(_ arguments: SocketControlArguments) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        guard let option = SocketOption(rawValue: arguments.first), option != .error,
              arguments.second <= UInt32(Int32.max) else { return .ok(SocketResult(.invalidArgument)) }
        switch option {
        case .priority where arguments.second > 6: return .ok(SocketResult(.notPermitted)) // 7+ needs CAP_NET_ADMIN
        case .tcpNoDelay where arguments.second > 1: return .ok(SocketResult(.invalidArgument))
        default: break
        }
        do throws(SocketErrno) { try backend.setOption(socket.descriptor, option, Int32(arguments.second)) } catch { return .ok(SocketResult(status(error))) }
        return .ok(SocketResult(.ok))
    }

    private func getOption(_ arguments: SocketControlArguments) -> VMRPCReply {
        guard arguments.second == 0 else { return .failed(.badArguments) }
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        guard let option = SocketOption(rawValue: arguments.first) else { return .ok(SocketResult(.invalidArgument)) }
        let value: Int32
        do throws(SocketErrno) { value = try backend.getOption(socket.descriptor, option) } catch { return .ok(SocketResult(status(error))) }
        if option == .error { return .ok(SocketResult(.ok, value: value == 0 ? 0 : SocketStatus(hostErrno: value).rawValue)) }
        return .ok(SocketResult(.ok, value: UInt32(clamping: max(value, 0))))
    }

    private func wait(_ arguments: SocketWaitArguments) -> VMRPCReply {
        let backend = self.backend, table = self.table, entries = arguments.entries
        let sockets = entries.map { table.lookup($0.handle) }
        let descriptors = zip(arguments.entries, sockets).compactMap { entry, socket -> PollDescriptor? in
            guard let socket else { return nil }
            var events: Int16 = 0
            if entry.events.contains(.readable) { events |= Int16(POLLIN) }
            if entry.events.contains(.writable) { events |= Int16(POLLOUT) }
            return PollDescriptor(fd: socket.descriptor, events: events)
        }
        @Sendable func look() -> [SocketEvents] {
            var ready = backend.readiness(descriptors).makeIterator()
            return zip(entries, sockets).map { entry, socket -> SocketEvents in
                guard let socket else { return .invalid }
                // Every socket found at the start has its result, in order: take it before
                // deciding, or a socket closed meanwhile would shift the later entries' results.
                guard let polled = ready.next(), table.lookup(entry.handle) === socket else { return .invalid }
                var events: SocketEvents = []
                if polled.returnedEvents & Int16(POLLIN) != 0 { events.insert(.readable) }
                if polled.returnedEvents & Int16(POLLOUT) != 0 { events.insert(.writable) }
                if polled.returnedEvents & Int16(POLLERR | POLLHUP) != 0 { events.insert(.error) }
                if polled.returnedEvents & Int16(POLLNVAL) != 0 { events.insert(.invalid) }
                return events
            }
        }
        let now = look()
        if now.contains(where: { !$0.isEmpty }) || arguments.timeoutNanoseconds == 0 { return .ok(SocketWaitResult(.ok, events: now)) }
        let request = LongPollRequest(deadline: deadline(arguments.timeoutNanoseconds), descriptors: descriptors)
        @Sendable func park() -> VMRPCReply {
            .wait(request) { result in
                switch result {
                case .descriptorsReady:
                    let events = look()
                    return events.contains(where: { !$0.isEmpty }) ? .ok(SocketWaitResult(.ok, events: events)) : park()
                case .cancelled: return .failed(.cancelled)
                case .interrupted: return .failed(.interrupted)
                case .deadlineReached, .parkLimitReached, .hostMessage: return .failed(.timedOut)
                }
            }
        }
        return park()
    }

    private func receiveBatch(_ arguments: SocketBatchArguments) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        guard socket.type == .datagram else { return .ok(SocketResult(.invalidArgument)) }
        let covered = arguments.coveredLength, stride = Int(arguments.stride), count = Int(arguments.count)
        guard covered <= policy.maximumBytesPerCall else { return denied(.ok(SocketResult(.denied))) }
        guard guestRangeIsValid(arguments.bufferAddress, covered) else { return .ok(SocketResult(.bufferOutOfRange)) }
        let backend = self.backend, memory = self.memory, counters = self.counters, address = arguments.bufferAddress
        let header = SocketWire.batchRecordHeaderSize
        return blocking(socket, handle: arguments.handle, events: Int16(POLLIN), timeout: arguments.timeoutNanoseconds,
                        wouldBlock: .ok(SocketResult(.wouldBlock)), closed: .ok(SocketResult(.badHandle))) {
            var buffer = [UInt8](repeating: 0, count: covered)
            let received: [SocketReceivedDatagram]
            do throws(SocketErrno) {
                received = try withMutableBytes(&buffer) { (bytes) throws(SocketErrno) in
                    try backend.receiveBatch(socket.descriptor, into: bytes, count: count, stride: stride,
                                             headerSize: header, capacity: stride - header)
                }
            } catch {
                if error.status == .wouldBlock { return .wouldBlock }
                return .done(.ok(SocketResult(error.status)))
            }
            var bytes: UInt64 = 0
            for (index, datagram) in received.enumerated() {
                var writer = VMRPCByteWriter()
                writer.append(UInt32(datagram.length)); writer.append(UInt32(datagram.truncated ? 1 : 0))
                datagram.source.encode(into: &writer)
                buffer.replaceSubrange(index * stride..<index * stride + header, with: writer.bytes)
                bytes += UInt64(datagram.length)
                // Record `index`'s header and payload only: inside [address, address + count·stride),
                // since index < count and header + length ≤ stride.
                let record = index * stride
                guard (try? memory.write(bytes: buffer[record..<record + header + datagram.length],
                                         at: GuestAddress(address + UInt64(record)))) != nil else {
                    return .done(.ok(SocketResult(.bufferOutOfRange)))
                }
            }
            counters.receives.wrappingAdd(UInt64(received.count), ordering: .relaxed)
            counters.bytesReceived.wrappingAdd(bytes, ordering: .relaxed)
            return .done(.ok(SocketResult(.ok, value: UInt32(received.count))))
        }
    }

    private func sendBatch(_ arguments: SocketBatchArguments) -> VMRPCReply {
        guard let socket = table.lookup(arguments.handle) else { return .ok(SocketResult(.badHandle)) }
        guard socket.type == .datagram else { return .ok(SocketResult(.invalidArgument)) }
        let covered = arguments.coveredLength, stride = Int(arguments.stride)
        guard covered <= policy.maximumBytesPerCall else { return denied(.ok(SocketResult(.denied))) }
        guard guestRangeIsValid(arguments.bufferAddress, covered) else { return .ok(SocketResult(.bufferOutOfRange)) }
        // Each record's header is read once into host memory and validated there; then its payload
        // (of the validated length) is read once. Nothing is read twice, nothing outside the records.
        let header = SocketWire.batchRecordHeaderSize
        var buffer = [UInt8](repeating: 0, count: covered)
        var datagrams: [SocketBatchDatagram] = []
        var refused = false
        for index in 0..<Int(arguments.count) {
            let start = index * stride
            let recordAddress = GuestAddress(arguments.bufferAddress + UInt64(start))
            guard let headerBytes = try? memory.readBytes(count: header, at: recordAddress) else {
                return .ok(SocketResult(.bufferOutOfRange))
            }
            let record: (length: UInt32, flags: UInt32, endpoint: SocketEndpoint)
            do throws(VMRPCStatus) {
                record = try withBytes(headerBytes[...]) { (bytes) throws(VMRPCStatus) in
                    var reader = VMRPCByteReader(bytes)
                    return (try reader.read(), try reader.read(), try SocketEndpoint(decoding: &reader))
                }
            } catch {
                return .failed(error)
            }
            guard record.flags == 0, Int(record.length) <= stride - header else { return .failed(.badArguments) }
            if let address = record.endpoint.address {
                guard address.family == socket.family else { return .ok(SocketResult(.invalidArgument)) }
                if !policy.allowsRemote(record.endpoint) { refused = true }
            }
            if record.length > 0 {
                guard let payload = try? memory.readBytes(count: Int(record.length), at: GuestAddress(recordAddress.rawValue + UInt64(header))) else {
                    return .ok(SocketResult(.bufferOutOfRange))
                }
                buffer.replaceSubrange(start + header..<start + header + payload.count, with: payload)
            }
            datagrams.append(SocketBatchDatagram(offset: start + header, length: Int(record.length),
                                                 destination: record.endpoint.address == nil ? nil : record.endpoint))
        }
        // One refused destination refuses the whole batch: nothing is sent.
        if refused { return denied(.ok(SocketResult(.denied))) }
        let backend = self.backend, counters = self.counters, records = datagrams, payloads = buffer
        return blocking(socket, handle: arguments.handle, events: Int16(POLLOUT), timeout: arguments.timeoutNanoseconds,
                        wouldBlock: .ok(SocketResult(.wouldBlock)), closed: .ok(SocketResult(.badHandle))) {
            let sent: Int
            do throws(SocketErrno) { sent = try withBytes(payloads[...]) { (bytes) throws(SocketErrno) in try backend.sendBatch(socket.descriptor, from: bytes, datagrams: records) } } catch {
                if error.status == .wouldBlock { return .wouldBlock }
                return .done(.ok(SocketResult(error.status)))
            }
            counters.sends.wrappingAdd(UInt64(sent), ordering: .relaxed)
            counters.bytesSent.wrappingAdd(records.prefix(sent).reduce(0) { $0 + UInt64($1.length) }, ordering: .relaxed)
            return .done(.ok(SocketResult(.ok, value: UInt32(sent))))
        }
    }
}

/// `withUnsafeBytes` with a typed error (the standard library's is `rethrows`, untyped).
func withBytes<R, E: Error>(_ bytes: ArraySlice<UInt8>, _ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
    // Sound: the pointer is used only inside `body`, while the slice is alive.
    let result: Result<R, E> = bytes.withUnsafeBytes { buffer in
        do throws(E) { return .success(try body(buffer)) } catch { return .failure(error) }
    }
    return try result.get()
}

/// `withUnsafeMutableBytes` with a typed error.
func withMutableBytes<R, E: Error>(_ bytes: inout [UInt8], _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
    // Sound: the pointer is used only inside `body`, while the array is alive and not otherwise accessed.
    let result: Result<R, E> = bytes.withUnsafeMutableBytes { buffer in
        do throws(E) { return .success(try body(buffer)) } catch { return .failure(error) }
    }
    return try result.get()
}
