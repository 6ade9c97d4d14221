/// Reads little-endian integers from a byte buffer with bounds checks.
public struct VMRPCByteReader {
    private let bytes: UnsafeRawBufferPointer
    /// Bytes consumed so far.
    public private(set) var offset = 0

    /// A reader over `bytes` (which must outlive the reader).
    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    /// Bytes not yet read.
    public var remaining: Int { bytes.count - offset }

    /// Reads a `T`, or throws `badArguments` when fewer bytes remain.
    public mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) throws(VMRPCStatus) -> T {
        guard remaining >= MemoryLayout<T>.size else { throw .badArguments }
        return unchecked()
    }

    /// Reads `count` bytes, or throws `badArguments`.
    public mutating func readBytes(count: Int) throws(VMRPCStatus) -> [UInt8] {
        guard count >= 0, remaining >= count else { throw .badArguments }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }

    /// Reads a u32 length, then that many bytes; throws `badArguments` when the length is over
    /// `maximum` or more than what remains.
    public mutating func readLengthPrefixedBytes(maximum: Int) throws(VMRPCStatus) -> [UInt8] {
        let length: UInt32 = try read()
        guard length <= UInt32(maximum) else { throw .badArguments }
        return try readBytes(count: Int(length))
    }

    mutating func unchecked<T: FixedWidthInteger>() -> T {
        var value = T.zero
        // Sound: callers check (or, for headers, the caller's buffer is a full header) that
        // `size` bytes remain.
        withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + MemoryLayout<T>.size])) }
        offset += MemoryLayout<T>.size
        return T(littleEndian: value)
    }
    mutating func uncheckedUInt16() -> UInt16 { unchecked() }
    mutating func uncheckedUInt32() -> UInt32 { unchecked() }
    mutating func uncheckedUInt64() -> UInt64 { unchecked() }
}

/// Appends little-endian integers to a byte array.
public struct VMRPCByteWriter {
    /// What was written.
    public private(set) var bytes: [UInt8] = []

    /// An empty writer.
    public init() {}

    /// Appends `value` little-endian.
    public mutating func append<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Appends raw bytes.
    public mutating func append(bytes more: some Collection<UInt8>) { bytes.append(contentsOf: more) }

    /// Appends a u32 length, then the bytes.
    public mutating func appendLengthPrefixed(_ more: [UInt8]) {
        append(UInt32(more.count))
        append(bytes: more)
    }
}

/// A value that travels as VMRPC arguments or results.
public protocol VMRPCMessage: Sendable {
    /// Decodes from exactly the bytes of a call's arguments or results.
    init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus)
    /// Encodes itself.
    func encode(into writer: inout VMRPCByteWriter)
}

extension VMRPCMessage {
    /// The encoded bytes.
    public var encoded: [UInt8] {
        var writer = VMRPCByteWriter()
        encode(into: &writer)
        return writer.bytes
    }

    /// Decodes `bytes`, requiring every byte to be used.
    public static func decode(_ bytes: [UInt8]) throws(VMRPCStatus) -> Self {
        var failure: VMRPCStatus?
        let value: Self? = bytes.withUnsafeBytes { buffer in
            var reader = VMRPCByteReader(buffer)
            do throws(VMRPCStatus) {
                let value = try Self(decoding: &reader)
                guard reader.remaining == 0 else { throw .badArguments }
                return value
            } catch {
                failure = error
                return nil
            }
        }
        guard let value else { throw failure ?? .badArguments }
        return value
    }
}

/// No bytes.
public struct VMRPCEmpty: VMRPCMessage, Equatable {
    /// Nothing.
    public init() {}
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {}
    public func encode(into writer: inout VMRPCByteWriter) {}
}
