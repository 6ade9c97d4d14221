import Foundation
import VMRPC
import VMRPCFuzzHarness
import XCTest

/// Replays the fuzzing corpus (seeds, plus every crash the fuzzer ever found, kept as files in
/// Tests/VMRPCTests/FuzzCorpus) through the same harness as the libFuzzer target.
final class FuzzCorpusReplayTests: XCTestCase {
    func testCorpusReplaysWithoutTrapping() throws {
        let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("FuzzCorpus")
        let files = try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted()
        XCTAssertGreaterThanOrEqual(files.count, 7)
        var doorbells = 0
        for file in files {
            let data = try Data(contentsOf: directory.appendingPathComponent(file))
            doorbells += VMRPCFuzzHarness.run(Array(data))
        }
        XCTAssertGreaterThan(doorbells, files.count, "the seeds ring doorbells")
    }

    func testRandomInputsDoNotTrap() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<300 {
            let length = Int.random(in: 0...4300, using: &generator)
            var input = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            if input.count >= 8, Bool.random(using: &generator) {
                input.replaceSubrange(0..<8, with: [0x52, 0x54, 0x56, 0x43, 1, 0, 64, 0]) // a valid prefix
            }
            VMRPCFuzzHarness.run(input)
        }
    }
}
