#if canImport(Glibc)
import Glibc
#endif

/// Whether tests that need the real kernel may skip when a part of it is absent.
///
/// Tests of the real kernel skip, saying why, only when something is missing from the machine:
/// `/dev/kvm`, root, cgroup v1 with RT group scheduling, a second CPU. With
/// `RTVIRT_REQUIRE_REAL=1` in the environment (CI sets it: its machines have all of these) such
/// a skip becomes a failure, so that a broken machine cannot turn the real-kernel tests into
/// silent skips. Failures of the code under test are never skips.
public enum RealHostRequirement {
    /// The environment variable that turns skips for missing host features into failures.
    public static let environmentVariable = "RTVIRT_REQUIRE_REAL"

    /// Whether `RTVIRT_REQUIRE_REAL=1` is set.
    public static var isRequired: Bool {
        guard let value = getenv(environmentVariable) else { return false }
        return String(cString: value) == "1"
    }

    /// What a test throws instead of a skip when the real host is required and `what` is missing.
    public struct Missing: Error, Equatable, CustomStringConvertible {
        /// The missing feature and what the test needed it for.
        public var what: String
        /// An error for `what`.
        public init(_ what: String) { self.what = what }
        public var description: String { "\(RealHostRequirement.environmentVariable)=1 forbids this skip: \(what)" }
    }
}
