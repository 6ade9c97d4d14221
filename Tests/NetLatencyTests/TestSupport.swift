#if canImport(Glibc)
import Glibc
#endif
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

/// Skips unless the test may create network namespaces and veths (root and iproute2).
func requireNamespaces() throws {
    guard geteuid() == 0 else { throw unavailable("network namespaces need root") }
    guard ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].contains(where: { (path: String) in access(path, X_OK) == 0 }) else {
        throw unavailable("iproute2 (ip) is not installed")
    }
}

/// Polls `condition` every millisecond until it holds or `seconds` pass (a hang detector, not a
/// timing assertion). Returns whether it held.
@discardableResult
func eventually(within seconds: Double = 30, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
    while monotonicNanoseconds() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}
