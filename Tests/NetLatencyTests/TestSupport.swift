#if canImport(Glibc)
import Glibc
#endif
import KVMBackend
import RTVirtCore
import RTVirtTesting
import XCTest
import RTVirtXCTestSupport

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
