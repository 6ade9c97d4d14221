import KVMBackend
import RTVirtCore
import XCTest

/// Opens /dev/kvm or skips the test, naming what is missing.
func openKVMOrSkip(file: StaticString = #filePath, line: UInt = #line) throws -> KVMSystem {
    do {
        return try KVMSystem()
    } catch let error as KVMError {
        switch error {
        case .deviceMissing, .permissionDenied:
            throw XCTSkip("real-KVM test skipped: /dev/kvm is not available here (\(error))")
        default:
            throw error
        }
    }
}
