import Foundation
import VMRPC
import VMRPCFuzzHarness
import XCTest

/// Replays the fuzzing corpus (seeds, plus every crash the fuzzer ever found, kept as files in
/// Tests/VMRPCTests/FuzzCorpus) through the same harness as the libFuzzer target. The harness
/// traps on a broken invariant (a malformed response, a reverse call with two outcomes or none,
/// a reply accepted for a call the guest was not given), which fails the test run.
final class FuzzCorpusReplayTests: XCTestCase {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("FuzzCorpus")

    func replay(_ name: String) throws -> VMRPCFuzzHarness.Report {
        VMRPCFuzzHarness.run(Array(try Data(contentsOf: Self.corpus.appendingPathComponent(name))))
    }

    func testCorpusReplaysWithoutTrapping() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.corpus.path).sorted()
        XCTAssertGreaterThanOrEqual(files.count, 10)
        var doorbells = 0
        for file in files { doorbells += try replay(file).doorbells }
        XCTAssertGreaterThan(doorbells, files.count, "the seeds ring doorbells")
    }

    /// The reverse-call seeds reach what the invariants are about: deliveries, accepted
    /// replies, and calls ended by cancellation or stop.
    func testReverseCallSeedsReachEveryOutcome() throws {
        let lifecycle = try replay("reverse-call-lifecycle")
        XCTAssertGreaterThanOrEqual(lifecycle.deliveries, 2)
        XCTAssertGreaterThanOrEqual(lifecycle.acceptedReplies, 1)
        XCTAssertGreaterThanOrEqual(lifecycle.failedCalls, 2)
        XCTAssertEqual(lifecycle.acceptedReplies + lifecycle.failedCalls, lifecycle.reverseCalls, "each call ended once")
        let forged = try replay("reverse-call-forged-replies")
        XCTAssertEqual(forged.deliveries, 2)
        XCTAssertEqual(forged.acceptedReplies, 2, "only the two replies with the delivered ids are accepted")
        let full = try replay("reverse-call-full-table")
        XCTAssertEqual(full.reverseCalls, 5, "four fit a table of four; one more after a cancel")
    }

    /// The exitless seeds reach what their invariants are about: calls the poller answers,
    /// posted calls a doorbell takes, calls handed back, late doorbells, and a channel broken
    /// by a storm of garbage posts (then doorbell-only).
    func testExitlessSeedsReachEveryPath() throws {
        let calls = try replay("exitless-calls")
        XCTAssertGreaterThan(calls.exitlessCalls, 0)
        XCTAssertGreaterThan(calls.postedDoorbellCalls, 0)
        XCTAssertGreaterThan(calls.handoffs, 0)
        XCTAssertGreaterThan(try replay("exitless-sleep-cycle").lateDoorbells, 0)
        XCTAssertGreaterThan(try replay("exitless-rewrite-while-posted").brokenChannels, 0)
        XCTAssertGreaterThan(try replay("exitless-handoff").handoffs, 3)
        let storm = try replay("exitless-garbage-storm")
        XCTAssertEqual(storm.exitlessCalls, 8, "7 garbage posts until the burst of 6 is spent, then none until the repair, then 1")
    }

    /// Random control areas, slots and programs through the exitless harness.
    func testRandomExitlessInputsKeepTheInvariants() {
        var generator = SystemRandomNumberGenerator()
        var total = VMRPCFuzzHarness.Report()
        for _ in 0..<300 {
            var input = VMRPCExitlessFuzzHarness.prefix
            input += (0..<Int.random(in: 4096...4300, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            if Bool.random(using: &generator) {
                input.replaceSubrange(4..<12, with: [0x52, 0x54, 0x56, 0x43, 1, 0, 64, 0]) // a valid prefix
                input.replaceSubrange(4 + 52..<4 + 56, with: [1, 0, 0, 0]) // posted
            }
            let report = VMRPCFuzzHarness.run(input)
            total.exitlessCalls += report.exitlessCalls
            total.postedDoorbellCalls += report.postedDoorbellCalls
            total.handoffs += report.handoffs
        }
        XCTAssertGreaterThan(total.exitlessCalls, 0, "random programs reach the poller")
        XCTAssertGreaterThan(total.postedDoorbellCalls, 0, "and posted doorbells")
        XCTAssertGreaterThan(total.handoffs, 0, "and hand-backs")
    }

    /// Random pages and programs: every run ends every reverse call it started exactly once
    /// (the harness checks each) and answers every doorbell.
    func testRandomInputsKeepTheInvariants() {
        var generator = SystemRandomNumberGenerator()
        var total = VMRPCFuzzHarness.Report()
        for _ in 0..<300 {
            let length = Int.random(in: 4096...4300, using: &generator)
            var input = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            if Bool.random(using: &generator) {
                input.replaceSubrange(0..<8, with: [0x52, 0x54, 0x56, 0x43, 1, 0, 64, 0]) // a valid prefix
            }
            let report = VMRPCFuzzHarness.run(input)
            XCTAssertEqual(report.acceptedReplies + report.failedCalls, report.reverseCalls)
            total.doorbells += report.doorbells
            total.reverseCalls += report.reverseCalls
            total.deliveries += report.deliveries
        }
        XCTAssertGreaterThan(total.doorbells, 300, "random programs ring doorbells")
        XCTAssertGreaterThan(total.reverseCalls, 300, "and start reverse calls")
        XCTAssertGreaterThan(total.deliveries, 0, "some of which are polled")
    }
}
