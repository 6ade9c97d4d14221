import CZlib
import Foundation
import Histogram
import KVMBackend
import RTVirtCore
@testable import rtvirt
import XCTest
import RealtimeVCPU
import RTVirtXCTestSupport

/// `rtvirt cyclictest`'s pieces: the HdrHistogram log encoding, rounds, statistics and
/// comparisons, the plot's axes, and one real round of every path. No timing is asserted.
final class CyclicTestEncodingTests: XCTestCase {
    func testZigZagLEB128MatchesHdrHistogramsEncoding() {
        func encoded(_ value: Int64) -> [UInt8] {
            var bytes: [UInt8] = []
            HistogramEncoding.appendZigZag(value, to: &bytes)
            return bytes
        }
        XCTAssertEqual(encoded(0), [0])
        XCTAssertEqual(encoded(-1), [1])
        XCTAssertEqual(encoded(1), [2])
        XCTAssertEqual(encoded(63), [126])
        XCTAssertEqual(encoded(64), [0x80, 0x01])
        XCTAssertEqual(encoded(-300), [0xD7, 0x04])
        XCTAssertEqual(encoded(Int64.max).count, 9, "64-bit values take 8 groups of 7 bits and a last full byte")
        XCTAssertEqual(decodeZigZag(encoded(Int64.min)).0, Int64.min)
        XCTAssertEqual(decodeZigZag(encoded(1 << 62)).0, 1 << 62)
    }

    func testCountsIndexAndValueAreInverse() {
        // 3 significant digits, unit 1: 2048 sub-buckets, half of them per later bucket.
        for value: UInt64 in [0, 1, 2047, 2048, 2049, 4095, 4096, 1_000_000, 9_999_999_999] {
            let index = HistogramEncoding.countsIndex(of: value, unitMagnitude: 0, subBucketHalfCountMagnitude: 10)
            let lowest = HistogramEncoding.value(atIndex: index, unitMagnitude: 0, subBucketHalfCountMagnitude: 10)
            XCTAssertLessThanOrEqual(lowest, value)
            XCTAssertEqual(HistogramEncoding.countsIndex(of: lowest, unitMagnitude: 0, subBucketHalfCountMagnitude: 10), index)
        }
        XCTAssertEqual(HistogramEncoding.countsIndex(of: 2047, unitMagnitude: 0, subBucketHalfCountMagnitude: 10), 2047)
        XCTAssertEqual(HistogramEncoding.countsIndex(of: 2048, unitMagnitude: 0, subBucketHalfCountMagnitude: 10), 2048)
        XCTAssertEqual(HistogramEncoding.countsIndex(of: 4096, unitMagnitude: 0, subBucketHalfCountMagnitude: 10), 3072)
    }

    func testCompressedEncodingDecodesToTheSameCounts() throws {
        var histogram = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 10_000_000_000, numberOfSignificantValueDigits: .three)
        let values: [UInt64] = [0, 0, 1, 7, 7, 7, 2047, 2048, 5_000, 5_003, 123_456, 123_456, 9_000_000, 9_999_999_999]
        for value in values { _ = histogram.record(value) }
        let compressed = try HistogramEncoding.encodeCompressed(histogram)
        XCTAssertTrue(Data(compressed).base64EncodedString().hasPrefix("HISTF"), "the cookie every HdrHistogram log line starts with")
        XCTAssertEqual(readBigEndian(compressed, 0, UInt32.self), HistogramEncoding.compressedCookie)
        let length = Int(readBigEndian(compressed, 4, UInt32.self))
        XCTAssertEqual(length, compressed.count - 8)

        let plain = try inflate(Array(compressed[8...]))
        XCTAssertEqual(plain, HistogramEncoding.encode(histogram))
        XCTAssertEqual(readBigEndian(plain, 0, UInt32.self), HistogramEncoding.cookie)
        let payloadLength = Int(readBigEndian(plain, 4, UInt32.self))
        XCTAssertEqual(payloadLength, plain.count - 40)
        XCTAssertEqual(readBigEndian(plain, 12, UInt32.self), 3, "significant digits")
        XCTAssertEqual(readBigEndian(plain, 16, UInt64.self), 1, "lowest discernible value")
        XCTAssertEqual(readBigEndian(plain, 24, UInt64.self), 10_000_000_000, "highest trackable value")
        XCTAssertEqual(Double(bitPattern: readBigEndian(plain, 32, UInt64.self)), 1.0)

        // Decode the counts as any HdrHistogram reader does and compare value by value.
        var counts: [Int: UInt64] = [:]
        var index = 0
        var offset = 40
        while offset < plain.count {
            let (value, used) = decodeZigZag(Array(plain[offset...]))
            offset += used
            if value < 0 { index += Int(-value) } else { if value > 0 { counts[index] = UInt64(value) }; index += 1 }
        }
        XCTAssertEqual(counts.values.reduce(0, +), UInt64(values.count))
        for (index, count) in counts {
            let value = HistogramEncoding.value(atIndex: index, unitMagnitude: 0, subBucketHalfCountMagnitude: 10)
            XCTAssertEqual(UInt64(histogram.countForValue(value)), count, "count at \(value)")
        }
    }

    func testLogWriterWritesTheHeaderAndOneTaggedLinePerInterval() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("cyclic-\(getpid()).hlog").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        var histogram = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 10_000_000_000, numberOfSignificantValueDigits: .three)
        _ = histogram.record(2_500_000)
        let writer = try HistogramLogWriter(path: path, startTime: Date(timeIntervalSince1970: 1_000_000), comment: "test")
        try writer.append(histogram, tag: "host", start: 0.5, end: 1.75)
        try writer.append(histogram, tag: "guest-longpoll", start: 1.75, end: 3)
        try writer.close()
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map(String.init)
        XCTAssertEqual(lines[1], "#[Histogram log format version 1.3]")
        XCTAssertTrue(lines[2].hasPrefix("#[StartTime: 1000000.000 (seconds since epoch), "))
        XCTAssertEqual(lines[3], "#[BaseTime: 1000000.000 (seconds since epoch)]")
        XCTAssertEqual(lines[4], "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"")
        XCTAssertTrue(lines[5].hasPrefix("Tag=host,0.500,1.250,2.501,HISTF"), lines[5])
        XCTAssertTrue(lines[6].hasPrefix("Tag=guest-longpoll,1.750,1.250,2.501,HISTF"), lines[6])
        XCTAssertEqual(lines.count, 7, "the maximum column is the highest equivalent value in ms, as the Java writer prints it")
    }
}

final class CyclicTestPlanTests: XCTestCase {
    func testDefaultRunIsTenRoundsOfOneSecondPerPath() throws {
        let command = try CyclicTestCommand.parse([])
        XCTAssertEqual(command.duration.seconds, 50)
        XCTAssertEqual(command.plan(pathCount: 5), CyclicRoundPlan(periodsPerPath: 10_000, minimumRounds: 10, intervalMicroseconds: 1000))
        XCTAssertEqual(command.plan(pathCount: 5)?.rounds, 10)
        XCTAssertEqual(command.plan(pathCount: 5)?.periodsPerRound, 1000)
    }

    func testLongRunsGetMoreRoundsOfBoundedLength() throws {
        let command = try CyclicTestCommand.parse(["--duration", "12h"])
        let plan = try XCTUnwrap(command.plan(pathCount: 5))
        XCTAssertEqual(plan.periodsPerRound, 10_000, "a round of one path lasts about 10 s")
        XCTAssertEqual(plan.rounds, 864)
        let fast = try XCTUnwrap(CyclicRoundPlan(periodsPerPath: 720_000, minimumRounds: 10, intervalMicroseconds: 100))
        XCTAssertLessThanOrEqual(fast.periodsPerRound, 65_536, "the guest's data buffer holds 65,536 long-poll periods")
        XCTAssertNil(CyclicRoundPlan(periodsPerPath: 50, minimumRounds: 10, intervalMicroseconds: 1000), "fewer than 10 periods per round")
        XCTAssertThrowsError(try CyclicTestCommand.parse(["--count", "50"]).validate())
    }

    func testDurationsParseWithUnits() {
        XCTAssertEqual(CyclicDuration(argument: "50")?.seconds, 50)
        XCTAssertEqual(CyclicDuration(argument: "1.5m")?.seconds, 90)
        XCTAssertEqual(CyclicDuration(argument: "12h")?.seconds, 43_200)
        XCTAssertEqual(CyclicDuration(argument: "2d")?.seconds, 172_800)
        XCTAssertNil(CyclicDuration(argument: "0"))
        XCTAssertNil(CyclicDuration(argument: "soon"))
        XCTAssertEqual(CyclicDuration(seconds: 43_200).description, "12h")
    }

    func testPathOrderRotatesEachRound() {
        let paths = CyclicPath.allCases
        XCTAssertEqual(CyclicRoundPlan.order(of: paths, round: 0), paths)
        XCTAssertEqual(CyclicRoundPlan.order(of: paths, round: 1), Array(paths[1...]) + [paths[0]])
        XCTAssertEqual(CyclicRoundPlan.order(of: paths, round: 5), paths)
        for round in 0..<paths.count {
            XCTAssertEqual(CyclicRoundPlan.order(of: paths, round: round)[0], paths[round], "each path leads one round in five")
        }
    }

    func testPathsOptionSelectsAndRejects() throws {
        XCTAssertEqual(try CyclicTestCommand.parse(["--paths", "host,guest-longpoll"]).selectedPaths, [.host, .guestLongPoll])
        XCTAssertThrowsError(try CyclicTestCommand.parse(["--paths", "host,guest"]).selectedPaths)
        XCTAssertEqual(CyclicPath.allCases.map(\.rawValue),
                       ["host", "host-compensated", "guest-longpoll-raw", "guest-longpoll", "guest-interrupt"], "stable JSON names")
    }
}

final class CyclicTestStatisticsTests: XCTestCase {
    func testEarlyWakesAreCountedAndTheExtremesKeptExactly() {
        var statistics = CyclicPathStatistics(path: .guestLongPollRaw)
        for lateness: Int64 in [-57_000, 1_000, 2_000, 3_000, 20_000_000_000] { statistics.record(latenessNanoseconds: lateness) }
        statistics.endRound(cost: ThreadCost()) { _ in }
        let result = statistics.result
        XCTAssertEqual(result.samples, 5)
        XCTAssertEqual(result.earlyWakes, 1)
        XCTAssertEqual(result.minUs, -57)
        XCTAssertEqual(result.maxUs, 20_000_000, "beyond the histogram's range, the maximum is still exact")
        XCTAssertEqual(result.p50Us, 2, accuracy: 0.01)
        XCTAssertEqual(statistics.total.totalCount, 5, "the early wake-up is in the histogram as lateness 0")
        XCTAssertEqual(statistics.round.totalCount, 0, "the round histogram is emptied")
        XCTAssertEqual(result.rounds, 1)
    }

    func testRoundsAddUpAndTheLogSeesEachRound() {
        var statistics = CyclicPathStatistics(path: .host)
        var logged: [UInt64] = []
        for round in 1...3 {
            for _ in 0..<100 { statistics.record(latenessNanoseconds: Int64(round) * 10_000) }
            var cost = ThreadCost()
            cost.wallNanoseconds = 1_000_000_000
            cost.cpuNanoseconds = 20_000_000
            cost.stealNanoseconds = UInt64(round) * 10_000_000
            cost.involuntarySwitches = round
            statistics.endRound(cost: cost) { logged.append($0.totalCount) }
        }
        XCTAssertEqual(logged, [100, 100, 100])
        let result = statistics.result
        XCTAssertEqual(result.samples, 300)
        XCTAssertEqual(result.cpuFraction, 0.02, accuracy: 1e-9)
        XCTAssertEqual(result.stealFraction, 0.02, accuracy: 1e-9)
        XCTAssertEqual(result.involuntaryContextSwitches, 6)
        XCTAssertEqual(statistics.rounds.map(\.p99Nanoseconds), [10_000, 20_000, 30_000].map(Double.init))
        XCTAssertNil(result.spinCpuFraction, "a path that does not spin has no spin fraction")
    }

    func testComparisonsAreMediansOfPerRoundValues() {
        var numerator = CyclicPathStatistics(path: .guestLongPoll)
        var denominator = CyclicPathStatistics(path: .hostCompensated)
        // Per-round p99s: guest 10, 30, 20, 90 µs; host 10, 10, 10, 10 µs → ratios 1, 3, 2, 9.
        for guest in [10, 30, 20, 90] {
            for _ in 0..<10 {
                numerator.record(latenessNanoseconds: Int64(guest) * 1000)
                denominator.record(latenessNanoseconds: 10_000)
            }
            numerator.endRound(cost: ThreadCost()) { _ in }
            denominator.endRound(cost: ThreadCost()) { _ in }
        }
        let comparisons = CyclicComparisons.evaluate(CyclicComparison.headline, statistics: [numerator, denominator])
        let tax = try? XCTUnwrap(comparisons.first { $0.name == "guest-longpoll p99 / host-compensated p99" })
        XCTAssertEqual(tax?.median ?? 0, 2.5, accuracy: 0.01, "the median of 1, 2, 3, 9")
        XCTAssertEqual(tax?.min ?? 0, 1, accuracy: 0.01)
        XCTAssertEqual(tax?.max ?? 0, 9, accuracy: 0.01)
        XCTAssertEqual(tax?.rounds, 4)
        XCTAssertEqual(tax?.numerator, "guest-longpoll")
        XCTAssertEqual(tax?.denominator, "host-compensated")
        let difference = comparisons.first { $0.kind == "difference" }
        XCTAssertEqual(difference?.median ?? 0, 15, accuracy: 0.1, "p50 differences 0, 20, 10, 80 µs")
        XCTAssertFalse(comparisons.contains { $0.denominator == "guest-interrupt" }, "no comparison with a path that did not run")
        XCTAssertEqual(CyclicComparisons.median([3, 1, 2]), 2)
    }

    func testReportJSONKeepsTheExistingPathFieldsAndAddsTheNewOnes() throws {
        var statistics = CyclicPathStatistics(path: .host)
        statistics.record(latenessNanoseconds: 12_000)
        statistics.endRound(cost: ThreadCost()) { _ in }
        let data = try JSONEncoder().encode(statistics.result)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        for key in ["name", "samples", "minUs", "avgUs", "p50Us", "p99Us", "p999Us", "maxUs",
                    "earlyWakes", "cpuFraction", "stealFraction", "involuntaryContextSwitches"] {
            XCTAssertNotNil(object[key], key)
        }
    }

    func testProcFilesAreParsed() {
        XCTAssertEqual(CPUAccounting.schedstatRuntime("123456789 5000 42\n"), 123_456_789)
        let stat = """
            cpu  7997 0 3204 98332 1773 0 29 21 97 0
            cpu0 3303 0 1199 51196 23 0 12 10 8 0
            cpu1 4693 0 2005 47135 1750 0 17 10 88 0
            intr 1 2 3
            """
        XCTAssertEqual(CPUAccounting.stealTicks(stat, cpu: 1), 10)
        XCTAssertEqual(CPUAccounting.stealTicks(stat, cpu: 0), 10)
        XCTAssertNil(CPUAccounting.stealTicks(stat, cpu: 2))
    }
}

final class CyclicPlotTests: XCTestCase {
    func testTicksAreRoundValues() {
        XCTAssertEqual(CyclicPlot.linearTicks(upTo: 1218), [0, 200, 400, 600, 800, 1000, 1200, 1400])
        XCTAssertEqual(CyclicPlot.linearTicks(upTo: 77.5), [0, 10, 20, 30, 40, 50, 60, 70, 80])
        XCTAssertEqual(CyclicPlot.logTicks(from: 0.3, to: 1380), [0.1, 1, 10, 100, 1000, 10_000])
        XCTAssertEqual(CyclicPlot.label(microseconds: 0.1), "0.1")
        XCTAssertEqual(CyclicPlot.label(microseconds: 100), "100")
        XCTAssertEqual(CyclicPlot.label(microseconds: 10_000), "10 ms")
    }

    func testEveryLabelIsInsideTheCanvas() throws {
        var paths: [CyclicPathStatistics] = []
        for (index, path) in CyclicPath.allCases.enumerated() {
            var statistics = CyclicPathStatistics(path: path)
            for sample in 0..<1000 { statistics.record(latenessNanoseconds: Int64(index * 10_000 + sample * 40)) }
            statistics.record(latenessNanoseconds: 2_000_000) // one outlier at 2 ms
            if path == .guestLongPollRaw { statistics.record(latenessNanoseconds: -5_000) }
            statistics.endRound(cost: ThreadCost()) { _ in }
            paths.append(statistics)
        }
        for scale in CyclicPlotScale.allCases {
            let svg = CyclicPlot.svg(paths, intervalMicroseconds: 1000, scale: scale)
            let width = try XCTUnwrap(Double(try XCTUnwrap(firstMatch(#"<svg [^>]*width="([0-9.]+)""#, in: svg))))
            for path in CyclicPath.allCases { XCTAssertTrue(svg.contains(">\(path.rawValue)  p50"), "legend of \(path.rawValue)") }
            // Each text's extent, at a generous 8 px per character, stays within the canvas.
            let texts = svg.components(separatedBy: "<text ").dropFirst()
            XCTAssertFalse(texts.isEmpty)
            for text in texts {
                let x = try XCTUnwrap(Double(try XCTUnwrap(firstMatch(#"x="([0-9.-]+)""#, in: text))))
                let content = try XCTUnwrap(firstMatch(#">([^<]*)</text>"#, in: text))
                let extent = Double(content.count) * 8
                let anchor = firstMatch(#"text-anchor="([a-z]+)""#, in: text) ?? "start"
                let (low, high) = anchor == "end" ? (x - extent, x) : anchor == "middle" ? (x - extent / 2, x + extent / 2) : (x, x + extent)
                XCTAssertGreaterThanOrEqual(low, 0, "\(scale): \(content)")
                XCTAssertLessThanOrEqual(high, width, "\(scale): \(content)")
            }
            if scale == .log {
                XCTAssertTrue(svg.contains(">1 ms</text>"), "decade ticks")
                XCTAssertTrue(svg.contains("(1 early!)"), "the legend flags early wake-ups")
            }
        }
    }

    private func firstMatch(_ pattern: String, in text: String) -> String? {
        guard let regex = try? NSRegularExpression(pattern: pattern),
              let match = regex.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)),
              let range = Range(match.range(at: 1), in: text) else { return nil }
        return String(text[range])
    }
}

/// One short round of each path on real KVM and real threads, twice, so that the re-entered
/// guests and the per-round bookkeeping are exercised. Counts only; no timing is asserted.
final class CyclicTestPathTests: XCTestCase {
    func testEveryPathRunsTwoRoundsAndRecordsEveryPeriod() throws {
        let system = try openKVMOrSkip("cyclictest path test")
        let cpu = try ThreadScheduling.affinity().cpus.last ?? 0
        // SCHED_OTHER and no mlockall: the test process keeps its own scheduling and memory.
        let settings = CyclicSettings(intervalMicroseconds: 1000, policy: RealtimePolicy(schedulingClass: .other(), cpus: CPUSet([cpu]),
                                                                                           timerSlackNanoseconds: 1, lockMemory: false),
                                      measuringCPU: cpu)
        let periods = 20
        var runners: [any CyclicPathRunner] = []
        for path in CyclicPath.allCases {
            switch path {
            case .host, .hostCompensated: runners.append(try HostCyclicRunner(path: path, settings: settings, maximumPeriods: periods))
            default: runners.append(try GuestCyclicRunner(path: path, settings: settings, system: system))
            }
        }
        for round in 0..<2 {
            for runner in runners {
                var statistics = CyclicPathStatistics(path: runner.path)
                let outcome = try runner.runRound(periods: periods, waiting: {}, record: {
                    statistics.record(latenessNanoseconds: $0, hostWakeNanoseconds: $1)
                })
                XCTAssertEqual(statistics.count, periods, "\(runner.path.rawValue), round \(round)")
                XCTAssertGreaterThan(outcome.cost.wallNanoseconds, 0)
                XCTAssertGreaterThan(outcome.cost.cpuNanoseconds, 0, "the measuring thread's schedstat was read")
                let spins = runner.path == .hostCompensated || runner.path == .guestLongPoll
                XCTAssertEqual(outcome.spinNanoseconds != nil, spins, "\(runner.path.rawValue) spin accounting")
                statistics.endRound(cost: outcome.cost) { _ in }
                XCTAssertEqual(statistics.result.returnP99Us != nil, runner.path == .guestLongPollRaw,
                               "only the raw guest reports the host's wake-up")
            }
        }
    }
}

// MARK: Helpers

private func readBigEndian<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, _: T.Type) -> T {
    bytes[offset..<offset + MemoryLayout<T>.size].reduce(T.zero) { $0 << 8 | T($1) }
}

/// Decodes one ZigZag LEB128 value (HdrHistogram's form); returns it and the bytes used.
private func decodeZigZag(_ bytes: [UInt8]) -> (Int64, Int) {
    var raw: UInt64 = 0
    var used = 0
    for (position, byte) in bytes.enumerated() {
        used += 1
        if position == 8 {
            raw |= UInt64(byte) << 56
            break
        }
        raw |= UInt64(byte & 0x7F) << (7 * UInt64(position))
        if byte & 0x80 == 0 { break }
    }
    return (Int64(bitPattern: raw >> 1) ^ -Int64(bitPattern: raw & 1), used)
}

private func inflate(_ compressed: [UInt8]) throws -> [UInt8] {
    var capacity = uLongf(1 << 20)
    var output = [UInt8](repeating: 0, count: Int(capacity))
    let status = output.withUnsafeMutableBufferPointer { target in
        compressed.withUnsafeBufferPointer { source in
            // Sound: zlib writes at most `capacity` bytes (the buffer's size) and reads `source.count`.
            uncompress(target.baseAddress, &capacity, source.baseAddress, uLong(source.count))
        }
    }
    guard status == Z_OK else { throw NSError(domain: "zlib", code: Int(status)) }
    return Array(output.prefix(Int(capacity)))
}

