import CLinuxSupport

/// Why a guest-memory access was refused.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `[address, address + length)` is not inside one region of guest memory.
    case outOfBounds(address: GuestAddress, length: UInt64)
    /// An atomic access at an address that is not a multiple of its size.
    case misaligned(address: GuestAddress, alignment: Int)

    public var description: String {
        switch self {
        case let .outOfBounds(address, length):
            return "guest memory access of \(length) bytes at \(address) is outside guest memory"
        case let .misaligned(address, alignment):
            return "atomic guest memory access at \(address) is not \(alignment)-byte aligned"
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

/// The memory ordering of an atomic access to guest memory (C11's, as in `Docs/VMRPC.md`).
public enum GuestMemoryOrdering: Sendable {
    /// No ordering beyond the access itself.
    case relaxed
    /// Later accesses of this thread stay after the load (consume what the guest published).
    case acquiring
    /// Earlier accesses of this thread stay before the store (publish to the guest).
    case releasing
    /// Sequentially consistent.
    case sequentiallyConsistent

    var loadOrder: Int32 {
        switch self {
        case .relaxed, .releasing: return 0
        case .acquiring: return 2
        case .sequentiallyConsistent: return 5
        }
    }

    var storeOrder: Int32 {
        switch self {
        case .relaxed, .acquiring: return 0
        case .releasing: return 3
        case .sequentiallyConsistent: return 5
        }
    }
}

/// Guest-memory words that may be shared with a running vCPU: 4 or 8 bytes, naturally aligned.
public protocol GuestMemoryAtomicWord: FixedWidthInteger, UnsignedInteger, Sendable {}
extension UInt32: GuestMemoryAtomicWord {}
extension UInt64: GuestMemoryAtomicWord {}

extension GuestMemory {
    /// Loads a word the guest may be writing at the same time, atomically (little-endian,
    /// x86's order). `.releasing` loads are relaxed.
    /// - Throws: `.misaligned` unless `address` is a multiple of the word's size; `.outOfBounds`.
    public func atomicLoad<Word: GuestMemoryAtomicWord>(_ type: Word.Type = Word.self, at address: GuestAddress,
                                                        ordering: GuestMemoryOrdering) throws(GuestMemoryError) -> Word {
        let size = MemoryLayout<Word>.size
        guard address.rawValue % UInt64(size) == 0 else { throw .misaligned(address: address, alignment: size) }
        do {
            return try withHostPointer(at: address, length: UInt64(size)) { pointer in
                // Sound: the range lies in guest memory and is naturally aligned (checked above,
                // and regions are page-aligned), as the C atomics require.
                if size == 4 {
                    return Word(truncatingIfNeeded: rtv_atomic_load_u32(pointer.assumingMemoryBound(to: UInt32.self), ordering.loadOrder))
                }
                return Word(truncatingIfNeeded: rtv_atomic_load_u64(pointer.assumingMemoryBound(to: UInt64.self), ordering.loadOrder))
            }
        } catch { throw .outOfBounds(address: address, length: UInt64(size)) }
    }

    /// Stores a word the guest may be reading at the same time, atomically. `.acquiring`
    /// stores are relaxed.
    /// - Throws: `.misaligned` unless `address` is a multiple of the word's size; `.outOfBounds`.
    public func atomicStore<Word: GuestMemoryAtomicWord>(_ value: Word, at address: GuestAddress,
                                                         ordering: GuestMemoryOrdering) throws(GuestMemoryError) {
        let size = MemoryLayout<Word>.size
        guard address.rawValue % UInt64(size) == 0 else { throw .misaligned(address: address, alignment: size) }
        do {
            try withHostPointer(at: address, length: UInt64(size)) { pointer in
                // Sound: as in `atomicLoad`.
                if size == 4 {
                    rtv_atomic_store_u32(pointer.assumingMemoryBound(to: UInt32.self), UInt32(truncatingIfNeeded: value), ordering.storeOrder)
                } else {
                    rtv_atomic_store_u64(pointer.assumingMemoryBound(to: UInt64.self), UInt64(truncatingIfNeeded: value), ordering.storeOrder)
                }
            }
        } catch { throw .outOfBounds(address: address, length: UInt64(size)) }
    }

    /// Atomically replaces the 32-bit word at `address` with `desired` if it holds `expected`
    /// (sequentially consistent). Returns the value it held.
    public func atomicCompareExchange(_ expected: UInt32, _ desired: UInt32, at address: GuestAddress) throws(GuestMemoryError) -> UInt32 {
        guard address.rawValue % 4 == 0 else { throw .misaligned(address: address, alignment: 4) }
        do {
            return try withHostPointer(at: address, length: 4) { pointer in
                // Sound: as in `atomicLoad`.
                rtv_atomic_cas_u32(pointer.assumingMemoryBound(to: UInt32.self), expected, desired)
            }
        } catch { throw .outOfBounds(address: address, length: 4) }
    }
}

/// A full memory fence (between publishing a flag and checking another, as `Docs/VMRPC.md` asks).
@inline(__always)
public func guestMemoryFullFence() { rtv_atomic_fence() }
