/// The VMRPC wire format, version 1. `Docs/VMRPC.md` is the specification; this file and the
/// C header `rtvirt_vmrpc.h` implement it and are tested against the same vectors.
///
/// Each vCPU owns one 4096-byte call slot in guest memory:
///
/// | offset | size | field | written by |
/// |---|---|---|---|
/// | 0 | 4 | magic `0x43565452` ("RTVC") | guest |
/// | 4 | 2 | version (1) | guest |
/// | 6 | 2 | header size (64) | guest |
/// | 8 | 4 | feature bits requested | guest |
/// | 12 | 4 | procedure id | guest |
/// | 16 | 4 | sequence (echoed) | guest |
/// | 20 | 4 | argument length | guest |
/// | 24 | 8 | reserved, zero | guest |
/// | 32 | 4 | status | host |
/// | 36 | 4 | result length | host |
/// | 40 | 4 | sequence echo | host |
/// | 44 | 4 | host feature bits | host |
/// | 48 | 4 | host version | host |
/// | 52 | 4 | `posted` (exitless control area) | guest sets 1, host clears |
/// | 56 | 4 | `completed` (exitless control area) | host |
/// | 60 | 4 | `needs_doorbell` (exitless control area) | host |
/// | 64 | ≤ 1984 | arguments | guest |
/// | 2048 | ≤ 2048 | results | host |
public enum VMRPCWire {
    /// "RTVC" little-endian.
    public static let magic: UInt32 = 0x4356_5452
    /// The protocol version this implementation speaks.
    public static let version: UInt16 = 1
    /// Bytes of the header (request and response parts).
    public static let headerSize = 64
    /// Bytes of one call slot.
    public static let slotSize = 4096
    /// Offset of the host-written response part of the header.
    public static let responseOffset = 32
    /// Bytes of the response part (status … host version); the control area follows it.
    public static let responseLength = 20
    /// Offset of the exitless control area (three 32-bit words, naturally aligned).
    public static let controlOffset = 52
    /// Offset of `posted`: the guest stores 1 (release) after writing a request; the host
    /// takes the call by exchanging it back to 0.
    public static let postedOffset = 52
    /// Offset of `completed`: the host stores the answered call's `sequence` (release) after
    /// writing the response.
    public static let completedOffset = 56
    /// Offset of `needs_doorbell`: non-zero while the host will not take a posted call
    /// without a doorbell (host-owned).
    public static let needsDoorbellOffset = 60
    /// Offset and maximum size of the arguments.
    public static let argumentsOffset = 64
    public static let maximumArgumentLength = 2048 - 64
    /// Offset and maximum size of the results.
    public static let resultsOffset = 2048
    public static let maximumResultLength = 2048
}

/// Feature bits. A call that requests a bit the host does not offer is rejected; every
/// response carries the host's bits, so a guest learns them from its first call.
public struct VMRPCFeatures: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    /// Bits as written on the wire.
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `poll` and `reply`: calls from the host into the guest.
    public static let reverseCalls = VMRPCFeatures(rawValue: 1 << 0)
    /// The doorbell may be an MMIO write as well as a port write.
    public static let mmioDoorbell = VMRPCFeatures(rawValue: 1 << 1)
    /// A call with this bit may end early with `interrupted` when the VMM has an interrupt
    /// for the parked vCPU; the guest takes the interrupt and calls again.
    public static let interruptible = VMRPCFeatures(rawValue: 1 << 2)
    /// Calls may be posted through the slot's control area and answered by a host poller
    /// without a VM exit (`Docs/VMRPC.md`, "Exitless calls"). A posted call must set it.
    public static let exitless = VMRPCFeatures(rawValue: 1 << 3)
    /// Everything this implementation offers.
    public static let all: VMRPCFeatures = [.reverseCalls, .mmioDoorbell, .interruptible, .exitless]
}

/// The status of a call, written by the host.
public enum VMRPCStatus: UInt32, Error, Sendable, CaseIterable {
    case ok = 0
    case badMagic = 1
    case badVersion = 2
    case badHeaderSize = 3
    case unsupportedFeature = 4
    case reservedNotZero = 5
    case badArgumentLength = 6
    case unknownProcedure = 7
    case badArguments = 8
    case timedOut = 9
    case cancelled = 10
    case channelBroken = 11
    case noSuchCall = 12
    case busy = 13
    case internalError = 14
    case interrupted = 15
}

/// Procedure ids. 0 is reserved; 0x100-0x1FF are reserved for `net.*`.
public enum VMRPCProcedureID {
    /// Does nothing; for measuring the round trip.
    public static let null: UInt32 = 1
    /// Host monotonic time, the guest TSC at the same instant, the TSC rate and offset.
    public static let clockRead: UInt32 = 2
    /// Blocks until a deadline in guest TSC cycles.
    public static let timerSleepUntil: UInt32 = 3
    /// Blocks until the host queues a reverse call for this vCPU, or a timeout.
    public static let poll: UInt32 = 4
    /// Answers a reverse call.
    public static let reply: UInt32 = 5
    /// First id of the `net.*` range.
    public static let networkRangeStart: UInt32 = 0x100
}

/// The guest-written part of a slot's header, decoded from one copy.
public struct VMRPCRequestHeader: Equatable, Sendable {
    public var magic: UInt32 = VMRPCWire.magic
    public var version: UInt16 = VMRPCWire.version
    public var headerSize: UInt16 = UInt16(VMRPCWire.headerSize)
    public var features: UInt32 = 0
    public var procedure: UInt32
    public var sequence: UInt32
    public var argumentLength: UInt32
    public var reserved: UInt64 = 0

    /// A well-formed header.
    public init(procedure: UInt32, sequence: UInt32, argumentLength: UInt32, features: VMRPCFeatures = []) {
        self.procedure = procedure
        self.sequence = sequence
        self.argumentLength = argumentLength
        self.features = features.rawValue
    }

    /// Decodes the first 32 bytes of `bytes`. Bytes missing from a shorter buffer read as zero
    /// (such a header fails `validate`: its magic is wrong); nothing is read out of bounds.
    public init(decoding bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= VMRPCWire.responseOffset else {
            self = withZeroPadded(bytes, to: VMRPCWire.responseOffset) { VMRPCRequestHeader(decoding: $0) }
            return
        }
        var reader = VMRPCByteReader(bytes)
        magic = reader.uncheckedUInt32()
        version = reader.uncheckedUInt16()
        headerSize = reader.uncheckedUInt16()
        features = reader.uncheckedUInt32()
        procedure = reader.uncheckedUInt32()
        sequence = reader.uncheckedUInt32()
        argumentLength = reader.uncheckedUInt32()
        reserved = reader.uncheckedUInt64()
    }

    /// The 32 bytes on the wire.
    public var bytes: [UInt8] {
        var writer = VMRPCByteWriter()
        writer.append(magic); writer.append(version); writer.append(headerSize); writer.append(features)
        writer.append(procedure); writer.append(sequence); writer.append(argumentLength); writer.append(reserved)
        return writer.bytes
    }

    /// Checks every header field against the host's limits (not the procedure's).
    public func validate(hostFeatures: VMRPCFeatures) -> VMRPCStatus {
        if magic != VMRPCWire.magic { return .badMagic }
        if version != VMRPCWire.version { return .badVersion }
        if headerSize != UInt16(VMRPCWire.headerSize) { return .badHeaderSize }
        if features & ~hostFeatures.rawValue != 0 { return .unsupportedFeature }
        if reserved != 0 { return .reservedNotZero }
        if argumentLength > UInt32(VMRPCWire.maximumArgumentLength) { return .badArgumentLength }
        return .ok
    }
}

/// The host-written part of a slot's header.
public struct VMRPCResponseHeader: Equatable, Sendable {
    public var status: UInt32
    public var resultLength: UInt32
    public var sequence: UInt32
    public var hostFeatures: UInt32
    public var hostVersion: UInt32 = UInt32(VMRPCWire.version)

    /// A response header.
    public init(status: VMRPCStatus, resultLength: UInt32, sequence: UInt32, hostFeatures: VMRPCFeatures) {
        self.status = status.rawValue
        self.resultLength = resultLength
        self.sequence = sequence
        self.hostFeatures = hostFeatures.rawValue
    }

    /// Decodes the first 20 bytes of `bytes` (the response part of the header). Bytes
    /// missing from a shorter buffer read as zero; nothing is read out of bounds.
    public init(decoding bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= 20 else {
            self = withZeroPadded(bytes, to: 20) { VMRPCResponseHeader(decoding: $0) }
            return
        }
        var reader = VMRPCByteReader(bytes)
        status = reader.uncheckedUInt32()
        resultLength = reader.uncheckedUInt32()
        sequence = reader.uncheckedUInt32()
        hostFeatures = reader.uncheckedUInt32()
        hostVersion = reader.uncheckedUInt32()
    }

    /// The 20 bytes on the wire at offset 32. The 12 bytes after them are the exitless
    /// control area, which a response never writes.
    public var bytes: [UInt8] {
        var writer = VMRPCByteWriter()
        writer.append(status); writer.append(resultLength); writer.append(sequence)
        writer.append(hostFeatures); writer.append(hostVersion)
        return writer.bytes
    }
}

/// Calls `body` with `bytes` copied into a zeroed buffer of `count` bytes (for decoders given
/// fewer bytes than their fixed size).
private func withZeroPadded<T>(_ bytes: UnsafeRawBufferPointer, to count: Int, _ body: (UnsafeRawBufferPointer) -> T) -> T {
    var padded = [UInt8](repeating: 0, count: count)
    padded.withUnsafeMutableBytes { padded in
        // Sound: at most `count` bytes are copied into a buffer of `count` bytes.
        padded.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes.prefix(count)))
    }
    return padded.withUnsafeBytes(body)
}
