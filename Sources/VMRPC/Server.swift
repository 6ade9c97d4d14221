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
    /// Whether the channel is broken (and so doorbell-only: the poller no longer reads its slot).
    public var broken: Bool
    /// Posted calls the exitless poller answered (no exit).
    public var exitlessCalls: UInt64
    /// Posted calls a doorbell took (the poller was asleep, or slower than the guest's spin).
    public var postedDoorbellCalls: UInt64
    /// Doorbells that found the posted call already answered by the poller (nothing written).
    public var lateDoorbells: UInt64
    /// Posted calls the poller handed to the doorbell (blocking procedures).
    public var handoffs: UInt64
    /// Handed-over calls the guest abandoned by posting again instead of ringing (malformed).
    public var abandonedHandoffs: UInt64
    /// Whether a handed-over call waits for the vCPU's doorbell now.
    public var awaitingDoorbell: Bool
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
///
/// With the `exitless` feature (offered by default) a guest may post a call in its slot's
/// control area instead of ringing; a `VMRPCPoller` attached to the server answers it without an
/// exit, through `serveExitless(vcpu:)`, with the same validation. Without a poller, or while it
/// sleeps, `needs_doorbell` tells the guest to ring, and the doorbell takes the posted call.
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
        /// The slot, and its control words (checked to lie in guest memory when the server was made).
        let slot: GuestAddress
        let postedAddress: GuestAddress
        let completedAddress: GuestAddress
        let needsDoorbellAddress: GuestAddress
        let doorbells = Atomic<UInt64>(0)
        let completed = Atomic<UInt64>(0)
        let rejected = Atomic<UInt64>(0)
        let parked = Atomic<UInt64>(0)
        let failedResponses = Atomic<UInt64>(0)
        let broken = Atomic<Bool>(false)
        let exitlessCalls = Atomic<UInt64>(0)
        let postedDoorbellCalls = Atomic<UInt64>(0)
        let lateDoorbells = Atomic<UInt64>(0)
        let handoffs = Atomic<UInt64>(0)
        let abandonedHandoffs = Atomic<UInt64>(0)
        /// A handed-over call waits for its doorbell (mirrors `serving`'s value, for lock-free
        /// reads; stored only while `serving` is held, so it never disagrees with it for long).
        let handoffPending = Atomic<Bool>(false)
        /// The vCPU's doorbell is serving a call of this slot (it may be parked in it for
        /// seconds): the poller leaves the slot alone meanwhile, and a `posted` word that another
        /// vCPU wrote into it does not keep the poller awake. Stored only while `serving` is held.
        let inDoorbell = Atomic<Bool>(false)
        /// Held while a call of this slot is served: the doorbell path waits for it, the poller
        /// only tries. It holds the call handed over to the next doorbell, if any.
        let serving = LockedValue<Handoff?>(nil)
        /// Serializes the stores of `needs_doorbell`; holds the value last stored. (Not a
        /// `LockedValue<Void>`: ThreadSanitizer reports the access to an empty payload at the
        /// object's address, where other threads read the class metadata, as a race.)
        let publication = LockedValue<UInt32>(0)
        let reverseCalls: ReverseCallTable
        /// Token bucket for malformed calls: (tokens, last refill in ns).
        let malformedBudget: LockedValue<(tokens: Double, refilledAt: UInt64)>
        let metrics: ChannelMetrics
        init(vcpu: Int, slot: GuestAddress, limits: VMRPCLimits, now: UInt64, metrics factory: any MetricsFactory) {
            self.slot = slot
            metrics = ChannelMetrics(vcpu: vcpu, factory: factory)
            // The slot lies inside guest memory (checked), so these offsets do not overflow.
            postedAddress = GuestAddress(slot.rawValue + UInt64(VMRPCWire.postedOffset))
            completedAddress = GuestAddress(slot.rawValue + UInt64(VMRPCWire.completedOffset))
            needsDoorbellAddress = GuestAddress(slot.rawValue + UInt64(VMRPCWire.needsDoorbellOffset))
            reverseCalls = ReverseCallTable(capacity: limits.reverseCallsPerVCPU)
            malformedBudget = LockedValue((Double(limits.malformedCallBurst), now))
        }
    }

    /// The swift-metrics of one vCPU's channel (dimension `vcpu`), created once.
    struct ChannelMetrics: Sendable {
        let doorbells, completed, rejected, broken, exitless: Counter
        let reverseCallOutcomes: [String: Counter]
        let park: Timer
        init(vcpu: Int, factory: any MetricsFactory) {
            let dimensions = [("vcpu", "\(vcpu)")]
            doorbells = Counter(label: "rtvirt_vmrpc_doorbells_total", dimensions: dimensions, factory: factory)
            completed = Counter(label: "rtvirt_vmrpc_calls_completed_total", dimensions: dimensions, factory: factory)
            rejected = Counter(label: "rtvirt_vmrpc_calls_rejected_total", dimensions: dimensions, factory: factory)
            broken = Counter(label: "rtvirt_vmrpc_channel_broken_total", dimensions: dimensions, factory: factory)
            exitless = Counter(label: "rtvirt_vmrpc_exitless_calls_total", dimensions: dimensions, factory: factory)
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

    /// The exitless poller the server is linked to.
    struct PollerLink: Sendable {
        let id: ObjectIdentifier
        let wake: @Sendable () -> Void
        let detach: @Sendable () -> Void
    }
    private let pollerLink = LockedValue<PollerLink?>(nil)
    /// Whether the linked poller is awake (changed under `pollerLink`'s lock).
    private let pollerAwake = Atomic<Bool>(false)

    /// What a procedure id leads to.
    enum Route: Sendable {
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

        /// Whether the exitless poller hands calls of this route to the doorbell unrun.
        var blocking: Bool {
            switch self {
            case .procedure(let procedure): return procedure.blocking
            case .poll: return true
            case .reply: return false
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
        let channels = slotAddresses.enumerated().map { Channel(vcpu: $0, slot: $1, limits: limits, now: now, metrics: factory) }
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
        // No poller yet: every slot needs the doorbell.
        publishNeedsDoorbellForAll()
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

    // MARK: Handling a call

    /// A call fetched once and validated: what the procedure gets.
    struct PreparedCall: Sendable {
        var request: VMRPCRequestHeader
        var route: Route
        var arguments: [UInt8]
    }

    /// A posted call the poller took but left for the vCPU's doorbell (a blocking procedure):
    /// the validated copy, and the procedure's `.wait` when it already ran.
    struct Handoff: Sendable {
        var call: PreparedCall
        var reply: VMRPCReply?
    }

    /// What validation made of a fetched header.
    private enum Preparation {
        /// Answer with this status and no results; `malformed` charges the channel's budget.
        case answer(VMRPCStatus, malformed: Bool)
        /// A valid call.
        case call(PreparedCall)
    }

    /// What running a call's procedure gave.
    private enum Invocation {
        case reply(VMRPCReply)
        /// A malformed call found by the procedure's own checks (a `reply` naming no call).
        case reject(VMRPCStatus)
    }

    /// Handles the call in `vcpu`'s slot. Returns when the response is written; a blocking
    /// procedure keeps the calling thread here until its event. A doorbell from a vCPU without
    /// a slot is counted (`unroutedDoorbells`) and otherwise ignored: there is nowhere to answer.
    ///
    /// When the server offers `exitless`, the doorbell first takes a posted call (`posted`
    /// 1 → 0), else finishes a call the poller handed over, else, for a request with the
    /// `exitless` bit, is a late doorbell for a call the poller already answered (nothing is
    /// written), else serves the slot as an ordinary call. It waits while the poller is serving
    /// this vCPU's slot, so it never answers a call twice.
    public func handleDoorbell(vcpu: Int) {
        guard slotAddresses.indices.contains(vcpu) else {
            unrouted.wrappingAdd(1, ordering: .relaxed)
            return
        }
        let channel = channels[vcpu]
        channel.doorbells.wrappingAdd(1, ordering: .relaxed)
        channel.metrics.doorbells.increment()
        guard features.contains(.exitless) else {
            guard let request = fetchHeader(channel) else { return }
            return serveOnThisThread(channel, vcpu, request, posted: false)
        }
        var tookPostedCall = false
        channel.serving.withLock { handoff in
            channel.inDoorbell.store(true, ordering: .relaxed)
            defer { channel.inDoorbell.store(false, ordering: .relaxed) }
            if takePostedCall(channel) {
                tookPostedCall = true
                channel.postedDoorbellCalls.wrappingAdd(1, ordering: .relaxed)
                if handoff != nil {
                    // The guest posted again instead of ringing for the call it was handed back:
                    // that call is abandoned, which is malformed.
                    handoff = nil
                    channel.handoffPending.store(false, ordering: .relaxed)
                    channel.abandonedHandoffs.wrappingAdd(1, ordering: .relaxed)
                    _ = chargeMalformedCall(channel)
                }
                guard let request = fetchHeader(channel) else { return }
                serveOnThisThread(channel, vcpu, request, posted: true)
            } else if let pending = handoff {
                handoff = nil
                channel.handoffPending.store(false, ordering: .relaxed)
                let reply: VMRPCReply
                if let waiting = pending.reply {
                    reply = waiting
                } else {
                    switch invoke(pending.call, vcpu: vcpu, onPoller: false) {
                    case .reply(let answer): reply = answer
                    case .reject(let status): return reject(channel, status, pending.call.request.sequence, posted: true)
                    }
                }
                finish(channel, vcpu, pending.call, reply, posted: true)
            } else {
                guard let request = fetchHeader(channel) else { return }
                if VMRPCFeatures(rawValue: request.features).contains(.exitless) {
                    // Nothing posted, nothing handed over: the poller answered this call
                    // already (the guest's spin bound passed as it did). Nothing to write.
                    channel.lateDoorbells.wrappingAdd(1, ordering: .relaxed)
                    return
                }
                serveOnThisThread(channel, vcpu, request, posted: false)
            }
        }
        // Every doorbell re-publishes `needs_doorbell` (a guest that cleared its slot memory
        // learns it again), and one that carried a posted call wakes a sleeping poller.
        publishNeedsDoorbell(channel)
        if tookPostedCall && !channel.broken.load(ordering: .relaxed) { wakePollerIfAsleep() }
    }

    /// Serves `vcpu`'s posted call, if there is one, without parking anything: what the exitless
    /// poller calls for each slot it watches (`VMRPCPoller` does; a VMM polling with its own
    /// thread may call it too). Validation is the doorbell path's, on one copy.
    ///
    /// A blocking procedure is not run (or, if it answered `.wait` unannounced, not waited
    /// for): the call is handed to the vCPU's doorbell, and `needs_doorbell` is set until the
    /// doorbell comes. A channel that is broken, or whose handed-over call is still waiting for
    /// its doorbell, is not looked at.
    public func serveExitless(vcpu: Int) -> VMRPCExitlessOutcome {
        guard features.contains(.exitless), channels.indices.contains(vcpu) else { return .idle }
        let channel = channels[vcpu]
        guard !channel.broken.load(ordering: .relaxed), !channel.handoffPending.load(ordering: .relaxed),
              !channel.inDoorbell.load(ordering: .relaxed),
              (try? memory.atomicLoad(UInt32.self, at: channel.postedAddress, ordering: .relaxed)) == 1 else { return .idle }
        let served: VMRPCExitlessOutcome? = channel.serving.withLockIfAvailable { handoff in
            guard handoff == nil, takePostedCall(channel) else { return .idle }
            guard let request = fetchHeader(channel) else { return .answered }
            let call: PreparedCall
            switch prepare(channel, request, posted: true) {
            case let .answer(status, malformed):
                if malformed { reject(channel, status, request.sequence, posted: true) } else {
                    respond(channel, status: status, results: [], sequence: request.sequence, posted: true)
                }
                return .answered
            case .call(let prepared):
                call = prepared
            }
            if call.route.blocking {
                handoff = Handoff(call: call, reply: nil)
                // Inside the lock: a doorbell that takes the hand-off right after it clears it.
                channel.handoffPending.store(true, ordering: .relaxed)
                return .handedOff
            }
            switch invoke(call, vcpu: vcpu, onPoller: true) {
            case .reject(let status):
                reject(channel, status, request.sequence, posted: true)
                return .answered
            case .reply(let reply):
                if case .wait = reply {
                    handoff = Handoff(call: call, reply: reply)
                    channel.handoffPending.store(true, ordering: .relaxed)
                    return .handedOff
                }
                finish(channel, vcpu, call, reply, posted: true)
                return .answered
            }
        }
        guard let served else { return .busy }
        switch served {
        case .answered:
            channel.exitlessCalls.wrappingAdd(1, ordering: .relaxed)
            channel.metrics.exitless.increment()
            if channel.broken.load(ordering: .relaxed) { publishNeedsDoorbell(channel) }
        case .handedOff:
            channel.handoffs.wrappingAdd(1, ordering: .relaxed)
            publishNeedsDoorbell(channel) // from the flags as they are now (the doorbell may have come)
        case .idle, .busy:
            break
        }
        return served
    }

    /// Takes the posted call of `channel`: `posted` 1 → 0, sequentially consistent (so it
    /// acquires what the guest published before it). Exactly one taker wins.
    private func takePostedCall(_ channel: Channel) -> Bool {
        (try? memory.atomicCompareExchange(1, 0, at: channel.postedAddress)) == 1
    }

    /// Fetch once: the whole request header, into host memory. Nil when guest memory no longer
    /// holds the slot (counted; there is nowhere to answer).
    private func fetchHeader(_ channel: Channel) -> VMRPCRequestHeader? {
        var header = [UInt8](repeating: 0, count: VMRPCWire.responseOffset)
        guard (try? header.withUnsafeMutableBytes({ try memory.read(into: $0, at: channel.slot) })) != nil else {
            channel.rejected.wrappingAdd(1, ordering: .relaxed)
            return nil
        }
        return header.withUnsafeBytes { VMRPCRequestHeader(decoding: $0) }
    }

    /// Validates the fetched header and copies exactly the validated arguments, once. The order
    /// of the checks is the specification's.
    private func prepare(_ channel: Channel, _ request: VMRPCRequestHeader, posted: Bool) -> Preparation {
        if channel.broken.load(ordering: .relaxed) { return .answer(.channelBroken, malformed: false) }
        let headerStatus = request.validate(hostFeatures: features)
        guard headerStatus == .ok else { return .answer(headerStatus, malformed: true) }
        guard let route = route(request.procedure) else { return .answer(.unknownProcedure, malformed: true) }
        // A posted call requires `exitless`, as `poll` requires `reverse_calls`.
        let required = posted ? route.requiredFeatures.union(.exitless) : route.requiredFeatures
        guard VMRPCFeatures(rawValue: request.features).isSuperset(of: required) else {
            return .answer(.unsupportedFeature, malformed: true)
        }
        guard route.argumentLength.contains(Int(request.argumentLength)) else { return .answer(.badArgumentLength, malformed: true) }
        var arguments = [UInt8](repeating: 0, count: Int(request.argumentLength))
        if !arguments.isEmpty {
            guard let argumentsAddress = channel.slot.checkedAdding(UInt64(VMRPCWire.argumentsOffset)),
                  (try? arguments.withUnsafeMutableBytes({ try memory.read(into: $0, at: argumentsAddress) })) != nil else {
                return .answer(.badArgumentLength, malformed: true)
            }
        }
        return .call(PreparedCall(request: request, route: route, arguments: arguments))
    }

    /// Runs the call's procedure once.
    private func invoke(_ call: PreparedCall, vcpu: Int, onPoller: Bool) -> Invocation {
        let channel = channels[vcpu]
        switch call.route {
        case .procedure(let procedure):
            let context = VMRPCCallContext(vcpuID: vcpu, sequence: call.request.sequence,
                                           features: VMRPCFeatures(rawValue: call.request.features), onPoller: onPoller)
            return .reply(procedure.handler(context, call.arguments))
        case .poll:
            return .reply(poll(channel, call.arguments))
        case .reply:
            // A reply that names no call delivered to this vCPU is malformed: it is counted
            // against the channel's budget, so guessing ids breaks the channel.
            if let status = handleReply(channel, call.arguments) { return .reject(status) }
            return .reply(.done(status: .ok, results: []))
        }
    }

    /// The doorbell path for one fetched call, on the vCPU's thread.
    private func serveOnThisThread(_ channel: Channel, _ vcpu: Int, _ request: VMRPCRequestHeader, posted: Bool) {
        switch prepare(channel, request, posted: posted) {
        case let .answer(status, malformed):
            if malformed { return reject(channel, status, request.sequence, posted: posted) }
            respond(channel, status: status, results: [], sequence: request.sequence, posted: posted)
        case .call(let call):
            switch invoke(call, vcpu: vcpu, onPoller: false) {
            case .reject(let status): reject(channel, status, request.sequence, posted: posted)
            case .reply(let reply): finish(channel, vcpu, call, reply, posted: posted)
            }
        }
    }

    /// Parks the vCPU for as long as the reply asks (only ever on the vCPU's own thread; on
    /// the poller the reply is never `.wait`), then writes the response.
    private func finish(_ channel: Channel, _ vcpu: Int, _ call: PreparedCall, _ reply: VMRPCReply, posted: Bool) {
        var reply = reply
        var waits = 0
        let interruptible = VMRPCFeatures(rawValue: call.request.features).contains(.interruptible)
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
            return respond(channel, status: .internalError, results: [], sequence: call.request.sequence, posted: posted)
        }
        respond(channel, status: status, results: results, sequence: call.request.sequence, posted: posted)
    }

    /// Takes one malformed call from the channel's budget; marks the channel broken (and
    /// doorbell-only) when the budget is spent. Returns whether it is.
    private func chargeMalformedCall(_ channel: Channel) -> Bool {
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
            publishNeedsDoorbell(channel)
            channel.metrics.broken.increment()
            logger.warning("VMRPC channel broken: too many malformed calls",
                           metadata: ["vcpu": "\(channels.firstIndex { $0 === channel } ?? -1)"])
        }
        return exhausted
    }

    private func reject(_ channel: Channel, _ status: VMRPCStatus, _ sequence: UInt32, posted: Bool) {
        let exhausted = chargeMalformedCall(channel)
        respond(channel, status: exhausted ? .channelBroken : status, results: [], sequence: sequence, posted: posted)
    }

    /// Writes results, then the 20-byte response header; the status is part of the last write.
    /// When the results cannot be written the call is answered `internal_error` without
    /// results. A posted call then gets `completed` = its sequence, with release, so that a
    /// guest that observes it (with acquire) sees the whole response.
    private func respond(_ channel: Channel, status: VMRPCStatus, results: [UInt8], sequence: UInt32, posted: Bool) {
        let slot = channel.slot
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
        if posted {
            if (try? memory.atomicStore(sequence, at: channel.completedAddress, ordering: .releasing)) == nil {
                channel.failedResponses.wrappingAdd(1, ordering: .relaxed)
            }
        }
    }

    // MARK: Exitless: needs_doorbell and the poller

    /// Stores `needs_doorbell` for `channel` from the host's state now: 1 unless a poller is
    /// attached and awake, the channel is not broken and no handed-over call waits for its
    /// doorbell. Stores are serialized per channel and each reads the state under the same
    /// lock, so the last store reflects the last change.
    func publishNeedsDoorbell(_ channel: Channel) {
        guard features.contains(.exitless) else { return }
        channel.publication.withLock { published in
            let needs = !pollerAwake.load(ordering: .relaxed) || channel.broken.load(ordering: .relaxed)
                || channel.handoffPending.load(ordering: .relaxed)
            published = needs ? 1 : 0
            try? memory.atomicStore(published, at: channel.needsDoorbellAddress, ordering: .releasing)
        }
    }

    private func publishNeedsDoorbellForAll() { for channel in channels { publishNeedsDoorbell(channel) } }

    private func wakePollerIfAsleep() {
        guard !pollerAwake.load(ordering: .relaxed) else { return }
        let wake = pollerLink.withLock { $0?.wake }
        wake?()
    }

    /// Links the server to a poller. False when another poller has it.
    func attach(poller id: ObjectIdentifier, wake: @escaping @Sendable () -> Void,
                detach: @escaping @Sendable () -> Void) -> Bool {
        pollerLink.withLock { link in
            guard link == nil else { return false }
            link = PollerLink(id: id, wake: wake, detach: detach)
            return true
        }
    }

    /// Unlinks the poller `id` (if it is the one linked); every slot then needs the doorbell.
    func detach(poller id: ObjectIdentifier) {
        let detached = pollerLink.withLock { link -> Bool in
            guard link?.id == id else { return false }
            link = nil
            pollerAwake.store(false, ordering: .relaxed)
            return true
        }
        if detached { publishNeedsDoorbellForAll() }
    }

    /// The linked poller `id` is awake (serving posted calls) or asleep; publishes
    /// `needs_doorbell` for every slot accordingly. Ignored from a poller that is not linked.
    func setPoller(_ id: ObjectIdentifier, awake: Bool) {
        let linked = pollerLink.withLock { link -> Bool in
            guard link?.id == id else { return false }
            pollerAwake.store(awake, ordering: .relaxed)
            return true
        }
        if linked { publishNeedsDoorbellForAll() }
    }

    /// Whether some slot the poller serves has a posted call (after a full fence, the second
    /// half of going to sleep). A slot whose vCPU is inside a doorbell call does not count: the
    /// vCPU cannot post while it is there, so its `posted` word was written by someone else, and
    /// the vCPU learns `needs_doorbell` when it posts after the call.
    func hasPostedCall() -> Bool {
        channels.contains { channel in
            !channel.broken.load(ordering: .relaxed) && !channel.handoffPending.load(ordering: .relaxed)
                && !channel.inDoorbell.load(ordering: .relaxed)
                && (try? memory.atomicLoad(UInt32.self, at: channel.postedAddress, ordering: .relaxed)) == 1
        }
    }

    /// Serves every posted call of the server's slots once; returns how many were answered or
    /// handed over.
    func serveExitlessAll() -> (taken: Int, answered: Int) {
        var taken = 0, answered = 0
        for vcpu in channels.indices {
            switch serveExitless(vcpu: vcpu) {
            case .answered: taken += 1; answered += 1
            case .handedOff: taken += 1
            case .idle, .busy: break
            }
        }
        return (taken, answered)
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
    /// `VirtualMachineRunner.stop()` has the same effect on the reverse calls. A server linked
    /// to an exitless poller is detached from it.
    public func shutdown() {
        let detach = pollerLink.withLock { $0?.detach }
        detach?()
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
            failedResponses: channel.failedResponses.load(ordering: .relaxed), broken: channel.broken.load(ordering: .relaxed),
            exitlessCalls: channel.exitlessCalls.load(ordering: .relaxed),
            postedDoorbellCalls: channel.postedDoorbellCalls.load(ordering: .relaxed),
            lateDoorbells: channel.lateDoorbells.load(ordering: .relaxed), handoffs: channel.handoffs.load(ordering: .relaxed),
            abandonedHandoffs: channel.abandonedHandoffs.load(ordering: .relaxed),
            awaitingDoorbell: channel.handoffPending.load(ordering: .relaxed))
    }

    /// Whether an exitless poller is linked to this server and awake (serving posted calls).
    public var isPollerAwake: Bool { pollerAwake.load(ordering: .relaxed) }

    /// Clears a broken channel (the VMM decides when to trust the guest again).
    public func repairChannel(vcpu: Int) {
        guard channels.indices.contains(vcpu) else { return }
        logger.info("VMRPC channel repaired", metadata: ["vcpu": "\(vcpu)"])
        channels[vcpu].broken.store(false, ordering: .relaxed)
        let now = dispatcher.clock.nowNanoseconds()
        channels[vcpu].malformedBudget.withLock { $0 = (Double(limits.malformedCallBurst), now) }
        publishNeedsDoorbell(channels[vcpu]) // the exitless path is back too
    }
}

/// What `VMRPCServer.serveExitless(vcpu:)` did with a slot.
public enum VMRPCExitlessOutcome: Equatable, Sendable {
    /// Nothing was posted (or the channel is broken, or a handed-over call waits for its doorbell).
    case idle
    /// The vCPU's doorbell path is serving the slot now; try again later.
    case busy
    /// A posted call was answered: response written, then `completed`.
    case answered
    /// A posted call was taken and validated but needs the vCPU's thread (a blocking
    /// procedure): `needs_doorbell` is set, and the vCPU's next doorbell finishes it.
    case handedOff
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
