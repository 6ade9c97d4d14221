import KVMBackend
import RTVirtCore
import RTVirtTesting
import XCTest
import RTVirtXCTestSupport

/// Opens /dev/kvm, or skips the test naming what is missing. Any other error fails the test.
func openKVMOrSkip() throws -> KVMSystem {
    do {
        return try KVMSystem()
    } catch .deviceMissing(let path) {
        throw unavailable("real-KVM test skipped: \(path) is not present on this machine")
    } catch .permissionDenied(let path) {
        throw unavailable("real-KVM test skipped: no permission to open \(path) (run as root or join its group)")
    }
}
