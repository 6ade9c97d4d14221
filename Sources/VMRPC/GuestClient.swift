import RTVirtCore

/// Errors a guest client sees.
public enum VMRPCGuestClientError: Error, Equatable, Sendable {
    /// Guest memory refused the access.
    case memory(GuestMemoryError)
    /// The response's sequence is not the request's.
    case sequenceMismatch(expected: UInt32, got: UInt32)
    /// The response claims more result bytes than the slot holds.
    case badResultLength(UInt32)
    /// The arguments do not fit in a slot.
    case argumentsTooLong(Int)
}

/// A guest's side of VMRPC in Swift, over any `GuestMemory`: writes a request into a slot,
/// rings the doorbell, reads the response. Tests use it to play the guest; the bundled guest
/// uses the C header, which implements the same format.
public final class VMRPCGuestClient {
    /// The memory the slot is in.
    public let memory: any GuestMemory
    /// The slot's guest address.
    public let slot: GuestAddress
    /// Features requested in every call.
    public var features: VMRPCFeatures
    /// Sequence of the next call.
    public private(set) var nextSequence: UInt32 = 1
    private let ringDoorbell: () -> Void

    /// A client of the slot at `slot`; `doorbell` must deliver the exit synchronously, as a
    /// vCPU's `out` does.
    public init(memory: any GuestMemory, slot: GuestAddress, features: VMRPCFeatures = [], doorbell: @escaping () -> Void) {
        self.memory = memory; self.slot = slot; self.features = features; self.ringDoorbell = doorbell
    }

    /// The response of a call.
    public struct Response: Equatable, Sendable {
        public var status: VMRPCStatus?
        public var rawStatus: UInt32
        public var results: [UInt8]
        public var hostFeatures: VMRPCFeatures
    }

    /// Writes `header` and `arguments` as given (even malformed) and rings; for tests of the host.
    public func callRaw(header: VMRPCRequestHeader, arguments: [UInt8]) throws(VMRPCGuestClientError) -> Response {
        guard arguments.count <= VMRPCWire.slotSize - VMRPCWire.argumentsOffset else { throw .argumentsTooLong(arguments.count) }
        do {
            try memory.write(bytes: header.bytes, at: slot)
            try memory.write(bytes: [UInt8](repeating: 0xEE, count: 32), at: GuestAddress(slot.rawValue + 32)) // stale response
            try memory.write(bytes: arguments, at: GuestAddress(slot.rawValue + UInt64(VMRPCWire.argumentsOffset)))
        } catch { throw .memory(error) }
        ringDoorbell()
        let responseBytes: [UInt8]
        do { responseBytes = try memory.readBytes(count: 32, at: GuestAddress(slot.rawValue + 32)) } catch { throw .memory(error) }
        let response = responseBytes.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
        guard response.sequence == header.sequence else { throw .sequenceMismatch(expected: header.sequence, got: response.sequence) }
        guard response.resultLength <= UInt32(VMRPCWire.maximumResultLength) else { throw .badResultLength(response.resultLength) }
        let results: [UInt8]
        do {
            results = try memory.readBytes(count: Int(response.resultLength), at: GuestAddress(slot.rawValue + UInt64(VMRPCWire.resultsOffset)))
        } catch { throw .memory(error) }
        return Response(status: VMRPCStatus(rawValue: response.status), rawStatus: response.status, results: results,
                        hostFeatures: VMRPCFeatures(rawValue: response.hostFeatures))
    }

    /// Calls `procedure` with `arguments`.
    public func call(_ procedure: UInt32, arguments: [UInt8] = []) throws(VMRPCGuestClientError) -> Response {
        let sequence = nextSequence
        nextSequence &+= 1
        let header = VMRPCRequestHeader(procedure: procedure, sequence: sequence, argumentLength: UInt32(arguments.count), features: features)
        return try callRaw(header: header, arguments: arguments)
    }

    /// `null`.
    public func null() throws(VMRPCGuestClientError) -> VMRPCStatus? { try call(VMRPCProcedureID.null).status }

    /// `clock.read`.
    public func clockRead() throws(VMRPCGuestClientError) -> VMRPCClockReading? {
        let response = try call(VMRPCProcedureID.clockRead)
        return response.status == .ok ? try? VMRPCClockReading.decode(response.results) : nil
    }

    /// `timer.sleepUntil`; returns the status and the wake-up.
    public func sleepUntil(guestTSC deadline: UInt64) throws(VMRPCGuestClientError) -> (VMRPCStatus?, VMRPCWakeUp?) {
        let response = try call(VMRPCProcedureID.timerSleepUntil, arguments: VMRPCSleepUntil(deadlineGuestTSC: deadline).encoded)
        return (response.status, response.status == .ok ? try? VMRPCWakeUp.decode(response.results) : nil)
    }

    /// `poll`; returns the status and the delivered reverse call, if any.
    public func poll(timeoutNanoseconds: UInt64) throws(VMRPCGuestClientError) -> (VMRPCStatus?, VMRPCReverseCallDelivery?) {
        let response = try call(VMRPCProcedureID.poll, arguments: VMRPCPoll(timeoutNanoseconds: timeoutNanoseconds).encoded)
        return (response.status, response.status == .ok ? try? VMRPCReverseCallDelivery.decode(response.results) : nil)
    }

    /// `reply` to a reverse call.
    public func reply(callID: UInt64, status: UInt32, payload: [UInt8]) throws(VMRPCGuestClientError) -> VMRPCStatus? {
        try call(VMRPCProcedureID.reply, arguments: VMRPCReplyArguments(callID: callID, status: status, payload: payload).encoded).status
    }
}
