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
    /// An exitless call was asked of a host that does not offer `exitless` (or whose features
    /// the client has not learned yet: make an ordinary call first).
    case exitlessNotOffered
}

/// How an exitless call reached its answer.
public enum VMRPCExitlessPath: Equatable, Sendable {
    /// The poller answered it: `completed` showed the call's sequence, no doorbell was rung.
    case exitless
    /// `needs_doorbell` was set (the poller sleeps, the call was handed to the doorbell, or the
    /// channel is doorbell-only), so the guest rang.
    case doorbellNeeded
    /// The spin bound passed without an answer, so the guest rang.
    case spinBoundPassed
    /// The guest posted and rang at once (`ringAtOnce`).
    case rangAtOnce
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
    /// The host's features, from the last response read (empty before the first call).
    public private(set) var hostFeatures: VMRPCFeatures = []
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
        try writeRequest(header: header, arguments: arguments)
        ringDoorbell()
        return try readResponse(sequence: header.sequence)
    }

    private func writeRequest(header: VMRPCRequestHeader, arguments: [UInt8]) throws(VMRPCGuestClientError) {
        guard arguments.count <= VMRPCWire.slotSize - VMRPCWire.argumentsOffset else { throw .argumentsTooLong(arguments.count) }
        do {
            try memory.write(bytes: header.bytes, at: slot)
            // A stale response (never the control area after it).
            try memory.write(bytes: [UInt8](repeating: 0xEE, count: VMRPCWire.responseLength), at: GuestAddress(slot.rawValue + 32))
            try memory.write(bytes: arguments, at: GuestAddress(slot.rawValue + UInt64(VMRPCWire.argumentsOffset)))
        } catch { throw .memory(error) }
    }

    private func readResponse(sequence: UInt32) throws(VMRPCGuestClientError) -> Response {
        let responseBytes: [UInt8]
        do {
            responseBytes = try memory.readBytes(count: VMRPCWire.responseLength, at: GuestAddress(slot.rawValue + 32))
        } catch { throw .memory(error) }
        let response = responseBytes.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
        guard response.sequence == sequence else { throw .sequenceMismatch(expected: sequence, got: response.sequence) }
        hostFeatures = VMRPCFeatures(rawValue: response.hostFeatures)
        guard response.resultLength <= UInt32(VMRPCWire.maximumResultLength) else { throw .badResultLength(response.resultLength) }
        let results: [UInt8]
        do {
            results = try memory.readBytes(count: Int(response.resultLength), at: GuestAddress(slot.rawValue + UInt64(VMRPCWire.resultsOffset)))
        } catch { throw .memory(error) }
        return Response(status: VMRPCStatus(rawValue: response.status), rawStatus: response.status, results: results,
                        hostFeatures: VMRPCFeatures(rawValue: response.hostFeatures))
    }

    /// Calls `procedure` with `arguments` exitlessly (`Docs/VMRPC.md`, "Exitless calls"): writes
    /// the request with the `exitless` bit, posts it (`posted` = 1, release), fences, and rings
    /// at once if `needs_doorbell` is set; otherwise polls `completed` (acquire) up to
    /// `spinLimit` times, ringing when `needs_doorbell` appears or the bound passes.
    /// `ringAtOnce` posts and rings without spinning (the doorbell then takes the call, or finds
    /// the poller's answer). Returns the response and how it came.
    public func callExitless(_ procedure: UInt32, arguments: [UInt8] = [], spinLimit: Int = 1_000_000,
                             ringAtOnce: Bool = false) throws(VMRPCGuestClientError) -> (Response, VMRPCExitlessPath) {
        guard hostFeatures.contains(.exitless) else { throw .exitlessNotOffered }
        let sequence = nextSequence
        nextSequence &+= 1
        let header = VMRPCRequestHeader(procedure: procedure, sequence: sequence, argumentLength: UInt32(arguments.count),
                                        features: features.union(.exitless))
        try writeRequest(header: header, arguments: arguments)
        let posted = GuestAddress(slot.rawValue + UInt64(VMRPCWire.postedOffset))
        let completed = GuestAddress(slot.rawValue + UInt64(VMRPCWire.completedOffset))
        let needsDoorbell = GuestAddress(slot.rawValue + UInt64(VMRPCWire.needsDoorbellOffset))
        var path = VMRPCExitlessPath.rangAtOnce
        do {
            try memory.atomicStore(UInt32(1), at: posted, ordering: .releasing)
            guestMemoryFullFence()
            if !ringAtOnce {
                path = .spinBoundPassed
                if try memory.atomicLoad(UInt32.self, at: needsDoorbell, ordering: .acquiring) != 0 {
                    path = .doorbellNeeded
                } else {
                    for _ in 0..<max(spinLimit, 1) {
                        if try memory.atomicLoad(UInt32.self, at: completed, ordering: .acquiring) == sequence {
                            path = .exitless
                            break
                        }
                        if try memory.atomicLoad(UInt32.self, at: needsDoorbell, ordering: .acquiring) != 0 {
                            path = .doorbellNeeded
                            break
                        }
                        spinLoopHint()
                    }
                }
            }
        } catch { throw .memory(error) }
        if path != .exitless { ringDoorbell() }
        return (try readResponse(sequence: sequence), path)
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
