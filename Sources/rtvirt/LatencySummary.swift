#if canImport(Glibc)
import Glibc
#endif

/// Order statistics of a set of latency samples (exact: computed from the sorted samples).
struct LatencySummary: Codable, Equatable, Sendable {
    /// Number of samples.
    public var count: Int
    public var minimum: Double
    public var average: Double
    public var p50: Double
    public var p99: Double
    public var p999: Double
    public var maximum: Double

    /// Summarizes `samples` (in any unit; the summary is in the same unit). Empty input gives zeros.
    public init(_ samples: [Double]) {
        let sorted = samples.sorted()
        count = sorted.count
        guard let first = sorted.first, let last = sorted.last else {
            minimum = 0; average = 0; p50 = 0; p99 = 0; p999 = 0; maximum = 0
            return
        }
        minimum = first
        maximum = last
        average = sorted.reduce(0, +) / Double(sorted.count)
        p50 = Self.percentile(sorted, 0.50)
        p99 = Self.percentile(sorted, 0.99)
        p999 = Self.percentile(sorted, 0.999)
    }

    /// The nearest-rank percentile of already sorted samples (`fraction` in 0...1).
    public static func percentile(_ sorted: [Double], _ fraction: Double) -> Double {
        guard !sorted.isEmpty else { return 0 }
        let rank = Int((fraction * Double(sorted.count)).rounded(.up))
        return sorted[min(max(rank, 1), sorted.count) - 1]
    }
}

/// A text histogram of samples for terminals: one row per bucket, bar length proportional to
/// the count on a logarithmic scale so that rare tail buckets stay visible.
struct TextHistogram: Sendable {
    /// Bucket edges (upper bounds, ascending) and counts; the last bucket is open-ended.
    public private(set) var upperBounds: [Double]
    public private(set) var counts: [Int]

    /// Buckets with the given upper bounds (plus an overflow bucket) filled with `samples`.
    public init(samples: [Double], upperBounds: [Double]) {
        self.upperBounds = upperBounds
        var counts = [Int](repeating: 0, count: upperBounds.count + 1)
        for sample in samples {
            let index = upperBounds.firstIndex { sample <= $0 } ?? upperBounds.count
            counts[index] += 1
        }
        self.counts = counts
    }

    /// Buckets with the given upper bounds and counts already made (for example from an
    /// HdrHistogram): `counts` has one more entry than `upperBounds`, the open-ended last bucket.
    public init(upperBounds: [Double], counts: [Int]) {
        precondition(counts.count == upperBounds.count + 1, "one count per bucket plus the overflow bucket")
        self.upperBounds = upperBounds
        self.counts = counts
    }

    /// The rows, labelled with `unit`, bars at most `width` characters.
    public func render(unit: String, width: Int = 40) -> [String] {
        let maximum = counts.max() ?? 0
        guard maximum > 0 else { return [] }
        let scale = Double(width) / log2(Double(maximum) + 1)
        var rows: [String] = []
        var lower = 0.0
        for (index, count) in counts.enumerated() where count > 0 || index < counts.count - 1 {
            let label = index < upperBounds.count
                ? "\(Self.format(lower))-\(Self.format(upperBounds[index])) \(unit)"
                : ">\(Self.format(upperBounds.last ?? 0)) \(unit)"
            if index < upperBounds.count { lower = upperBounds[index] }
            guard count > 0 else { continue }
            let bar = String(repeating: "#", count: max(1, Int(log2(Double(count) + 1) * scale)))
            let padded = label.count >= 18 ? label : label + String(repeating: " ", count: 18 - label.count)
            rows.append(padded + " " + bar + " \(count)")
        }
        return rows
    }

    static func format(_ value: Double) -> String {
        value == value.rounded() ? String(Int(value)) : String(value)
    }
}
