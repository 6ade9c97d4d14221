import RTVirtCore
import RTVirtTesting
import VMRPC
import VMRPCSockets
import LongPoll

/// Runs the `net.*` procedures on guest-controlled bytes over an `InMemorySocketBackend` (no
/// real socket is opened): the input is a program of up to 96 operations — opens, binds, sends
/// and receives in the slot and through guest buffers, batches, waits, closes, with handles the
/// guest was given, stale ones and forged ones; raw argument bytes for any `net.*` id; datagrams
/// and connections arriving; VM stops and restarts; clock jumps. No real time passes.
///
/// Invariants, checked after every operation; a violation traps:
/// - every response has a known VMRPC status, and when it is `ok` a known socket status;
/// - guest memory changes only in the calling slot's response part and inside the guest buffer
///   the call named (decoded from the same argument bytes the host saw);
/// - nothing is ever sent to a destination the policy does not allow;
/// - the backend holds exactly the descriptors of the VM's open sockets (none after a stop).
public enum SocketsFuzzHarness {
    static let slotBase: UInt64 = 0x1000
    static let memorySize: UInt64 = 0x20000
    static let ports: [UInt16] = [7000, 7001, 80, 0]

    /// What one run did.
    public struct Report: Equatable, Sendable {
        /// Doorbells rung.
        public var calls = 0
        /// Calls answered `ok` with socket status `ok`.
        public var successfulCalls = 0
        /// Calls the policy refused.
        public var deniedCalls = 0
        /// Datagrams the backend saw sent.
        public var datagramsSent = 0
        /// An empty report.
        public init() {}
    }

    /// The policy of every run: binds 7000–7001 (and 0), sends to 198.18.0.0/24 ports 1–9999 and fd00:18::/64.
    public static var policy: SocketPolicy {
        var policy = SocketPolicy()
        policy.bindPorts = [7000...7001]
        policy.remotes = [SocketRemoteRule(prefix: IPPrefix("198.18.0.0/24")!, ports: 1...9999),
                          SocketRemoteRule(prefix: IPPrefix("fd00:18::/64")!)]
        policy.maximumOpenSockets = 8
        policy.maximumBytesPerCall = 16384
        return policy
    }

    static let destinations: [SocketEndpoint] = [
        SocketEndpoint(IPAddress("198.18.0.2")!, port: 9), SocketEndpoint(IPAddress("198.18.1.2")!, port: 9),
        SocketEndpoint(IPAddress("198.18.0.2")!, port: 10000), SocketEndpoint(IPAddress("fd00:18::2")!, port: 53),
        SocketEndpoint(IPAddress("fd00:19::2")!, port: 53), SocketEndpoint(IPAddress("127.0.0.1")!, port: 9), .none,
    ]

    /// Runs one input.
    @discardableResult
    public static func run(_ input: [UInt8]) -> Report {
        let memory = GuestMemoryMap()
        guard (try? memory.addRegion(at: GuestAddress(0), size: memorySize)) != nil else { return Report() }
        let clock = ManualClock(start: 1_000_000_000)
        let waiter = ManualClockWaiter(clock: clock, lateness: 10)
        let backend = InMemorySocketBackend()
        let counter = LockedValue<UInt32>(0)
        guard let dispatcher = try? LongPollDispatcher(vcpuCount: 2, clock: clock, waiter: waiter),
              let service = try? VMRPCSocketService(backend: backend, policy: policy, memory: memory, dispatcher: dispatcher,
                                                    handleGenerations: { counter.withLock { $0 &+= 0x9E37; return $0 } }),
              let server = try? VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: GuestAddress(slotBase), count: 2),
                                            dispatcher: dispatcher, procedures: service.procedures, completionContext: .endingThread)
        else { return Report() }
        var bytes = input.makeIterator()
        func next() -> UInt8 { bytes.next() ?? 0 }
        func next16() -> UInt16 { UInt16(next()) | UInt16(next()) << 8 }
        func next64() -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(next()) << (8 * $1) } }
        var handles: [UInt64] = []
        var report = Report()
        var sequence: UInt32 = 0

        func handle(_ selector: UInt8) -> UInt64 {
            if selector < 200, !handles.isEmpty { return handles[Int(selector) % handles.count] }
            return selector & 1 == 0 ? (handles.first ?? 1) ^ (1 << 33) : UInt64(selector) << 32 | UInt64(selector % 9)
        }

        func call(_ vcpu: Int, _ procedure: UInt32, _ arguments: [UInt8]) {
            let slot = slotBase + UInt64(vcpu) * 0x1000
            sequence &+= 1
            let header = VMRPCRequestHeader(procedure: procedure, sequence: sequence, argumentLength: UInt32(min(arguments.count, 1984)))
            try? memory.write(bytes: header.bytes, at: GuestAddress(slot))
            try? memory.write(bytes: arguments.prefix(1984), at: GuestAddress(slot + 64))
            let before = (try? memory.readBytes(count: Int(memorySize), at: GuestAddress(0))) ?? []
            let allowed = writableRange(procedure, Array(arguments.prefix(1984)))
            server.handleDoorbell(vcpu: vcpu)
            report.calls += 1
            let after = (try? memory.readBytes(count: Int(memorySize), at: GuestAddress(0))) ?? []
            for index in 0..<min(before.count, after.count) where before[index] != after[index] {
                let address = UInt64(index)
                let inResponse = address >= slot + 32 && address < slot + 0x1000
                let inBuffer = allowed.map { address >= $0.lowerBound && address < $0.upperBound } ?? false
                precondition(inResponse || inBuffer, "net.* wrote guest memory at \(address) outside the slot and the named buffer")
            }
            let response = (try? memory.readBytes(count: 32, at: GuestAddress(slot + 32))) ?? []
            let status = response.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
            precondition(VMRPCStatus(rawValue: status.status) != nil, "unknown VMRPC status \(status.status)")
            precondition(status.sequence == sequence, "the response is for another call")
            if status.status == VMRPCStatus.ok.rawValue {
                let results = (try? memory.readBytes(count: Int(status.resultLength), at: GuestAddress(slot + 2048))) ?? []
                precondition(results.count >= 8, "every net.* result starts with status and a value")
                let netStatus = UInt32(results[0]) | UInt32(results[1]) << 8 | UInt32(results[2]) << 16 | UInt32(results[3]) << 24
                precondition(SocketStatus(rawValue: netStatus) != nil, "unknown socket status \(netStatus)")
                if netStatus == 0 { report.successfulCalls += 1 }
                if netStatus == SocketStatus.denied.rawValue { report.deniedCalls += 1 }
                if procedure == SocketProcedureID.open || procedure == SocketProcedureID.accept, netStatus == 0,
                   let opened = try? SocketOpenResult.decode(results) {
                    handles.append(opened.handle)
                }
            }
            for sent in backend.sent {
                guard let destination = sent.destination else { continue }
                precondition(policy.allowsRemote(destination), "sent to \(destination), which the policy refuses")
            }
            precondition(backend.openDescriptors.count == service.openSocketCount, "descriptors and handles disagree")
        }

        for _ in 0..<96 {
            guard let opcode = bytes.next() else { break }
            let vcpu = Int(opcode >> 7)
            let flagsByte = next()
            let inBuffer = flagsByte & 1 == 1
            let address = UInt64(next16()) << 2 // anywhere in (and past) guest memory
            switch opcode % 12 {
            case 0:
                call(vcpu, SocketProcedureID.open, SocketOpenArguments(family: flagsByte & 2 == 0 ? 4 : 6, type: UInt16(next() % 3)).encoded)
            case 1:
                let family = flagsByte & 2 == 0 ? IPAddress.any(.ipv4) : IPAddress.any(.ipv6)
                call(vcpu, SocketProcedureID.bind, SocketBindArguments(handle: handle(next()), endpoint: SocketEndpoint(family, port: ports[Int(next()) % ports.count])).encoded)
            case 2:
                let destination = destinations[Int(next()) % destinations.count]
                let length = Int(next16() % 3000)
                let arguments = inBuffer
                    ? SocketSendArguments(handle: handle(next()), timeoutNanoseconds: UInt64(next()), destination: destination, bufferAddress: address, length: UInt32(length))
                    : SocketSendArguments(handle: handle(next()), timeoutNanoseconds: UInt64(next()), destination: destination,
                                          payload: Array(input.prefix(min(length, 1920))))
                call(vcpu, flagsByte & 4 == 0 ? SocketProcedureID.sendTo : SocketProcedureID.send, arguments.encoded)
            case 3:
                let arguments = SocketReceiveArguments(handle: handle(next()), timeoutNanoseconds: UInt64(next()) << 8,
                                                       capacity: UInt32(next16() % (inBuffer ? 5000 : 1921)), bufferAddress: inBuffer ? address : nil)
                call(vcpu, flagsByte & 4 == 0 ? SocketProcedureID.receiveFrom : SocketProcedureID.receive, arguments.encoded)
            case 4, 5:
                let stride = UInt32(max(5, next() % 64)) * 8
                let count = UInt32(next() % 9)
                let arguments = SocketBatchArguments(handle: handle(next()), timeoutNanoseconds: UInt64(next()), count: count,
                                                     bufferAddress: address, bufferLength: count * stride + UInt32(next() % 2), stride: stride)
                if opcode % 12 == 5 {
                    // A batch to send: records with destinations from the list.
                    var records: [SocketBatchRecord] = []
                    for _ in 0..<count {
                        records.append(SocketBatchRecord(endpoint: destinations[Int(next()) % destinations.count],
                                                         payload: Array(input.prefix(Int(next()) % Int(stride - 32)))))
                    }
                    try? memory.write(bytes: SocketBatchRecord.encode(records, stride: Int(stride)), at: GuestAddress(address))
                }
                call(vcpu, opcode % 12 == 4 ? SocketProcedureID.receiveBatch : SocketProcedureID.sendBatch, arguments.encoded)
            case 6:
                backend.deliver(Array(input.prefix(Int(next16() % 3000))), toPort: ports[Int(next()) % ports.count],
                                from: SocketEndpoint(IPAddress("198.18.0.9")!, port: 4000))
                backend.queueConnection(toPort: ports[Int(next()) % ports.count], from: SocketEndpoint(IPAddress("198.18.0.9")!, port: 4001))
            case 7:
                call(vcpu, SocketProcedureID.close, SocketHandleArguments(handle: handle(next())).encoded)
            case 8:
                let entries = (0..<Int(next() % 5) + 1).map { _ in SocketWaitEntry(handle: handle(next()), events: SocketEvents(rawValue: UInt32(next() % 4))) }
                call(vcpu, SocketProcedureID.wait, SocketWaitArguments(timeoutNanoseconds: UInt64(next()), entries: entries).encoded)
            case 9:
                // Raw bytes for any net.* id, including ids past the last one.
                let length = Int(next() % 128)
                var arguments = (0..<length).map { _ in next() }
                if arguments.count >= 8, flagsByte & 8 == 0 { arguments.replaceSubrange(0..<8, with: withUnsafeBytes(of: handle(next()).littleEndian, Array.init)) }
                call(vcpu, SocketProcedureID.open + UInt32(next() % 20), arguments)
            case 10:
                let procedure = [SocketProcedureID.listen, SocketProcedureID.accept, SocketProcedureID.connect, SocketProcedureID.shutdown,
                                 SocketProcedureID.setOption, SocketProcedureID.getOption, SocketProcedureID.getSocketName,
                                 SocketProcedureID.getPeerName][Int(next()) % 8]
                let target = handle(next())
                switch procedure {
                case SocketProcedureID.accept: call(vcpu, procedure, SocketAcceptArguments(handle: target, timeoutNanoseconds: UInt64(next())).encoded)
                case SocketProcedureID.connect:
                    call(vcpu, procedure, SocketConnectArguments(handle: target, timeoutNanoseconds: UInt64(next()),
                                                                 endpoint: destinations[Int(next()) % destinations.count]).encoded)
                case SocketProcedureID.getSocketName, SocketProcedureID.getPeerName: call(vcpu, procedure, SocketHandleArguments(handle: target).encoded)
                default: call(vcpu, procedure, SocketControlArguments(handle: target, UInt32(next() % 8), UInt32(next() % 9)).encoded)
                }
            default:
                if flagsByte & 2 == 0 {
                    dispatcher.close(vcpu: vcpu) // the VM stops: every socket closes
                    precondition(backend.openDescriptors.isEmpty, "a stopped VM keeps sockets open")
                    dispatcher.resume(vcpu: vcpu)
                } else {
                    clock.advance(by: UInt64(next()) << 16)
                }
            }
        }
        dispatcher.closeAll()
        precondition(backend.openDescriptors.isEmpty, "sockets left open after the VM stopped")
        report.datagramsSent = backend.sent.count
        return report
    }

    /// The guest memory a call may write besides its slot: the receive buffer it names.
    static func writableRange(_ procedure: UInt32, _ arguments: [UInt8]) -> Range<UInt64>? {
        switch procedure {
        case SocketProcedureID.receive, SocketProcedureID.receiveFrom:
            guard let decoded = try? SocketReceiveArguments.decode(arguments), decoded.flags.contains(.guestBuffer) else { return nil }
            return decoded.bufferAddress..<decoded.bufferAddress &+ UInt64(decoded.capacity)
        case SocketProcedureID.receiveBatch:
            guard let decoded = try? SocketBatchArguments.decode(arguments) else { return nil }
            return decoded.bufferAddress..<decoded.bufferAddress &+ UInt64(decoded.coveredLength)
        default:
            return nil
        }
    }
}
