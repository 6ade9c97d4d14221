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
    let rawValue: Int32
    init(_ rawValue: Int32) { self.rawValue = rawValue }
    deinit { close(rawValue) }
}
