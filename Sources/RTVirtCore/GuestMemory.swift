/// Why a guest-memory access was refused.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `[address, address + length)` is not inside one region of guest memory.
    case outOfBounds(address: GuestAddress, length: UInt64)

    public var description: String {
        switch self {
        case let .outOfBounds(address, length):
            return "guest memory access of \(length) bytes at \(address) is outside guest memory"
        }
    }
}

/// Guest-physical memory as the host sees it: every access is bounds-checked.
///
/// Conformers own host memory that backs guest RAM. Accesses copy; no host pointer into
/// guest memory escapes except through `withHostPointer`, whose range is checked too.
/// Guest memory is shared with running vCPUs: the guest may change it at any moment.
/// Copy what you need once, then validate the copy.
public protocol GuestMemory: AnyObject, Sendable {
    /// Copies `buffer.count` bytes starting at `address` into `buffer`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError)

    /// Copies `bytes` into guest memory starting at `address`.
    func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError)

    /// Calls `body` with a host pointer to `length` bytes at `address`, after checking that
    /// the whole range lies in one region. The pointer is valid only inside `body`.
    func withHostPointer<R>(
        at address: GuestAddress, length: UInt64,
        _ body: (UnsafeMutableRawPointer) throws -> R
    ) throws -> R
}

extension GuestMemory {
    /// Reads a little-endian integer at `address`.
    public func read<T: FixedWidthInteger>(_ type: T.Type = T.self, at address: GuestAddress) throws(GuestMemoryError) -> T {
        var value = T.zero
        try withUnsafeMutableBytes(of: &value) { (buffer) throws(GuestMemoryError) in
            try read(into: buffer, at: address)
        }
        return T(littleEndian: value)
    }

    /// Writes `value` little-endian at `address`.
    public func write<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        var littleEndian = value.littleEndian
        try withUnsafeBytes(of: &littleEndian) { (buffer) throws(GuestMemoryError) in
            try write(buffer, at: address)
        }
    }

    /// Reads `count` bytes at `address`.
    public func readBytes(count: Int, at address: GuestAddress) throws(GuestMemoryError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var failure: GuestMemoryError?
        bytes.withUnsafeMutableBytes { buffer in
            do throws(GuestMemoryError) { try read(into: buffer, at: address) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Writes `bytes` at `address`.
    public func write(bytes: some Collection<UInt8>, at address: GuestAddress) throws(GuestMemoryError) {
        let array = Array(bytes)
        var failure: GuestMemoryError?
        array.withUnsafeBytes { buffer in
            do throws(GuestMemoryError) { try write(buffer, at: address) } catch { failure = error }
        }
        if let failure { throw failure }
    }
}
