import Glibc
import SystemPackage

/// Calls an ioctl wrapper, retrying on EINTR, and turns -1 into `KVMError.ioctlFailed`.
@inline(__always)
func checkedIoctl(_ operation: String, _ call: () -> Int32) throws(KVMError) -> Int32 {
    while true {
        let result = call()
        if result >= 0 { return result }
        let code = errno
        if code == EINTR { continue }
        throw .ioctlFailed(operation: operation, errno: Errno(rawValue: code))
    }
}

/// Owns a file descriptor and closes it on deinit: one owner per KVM descriptor.
final class OwnedDescriptor: Sendable {
    /// The descriptor.
    let descriptor: FileDescriptor
    /// Its number, for the ioctl wrappers.
    var rawValue: Int32 { descriptor.rawValue }
    init(_ rawValue: Int32) { descriptor = FileDescriptor(rawValue: rawValue) }
    deinit { try? descriptor.close() }
}

/// Allocates a zeroed kernel structure `Header` followed by `count` `Entry` elements (a C
/// flexible array member, as in `struct kvm_msrs` or `struct kvm_cpuid2`) for `body`.
func withFlexibleArray<Header, Entry, Result>(
    header: Header.Type, entry: Entry.Type, count: Int,
    _ body: (UnsafeMutablePointer<Header>, UnsafeMutableBufferPointer<Entry>) throws(KVMError) -> Result
) throws(KVMError) -> Result {
    let byteCount = MemoryLayout<Header>.size + count * MemoryLayout<Entry>.stride
    let raw = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 8)
    defer { raw.deallocate() }
    raw.initializeMemory(as: UInt8.self, repeating: 0, count: byteCount)
    // Sound: the entries start right after the header inside the allocation sized for both,
    // and KVM's headers are 8-byte aligned in size.
    let entries = UnsafeMutableBufferPointer(start: (raw + MemoryLayout<Header>.size).assumingMemoryBound(to: Entry.self), count: count)
    return try body(raw.assumingMemoryBound(to: Header.self), entries)
}
