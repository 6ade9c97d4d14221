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
    let handler: @Sendable (VMRPCCallContext, [UInt8]) -> VMRPCReply

    /// A procedure over raw argument bytes.
    public init(id: UInt32, name: String, argumentLength: ClosedRange<Int>, requiredFeatures: VMRPCFeatures = [],
                handler: @escaping @Sendable (VMRPCCallContext, [UInt8]) -> VMRPCReply) {
        self.id = id; self.name = name; self.argumentLength = argumentLength
        self.requiredFeatures = requiredFeatures; self.handler = handler
    }

    /// A procedure whose arguments decode as `Arguments` (a decoding failure answers `badArguments`).
    public static func typed<Arguments: VMRPCMessage>(
        id: UInt32, name: String, argumentLength: ClosedRange<Int>, requiredFeatures: VMRPCFeatures = [],
        arguments: Arguments.Type,
        _ body: @escaping @Sendable (VMRPCCallContext, Arguments) -> VMRPCReply
    ) -> VMRPCProcedure {
        VMRPCProcedure(id: id, name: name, argumentLength: argumentLength, requiredFeatures: requiredFeatures) { context, bytes in
            do throws(VMRPCStatus) { return body(context, try Arguments.decode(bytes)) } catch { return .failed(error) }
        }
    }
}

/// Why a procedure table could not be built.
public enum VMRPCRegistrationError: Error, Equatable, Sendable {
    /// Id 0 is reserved.
    case reservedID
    /// Two procedures with one id.
    case duplicateID(UInt32)
    /// The id belongs to a procedure the server provides itself (`poll`, `reply`).
    case builtInID(UInt32)
    /// An argument length range outside 0 ... 1984.
    case invalidArgumentLength(UInt32)
}
