import RTVirtCore
@testable import rtvirt
import XCTest

final class LatencySummaryTests: XCTestCase {
    func testPercentilesAreNearestRank() {
        let summary = LatencySummary((1...1000).map(Double.init).shuffled())
        XCTAssertEqual(summary.count, 1000)
        XCTAssertEqual(summary.minimum, 1)
        XCTAssertEqual(summary.maximum, 1000)
        XCTAssertEqual(summary.average, 500.5)
        XCTAssertEqual(summary.p50, 500)
        XCTAssertEqual(summary.p99, 990)
        XCTAssertEqual(summary.p999, 999)
        XCTAssertEqual(LatencySummary([]).count, 0)
        XCTAssertEqual(LatencySummary([7]).p999, 7)
    }

    func testHistogramBuckets() {
        let histogram = TextHistogram(samples: [1, 2, 2, 15, 1000], upperBounds: [5, 10, 20])
        XCTAssertEqual(histogram.counts, [3, 0, 1, 1])
        let rows = histogram.render(unit: "us", width: 10)
        XCTAssertEqual(rows.count, 3)
        XCTAssertTrue(rows[0].hasPrefix("0-5 us"))
        XCTAssertTrue(rows[2].hasPrefix(">20 us"))
        XCTAssertTrue(rows[0].hasSuffix(" 3"))
    }
}

final class RecentSamplesTests: XCTestCase {
    func testWindowKeepsTheNewestSamplesAndRanksDown() {
        var window = RecentSamples<Int>(capacity: 4)
        XCTAssertNil(window.percentile(0.5))
        for value in [10, 20, 30, 40] { window.append(value) }
        XCTAssertEqual(window.percentile(0), 10)
        XCTAssertEqual(window.percentile(0.5), 20, "rank (4 - 1) * 0.5 = 1.5 rounds down")
        XCTAssertEqual(window.percentile(1), 40)
        window.append(50) // replaces 10
        XCTAssertEqual(window.percentile(0), 20)
        XCTAssertEqual(RecentSamples<Int>(capacity: 0).capacity, 1)
    }
}
