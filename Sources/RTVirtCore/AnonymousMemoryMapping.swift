#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import SystemPackage

/// Errors from laying out guest memory.
public enum MemoryLayoutError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A size or address is not a multiple of the host page size.
    case unaligned(what: String, value: UInt64, pageSize: UInt64)
    /// A region of size zero.
    case emptyRegion
    /// `[base, base + size)` overflows the 64-bit address space.
    case addressOverflow(base: GuestAddress, size: UInt64)
    /// The new region overlaps an existing one.
    case overlapping(base: GuestAddress, size: UInt64, existingBase: GuestAddress, existingSize: UInt64)
    /// The host could not map the memory.
    case hostMappingFailed(size: UInt64, errno: Errno)
    /// No more regions can be added (the hypervisor's slot limit).
    case tooManyRegions(limit: Int)

    public var description: String {
        switch self {
        case let .unaligned(what, value, pageSize):
            return "\(what) 0x\(String(value, radix: 16)) is not a multiple of the page size (\(pageSize))"
        case .emptyRegion:
            return "a memory region cannot be empty"
        case let .addressOverflow(base, size):
            return "region at \(base) of size \(size) overflows the address space"
        case let .overlapping(base, size, existingBase, existingSize):
            return "region [\(base), +\(size)) overlaps the existing region [\(existingBase), +\(existingSize))"
        case let .hostMappingFailed(size, errno):
            return "mmap of \(size) bytes failed: \(errno)"
        case let .tooManyRegions(limit):
            return "no more memory regions can be added (limit \(limit))"
        }
    }
}

/// The host page size.
public let hostPageSize: UInt64 = UInt64(sysconf(Int32(_SC_PAGESIZE)))

/// Owns one private anonymous `mmap` of host memory, unmapped on deinit.
public final class AnonymousMemoryMapping: @unchecked Sendable {
    // @unchecked: the pointer is immutable after init; concurrent access to the bytes it
    // points to is the guest-shared-memory contract described on `GuestMemory`.

    /// Start of the mapping.
    public let pointer: UnsafeMutableRawPointer
    /// Size of the mapping in bytes (a multiple of the page size).
    public let size: UInt64

    /// Maps `size` bytes of zeroed, readable and writable anonymous memory.
    public init(size: UInt64) throws(MemoryLayoutError) {
        guard size > 0 else { throw .emptyRegion }
        guard size % hostPageSize == 0 else {
            throw .unaligned(what: "size", value: size, pageSize: hostPageSize)
        }
        guard let length = Int(exactly: size) else { throw .addressOverflow(base: GuestAddress(0), size: size) }
        let result = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let result, result != MAP_FAILED else {
            throw .hostMappingFailed(size: size, errno: Errno(rawValue: errno))
        }
        self.pointer = result
        self.size = size
    }

    deinit {
        munmap(pointer, Int(size))
    }
}
