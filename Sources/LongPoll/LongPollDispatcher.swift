#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import Metrics
import SystemPackage
import Synchronization

/// Blocks a vCPU's thread until the first of its events, without touching other vCPUs.
///
/// Each vCPU has its own queue of host messages, cancellation flag and wake-up eventfd, so one
/// vCPU parked for seconds never delays another. Messages posted while nobody waits stay
/// queued for the next wait, in order; a cancellation stays in force until `resume(vcpu:)`.
/// Time comes from an injectable clock and the blocking from an injectable `BlockingWaiter`.
///
/// Closing a vCPU (`close(vcpu:)`, which `VirtualMachineRunner.stop()` does for each of its
/// vCPUs) means the VM stopped: the vCPU takes no more messages, and every close handler runs,
/// so that whoever queued messages (the VMRPC server's reverse calls) can end them.
public final class LongPollDispatcher: LongPollWaiting {
    /// Per-vCPU state.
    final class Channel: Sendable {
        struct State {
            var messages: [HostMessage] = []
            var cancelled = false
            var closed = false
            var waiting = false
        }
        let state = LockedValue(State())
        /// The VMM has an interrupt for this vCPU: end an interruptible wait. Cleared when a
        /// wait takes it or when the vCPU re-enters the guest (which delivers the interrupt).
        let interruptPending = Atomic<Bool>(false)
        let wake: EventNotifier
        /// How late deadline waits end (swift-metrics, dimension `vcpu`).
        let wakeLateness: Timer
        init(vcpu: Int, metrics: any MetricsFactory) throws(Errno) {
            wake = try EventNotifier()
            wakeLateness = Timer(label: "rtvirt_longpoll_wake_lateness", dimensions: [("vcpu", "\(vcpu)")], factory: metrics)
        }
    }

    private let channels: [Channel]
    /// The clock deadlines are measured on.
    public let clock: any MonotonicClock
    private let waiter: any BlockingWaiter
    /// Messages a vCPU's queue holds at most.
    public let queueCapacity: Int
    /// The longest a single wait may park a vCPU, in nanoseconds.
    public let maximumParkNanoseconds: UInt64
    private let timerStrategy: DeadlineTimerStrategy?
    private let closeHandlers = LockedValue<(next: UInt64, handlers: [UInt64: @Sendable (Int) -> Void])>((1, [:]))

    /// The most vCPUs one dispatcher serves.
    public static let maximumVCPUCount = 4096

    /// A dispatcher for vCPUs `0 ..< vcpuCount`.
    /// - Parameters:
    ///   - vcpuCount: 1 ... `maximumVCPUCount`.
    ///   - clock: the clock deadlines are measured on.
    ///   - waiter: what blocks (`ppoll` by default; a `ManualClockWaiter` in tests).
    ///   - queueCapacity: host messages one vCPU's queue holds, at least 1.
    ///   - maximumParkNanoseconds: the longest any single wait parks a vCPU.
    ///   - timerStrategy: how to wait for a deadline precisely (wake early, then spin);
    ///     nil: block until the deadline and accept the waiter's lateness.
    ///   - metrics: where the wake-lateness timer goes (nil: the bootstrapped `MetricsSystem`).
    /// - Throws: `LongPollSetupError` for a count out of range, or when an eventfd cannot be made.
    public init(vcpuCount: Int, clock: any MonotonicClock = SystemMonotonicClock(),
                waiter: any BlockingWaiter = PollingWaiter(), queueCapacity: Int = 64,
                maximumParkNanoseconds: UInt64 = 10_000_000_000,
                timerStrategy: DeadlineTimerStrategy? = nil,
                metrics: (any MetricsFactory)? = nil) throws(LongPollSetupError) {
        guard (1...Self.maximumVCPUCount).contains(vcpuCount) else { throw .invalidVCPUCount(vcpuCount) }
        guard queueCapacity >= 1 else { throw .invalidQueueCapacity(queueCapacity) }
        let factory = metrics ?? MetricsSystem.factory
        var channels: [Channel] = []
        for vcpu in 0..<vcpuCount {
            do { channels.append(try Channel(vcpu: vcpu, metrics: factory)) } catch { throw .eventNotifier(error) }
        }
        self.channels = channels
        self.clock = clock
        self.waiter = waiter
        self.queueCapacity = queueCapacity
        self.maximumParkNanoseconds = maximumParkNanoseconds
        self.timerStrategy = timerStrategy
    }

    /// The number of vCPUs.
    public var vcpuCount: Int { channels.count }

    // MARK: From other threads

    /// Queues `message` for `vcpu` and wakes it if it waits for messages.
    public func post(_ message: HostMessage, to vcpu: Int) throws(LongPollError) {
        guard channels.indices.contains(vcpu) else { throw .noSuchVCPU(vcpu) }
        let channel = channels[vcpu]
        try channel.state.withLock { (state) throws(LongPollError) in
            guard !state.closed else { throw .closed(vcpu: vcpu) }
            guard state.messages.count < queueCapacity else { throw .queueFull(vcpu: vcpu, capacity: queueCapacity) }
            state.messages.append(message)
        }
        channel.wake.signal()
    }

    /// Ends the current wait of `vcpu` (and every later one until `resume(vcpu:)`) with `.cancelled`.
    public func cancel(vcpu: Int) {
        guard channels.indices.contains(vcpu) else { return }
        channels[vcpu].state.withLock { $0.cancelled = true }
        channels[vcpu].wake.signal()
    }

    /// Ends the current or next interruptible wait of `vcpu` with `.interrupted`: the VMM has
    /// injected an interrupt for it and wants the guest to take it now, not when its long poll
    /// ends. The request stays pending until a wait takes it or the run loop re-enters the guest
    /// (`interruptDelivered(vcpu:)`, which `VCPURunLoop` calls before each entry). Waits that are
    /// not `interruptible` ignore it. Safe from any thread; inject the interrupt first.
    public func interrupt(vcpu: Int) {
        guard channels.indices.contains(vcpu) else { return }
        channels[vcpu].interruptPending.store(true, ordering: .sequentiallyConsistent)
        channels[vcpu].wake.signal()
    }

    /// Drops a pending `interrupt(vcpu:)`: the vCPU is about to enter the guest, where the
    /// hypervisor delivers the interrupt itself. Called by the run loop before each entry.
    @inline(__always)
    public func interruptDelivered(vcpu: Int) {
        guard channels.indices.contains(vcpu) else { return }
        let channel = channels[vcpu]
        if channel.interruptPending.load(ordering: .relaxed) {
            channel.interruptPending.store(false, ordering: .sequentiallyConsistent)
        }
    }

    /// Cancels every vCPU's waits.
    public func cancelAll() { for vcpu in channels.indices { cancel(vcpu: vcpu) } }

    /// Lets `vcpu` wait again after a cancellation, and take messages again after a close
    /// (a VM that restarts).
    public func resume(vcpu: Int) {
        guard channels.indices.contains(vcpu) else { return }
        channels[vcpu].state.withLock { $0.cancelled = false; $0.closed = false }
    }

    /// Stops `vcpu` from taking messages (the VM stopped): cancels its wait, returns the
    /// messages still queued, and, the first time, runs every close handler with `vcpu`.
    @discardableResult
    public func close(vcpu: Int) -> [HostMessage] {
        guard channels.indices.contains(vcpu) else { return [] }
        cancel(vcpu: vcpu)
        let (wasOpen, dropped) = channels[vcpu].state.withLock { state in
            let wasOpen = !state.closed
            state.closed = true
            defer { state.messages.removeAll() }
            return (wasOpen, state.messages)
        }
        if wasOpen {
            for handler in closeHandlers.withLock({ Array($0.handlers.values) }) { handler(vcpu) }
        }
        return dropped
    }

    /// Closes every vCPU.
    public func closeAll() { for vcpu in channels.indices { close(vcpu: vcpu) } }

    /// Whether `vcpu` is closed (the VM stopped and it was not resumed since).
    public func isClosed(vcpu: Int) -> Bool {
        !channels.indices.contains(vcpu) || channels[vcpu].state.withLock { $0.closed }
    }

    /// Registers `handler` to run (on the closing thread) each time a vCPU is closed. Returns a
    /// token for `removeCloseHandler(_:)`.
    public func addCloseHandler(_ handler: @escaping @Sendable (_ vcpu: Int) -> Void) -> LongPollCloseHandlerToken {
        closeHandlers.withLock { table in
            defer { table.next += 1 }
            table.handlers[table.next] = handler
            return LongPollCloseHandlerToken(rawValue: table.next)
        }
    }

    /// Removes a close handler.
    public func removeCloseHandler(_ token: LongPollCloseHandlerToken) {
        _ = closeHandlers.withLock { $0.handlers.removeValue(forKey: token.rawValue) }
    }

    public func closeVCPU(_ vcpu: Int) { close(vcpu: vcpu) }

    /// Removes the queued messages of `vcpu` whose id is `messageID` (a call that ended before
    /// any wait took it). Returns how many were removed.
    @discardableResult
    public func withdraw(messageID: UInt64, from vcpu: Int) -> Int {
        guard channels.indices.contains(vcpu) else { return 0 }
        return channels[vcpu].state.withLock { state in
            let before = state.messages.count
            state.messages.removeAll { $0.id == messageID }
            return before - state.messages.count
        }
    }

    /// Messages queued for `vcpu`.
    public func queuedMessageCount(vcpu: Int) -> Int {
        channels.indices.contains(vcpu) ? channels[vcpu].state.withLock { $0.messages.count } : 0
    }

    /// Whether `vcpu` is inside `wait` now.
    public func isWaiting(vcpu: Int) -> Bool {
        channels.indices.contains(vcpu) && channels[vcpu].state.withLock { $0.waiting }
    }

    // MARK: On the vCPU's thread

    /// Blocks the calling thread (vCPU `vcpu`'s) until the first event of `request`.
    public func wait(vcpu: Int, for request: LongPollRequest) -> LongPollResult {
        guard channels.indices.contains(vcpu) else { return .cancelled }
        let result = wait(channels[vcpu], for: request)
        if case .deadlineReached(let late) = result {
            channels[vcpu].wakeLateness.recordNanoseconds(Int64(clamping: late))
        }
        return result
    }

    private func wait(_ channel: Channel, for request: LongPollRequest) -> LongPollResult {
        channel.state.withLock { $0.waiting = true }
        let start = clock.nowNanoseconds()
        defer {
            channel.state.withLock { $0.waiting = false }
            if request.deadline != nil { timerStrategy?.recordWait(nanoseconds: clock.nowNanoseconds() &- start) }
        }
        let parkLimit = start &+ maximumParkNanoseconds
        let wakeAt = min(request.deadline ?? UInt64.max, parkLimit)
        while true {
            // Consume the wake-up before looking at the state, so a post or cancel that lands
            // after the look re-signals the eventfd and ends the next block.
            channel.wake.drain()
            if let early = takeEarlyResult(channel, request) { return early }
            let now = clock.nowNanoseconds()
            if let deadline = request.deadline, now >= deadline, deadline <= parkLimit {
                return .deadlineReached(lateNanoseconds: now - deadline)
            }
            if now >= parkLimit { return .parkLimitReached }

            var blockUntil = wakeAt
            let precise = timerStrategy != nil && request.deadline == wakeAt
            if precise, let strategy = timerStrategy, let deadline = request.deadline {
                blockUntil = strategy.wakeTime(forDeadline: deadline, waitStartedAt: start)
                if blockUntil <= now {
                    if let result = spin(until: deadline, channel: channel, request: request) { return result }
                    continue
                }
            }
            var descriptors = request.descriptors + [PollDescriptor(fd: channel.wake.fd, events: Int16(POLLIN))]
            waiter.block(descriptors: &descriptors, untilNanoseconds: blockUntil, clock: clock)
            let ready = descriptors.dropLast().filter { $0.returnedEvents != 0 }
            if !ready.isEmpty { return .descriptorsReady(Array(ready)) }
            if precise, descriptors.last?.returnedEvents == 0 {
                timerStrategy?.recordTimedWake(requested: blockUntil, actual: clock.nowNanoseconds())
            }
        }
    }

    private func takeEarlyResult(_ channel: Channel, _ request: LongPollRequest) -> LongPollResult? {
        if request.interruptible, channel.interruptPending.exchange(false, ordering: .sequentiallyConsistent) {
            if channel.state.withLock({ $0.cancelled }) { return .cancelled }
            return .interrupted
        }
        return channel.state.withLock { state in
            if state.cancelled { return .cancelled }
            if request.acceptsHostMessages, !state.messages.isEmpty { return .hostMessage(state.messages.removeFirst()) }
            return nil
        }
    }

    /// Busy-waits until `deadline`; returns nil early when a wake-up arrives (the caller's
    /// loop then looks at it), else `.deadlineReached`.
    private func spin(until deadline: UInt64, channel: Channel, request: LongPollRequest) -> LongPollResult? {
        let spinStart = clock.nowNanoseconds()
        defer { timerStrategy?.recordSpin(nanoseconds: clock.nowNanoseconds() &- spinStart) }
        var iterations = 0
        var now = spinStart
        while now < deadline {
            iterations &+= 1
            if iterations & 63 == 0, channel.wake.drain() {
                channel.wake.signal() // leave it for the caller's loop to see
                return nil
            }
            spinLoopHint()
            now = clock.nowNanoseconds()
        }
        return .deadlineReached(lateNanoseconds: now - deadline)
    }
}
