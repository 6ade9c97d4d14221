import KVMBackend
import RTVirtCore
import XCTest

/// Opens /dev/kvm, or skips the test naming what is missing.
func openKVMOrSkip() throws -> KVMSystem {
    do {
        return try KVMSystem()
    } catch .deviceMissing(let path) {
        throw XCTSkip("real-KVM test skipped: \(path) is not present on this machine")
    } catch .permissionDenied(let path) {
        throw XCTSkip("real-KVM test skipped: no permission to open \(path) (run as root or join its group)")
    }
}
