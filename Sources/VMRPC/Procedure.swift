import LongPoll
import RTVirtCore

/// What a procedure answers: now, or after the calling vCPU has long-polled for an event.
public enum VMRPCReply: Sendable {
    /// The call is complete with `status` and `results` (at most 2048 bytes).
    case done(status: VMRPCStatus, results: [UInt8])
    /// Park the calling vCPU until the first event of the request, then continue with `then`.
    case wait(LongPollRequest, then: @Sendable (LongPollResult) -> VMRPCReply)

    /// Success with `results` encoded.
    public static func ok(_ results: some VMRPCMessage) -> VMRPCReply { .done(status: .ok, results: results.encoded) }
    /// Failure with `status` and no results.
    public static func failed(_ status: VMRPCStatus) -> VMRPCReply { .done(status: status, results: []) }
}

/// Where a call comes from.
public struct VMRPCCallContext: Sendable {
    /// The calling vCPU (from the exit, never from guest memory).
    public var vcpuID: Int
    /// The guest's sequence number.
    public var sequence: UInt32
    /// The features the guest asked for in this call.
    public var features: VMRPCFeatures
    /// Whether the exitless poller runs the call (else the vCPU's own thread, in its exit).
    public var onPoller: Bool = false
}

/// A host procedure the guest can call.
public struct VMRPCProcedure: Sendable {
    /// The procedure id (1 ... 2^32 - 1; 0 is reserved).
    public let id: UInt32
    /// A name for reports, for example `clock.read`.
    public let name: String
    /// Argument lengths the procedure accepts; others fail with `badArgumentLength` before it runs.
    public let argumentLength: ClosedRange<Int>
    /// Feature bits a call must request to use this procedure (else `unsupportedFeature`).
    public let requiredFeatures: VMRPCFeatures
    /// Whether the procedure usually answers `.wait` (it sleeps, polls, receives). The exitless
    /// poller never runs a blocking procedure: it hands the validated call to the vCPU's next
    /// doorbell, so the procedure runs on the vCPU's own thread. A procedure that is not marked
    /// and answers `.wait` anyway is handed over after it ran, with its `.wait`; either way it
    /// runs once per call. A procedure must not assume which thread runs it.
    public let blocking: Bool
    let handler: @Sendable (VMRPCCallContext, [UInt8]) -> VMRPCReply

    /// A procedure over raw argument bytes.
    public init(id: UInt32, name: String, argumentLength: ClosedRange<Int>, requiredFeatures: VMRPCFeatures = [],
                blocking: Bool = false, handler: @escaping @Sendable (VMRPCCallContext, [UInt8]) -> VMRPCReply) {
        self.id = id; self.name = name; self.argumentLength = argumentLength
        self.requiredFeatures = requiredFeatures; self.blocking = blocking; self.handler = handler
    }

    /// A procedure whose arguments decode as `Arguments` (a decoding failure answers `badArguments`).
    public static func typed<Arguments: VMRPCMessage>(
        id: UInt32, name: String, argumentLength: ClosedRange<Int>, requiredFeatures: VMRPCFeatures = [],
        blocking: Bool = false, arguments: Arguments.Type,
        _ body: @escaping @Sendable (VMRPCCallContext, Arguments) -> VMRPCReply
    ) -> VMRPCProcedure {
        VMRPCProcedure(id: id, name: name, argumentLength: argumentLength, requiredFeatures: requiredFeatures,
                       blocking: blocking) { context, bytes in
            do throws(VMRPCStatus) { return body(context, try Arguments.decode(bytes)) } catch { return .failed(error) }
        }
    }
}

/// Why a `VMRPCServer` could not be configured. These are the VMM's mistakes, never the
/// guest's: each is refused when the server is made, and none traps.
public enum VMRPCConfigurationError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Id 0 is reserved.
    case reservedID
    /// Two procedures with one id.
    case duplicateID(UInt32)
    /// The id belongs to a procedure the server provides itself (`poll`, `reply`).
    case builtInID(UInt32)
    /// An argument length range outside 0 ... 1984.
    case invalidArgumentLength(UInt32)
    /// A vCPU of the dispatcher has no slot.
    case vcpuWithoutSlot(vcpu: Int)
    /// A slot's address is not a multiple of the 4096-byte slot size.
    case slotNotPageAligned(vcpu: Int, GuestAddress)
    /// The slot of `vcpu` is not wholly inside one region of guest memory.
    case slotOutsideGuestMemory(vcpu: Int)
    /// Two vCPUs were given the same slot.
    case sharedSlot(vcpu: Int, otherVCPU: Int, GuestAddress)
    /// A `VMRPCLimits` value is out of range.
    case invalidLimit(name: String, value: String)

    public var description: String {
        switch self {
        case .reservedID: return "procedure id 0 is reserved"
        case let .duplicateID(id): return "two procedures have id \(id)"
        case let .builtInID(id): return "procedure id \(id) is the server's own (poll or reply)"
        case let .invalidArgumentLength(id): return "procedure \(id) accepts argument lengths outside 0 ... \(VMRPCWire.maximumArgumentLength)"
        case let .vcpuWithoutSlot(vcpu): return "vCPU \(vcpu) has no VMRPC slot"
        case let .slotNotPageAligned(vcpu, address): return "the slot of vCPU \(vcpu) at \(address) is not 4096-byte aligned"
        case let .slotOutsideGuestMemory(vcpu): return "the slot of vCPU \(vcpu) is not inside guest memory"
        case let .sharedSlot(vcpu, other, address): return "vCPUs \(other) and \(vcpu) were both given the slot at \(address)"
        case let .invalidLimit(name, value): return "VMRPCLimits.\(name) = \(value) is out of range"
        }
    }
}
