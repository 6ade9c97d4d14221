import Dispatch
import Logging
import Metrics
import LongPoll
import RTVirtCore
import Synchronization

/// Where each vCPU's call slot is: the VMM decides, the server checks it once when it is made
/// (every slot page-aligned, wholly inside guest memory, one per vCPU, no two the same).
public protocol VMRPCSlotPlacement: Sendable {
    /// The guest-physical address of `vcpu`'s 4096-byte slot, or nil when it has none.
    func address(ofVCPU vcpu: Int) -> GuestAddress?
}

/// Contiguous slots: vCPU `n` uses the 4096 bytes at `base + n * 4096`.
public struct VMRPCSlotLayout: VMRPCSlotPlacement, Equatable {
    /// Guest-physical address of vCPU 0's slot (page-aligned).
    public var base: GuestAddress
    /// Number of slots (vCPUs).
    public var count: Int

    /// A layout. `VMRPCServer` checks it against guest memory and its dispatcher.
    public init(base: GuestAddress, count: Int) { self.base = base; self.count = count }

    /// The slot of `vcpu`, or nil when out of range.
    public func address(ofVCPU vcpu: Int) -> GuestAddress? {
        guard vcpu >= 0, vcpu < count else { return nil }
        return base.checkedAdding(UInt64(vcpu) * UInt64(VMRPCWire.slotSize))
    }
}

/// Slots wherever the VMM puts them: one address per vCPU id.
public struct VMRPCSlotTable: VMRPCSlotPlacement, Equatable {
    /// The slot of each vCPU.
    public var addresses: [Int: GuestAddress]

    /// A table of slot addresses by vCPU id.
    public init(_ addresses: [Int: GuestAddress]) { self.addresses = addresses }

    /// The slot of `vcpu`, or nil when the table has none.
    public func address(ofVCPU vcpu: Int) -> GuestAddress? { addresses[vcpu] }
}

/// Limits that keep a hostile guest from costing the host more than a bounded amount.
public struct VMRPCLimits: Equatable, Sendable {
    /// Malformed calls a vCPU may make in a burst before its channel is marked broken (≥ 1).
    public var malformedCallBurst: Int = 1_000
    /// Malformed calls per second a vCPU may sustain (the bucket's refill rate, ≥ 0).
    public var malformedCallsPerSecond: Int = 1_000
    /// Longest a `poll` may park a vCPU, nanoseconds.
    public var maximumPollNanoseconds: UInt64 = 1_000_000_000
    /// Reverse calls outstanding per vCPU (1 ... 65535).
    public var reverseCallsPerVCPU: Int = 64
    /// How long a reverse call waits for the guest's reply when its caller gives no timeout.
    public var reverseCallTimeoutNanoseconds: UInt64 = 10_000_000_000
    /// How many times one call may park its vCPU in a row (≥ 1).
    public var maximumWaitsPerCall: Int = 8

    /// The longest timeout a reverse call may have: one day.
    public static let maximumReverseCallTimeoutNanoseconds: UInt64 = 86_400_000_000_000

    /// The defaults.
    public init() {}

    /// Throws `VMRPCConfigurationError.invalidLimit` for the first value out of range.
    public func validate() throws(VMRPCConfigurationError) {
        func check(_ valid: Bool, _ name: String, _ value: some BinaryInteger) throws(VMRPCConfigurationError) {
            guard valid else { throw .invalidLimit(name: name, value: "\(value)") }
        }
        try check(malformedCallBurst >= 1, "malformedCallBurst", malformedCallBurst)
        try check(malformedCallsPerSecond >= 0, "malformedCallsPerSecond", malformedCallsPerSecond)
        try check(maximumPollNanoseconds >= 1, "maximumPollNanoseconds", maximumPollNanoseconds)
        try check((1...ReverseCallTable.maximumCapacity).contains(reverseCallsPerVCPU), "reverseCallsPerVCPU", reverseCallsPerVCPU)
        try check((1...Self.maximumReverseCallTimeoutNanoseconds).contains(reverseCallTimeoutNanoseconds),
                  "reverseCallTimeoutNanoseconds", reverseCallTimeoutNanoseconds)
        try check(maximumWaitsPerCall >= 1, "maximumWaitsPerCall", maximumWaitsPerCall)
    }
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
    /// Responses whose results could not be written (answered `internal_error` instead).
    public var failedResponses: UInt64
    /// Whether the channel is broken.
    public var broken: Bool
}

/// Where the completions of reverse calls run.
public enum VMRPCCompletionContext: Sendable {
    /// Asynchronously on this queue; never on a vCPU's thread. The default is a serial queue
    /// of the server's own.
    case queue(DispatchQueue)
    /// On the thread that ended the call: the vCPU's thread for a guest's `reply`, the timer
    /// queue for a timeout, the stopping thread for a stop. Only for completions as cheap as
    /// resuming a continuation, and for deterministic tests.
    case endingThread
}

/// The host side of VMRPC: validates each call a guest makes through its slot, runs the
/// procedure (parking the vCPU through the long-poll dispatcher when it waits), and writes
/// the response. Also sends reverse calls into the guest through `poll`.
///
/// Everything the guest wrote is copied out of guest memory once and validated on the copy;
/// nothing is read twice. Each vCPU has its own channel: no lock is shared between vCPUs on
/// the call path. A malformed call is answered with an error status and counted; a vCPU that
/// keeps sending them has its channel marked broken and only ever gets `channelBroken`.
///
/// Every reverse call ends exactly once: with the guest's reply, its timeout, a cancellation,
/// or the VM's stop (the dispatcher closing the vCPU, `shutdown()`, or the server going away).
public final class VMRPCServer: Sendable {
    /// Guest memory holding the slots.
    public let memory: any GuestMemory
    /// Where the slots are.
    public let slots: any VMRPCSlotPlacement
    /// Each vCPU's slot, checked, by vCPU id.
    private let slotAddresses: [GuestAddress]
    /// Parks vCPUs for blocking calls.
    public let dispatcher: any LongPollWaiting
    /// Features offered to the guest.
    public let features: VMRPCFeatures
    /// Limits.
    public let limits: VMRPCLimits
    /// Where reverse-call completions run.
    public let completionContext: VMRPCCompletionContext
    private let procedures: [UInt32: VMRPCProcedure]
    private let channels: [Channel]
    private let timerQueue = DispatchQueue(label: "rtvirt.vmrpc.reverse-call-timeouts")
    private let unrouted = Atomic<UInt64>(0)
    private let closeToken: LongPollCloseHandlerToken
    private let logger: Logger

    final class Channel: Sendable {
        let doorbells = Atomic<UInt64>(0)
        let completed = Atomic<UInt64>(0)
        let rejected = Atomic<UInt64>(0)
        let parked = Atomic<UInt64>(0)
        let failedResponses = Atomic<UInt64>(0)
        let broken = Atomic<Bool>(false)
        let reverseCalls: ReverseCallTable
        /// Token bucket for malformed calls: (tokens, last refill in ns). Only this vCPU's thread uses it.
        let malformedBudget: LockedValue<(tokens: Double, refilledAt: UInt64)>
        let metrics: ChannelMetrics
        init(vcpu: Int, limits: VMRPCLimits, now: UInt64, metrics factory: any MetricsFactory) {
            reverseCalls = ReverseCallTable(capacity: limits.reverseCallsPerVCPU)
            malformedBudget = LockedValue((Double(limits.malformedCallBurst), now))
            metrics = ChannelMetrics(vcpu: vcpu, factory: factory)
        }
    }

    /// The swift-metrics of one vCPU's channel (dimension `vcpu`), created once.
    struct ChannelMetrics: Sendable {
        let doorbells, completed, rejected, broken: Counter
        let reverseCallOutcomes: [String: Counter]
        let park: Timer
        init(vcpu: Int, factory: any MetricsFactory) {
            let dimensions = [("vcpu", "\(vcpu)")]
            doorbells = Counter(label: "rtvirt_vmrpc_doorbells_total", dimensions: dimensions, factory: factory)
            completed = Counter(label: "rtvirt_vmrpc_calls_completed_total", dimensions: dimensions, factory: factory)
            rejected = Counter(label: "rtvirt_vmrpc_calls_rejected_total", dimensions: dimensions, factory: factory)
            broken = Counter(label: "rtvirt_vmrpc_channel_broken_total", dimensions: dimensions, factory: factory)
            park = Timer(label: "rtvirt_vmrpc_park_duration", dimensions: dimensions, factory: factory)
            var outcomes: [String: Counter] = [:]
            for outcome in ["replied", "timed_out", "cancelled", "vm_stopped"] {
                outcomes[outcome] = Counter(label: "rtvirt_vmrpc_reverse_calls_total", dimensions: dimensions + [("outcome", outcome)],
                                            factory: factory)
            }
            reverseCallOutcomes = outcomes
        }

        func reverseCallEnded(_ outcome: String) { reverseCallOutcomes[outcome]?.increment() }
    }

    /// What a procedure id leads to.
    private enum Route {
        case procedure(VMRPCProcedure)
        case poll
        case reply

        var argumentLength: ClosedRange<Int> {
            switch self {
            case .procedure(let procedure): return procedure.argumentLength
            case .poll: return 8...8
            case .reply: return 16...VMRPCWire.maximumArgumentLength
            }
        }

        var requiredFeatures: VMRPCFeatures {
            switch self {
            case .procedure(let procedure): return procedure.requiredFeatures
            case .poll, .reply: return .reverseCalls
            }
        }
    }

    /// A server for the vCPUs of `dispatcher` (ids `0 ..< dispatcher.vcpuCount`), each with its
    /// slot in `slots`, and `procedures` (ids must be unique and not 0, `poll` or `reply`, which
    /// the server provides when `features` has `.reverseCalls`).
    /// - Throws: `VMRPCConfigurationError` when a procedure, a slot (missing for a vCPU, not
    ///   page-aligned, not wholly inside guest memory, shared by two vCPUs) or a limit is
    ///   invalid. Nothing traps.
    public init(memory: any GuestMemory, slots: any VMRPCSlotPlacement, dispatcher: any LongPollWaiting,
                procedures: [VMRPCProcedure], features: VMRPCFeatures = .all,
                limits: VMRPCLimits = VMRPCLimits(),
                completionContext: VMRPCCompletionContext? = nil,
                logger: Logger = Logger(label: "rtvirt.vmrpc"),
                metrics: (any MetricsFactory)? = nil) throws(VMRPCConfigurationError) {
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
        try limits.validate()
        slotAddresses = try Self.validate(slots, memory: memory, dispatcher: dispatcher)
        self.memory = memory
        self.slots = slots
        self.dispatcher = dispatcher
        self.features = features
        self.limits = limits
        self.completionContext = completionContext ?? .queue(DispatchQueue(label: "rtvirt.vmrpc.reverse-call-completions"))
        self.procedures = table
        let now = dispatcher.clock.nowNanoseconds()
        let factory = metrics ?? MetricsSystem.factory
        let channels = slotAddresses.indices.map { Channel(vcpu: $0, limits: limits, now: now, metrics: factory) }
        self.logger = logger
        self.channels = channels
        // The VM stopping (the runner closing the vCPU) ends that vCPU's reverse calls.
        let context = self.completionContext
        closeToken = dispatcher.addCloseHandler { vcpu in
            guard channels.indices.contains(vcpu) else { return }
            for call in channels[vcpu].reverseCalls.endAll() {
                channels[vcpu].metrics.reverseCallEnded("vm_stopped")
                Self.complete(call.completion, with: .failure(.vmStopped), in: context)
            }
        }
    }

    private static func validate(_ slots: any VMRPCSlotPlacement, memory: any GuestMemory,
                                 dispatcher: any LongPollWaiting) throws(VMRPCConfigurationError) -> [GuestAddress] {
        var addresses: [GuestAddress] = []
        var taken: [GuestAddress: Int] = [:]
        for vcpu in 0..<dispatcher.vcpuCount {
            guard let address = slots.address(ofVCPU: vcpu) else { throw .vcpuWithoutSlot(vcpu: vcpu) }
            guard address.rawValue % UInt64(VMRPCWire.slotSize) == 0 else { throw .slotNotPageAligned(vcpu: vcpu, address) }
            guard (try? memory.withHostPointer(at: address, length: UInt64(VMRPCWire.slotSize), { _ in })) != nil else {
                throw .slotOutsideGuestMemory(vcpu: vcpu)
            }
            if let other = taken[address] { throw .sharedSlot(vcpu: vcpu, otherVCPU: other, address) }
            taken[address] = vcpu
            addresses.append(address)
        }
        return addresses
    }

    /// A server that goes away ends its reverse calls with `vmStopped`.
    deinit {
        dispatcher.removeCloseHandler(closeToken)
        for (vcpu, channel) in channels.enumerated() {
            for call in channel.reverseCalls.endAll() {
                channel.metrics.reverseCallEnded("vm_stopped")
                dispatcher.withdraw(messageID: call.id, from: vcpu)
                Self.complete(call.completion, with: .failure(.vmStopped), in: completionContext)
            }
        }
    }

    /// The procedure ids the guest can call, ascending.
    public var procedureIDs: [UInt32] {
        (Array(procedures.keys) + (features.contains(.reverseCalls) ? [VMRPCProcedureID.poll, VMRPCProcedureID.reply] : [])).sorted()
    }

    /// A bus device that forwards doorbells (port or MMIO writes) to this server.
    public func makeDoorbell() -> VMRPCDoorbell { VMRPCDoorbell(server: self) }

    /// Puts this server's doorbell on `bus`: at `port` (one port), and at `mmio` (4 bytes, an
    /// address without guest memory) when given and the server offers `mmioDoorbell`.
    /// - Throws: `BusError` when a range is taken.
    public func registerDoorbell(on bus: inout IOBus, port: UInt16?, mmio: GuestAddress? = nil) throws(BusError) {
        let doorbell = makeDoorbell()
        if let port { try bus.register(doorbell, space: .port, base: UInt64(port), length: 1) }
        if let mmio, features.contains(.mmioDoorbell) { try bus.register(doorbell, space: .mmio, base: mmio.rawValue, length: 4) }
    }

    private func route(_ procedure: UInt32) -> Route? {
        if features.contains(.reverseCalls) {
            if procedure == VMRPCProcedureID.poll { return .poll }
            if procedure == VMRPCProcedureID.reply { return .reply }
        }
        return procedures[procedure].map { .procedure($0) }
    }

    // MARK: Handling a call (on the calling vCPU's thread)

    /// Handles the call in `vcpu`'s slot. Returns when the response is written; a blocking
    /// procedure keeps the calling thread here until its event. A doorbell from a vCPU without
    /// a slot is counted (`unroutedDoorbells`) and otherwise ignored: there is nowhere to answer.
    public func handleDoorbell(vcpu: Int) {
        guard slotAddresses.indices.contains(vcpu) else {
            unrouted.wrappingAdd(1, ordering: .relaxed)
            return
        }
        let slot = slotAddresses[vcpu], channel = channels[vcpu]
        channel.doorbells.wrappingAdd(1, ordering: .relaxed)
        channel.metrics.doorbells.increment()

        // Fetch once: the whole header, then (below) the arguments, into host memory.
        var header = [UInt8](repeating: 0, count: VMRPCWire.responseOffset)
        guard (try? header.withUnsafeMutableBytes({ try memory.read(into: $0, at: slot) })) != nil else {
            channel.rejected.wrappingAdd(1, ordering: .relaxed)
            return // guest memory no longer holds the slot: nowhere to answer
        }
        let request = header.withUnsafeBytes { VMRPCRequestHeader(decoding: $0) }
        if channel.broken.load(ordering: .relaxed) {
            return respond(channel, slot, status: .channelBroken, results: [], sequence: request.sequence)
        }
        let headerStatus = request.validate(hostFeatures: features)
        guard headerStatus == .ok else { return reject(channel, slot, headerStatus, request.sequence) }
        guard let route = route(request.procedure) else {
            return reject(channel, slot, .unknownProcedure, request.sequence)
        }
        guard VMRPCFeatures(rawValue: request.features).isSuperset(of: route.requiredFeatures) else {
            return reject(channel, slot, .unsupportedFeature, request.sequence)
        }
        guard route.argumentLength.contains(Int(request.argumentLength)) else {
            return reject(channel, slot, .badArgumentLength, request.sequence)
        }
        var arguments = [UInt8](repeating: 0, count: Int(request.argumentLength))
        if !arguments.isEmpty {
            guard let argumentsAddress = slot.checkedAdding(UInt64(VMRPCWire.argumentsOffset)),
                  (try? arguments.withUnsafeMutableBytes({ try memory.read(into: $0, at: argumentsAddress) })) != nil else {
                return reject(channel, slot, .badArgumentLength, request.sequence)
            }
        }
        var reply: VMRPCReply
        switch route {
        case .procedure(let procedure):
            let context = VMRPCCallContext(vcpuID: vcpu, sequence: request.sequence,
                                           features: VMRPCFeatures(rawValue: request.features))
            reply = procedure.handler(context, arguments)
        case .poll:
            reply = poll(channel, arguments)
        case .reply:
            // A reply that names no call delivered to this vCPU is malformed: it is counted
            // against the channel's budget, so guessing ids breaks the channel.
            if let status = handleReply(channel, arguments) { return reject(channel, slot, status, request.sequence) }
            reply = .done(status: .ok, results: [])
        }
        var waits = 0
        let interruptible = VMRPCFeatures(rawValue: request.features).contains(.interruptible)
        while case let .wait(waitRequest, then) = reply {
            guard waits < limits.maximumWaitsPerCall else { reply = .failed(.internalError); break }
            waits += 1
            channel.parked.wrappingAdd(1, ordering: .relaxed)
            var parkRequest = waitRequest
            parkRequest.interruptible = interruptible
            let parkedAt = dispatcher.clock.nowNanoseconds()
            let result = dispatcher.wait(vcpu: vcpu, for: parkRequest)
            channel.metrics.park.recordNanoseconds(Int64(clamping: dispatcher.clock.nowNanoseconds() &- parkedAt))
            // The VMM has an interrupt for this vCPU: abandon the call (the procedure took
            // nothing yet) and let the guest take the interrupt and call again.
            reply = result == .interrupted ? .failed(.interrupted) : then(result)
        }
        guard case let .done(status, results) = reply else { return }
        channel.completed.wrappingAdd(1, ordering: .relaxed)
        channel.metrics.completed.increment()
        guard results.count <= VMRPCWire.maximumResultLength else {
            return respond(channel, slot, status: .internalError, results: [], sequence: request.sequence)
        }
        respond(channel, slot, status: status, results: results, sequence: request.sequence)
    }

    private func reject(_ channel: Channel, _ slot: GuestAddress, _ status: VMRPCStatus, _ sequence: UInt32) {
        channel.rejected.wrappingAdd(1, ordering: .relaxed)
        channel.metrics.rejected.increment()
        let now = dispatcher.clock.nowNanoseconds()
        let exhausted = channel.malformedBudget.withLock { budget -> Bool in
            let elapsed = Double(now &- budget.refilledAt) / 1e9
            budget.tokens = min(Double(limits.malformedCallBurst), budget.tokens + elapsed * Double(limits.malformedCallsPerSecond))
            budget.refilledAt = now
            budget.tokens -= 1
            return budget.tokens < 0
        }
        if exhausted, !channel.broken.exchange(true, ordering: .relaxed) {
            channel.metrics.broken.increment()
            logger.warning("VMRPC channel broken: too many malformed calls", metadata: ["vcpu": "\(channels.firstIndex { $0 === channel } ?? -1)"])
        }
        respond(channel, slot, status: exhausted ? .channelBroken : status, results: [], sequence: sequence)
    }

    /// Writes results, then the response header; the status is part of the last write. When
    /// the results cannot be written the call is answered `internal_error` without results.
    private func respond(_ channel: Channel, _ slot: GuestAddress, status: VMRPCStatus, results: [UInt8], sequence: UInt32) {
        var status = status, resultLength = results.count
        if !results.isEmpty {
            let written = slot.checkedAdding(UInt64(VMRPCWire.resultsOffset))
                .map { (try? memory.write(bytes: results, at: $0)) != nil } ?? false
            if !written {
                channel.failedResponses.wrappingAdd(1, ordering: .relaxed)
                status = .internalError
                resultLength = 0
            }
        }
        let response = VMRPCResponseHeader(status: status, resultLength: UInt32(resultLength), sequence: sequence,
                                           hostFeatures: features)
        let written = slot.checkedAdding(UInt64(VMRPCWire.responseOffset))
            .map { (try? memory.write(bytes: response.bytes, at: $0)) != nil } ?? false
        if !written { channel.failedResponses.wrappingAdd(1, ordering: .relaxed) }
    }

    // MARK: Reverse calls: the guest's side

    /// `poll`: parks until a reverse call for this vCPU is queued, or the timeout.
    private func poll(_ channel: Channel, _ arguments: [UInt8]) -> VMRPCReply {
        let poll: VMRPCPoll
        do { poll = try VMRPCPoll.decode(arguments) } catch { return .failed(error) }
        let timeout = min(poll.timeoutNanoseconds, limits.maximumPollNanoseconds)
        return awaitDelivery(channel, LongPollRequest(deadline: dispatcher.clock.nowNanoseconds() &+ timeout,
                                                      acceptsHostMessages: true))
    }

    private func awaitDelivery(_ channel: Channel, _ request: LongPollRequest) -> VMRPCReply {
        .wait(request) { [self] result in
            switch result {
            case .hostMessage(let message):
                // A call that ended while its message was queued is not handed out: wait on.
                guard channel.reverseCalls.deliver(message.id) else { return awaitDelivery(channel, request) }
                return .ok(VMRPCReverseCallDelivery(callID: message.id, procedure: message.procedure, payload: message.payload))
            case .cancelled: return .failed(.cancelled)
            case .interrupted: return .failed(.interrupted)
            case .deadlineReached, .parkLimitReached, .descriptorsReady: return .failed(.timedOut)
            }
        }
    }

    /// `reply`: answers a delivered call. Returns the status to reject the call with, or nil.
    private func handleReply(_ channel: Channel, _ arguments: [UInt8]) -> VMRPCStatus? {
        let reply: VMRPCReplyArguments
        do { reply = try VMRPCReplyArguments.decode(arguments) } catch { return error }
        guard let completion = channel.reverseCalls.answer(reply.callID) else { return .noSuchCall }
        channel.metrics.reverseCallEnded("replied")
        Self.complete(completion, with: .success(VMRPCReverseCallReply(status: reply.status, payload: reply.payload)),
                      in: completionContext)
        return nil
    }

    // MARK: Reverse calls: the host's side

    /// Sends a call into the guest on `vcpu`: it is delivered to the guest's next (or current)
    /// `poll` on that vCPU, and ends with the guest's `reply`, after `timeoutNanoseconds`
    /// (default `limits.reverseCallTimeoutNanoseconds`) with `.timedOut`, on
    /// `cancelReverseCall` with `.cancelled`, or when the VM stops with `.vmStopped`.
    ///
    /// If this throws, `completion` never runs. Otherwise it runs exactly once, with the one
    /// outcome, in `completionContext`.
    @discardableResult
    public func reverseCall(vcpu: Int, procedure: UInt32, payload: [UInt8], timeoutNanoseconds: UInt64? = nil,
                            completion: @escaping @Sendable (Result<VMRPCReverseCallReply, VMRPCReverseCallError>) -> Void)
        throws(VMRPCReverseCallError) -> VMRPCReverseCallHandle {
        guard channels.indices.contains(vcpu) else { throw .noSuchVCPU(vcpu) }
        guard payload.count <= VMRPCReverseCallDelivery.maximumPayloadLength else { throw .payloadTooLarge(payload.count) }
        let timeout = timeoutNanoseconds ?? limits.reverseCallTimeoutNanoseconds
        guard (1...VMRPCLimits.maximumReverseCallTimeoutNanoseconds).contains(timeout) else {
            throw .invalidTimeout(nanoseconds: timeout)
        }
        let channel = channels[vcpu]
        guard !channel.broken.load(ordering: .relaxed) else { throw .channelBroken(vcpu: vcpu) }
        guard let id = channel.reverseCalls.reserve(completion) else {
            throw .queueFull(vcpu: vcpu, capacity: channel.reverseCalls.capacity)
        }
        let handle = VMRPCReverseCallHandle(vcpu: vcpu, callID: id)
        armTimeout(handle, channel, nanoseconds: timeout)
        do {
            try dispatcher.post(HostMessage(id: id, procedure: procedure, payload: payload), to: vcpu)
        } catch {
            // Nobody saw the message. If the call is still only reserved, no outcome exists
            // yet: free it and throw. If it ended meanwhile (a stop, a timeout, a cancel), its
            // completion has that outcome already: do not throw a second one.
            guard channel.reverseCalls.release(id) else { return handle }
            switch error {
            case .queueFull(_, let capacity): throw .queueFull(vcpu: vcpu, capacity: capacity)
            case .noSuchVCPU: throw .noSuchVCPU(vcpu)
            case .closed: throw .vmStopped
            }
        }
        if channel.reverseCalls.markQueued(id) == .ended {
            dispatcher.withdraw(messageID: id, from: vcpu) // the call ended before its message was queued
        }
        return handle
    }

    /// `reverseCall` as an async function. Cancelling the task ends the call with `.cancelled`.
    public func reverseCall(vcpu: Int, procedure: UInt32, payload: [UInt8],
                            timeoutNanoseconds: UInt64? = nil) async throws(VMRPCReverseCallError) -> VMRPCReverseCallReply {
        let started = LockedValue<(handle: VMRPCReverseCallHandle?, cancelled: Bool)>((nil, false))
        let result: Result<VMRPCReverseCallReply, VMRPCReverseCallError> = await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                do throws(VMRPCReverseCallError) {
                    let handle = try reverseCall(vcpu: vcpu, procedure: procedure, payload: payload,
                                                 timeoutNanoseconds: timeoutNanoseconds) { continuation.resume(returning: $0) }
                    let cancelledAlready = started.withLock { state in
                        state.handle = handle
                        return state.cancelled
                    }
                    if cancelledAlready { cancelReverseCall(handle) }
                } catch {
                    continuation.resume(returning: .failure(error)) // the completion never runs
                }
            }
        } onCancel: {
            let handle = started.withLock { state in
                state.cancelled = true
                return state.handle
            }
            if let handle { cancelReverseCall(handle) }
        }
        return try result.get()
    }

    /// Ends a reverse call with `.cancelled`. Returns false when it had already ended.
    @discardableResult
    public func cancelReverseCall(_ handle: VMRPCReverseCallHandle) -> Bool {
        end(handle, with: .cancelled)
    }

    private func end(_ handle: VMRPCReverseCallHandle, with error: VMRPCReverseCallError) -> Bool {
        guard channels.indices.contains(handle.vcpu),
              let completion = channels[handle.vcpu].reverseCalls.end(handle.callID) else { return false }
        channels[handle.vcpu].metrics.reverseCallEnded(error == .timedOut ? "timed_out" : "cancelled")
        if error == .timedOut {
            logger.notice("reverse call timed out", metadata: ["vcpu": "\(handle.vcpu)", "call": "\(handle.callID)"])
        }
        dispatcher.withdraw(messageID: handle.callID, from: handle.vcpu)
        Self.complete(completion, with: .failure(error), in: completionContext)
        return true
    }

    private func armTimeout(_ handle: VMRPCReverseCallHandle, _ channel: Channel, nanoseconds: UInt64) {
        let timer = DispatchSource.makeTimerSource(queue: timerQueue)
        timer.schedule(deadline: .now() + .nanoseconds(Int(clamping: nanoseconds)))
        timer.setEventHandler { [weak self] in _ = self?.end(handle, with: .timedOut) }
        timer.activate()
        if !channel.reverseCalls.attach(timer: ReverseCallTable.TimeoutTimer(timer), to: handle.callID) { timer.cancel() }
    }

    private static func complete(_ completion: @escaping ReverseCallTable.Completion,
                                 with outcome: Result<VMRPCReverseCallReply, VMRPCReverseCallError>,
                                 in context: VMRPCCompletionContext) {
        switch context {
        case .queue(let queue): queue.async { completion(outcome) }
        case .endingThread: completion(outcome)
        }
    }

    /// Stops the server: closes its vCPUs on the dispatcher (cancelling parked calls and
    /// dropping queued messages) and ends every outstanding reverse call with `.vmStopped`.
    /// `VirtualMachineRunner.stop()` has the same effect on the reverse calls.
    public func shutdown() {
        for (vcpu, channel) in channels.enumerated() {
            dispatcher.closeVCPU(vcpu)
            for call in channel.reverseCalls.endAll() {
                channel.metrics.reverseCallEnded("vm_stopped")
                Self.complete(call.completion, with: .failure(.vmStopped), in: completionContext)
            }
        }
    }

    /// Reverse calls outstanding for `vcpu`.
    public func outstandingReverseCalls(vcpu: Int) -> Int {
        channels.indices.contains(vcpu) ? channels[vcpu].reverseCalls.outstanding : 0
    }

    /// Doorbells from vCPUs that have no slot in the layout (ignored).
    public var unroutedDoorbells: UInt64 { unrouted.load(ordering: .relaxed) }

    /// Counters of `vcpu`'s channel.
    public func statistics(vcpu: Int) -> VMRPCChannelStatistics? {
        guard channels.indices.contains(vcpu) else { return nil }
        let channel = channels[vcpu]
        return VMRPCChannelStatistics(
            doorbells: channel.doorbells.load(ordering: .relaxed), completedCalls: channel.completed.load(ordering: .relaxed),
            rejectedCalls: channel.rejected.load(ordering: .relaxed), parkedCalls: channel.parked.load(ordering: .relaxed),
            failedResponses: channel.failedResponses.load(ordering: .relaxed), broken: channel.broken.load(ordering: .relaxed))
    }

    /// Clears a broken channel (the VMM decides when to trust the guest again).
    public func repairChannel(vcpu: Int) {
        guard channels.indices.contains(vcpu) else { return }
        logger.info("VMRPC channel repaired", metadata: ["vcpu": "\(vcpu)"])
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
