import Foundation
import Histogram
import LongPoll

/// A measured path of one of the interleaved-round reports (`rtvirt cyclictest`, `rtvirt
/// netlatency`): its stable name (in the table and the JSON) and its colour in the plot.
protocol MeasuredPath: Hashable, Sendable {
    var name: String { get }
    var plotColor: String { get }
}

/// The measured paths of `rtvirt cyclictest`. The raw values are the names in the table and the
/// JSON; they are stable.
enum CyclicPath: String, CaseIterable, Codable, Sendable, MeasuredPath {
    /// `clock_nanosleep(TIMER_ABSTIME)` on a host thread: the plain host sleep.
    case host
    /// The long-poll dispatcher's deadline wait (`DeadlineTimerStrategy`: wake early by a learned
    /// margin, spin to the deadline) on a host thread: the best a sleeping host thread does here.
    case hostCompensated = "host-compensated"
    /// The guest's `timer.sleepUntil` with no compensation: no early wake, no early release, no
    /// guest spin. The bare mechanism.
    case guestLongPollRaw = "guest-longpoll-raw"
    /// The guest's `timer.sleepUntil` with every compensation (early wake and spin in the host,
    /// early release by the learned return latency, the guest's spin to its deadline).
    case guestLongPoll = "guest-longpoll"
    /// The conventional path: the LAPIC TSC-deadline timer, `sti; hlt`, an interrupt handler.
    case guestInterrupt = "guest-interrupt"

    var name: String { rawValue }
    var plotColor: String { CyclicPlot.color(of: self) }
}

/// A comparison the report makes for every round: `numerator`'s percentile over
/// `denominator`'s (a ratio) or minus it (a difference, microseconds).
struct PathComparison<Path: MeasuredPath>: Sendable {
    enum Kind: String, Sendable { case ratio, difference }
    var kind: Kind
    var numerator: Path
    var denominator: Path
    /// 50 or 99.
    var percentile: Double
    /// What it shows, for the table.
    var meaning: String

    var name: String {
        let p = percentile == 50 ? "p50" : "p99"
        return kind == .ratio ? "\(numerator.name) \(p) / \(denominator.name) \(p)"
            : "\(numerator.name) \(p) - \(denominator.name) \(p)"
    }
}

/// The comparisons of `rtvirt cyclictest`.
typealias CyclicComparison = PathComparison<CyclicPath>

extension PathComparison where Path == CyclicPath {
    /// The headline comparisons, in the order of the table.
    static let headline: [CyclicComparison] = [
        CyclicComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .hostCompensated, percentile: 99,
                         meaning: "virtualization tax, like for like (both compensated)"),
        CyclicComparison(kind: .ratio, numerator: .guestLongPollRaw, denominator: .host, percentile: 99,
                         meaning: "bare mechanism vs plain host sleep (neither compensated)"),
        CyclicComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .guestInterrupt, percentile: 99,
                         meaning: "long polling vs the LAPIC timer interrupt"),
        CyclicComparison(kind: .difference, numerator: .guestLongPoll, denominator: .hostCompensated, percentile: 50,
                         meaning: "median wake-up, guest vs host thread"),
        CyclicComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .hostCompensated, percentile: 50,
                         meaning: "(p50 values near 0 make this ratio unstable; see the difference)"),
        CyclicComparison(kind: .ratio, numerator: .guestLongPollRaw, denominator: .host, percentile: 50,
                         meaning: ""),
        CyclicComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .guestInterrupt, percentile: 50,
                         meaning: ""),
    ]
}

/// One comparison over all rounds: the median of the per-round values and their range.
struct CyclicRatio: Codable, Equatable, Sendable {
    var name: String
    /// "ratio" (numerator / denominator) or "difference" (numerator − denominator, µs).
    var kind: String
    var numerator: String
    var denominator: String
    /// "p50" or "p99".
    var percentile: String
    var median: Double
    var min: Double
    var max: Double
    /// The number of rounds the median is taken over (rounds where both paths had samples and,
    /// for a ratio, the denominator was not 0).
    var rounds: Int
}

/// One path in one round, kept for the per-round comparisons (a few numbers per round).
struct CyclicRoundSummary: Sendable, Equatable {
    var p50Nanoseconds: Double
    var p99Nanoseconds: Double
    var stealFraction: Double
}

/// Everything recorded for one path, in memory that does not grow with the number of samples:
/// HdrHistograms (3 significant digits, nanoseconds up to `highestTrackableNanoseconds`), exact
/// extremes and counters, and the cost counters.
struct PathStatistics<Path: MeasuredPath> {
    /// Values above this are recorded as this (the exact maximum is kept separately).
    static var highestTrackableNanoseconds: UInt64 { 10_000_000_000 }

    let path: Path
    /// Every sample of the run.
    private(set) var total: Histogram<UInt64>
    /// The samples of the round being recorded.
    private(set) var round: Histogram<UInt64>
    private(set) var count = 0
    /// Wake-ups before the deadline (recorded in the histograms as lateness 0).
    private(set) var earlyWakes = 0
    private(set) var minimumNanoseconds = Int64.max
    private(set) var maximumNanoseconds = Int64.min
    private(set) var sumNanoseconds: Double = 0
    /// The measuring thread's use, summed over rounds.
    var cost = ThreadCost()
    /// Spinning before deadlines (host and guest), and the time waited, for `spinCpuFraction`;
    /// nil for paths that do not spin.
    var spinNanoseconds: Double?
    var waitedNanoseconds: Double = 0
    /// Per-round summaries, in round order.
    private(set) var rounds: [CyclicRoundSummary] = []
    /// Where the path reports when the host woke up for each wake-up: that time after the
    /// deadline, and the rest of the lateness (the return into the guest), over all samples.
    private(set) var hostWake: Histogram<UInt64>?
    private(set) var returnPath: Histogram<UInt64>?

    init(path: Path) {
        self.path = path
        total = Self.emptyHistogram()
        round = total
    }

    /// Records one wake-up `latenessNanoseconds` after its deadline (negative: before it), for
    /// which the host woke up `hostWakeNanoseconds` after the deadline, when known.
    mutating func record(latenessNanoseconds: Int64, hostWakeNanoseconds: Int64? = nil) {
        if let hostWakeNanoseconds {
            if hostWake == nil { hostWake = Self.emptyHistogram(); returnPath = Self.emptyHistogram() }
            _ = hostWake?.record(Self.clamped(hostWakeNanoseconds))
            _ = returnPath?.record(Self.clamped(latenessNanoseconds - hostWakeNanoseconds))
        }
        count += 1
        if latenessNanoseconds < 0 { earlyWakes += 1 }
        minimumNanoseconds = min(minimumNanoseconds, latenessNanoseconds)
        maximumNanoseconds = max(maximumNanoseconds, latenessNanoseconds)
        sumNanoseconds += Double(latenessNanoseconds)
        _ = round.record(Self.clamped(latenessNanoseconds))
    }

    static func clamped(_ nanoseconds: Int64) -> UInt64 { min(UInt64(max(0, nanoseconds)), highestTrackableNanoseconds) }

    static func emptyHistogram() -> Histogram<UInt64> {
        Histogram(lowestDiscernibleValue: 1, highestTrackableValue: highestTrackableNanoseconds, numberOfSignificantValueDigits: .three)
    }

    /// Ends the current round: keeps its summary, adds it to the total, empties it. `log` sees
    /// the round's histogram first.
    mutating func endRound(cost roundCost: ThreadCost, log: (Histogram<UInt64>) throws -> Void) rethrows {
        try log(round)
        rounds.append(CyclicRoundSummary(p50Nanoseconds: Double(round.valueAtPercentile(50)),
                                         p99Nanoseconds: Double(round.valueAtPercentile(99)),
                                         stealFraction: roundCost.stealFraction))
        cost += roundCost
        total.add(round)
        round.reset()
    }

    /// Records one latency sample (a round-trip time, for example).
    mutating func record(nanoseconds: Int64) { record(latenessNanoseconds: nanoseconds) }

    /// The percentile `percentile` (0 ... 100) of all samples, microseconds.
    func microseconds(atPercentile percentile: Double) -> Double { Double(total.valueAtPercentile(percentile)) / 1000 }
}

/// The statistics of one path of `rtvirt cyclictest`.
typealias CyclicPathStatistics = PathStatistics<CyclicPath>

extension PathStatistics where Path == CyclicPath {
    /// The path's line of the report.
    var result: CyclicPathResult {
        func us(_ nanoseconds: Double) -> Double { nanoseconds / 1000 }
        return CyclicPathResult(
            name: path.rawValue, samples: count,
            minUs: count == 0 ? 0 : us(Double(minimumNanoseconds)), avgUs: count == 0 ? 0 : us(sumNanoseconds / Double(count)),
            p50Us: us(Double(total.valueAtPercentile(50))), p99Us: us(Double(total.valueAtPercentile(99))),
            p999Us: us(Double(total.valueAtPercentile(99.9))), maxUs: count == 0 ? 0 : us(Double(maximumNanoseconds)),
            spinCpuFraction: spinNanoseconds.map { waitedNanoseconds > 0 ? $0 / waitedNanoseconds : 0 },
            earlyWakes: earlyWakes, cpuFraction: cost.cpuFraction, stealFraction: cost.stealFraction,
            involuntaryContextSwitches: cost.involuntarySwitches, rounds: rounds.count,
            hostWakeP50Us: hostWake.map { us(Double($0.valueAtPercentile(50))) }, hostWakeP99Us: hostWake.map { us(Double($0.valueAtPercentile(99))) },
            returnP50Us: returnPath.map { us(Double($0.valueAtPercentile(50))) }, returnP99Us: returnPath.map { us(Double($0.valueAtPercentile(99))) })
    }
}

/// One measured path in the report (`paths[]` of the JSON).
struct CyclicPathResult: Codable, Equatable, Sendable {
    /// The path's stable name (`CyclicPath`).
    var name: String
    var samples: Int
    /// The earliest wake-up, microseconds after the deadline (negative: before it).
    var minUs: Double
    var avgUs: Double
    /// Percentiles over all rounds (HdrHistogram, 3 significant digits; early wake-ups count as 0).
    var p50Us: Double
    var p99Us: Double
    var p999Us: Double
    var maxUs: Double
    /// CPU spent spinning before deadlines (host and guest) over the time waited; nil: the path
    /// does not spin.
    var spinCpuFraction: Double?
    /// Wake-ups before the deadline (a correctness failure for a real-time timer).
    var earlyWakes: Int
    /// The measuring thread's (host thread's or vCPU thread's) CPU time over wall time.
    var cpuFraction: Double
    /// The measuring CPU's steal time over wall time while this path ran.
    var stealFraction: Double
    /// Involuntary context switches of the measuring thread while this path ran.
    var involuntaryContextSwitches: Int
    /// Rounds this path ran.
    var rounds: Int
    /// `guest-longpoll-raw` only: when the host woke up (the guest TSC of the call's result),
    /// after the deadline, and the rest of the lateness, the return from the host into the
    /// guest (p50 and p99 over all samples, µs).
    var hostWakeP50Us: Double?
    var hostWakeP99Us: Double?
    var returnP50Us: Double?
    var returnP99Us: Double?
}

/// The per-round comparisons of a run: for each comparison, the median and range of its values
/// over the rounds in which both paths ran.
enum CyclicComparisons {
    static func evaluate<Path>(_ comparisons: [PathComparison<Path>], statistics: [PathStatistics<Path>]) -> [CyclicRatio] {
        comparisons.compactMap { comparison in
            guard let numerator = statistics.first(where: { $0.path == comparison.numerator }),
                  let denominator = statistics.first(where: { $0.path == comparison.denominator }) else { return nil }
            var values: [Double] = []
            for (top, bottom) in zip(numerator.rounds, denominator.rounds) {
                let a = comparison.percentile == 50 ? top.p50Nanoseconds : top.p99Nanoseconds
                let b = comparison.percentile == 50 ? bottom.p50Nanoseconds : bottom.p99Nanoseconds
                switch comparison.kind {
                case .ratio: if b > 0 { values.append(a / b) }
                case .difference: values.append((a - b) / 1000)
                }
            }
            guard !values.isEmpty else { return nil }
            return CyclicRatio(name: comparison.name, kind: comparison.kind.rawValue, numerator: comparison.numerator.name,
                               denominator: comparison.denominator.name, percentile: comparison.percentile == 50 ? "p50" : "p99",
                               median: median(values), min: values.min()!, max: values.max()!, rounds: values.count)
        }
    }

    /// The median (the mean of the two middle values for an even count).
    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        guard !sorted.isEmpty else { return 0 }
        let middle = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
    }
}
