import VMRPCFuzzHarness
import XCTest

/// Random programs through the socket fuzz harness (which traps on a broken invariant: a write
/// outside the named buffer, a send the policy refuses, a leaked descriptor, a malformed response).
final class SocketsFuzzReplayTests: XCTestCase {
    func testRandomProgramsKeepTheInvariants() {
        var generator = SplitMix64(seed: 0x5EED_0010) // fixed: the counts below are the same every run
        var total = SocketsFuzzHarness.Report()
        for _ in 0..<150 {
            let input = (0..<Int.random(in: 50...600, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            let report = SocketsFuzzHarness.run(input)
            total.calls += report.calls
            total.successfulCalls += report.successfulCalls
            total.deniedCalls += report.deniedCalls
            total.datagramsSent += report.datagramsSent
        }
        print("150 random socket programs: \(total)")
        XCTAssertGreaterThan(total.calls, 1500, "random programs make calls")
        XCTAssertGreaterThan(total.successfulCalls, 50, "some of which succeed")
        XCTAssertGreaterThan(total.deniedCalls, 5, "and some the policy refuses")
        XCTAssertGreaterThan(total.datagramsSent, 5, "and datagrams go out")
    }

    /// A fixed program: open, bind, a datagram arrives, receive it into a buffer, batch-echo, close.
    func testAFixedProgramReachesTheDataPath() {
        var program: [UInt8] = []
        program += [0, 0, 0, 0, 2]            // open IPv4 datagram
        program += [1, 0, 0, 0, 0, 0]         // bind handle 0 to port 7000
        program += [6, 0, 0, 0, 100, 0, 0, 0] // a 100-byte datagram to port 7000
        program += [3, 1, 0, 0x10, 0, 0, 0, 0x20] // receive into a guest buffer at 0x4000
        program += [2, 0, 0, 0, 0, 10, 0, 0, 0]  // sendTo 198.18.0.2:9, 10 bytes inline
        let report = SocketsFuzzHarness.run(program)
        XCTAssertEqual(report.calls, 4)
        XCTAssertGreaterThanOrEqual(report.successfulCalls, 3, "\(report)")
        XCTAssertEqual(report.datagramsSent, 1)
    }
}

/// A small deterministic generator (SplitMix64), so the random programs are the same every run.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
