/// Results of `clock.read`: 32 bytes.
public struct VMRPCClockReading: VMRPCMessage, Equatable {
    /// Host `CLOCK_MONOTONIC`, nanoseconds.
    public var hostMonotonicNanoseconds: UInt64
    /// The calling vCPU's TSC at the same instant.
    public var guestTSC: UInt64
    /// TSC ticks per second.
    public var tscFrequencyHz: UInt64
    /// Guest TSC minus host TSC.
    public var guestTSCOffset: Int64

    /// A reading.
    public init(hostMonotonicNanoseconds: UInt64, guestTSC: UInt64, tscFrequencyHz: UInt64, guestTSCOffset: Int64) {
        self.hostMonotonicNanoseconds = hostMonotonicNanoseconds; self.guestTSC = guestTSC
        self.tscFrequencyHz = tscFrequencyHz; self.guestTSCOffset = guestTSCOffset
    }

    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        hostMonotonicNanoseconds = try reader.read(); guestTSC = try reader.read()
        tscFrequencyHz = try reader.read(); guestTSCOffset = try reader.read()
    }

    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(hostMonotonicNanoseconds); writer.append(guestTSC)
        writer.append(tscFrequencyHz); writer.append(guestTSCOffset)
    }
}

/// Arguments of `timer.sleepUntil`: the deadline in the calling vCPU's TSC ticks and, in the
/// 16-byte form, the guest's arrival after its previous sleep (TSC at return minus that
/// deadline, before any spin; 0 when unknown). The 16-byte form also tells the host that the
/// guest spins to its deadline itself, so the host may release it early by the return latency
/// it learns from those arrivals.
public struct VMRPCSleepUntil: VMRPCMessage, Equatable {
    public var deadlineGuestTSC: UInt64
    /// The previous arrival in TSC ticks, in the 16-byte form.
    public var previousArrival: Int64?

    /// A deadline, optionally with the previous arrival (the 16-byte form).
    public init(deadlineGuestTSC: UInt64, previousArrival: Int64? = nil) {
        self.deadlineGuestTSC = deadlineGuestTSC
        self.previousArrival = previousArrival
    }

    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        deadlineGuestTSC = try reader.read()
        previousArrival = reader.remaining >= 8 ? try reader.read() : nil
    }

    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(deadlineGuestTSC)
        if let previousArrival { writer.append(previousArrival) }
    }
}

/// Results of `timer.sleepUntil`: the guest TSC when the host released the vCPU.
public struct VMRPCWakeUp: VMRPCMessage, Equatable {
    public var guestTSC: UInt64
    /// A wake-up time.
    public init(guestTSC: UInt64) { self.guestTSC = guestTSC }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) { guestTSC = try reader.read() }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(guestTSC) }
}

/// Arguments of `poll`: how long to wait for a reverse call, in nanoseconds (the host caps it).
public struct VMRPCPoll: VMRPCMessage, Equatable {
    public var timeoutNanoseconds: UInt64
    /// A poll.
    public init(timeoutNanoseconds: UInt64) { self.timeoutNanoseconds = timeoutNanoseconds }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) { timeoutNanoseconds = try reader.read() }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(timeoutNanoseconds) }
}

/// Results of `poll` when a reverse call arrived: its id, procedure and payload.
public struct VMRPCReverseCallDelivery: VMRPCMessage, Equatable {
    /// The host's id for the call; the guest echoes it in `reply`.
    public var callID: UInt64
    /// What the host asks the guest to do (the guest's own numbering).
    public var procedure: UInt32
    /// The payload (at most `maximumPayloadLength` bytes).
    public var payload: [UInt8]
    /// Largest payload that fits in the results area.
    public static let maximumPayloadLength = VMRPCWire.maximumResultLength - 16

    /// A delivery.
    public init(callID: UInt64, procedure: UInt32, payload: [UInt8]) {
        self.callID = callID; self.procedure = procedure; self.payload = payload
    }

    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        callID = try reader.read()
        procedure = try reader.read()
        payload = try reader.readLengthPrefixedBytes(maximum: Self.maximumPayloadLength)
    }

    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(callID); writer.append(procedure); writer.appendLengthPrefixed(payload)
    }
}

/// Arguments of `reply`: the call id, the guest's status for it, and a payload.
public struct VMRPCReplyArguments: VMRPCMessage, Equatable {
    public var callID: UInt64
    /// The guest's status (its own meaning; 0 is success by convention).
    public var status: UInt32
    public var payload: [UInt8]
    /// Largest payload that fits in the arguments area.
    public static let maximumPayloadLength = VMRPCWire.maximumArgumentLength - 16

    /// A reply.
    public init(callID: UInt64, status: UInt32, payload: [UInt8]) {
        self.callID = callID; self.status = status; self.payload = payload
    }

    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        callID = try reader.read()
        status = try reader.read()
        payload = try reader.readLengthPrefixedBytes(maximum: Self.maximumPayloadLength)
    }

    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(callID); writer.append(status); writer.appendLengthPrefixed(payload)
    }
}
