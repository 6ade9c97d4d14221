import RTVirtCore
import Synchronization

/// Where the call slots are: vCPU `n` uses the 4096 bytes at `base + n * 4096`.
public struct VMRPCSlotLayout: Equatable, Sendable {
    /// Guest-physical address of vCPU 0's slot (page-aligned).
    public var base: GuestAddress
    /// Number of slots (vCPUs).
    public var count: Int

    /// A layout.
    public init(base: GuestAddress, count: Int) { self.base = base; self.count = count }

    /// The slot of `vcpu`, or nil when out of range.
    public func address(ofVCPU vcpu: Int) -> GuestAddress? {
        guard vcpu >= 0, vcpu < count else { return nil }
        return base.checkedAdding(UInt64(vcpu) * UInt64(VMRPCWire.slotSize))
    }
}

/// Limits that keep a hostile guest from costing the host more than a bounded amount.
public struct VMRPCLimits: Equatable, Sendable {
    /// Malformed calls a vCPU may make in a burst before its channel is marked broken.
    public var malformedCallBurst: Int = 1_000
    /// Malformed calls per second a vCPU may sustain (the bucket's refill rate).
    public var malformedCallsPerSecond: Int = 1_000
    /// Longest a `poll` may park a vCPU, nanoseconds.
    public var maximumPollNanoseconds: UInt64 = 1_000_000_000
    /// Reverse calls outstanding per vCPU.
    public var reverseCallsPerVCPU: Int = 64
    /// How many times one call may park its vCPU in a row.
    public var maximumWaitsPerCall: Int = 8

    /// The defaults.
    public init() {}
}

/// Counters of one vCPU's channel.
public struct VMRPCChannelStatistics: Equatable, Sendable {
    /// Doorbells rung.
    public var doorbells: UInt64
    /// Calls that reached a procedure.
    public var completedCalls: UInt64
    /// Calls rejected before reaching a procedure, by status.
    public var rejectedCalls: UInt64
    /// Calls that parked the vCPU.
    public var parkedCalls: UInt64
    /// Whether the channel is broken.
    public var broken: Bool
}

/// The host side of VMRPC: validates each call a guest makes through its slot, runs the
/// procedure (parking the vCPU through the long-poll dispatcher when it waits), and writes
/// the response. Also sends reverse calls into the guest through `poll`.
///
/// Everything the guest wrote is copied out of guest memory once and validated on the copy;
/// nothing is read twice. Each vCPU has its own channel: no lock is shared between vCPUs on
/// the call path. A malformed call is answered with an error status and counted; a vCPU that
/// keeps sending them has its channel marked broken and only ever gets `channelBroken`.
public final class VMRPCServer: Sendable {
    /// Guest memory holding the slots.
    public let memory: any GuestMemory
    /// Where the slots are.
    public let slots: VMRPCSlotLayout
    /// Parks vCPUs for blocking calls.
    public let dispatcher: LongPollDispatcher
    /// Features offered to the guest.
    public let features: VMRPCFeatures
    /// Limits.
    public let limits: VMRPCLimits
    private let procedures: [UInt32: VMRPCProcedure]
    private let channels: [Channel]

    final class Channel: Sendable {
        let doorbells = Atomic<UInt64>(0)
        let completed = Atomic<UInt64>(0)
        let rejected = Atomic<UInt64>(0)
        let parked = Atomic<UInt64>(0)
        let broken = Atomic<Bool>(false)
        let reverseCalls: ReverseCallTable
        /// Token bucket for malformed calls: (tokens, last refill in ns). Only this vCPU's thread uses it.
        let malformedBudget: Mutex<(tokens: Double, refilledAt: UInt64)>
        init(limits: VMRPCLimits, now: UInt64) {
            reverseCalls = ReverseCallTable(capacity: limits.reverseCallsPerVCPU)
            malformedBudget = Mutex((Double(limits.malformedCallBurst), now))
        }
    }

    /// A server for the slots in `slots`, with `procedures` (ids must be unique and not 0,
    /// `poll` or `reply`, which the server provides when `features` has `.reverseCalls`).
    public init(memory: any GuestMemory, slots: VMRPCSlotLayout, dispatcher: LongPollDispatcher,
                procedures: [VMRPCProcedure], features: VMRPCFeatures = .all,
                limits: VMRPCLimits = VMRPCLimits()) throws(VMRPCRegistrationError) {
        var table: [UInt32: VMRPCProcedure] = [:]
        for procedure in procedures {
            guard procedure.id != 0 else { throw .reservedID }
            guard procedure.id != VMRPCProcedureID.poll, procedure.id != VMRPCProcedureID.reply else { throw .builtInID(procedure.id) }
            guard table[procedure.id] == nil else { throw .duplicateID(procedure.id) }
            guard procedure.argumentLength.lowerBound >= 0, procedure.argumentLength.upperBound <= VMRPCWire.maximumArgumentLength else {
                throw .invalidArgumentLength(procedure.id)
            }
            table[procedure.id] = procedure
        }
        self.memory = memory
        self.slots = slots
        self.dispatcher = dispatcher
        self.features = features
        self.limits = limits
        let now = dispatcher.clock.nowNanoseconds()
        channels = (0..<slots.count).map { _ in Channel(limits: limits, now: now) }
        var withBuiltIns = table
        if features.contains(.reverseCalls) {
            withBuiltIns[VMRPCProcedureID.poll] = Self.pollProcedure(limits: limits, clock: dispatcher.clock)
        }
        self.procedures = withBuiltIns
    }

    /// The procedure ids the guest can call, ascending.
    public var procedureIDs: [UInt32] {
        (Array(procedures.keys) + (features.contains(.reverseCalls) ? [VMRPCProcedureID.reply] : [])).sorted()
    }

    /// A bus device that forwards doorbells (port or MMIO writes) to this server.
    public func makeDoorbell() -> VMRPCDoorbell { VMRPCDoorbell(server: self) }

    // MARK: Handling a call (on the calling vCPU's thread)

    /// Handles the call in `vcpu`'s slot. Returns when the response is written; a blocking
    /// procedure keeps the calling thread here until its event.
    public func handleDoorbell(vcpu: Int) {
        guard let slot = slots.address(ofVCPU: vcpu), channels.indices.contains(vcpu) else { return }
        let channel = channels[vcpu]
        channel.doorbells.wrappingAdd(1, ordering: .relaxed)

        // Fetch once: the whole header, then (below) the arguments, into host memory.
        var header = [UInt8](repeating: 0, count: VMRPCWire.responseOffset)
        guard (try? header.withUnsafeMutableBytes({ try memory.read(into: $0, at: slot) })) != nil else {
            channel.rejected.wrappingAdd(1, ordering: .relaxed)
            return // the slot is outside guest memory: nowhere to answer
        }
        let request = header.withUnsafeBytes { VMRPCRequestHeader(decoding: $0) }
        if channel.broken.load(ordering: .relaxed) {
            return respond(slot, status: .channelBroken, results: [], sequence: request.sequence)
        }
        let headerStatus = request.validate(hostFeatures: features)
        guard headerStatus == .ok else { return reject(channel, slot, headerStatus, request.sequence) }

        let isReply = request.procedure == VMRPCProcedureID.reply && features.contains(.reverseCalls)
        guard isReply || procedures[request.procedure] != nil else {
            return reject(channel, slot, .unknownProcedure, request.sequence)
        }
        let required = isReply ? VMRPCFeatures.reverseCalls : procedures[request.procedure]!.requiredFeatures
        guard VMRPCFeatures(rawValue: request.features).isSuperset(of: required) else {
            return reject(channel, slot, .unsupportedFeature, request.sequence)
        }
        let lengths = isReply ? 16...VMRPCWire.maximumArgumentLength : procedures[request.procedure]!.argumentLength
        guard lengths.contains(Int(request.argumentLength)) else {
            return reject(channel, slot, .badArgumentLength, request.sequence)
        }
        var arguments = [UInt8](repeating: 0, count: Int(request.argumentLength))
        if !arguments.isEmpty {
            guard let argumentsAddress = slot.checkedAdding(UInt64(VMRPCWire.argumentsOffset)),
                  (try? arguments.withUnsafeMutableBytes({ try memory.read(into: $0, at: argumentsAddress) })) != nil else {
                return reject(channel, slot, .badArgumentLength, request.sequence)
            }
        }
        let context = VMRPCCallContext(vcpuID: vcpu, sequence: request.sequence,
                                       features: VMRPCFeatures(rawValue: request.features))
        var reply = isReply ? handleReply(channel, arguments) : procedures[request.procedure]!.handler(context, arguments)
        var waits = 0
        while case let .wait(waitRequest, then) = reply {
            guard waits < limits.maximumWaitsPerCall else { reply = .failed(.internalError); break }
            waits += 1
            channel.parked.wrappingAdd(1, ordering: .relaxed)
            reply = then(dispatcher.wait(vcpu: vcpu, for: waitRequest))
        }
        guard case let .done(status, results) = reply else { return }
        channel.completed.wrappingAdd(1, ordering: .relaxed)
        guard results.count <= VMRPCWire.maximumResultLength else {
            return respond(slot, status: .internalError, results: [], sequence: request.sequence)
        }
        respond(slot, status: status, results: results, sequence: request.sequence)
    }

    private func reject(_ channel: Channel, _ slot: GuestAddress, _ status: VMRPCStatus, _ sequence: UInt32) {
        channel.rejected.wrappingAdd(1, ordering: .relaxed)
        let now = dispatcher.clock.nowNanoseconds()
        let exhausted = channel.malformedBudget.withLock { budget -> Bool in
            let elapsed = Double(now &- budget.refilledAt) / 1e9
            budget.tokens = min(Double(limits.malformedCallBurst), budget.tokens + elapsed * Double(limits.malformedCallsPerSecond))
            budget.refilledAt = now
            budget.tokens -= 1
            return budget.tokens < 0
        }
        if exhausted { channel.broken.store(true, ordering: .relaxed) }
        respond(slot, status: exhausted ? .channelBroken : status, results: [], sequence: sequence)
    }

    /// Writes results, then the response header; the status is part of the last write.
    private func respond(_ slot: GuestAddress, status: VMRPCStatus, results: [UInt8], sequence: UInt32) {
        if !results.isEmpty, let resultsAddress = slot.checkedAdding(UInt64(VMRPCWire.resultsOffset)) {
            try? memory.write(bytes: results, at: resultsAddress)
        }
        let response = VMRPCResponseHeader(status: status, resultLength: UInt32(results.count), sequence: sequence,
                                           hostFeatures: features)
        if let responseAddress = slot.checkedAdding(UInt64(VMRPCWire.responseOffset)) {
            try? memory.write(bytes: response.bytes, at: responseAddress)
        }
    }

    // MARK: Reverse calls

    private static func pollProcedure(limits: VMRPCLimits, clock: any MonotonicClock) -> VMRPCProcedure {
        .typed(id: VMRPCProcedureID.poll, name: "poll", argumentLength: 8...8, requiredFeatures: .reverseCalls,
               arguments: VMRPCPoll.self) { _, poll in
            let timeout = min(poll.timeoutNanoseconds, limits.maximumPollNanoseconds)
            let request = LongPollRequest(deadline: clock.nowNanoseconds() &+ timeout, acceptsHostMessages: true)
            return .wait(request) { result in
                switch result {
                case .hostMessage(let message):
                    return .ok(VMRPCReverseCallDelivery(callID: message.id, procedure: message.procedure, payload: message.payload))
                case .cancelled: return .failed(.cancelled)
                case .deadlineReached, .parkLimitReached, .descriptorsReady: return .failed(.timedOut)
                }
            }
        }
    }

    private func handleReply(_ channel: Channel, _ arguments: [UInt8]) -> VMRPCReply {
        let reply: VMRPCReplyArguments
        do { reply = try VMRPCReplyArguments.decode(arguments) } catch { return .failed(error) }
        guard let completion = channel.reverseCalls.take(reply.callID) else { return .failed(.noSuchCall) }
        completion(.success(VMRPCReverseCallReply(status: reply.status, payload: reply.payload)))
        return .done(status: .ok, results: [])
    }

    /// Sends a call into the guest on `vcpu`: it is delivered to the guest's next (or current)
    /// `poll` on that vCPU, and `completion` runs (on the vCPU's thread) when the guest replies,
    /// or with an error when the VM stops first.
    public func reverseCall(vcpu: Int, procedure: UInt32, payload: [UInt8],
                            completion: @escaping @Sendable (Result<VMRPCReverseCallReply, VMRPCReverseCallError>) -> Void) throws(VMRPCReverseCallError) {
        guard channels.indices.contains(vcpu) else { throw .noSuchVCPU(vcpu) }
        guard payload.count <= VMRPCReverseCallDelivery.maximumPayloadLength else { throw .payloadTooLarge(payload.count) }
        let channel = channels[vcpu]
        guard !channel.broken.load(ordering: .relaxed) else { throw .channelBroken(vcpu: vcpu) }
        guard let id = channel.reverseCalls.reserve(completion) else {
            throw .queueFull(vcpu: vcpu, capacity: channel.reverseCalls.capacity)
        }
        do {
            try dispatcher.post(HostMessage(id: id, procedure: procedure, payload: payload), to: vcpu)
        } catch {
            _ = channel.reverseCalls.take(id)
            switch error {
            case .queueFull(_, let capacity): throw .queueFull(vcpu: vcpu, capacity: capacity)
            case .noSuchVCPU: throw .noSuchVCPU(vcpu)
            case .closed: throw .vmStopped
            }
        }
    }

    /// `reverseCall` as an async function.
    public func reverseCall(vcpu: Int, procedure: UInt32, payload: [UInt8]) async throws(VMRPCReverseCallError) -> VMRPCReverseCallReply {
        let result: Result<VMRPCReverseCallReply, VMRPCReverseCallError> = await withCheckedContinuation { continuation in
            do throws(VMRPCReverseCallError) {
                try reverseCall(vcpu: vcpu, procedure: procedure, payload: payload) { continuation.resume(returning: $0) }
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        return try result.get()
    }

    /// Stops the server: cancels parked calls, stops queues and fails every outstanding
    /// reverse call with `.vmStopped`. Call when the VM stops.
    public func shutdown() {
        for (vcpu, channel) in channels.enumerated() {
            _ = dispatcher.close(vcpu: vcpu)
            for completion in channel.reverseCalls.takeAll() { completion(.failure(.vmStopped)) }
        }
    }

    /// Reverse calls outstanding for `vcpu`.
    public func outstandingReverseCalls(vcpu: Int) -> Int {
        channels.indices.contains(vcpu) ? channels[vcpu].reverseCalls.outstanding : 0
    }

    /// Counters of `vcpu`'s channel.
    public func statistics(vcpu: Int) -> VMRPCChannelStatistics? {
        guard channels.indices.contains(vcpu) else { return nil }
        let channel = channels[vcpu]
        return VMRPCChannelStatistics(
            doorbells: channel.doorbells.load(ordering: .relaxed), completedCalls: channel.completed.load(ordering: .relaxed),
            rejectedCalls: channel.rejected.load(ordering: .relaxed), parkedCalls: channel.parked.load(ordering: .relaxed),
            broken: channel.broken.load(ordering: .relaxed))
    }

    /// Clears a broken channel (the VMM decides when to trust the guest again).
    public func repairChannel(vcpu: Int) {
        guard channels.indices.contains(vcpu) else { return }
        channels[vcpu].broken.store(false, ordering: .relaxed)
        let now = dispatcher.clock.nowNanoseconds()
        channels[vcpu].malformedBudget.withLock { $0 = (Double(limits.malformedCallBurst), now) }
    }
}

/// A doorbell on the bus: any write rings the server for the writing vCPU; the value written
/// is ignored. Reads return 0.
public final class VMRPCDoorbell: BusDevice {
    /// The server it rings.
    public let server: VMRPCServer
    init(server: VMRPCServer) { self.server = server }
    public func read(_ access: BusAccess) -> UInt64 { 0 }
    public func write(_ access: BusAccess, value: UInt64) -> BusWriteResult {
        server.handleDoorbell(vcpu: access.vcpuID)
        return .handled
    }
}
