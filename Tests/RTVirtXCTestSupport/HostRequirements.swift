// What the test targets share that needs XCTest (RTVirtTesting, a library for VMM authors'
// tests too, stays free of it): skips that name what the host lacks, and a descriptor count.
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KVMBackend
import RTVirtTesting
import XCTest

/// A skip for a host feature that is absent, naming it: `XCTSkip(message)`, or under
/// `RTVIRT_REQUIRE_REAL=1` (as in CI) a `RealHostRequirement.Missing` error that fails the test.
public func unavailable(_ message: String) -> any Error {
    RealHostRequirement.isRequired ? RealHostRequirement.Missing(message) : XCTSkip(message)
}

/// Opens /dev/kvm, or skips `test` naming what is missing. Any other error fails the test.
public func openKVMOrSkip(_ test: String = "real-KVM test") throws -> KVMSystem {
    do {
        return try KVMSystem()
    } catch .deviceMissing(let path) {
        throw unavailable("\(test) skipped: \(path) is not present on this machine")
    } catch .permissionDenied(let path) {
        throw unavailable("\(test) skipped: no permission to open \(path) (run as root or join its group)")
    }
}

/// Skips unless the test may create network namespaces and veths (root and iproute2).
public func requireNamespaces() throws {
    guard geteuid() == 0 else { throw unavailable("network namespace test skipped: namespaces need root") }
    guard ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].contains(where: { (path: String) in access(path, X_OK) == 0 }) else {
        throw unavailable("network namespace test skipped: iproute2 (ip) is not installed")
    }
}

/// The descriptors the process has open now (the entries of /proc/self/fd; -1 if unreadable).
public func openDescriptorCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}
