// What the test targets share that needs XCTest (RTVirtTesting, a library for VMM authors'
// tests too, stays free of it).
import RTVirtTesting
import XCTest

/// A skip for a host feature that is absent, naming it: `XCTSkip(message)`, or under
/// `RTVIRT_REQUIRE_REAL=1` (as in CI) a `RealHostRequirement.Missing` error that fails the test.
public func unavailable(_ message: String) -> any Error {
    RealHostRequirement.isRequired ? RealHostRequirement.Missing(message) : XCTSkip(message)
}
