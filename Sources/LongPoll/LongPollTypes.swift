import RTVirtCore
import SystemPackage

/// A file descriptor a long poll waits on, with the `poll(2)` events of interest.
public struct PollDescriptor: Equatable, Sendable {
    /// The descriptor (owned by the caller; it must stay open while the wait runs).
    public var fd: Int32
    /// `POLLIN`, `POLLOUT`, ... as in `poll(2)`.
    public var events: Int16
    /// What happened, after the wait.
    public var returnedEvents: Int16

    /// Waits for `events` on `fd`.
    public init(fd: Int32, events: Int16, returnedEvents: Int16 = 0) {
        self.fd = fd; self.events = events; self.returnedEvents = returnedEvents
    }
}

/// A message from the host to the guest, delivered to a vCPU that long-polls for it.
public struct HostMessage: Equatable, Sendable {
    /// The host's id for the message (a reverse call id, for example).
    public var id: UInt64
    /// What the guest is asked to do.
    public var procedure: UInt32
    /// The bytes that go with it.
    public var payload: [UInt8]

    /// A message.
    public init(id: UInt64, procedure: UInt32, payload: [UInt8]) {
        self.id = id; self.procedure = procedure; self.payload = payload
    }
}

/// What a vCPU waits for: the first of a deadline, file descriptors, and host messages.
/// A wait is also always ended by cancellation (pause, shutdown).
public struct LongPollRequest: Equatable, Sendable {
    /// Monotonic nanoseconds at which the wait ends; nil: no deadline (the dispatcher's
    /// maximum park time still applies).
    public var deadline: UInt64?
    /// Descriptors whose readiness ends the wait.
    public var descriptors: [PollDescriptor]
    /// Whether a queued host message ends the wait (and is taken).
    public var acceptsHostMessages: Bool
    /// Whether `LongPollDispatcher.interrupt(vcpu:)` ends the wait with `.interrupted`.
    public var interruptible: Bool

    /// A wait request.
    public init(deadline: UInt64? = nil, descriptors: [PollDescriptor] = [], acceptsHostMessages: Bool = false,
                interruptible: Bool = false) {
        self.deadline = deadline; self.descriptors = descriptors; self.acceptsHostMessages = acceptsHostMessages
        self.interruptible = interruptible
    }
}

/// Why a long poll ended.
public enum LongPollResult: Equatable, Sendable {
    /// The deadline passed. `lateNanoseconds` is how long after it the waiter resumed.
    case deadlineReached(lateNanoseconds: UInt64)
    /// Some descriptors became ready; their `returnedEvents` are set.
    case descriptorsReady([PollDescriptor])
    /// A host message was taken from the vCPU's queue.
    case hostMessage(HostMessage)
    /// The dispatcher's maximum park time passed with nothing to report.
    case parkLimitReached
    /// The wait was cancelled (the vCPU is pausing or stopping).
    case cancelled
    /// The VMM has an interrupt for the vCPU (`LongPollDispatcher.interrupt(vcpu:)`); only for
    /// `interruptible` requests. The caller returns to the guest, which takes the interrupt.
    case interrupted
}

/// Errors from posting to a vCPU.
public enum LongPollError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The vCPU's host-message queue holds `capacity` messages already.
    case queueFull(vcpu: Int, capacity: Int)
    /// No such vCPU.
    case noSuchVCPU(Int)
    /// The vCPU's channel is closed (the VM stopped).
    case closed(vcpu: Int)

    public var description: String {
        switch self {
        case let .queueFull(vcpu, capacity): return "host-message queue of vCPU \(vcpu) is full (\(capacity) messages)"
        case let .noSuchVCPU(vcpu): return "no vCPU \(vcpu)"
        case let .closed(vcpu): return "vCPU \(vcpu) no longer takes messages (stopped)"
        }
    }
}

/// Why a dispatcher could not be made.
public enum LongPollSetupError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The vCPU count is not in 1 ... `LongPollDispatcher.maximumVCPUCount`.
    case invalidVCPUCount(Int)
    /// The per-vCPU queue capacity is below 1.
    case invalidQueueCapacity(Int)
    /// A vCPU's wake-up eventfd could not be created.
    case eventNotifier(Errno)

    public var description: String {
        switch self {
        case let .invalidVCPUCount(count):
            return "a long-poll dispatcher serves 1 ... \(LongPollDispatcher.maximumVCPUCount) vCPUs, not \(count)"
        case let .invalidQueueCapacity(capacity): return "a host-message queue capacity of \(capacity) is below 1"
        case let .eventNotifier(errno): return "eventfd: \(errno)"
        }
    }
}

/// Identifies a close handler registered with `LongPollWaiting.addCloseHandler(_:)`.
public struct LongPollCloseHandlerToken: Hashable, Sendable {
    let rawValue: UInt64
    /// A token with the waiter's own number.
    public init(rawValue: UInt64) { self.rawValue = rawValue }
}

/// What parks vCPUs in long polls, as a VMRPC server (or any device) sees it: a blocking wait
/// on the vCPU's thread, per-vCPU queues of host messages, and notice of the VM stopping.
/// `LongPollDispatcher` is the implementation; a VMM may bring its own.
public protocol LongPollWaiting: VCPUParking {
    /// The clock deadlines are measured on.
    var clock: any MonotonicClock { get }
    /// The vCPUs served: ids `0 ..< vcpuCount`.
    var vcpuCount: Int { get }
    /// Blocks the calling thread (vCPU `vcpu`'s) until the first event of `request`.
    func wait(vcpu: Int, for request: LongPollRequest) -> LongPollResult
    /// Queues `message` for `vcpu` and wakes it if it waits for messages.
    func post(_ message: HostMessage, to vcpu: Int) throws(LongPollError)
    /// Removes the queued messages of `vcpu` with id `messageID`; returns how many.
    @discardableResult
    func withdraw(messageID: UInt64, from vcpu: Int) -> Int
    /// Runs `handler` with the vCPU each time a vCPU is closed (the VM stopped).
    func addCloseHandler(_ handler: @escaping @Sendable (_ vcpu: Int) -> Void) -> LongPollCloseHandlerToken
    /// Removes a close handler.
    func removeCloseHandler(_ token: LongPollCloseHandlerToken)
    /// Whether `vcpu` is parked in `wait` now.
    func isWaiting(vcpu: Int) -> Bool
}
