import ArgumentParser
import Foundation
import Histogram
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import RealtimeVCPU

/// What `rtvirt cyclictest --json` prints.
struct CyclicTestReport: Codable {
    var kvmModule: String
    var nested: Bool
    var intervalUs: Int
    var policy: String
    var cpu: Int
    var load: Bool
    var cpuDMALatencyHeld: Bool
    /// Rounds, each running every path for `periodsPerRound` periods, the order rotated by one each round.
    var rounds: Int
    var periodsPerRound: Int
    /// `/sys/module/kvm/parameters/lapic_timer_advance` (KVM's adaptive advance of the guest's
    /// LAPIC timer, which applies to `guest-interrupt`), nil where the parameter is absent.
    var lapicTimerAdvance: String?
    /// `/sys/module/kvm/parameters/halt_poll_ns` (how long KVM polls before it sleeps a halted vCPU).
    var haltPollNs: String?
    /// The percentile of learned return latencies `guest-longpoll` released its vCPU early by.
    var releasePercentile: Double
    var paths: [CyclicPathResult]
    /// The per-round comparisons (median over rounds of the per-round values, with their range).
    var ratios: [CyclicRatio]
}

/// How the plot's lateness axis is scaled.
enum CyclicPlotScale: String, ExpressibleByArgument, CaseIterable, Sendable {
    case log, linear
}

/// A duration on the command line: seconds, or a number with `s`, `m`, `h` or `d`.
struct CyclicDuration: ExpressibleByArgument, Equatable, CustomStringConvertible {
    var seconds: Double

    init(seconds: Double) { self.seconds = seconds }

    init?(argument: String) {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86_400]
        var text = argument.lowercased()
        var scale = 1.0
        if let last = text.last, let unit = units[last] {
            scale = unit
            text.removeLast()
        }
        guard let value = Double(text), value.isFinite, value > 0 else { return nil }
        seconds = value * scale
    }

    var description: String {
        if seconds >= 3600, seconds.truncatingRemainder(dividingBy: 3600) == 0 { return "\(Int(seconds / 3600))h" }
        if seconds >= 60, seconds.truncatingRemainder(dividingBy: 60) == 0 { return "\(Int(seconds / 60))m" }
        return seconds == seconds.rounded() ? "\(Int(seconds))s" : "\(seconds)s"
    }
}

/// How a run is cut into rounds.
struct CyclicRoundPlan: Equatable {
    /// The most periods of one path in one round: the guest's data buffer holds 65,536 long-poll
    /// periods, and a round of one path should last at most about 10 s so that noise is spread.
    static func maximumPeriodsPerRound(intervalMicroseconds: Int) -> Int {
        min(65_536, max(10, 10_000_000 / intervalMicroseconds))
    }

    var rounds: Int
    var periodsPerRound: Int

    /// `periodsPerPath` split into at least `minimumRounds` rounds of equal length (the
    /// remainder is dropped), more when a round would be too long. Nil when a round would
    /// have fewer than 10 periods.
    init?(periodsPerPath: Int, minimumRounds: Int, intervalMicroseconds: Int) {
        let cap = Self.maximumPeriodsPerRound(intervalMicroseconds: intervalMicroseconds)
        rounds = max(minimumRounds, (periodsPerPath + cap - 1) / cap)
        periodsPerRound = periodsPerPath / max(rounds, 1)
        guard rounds >= 1, periodsPerRound >= 10 else { return nil }
    }

    /// The paths of round `round` (0-based): `paths` rotated left by `round`.
    static func order(of paths: [CyclicPath], round: Int) -> [CyclicPath] {
        guard !paths.isEmpty else { return [] }
        let shift = round % paths.count
        return Array(paths[shift...] + paths[..<shift])
    }
}

struct CyclicTestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cyclictest",
        abstract: "Timer wake-up lateness of five paths, host and guest, like for like, in interleaved rounds.",
        discussion: """
            Paths (stable names): 'host' (clock_nanosleep(TIMER_ABSTIME) on a host thread), 'host-compensated' (the \
            long-poll dispatcher's deadline wait on a host thread: wake early by a learned margin, spin to the \
            deadline), 'guest-longpoll-raw' (the bundled guest at CPL 3 calls VMRPC timer.sleepUntil in its 8-byte \
            form through a dispatcher without that strategy: no early wake, no early release, no guest spin), \
            'guest-longpoll' (the same with every compensation: the host's early wake and spin, early release by the \
            learned return latency, the guest's spin to its deadline), 'guest-interrupt' (the LAPIC TSC-deadline \
            timer, sti; hlt, an interrupt handler at CPL 0). Every path runs on a thread with the same real-time \
            policy pinned to the same CPU. The run is cut into rounds; each round runs every path for the same \
            number of periods, the order rotated by one each round, so that bursts of noise (steal time on a shared \
            host) are spread over all paths. Percentiles are over all samples of a path (HdrHistogram, 3 significant \
            digits); each ratio is the median of the per-round ratios, with their range. Lateness is the TSC (or \
            clock) at resume minus the deadline; a wake-up before the deadline is counted as early.
            """)

    @Option(help: "Period in microseconds.")
    var interval = 1000

    @Option(help: "Periods per path over the whole run (overrides --duration).")
    var count: Int?

    @Option(help: "Measuring time of the whole run, over all paths: seconds, or with s, m, h (50s, 10m, 12h).")
    var duration = CyclicDuration(seconds: 50)

    @Option(help: "Rounds (at least; more when a round of one path would exceed 65,536 periods or about 10 s).")
    var rounds = 10

    @Option(help: "Comma-separated paths to measure (default: all five).")
    var paths = CyclicPath.allCases.map(\.rawValue).joined(separator: ",")

    @Option(help: "SCHED_FIFO priority of the measuring threads (0: SCHED_OTHER).")
    var priority: Int32 = 50

    @Option(help: "CPU to run the measuring threads on (default: the last online CPU).")
    var cpu: Int?

    @Flag(help: "Keep every other CPU busy with a CPU hog while measuring.")
    var load = false

    @Flag(help: "Do not hold /dev/cpu_dma_latency at 0 while measuring (cyclictest holds it; idle states then add latency).")
    var noDMALatency = false

    @Option(help: "Write an SVG plot of the latency distributions to this file.")
    var plot: String?

    @Option(help: "The plot's lateness axis: log or linear.")
    var plotScale: CyclicPlotScale = .log

    @Option(help: "Write every round of every path to this file in HdrHistogram's interval log format (values in ns, tagged by path).")
    var histogramLog: String?

    @Option(help: "guest-longpoll: release the vCPU early by this percentile (0...1) of the learned host-to-guest return latency; the guest spins the rest.")
    var releasePercentile: Double = 0.9

    @Flag(help: "Print one JSON object instead of the table.")
    var json = false

    var selectedPaths: [CyclicPath] {
        get throws {
            var selected: [CyclicPath] = []
            for name in paths.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !name.isEmpty {
                guard let path = CyclicPath(rawValue: name) else {
                    throw ValidationError("unknown path '\(name)'; paths: \(CyclicPath.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                if !selected.contains(path) { selected.append(path) }
            }
            guard !selected.isEmpty else { throw ValidationError("--paths names no path") }
            return selected
        }
    }

    func plan(pathCount: Int) -> CyclicRoundPlan? {
        let periodsPerPath = count ?? Int(duration.seconds * 1e6 / Double(interval)) / pathCount
        return CyclicRoundPlan(periodsPerPath: periodsPerPath, minimumRounds: rounds, intervalMicroseconds: interval)
    }

    func validate() throws {
        guard (50...1_000_000).contains(interval) else { throw ValidationError("--interval must be 50...1000000 µs") }
        guard (0...99).contains(priority) else { throw ValidationError("--priority must be 0...99") }
        if let count { guard count >= 10 else { throw ValidationError("--count must be at least 10") } }
        guard rounds >= 1 else { throw ValidationError("--rounds must be at least 1") }
        guard (0...1).contains(releasePercentile) else { throw ValidationError("--release-percentile must be 0...1") }
        guard plan(pathCount: try selectedPaths.count) != nil else {
            throw ValidationError("--count/--duration give fewer than 10 periods per path per round; lower --rounds or measure longer")
        }
    }

    func run() throws {
        let module = KVMHostInfo.detectModule()
        let files = HostFiles()
        let paths = try selectedPaths
        guard let plan = plan(pathCount: paths.count) else { throw ValidationError("the run is too short for --rounds") }
        let online = try ThreadScheduling.affinity()
        let measuringCPU = cpu ?? online.cpus.last ?? 0
        guard online.contains(measuringCPU) else { throw ValidationError("CPU \(measuringCPU) is not available (online: \(online))") }
        let policy = RealtimePolicy(schedulingClass: priority == 0 ? .other() : .fifo(priority: priority),
                                    cpus: CPUSet([measuringCPU]), timerSlackNanoseconds: 1, lockMemory: true)
        // Held for the whole run, so that the measuring threads' own references (taken and given
        // back each round) never unlock and re-lock the process between rounds.
        do { try ProcessMemoryLock.acquire() } catch { throw CyclicTestError.policy("cannot lock memory: \(error)") }
        defer { ProcessMemoryLock.release() }
        let settings = CyclicSettings(intervalMicroseconds: interval, policy: policy, measuringCPU: measuringCPU,
                                      earlyReleasePercentile: releasePercentile)
        let lapicAdvance = files.readLine("/sys/module/kvm/parameters/lapic_timer_advance")
            ?? files.readLine("/sys/module/kvm/parameters/lapic_timer_advance_ns")
        let haltPoll = files.readLine("/sys/module/kvm/parameters/halt_poll_ns")
        let progress = ProgressLine(enabled: isatty(STDERR_FILENO) == 1)

        if !json {
            let measuring = Double(plan.rounds * plan.periodsPerRound * paths.count * interval) / 1e6
            print("rtvirt cyclictest: \(paths.count) paths × \(plan.rounds) rounds × \(plan.periodsPerRound) periods of \(interval) µs "
                  + "(\(String(format: "%.0f", measuring)) s), path order rotated each round; \(policy.schedulingClass) on CPU \(measuringCPU)"
                  + (load ? ", CPU hogs on the other CPUs" : "") + (noDMALatency ? "" : ", /dev/cpu_dma_latency held at 0"))
            print("KVM backend: \(module.rawValue) — \(module.implication)")
            if paths.contains(.guestInterrupt) {
                print("KVM lapic_timer_advance: \(lapicAdvance.map { Self.describeLapicAdvance($0) } ?? "parameter not present")"
                      + "; halt_poll_ns: \(haltPoll ?? "not present") (both apply to guest-interrupt)")
            }
        }

        let latencyRequest = noDMALatency ? nil : try? CPUDMALatencyRequest(microseconds: 0)
        defer { withExtendedLifetime(latencyRequest) {} }
        if !json, !noDMALatency, latencyRequest == nil {
            print("note: could not hold /dev/cpu_dma_latency at 0; idle-state exits add to every path")
        }

        var runners: [CyclicPath: any CyclicPathRunner] = [:]
        do {
            let system: KVMSystem? = paths.contains(where: { $0 != .host && $0 != .hostCompensated }) ? try KVMSystem() : nil
            for path in paths {
                switch path {
                case .host, .hostCompensated:
                    runners[path] = try HostCyclicRunner(path: path, settings: settings, maximumPeriods: plan.periodsPerRound)
                case .guestLongPollRaw, .guestLongPoll, .guestInterrupt:
                    runners[path] = try GuestCyclicRunner(path: path, settings: settings, system: system!)
                }
            }
        } catch {
            throw ValidationError("cannot set up the paths: \(error)")
        }
        let startTime = Date()
        let log = try histogramLog.map {
            try HistogramLogWriter(path: $0, startTime: startTime,
                                   comment: "rtvirt cyclictest: wake-up lateness in nanoseconds, one interval per path per round, tagged by path")
        }
        let runStart = monotonicNanoseconds()
        // One entry per path, in the order of `paths` (mutated in place: each holds histograms).
        var statistics = paths.map { CyclicPathStatistics(path: $0) }
        let hogs = load ? try CPULoad(cpus: CPUSet(online.cpus.filter { $0 != measuringCPU })) : nil
        defer { hogs?.finish() }
        do {
            for round in 0..<plan.rounds {
                for (position, path) in CyclicRoundPlan.order(of: paths, round: round).enumerated() {
                    let index = paths.firstIndex(of: path)!
                    let roundStart = monotonicNanoseconds()
                    let expected = Double(plan.periodsPerRound * interval) * 1000
                    let outcome = try runners[path]!.runRound(periods: plan.periodsPerRound, waiting: {
                        progress.show(String(format: "round %d/%d  %@ (%d/%d)  %3.0f%%", round + 1, plan.rounds, path.rawValue,
                                             position + 1, paths.count, min(1, Double(monotonicNanoseconds() - roundStart) / expected) * 100))
                    }, record: { statistics[index].record(latenessNanoseconds: $0, hostWakeNanoseconds: $1) })
                    let roundEnd = monotonicNanoseconds()
                    if let spin = outcome.spinNanoseconds { statistics[index].spinNanoseconds = (statistics[index].spinNanoseconds ?? 0) + spin }
                    statistics[index].waitedNanoseconds += outcome.waitedNanoseconds
                    try statistics[index].endRound(cost: outcome.cost) { histogram in
                        try log?.append(histogram, tag: path.rawValue, start: Double(roundStart - runStart) / 1e9,
                                        end: Double(roundEnd - runStart) / 1e9)
                    }
                }
            }
        } catch {
            progress.clear()
            throw ValidationError("\(error)")
        }
        progress.clear()
        try log?.close()
        runners.removeAll()

        let results = statistics.map(\.result)
        let ratios = CyclicComparisons.evaluate(CyclicComparison.headline, statistics: statistics)
        if let plot {
            try CyclicPlot.svg(statistics, intervalMicroseconds: interval, scale: plotScale)
                .write(toFile: plot, atomically: true, encoding: .utf8)
        }
        let report = CyclicTestReport(kvmModule: module.rawValue, nested: module == .pvm, intervalUs: interval,
                                      policy: policy.schedulingClass.description, cpu: measuringCPU, load: load,
                                      cpuDMALatencyHeld: latencyRequest != nil, rounds: plan.rounds, periodsPerRound: plan.periodsPerRound,
                                      lapicTimerAdvance: lapicAdvance, haltPollNs: haltPoll,
                                      releasePercentile: releasePercentile, paths: results, ratios: ratios)
        if json {
            try printJSON(report)
        } else {
            print(Self.table(results, ratios: ratios, cpu: measuringCPU))
            print(Self.noise(statistics, cpu: measuringCPU))
            for path in statistics { print(Self.histogram(path)) }
            if let plot { print("\nPlot written to \(plot)") }
            if let histogramLog { print("HdrHistogram interval log written to \(histogramLog)") }
        }
    }

    static func describeLapicAdvance(_ value: String) -> String {
        switch value {
        case "Y": return "Y (adaptive: KVM arms the host timer early by a learned amount and waits out the rest before injecting)"
        case "N": return "N (off)"
        case "-1": return "-1 (adaptive)"
        default: return value
        }
    }

    // MARK: Output

    static func cell(_ text: String, _ width: Int) -> String {
        text.count >= width ? " " + text : String(repeating: " ", count: width - text.count) + text
    }

    static func table(_ results: [CyclicPathResult], ratios: [CyclicRatio], cpu: Int) -> String {
        var lines: [String] = [""]
        lines.append("path                  samples     min     avg     p50     p99   p99.9      max (µs)  early   cpu  spin  steal  inv.cs")
        for result in results {
            var line = (result.name + (result.earlyWakes > 0 ? " !" : "")).padding(toLength: 20, withPad: " ", startingAt: 0)
            line += cell("\(result.samples)", 9)
            for value in [result.minUs, result.avgUs, result.p50Us, result.p99Us, result.p999Us] { line += cell(String(format: "%.1f", value), 8) }
            line += cell(String(format: "%.1f", result.maxUs), 9)
            line += "     " + cell("\(result.earlyWakes)", 6) + cell(String(format: "%.2f", result.cpuFraction), 6)
            line += cell(result.spinCpuFraction.map { String(format: "%.2f", $0) } ?? "-", 6)
            line += cell(String(format: "%.3f", result.stealFraction), 7) + cell("\(result.involuntaryContextSwitches)", 8)
            lines.append(line)
        }
        lines.append("(cpu: the measuring thread's CPU time over wall time; spin: CPU spun before deadlines over the time waited;")
        lines.append(" steal: CPU \(cpu)'s steal time over wall time; inv.cs: involuntary context switches of the measuring thread)")
        for result in results {
            guard let wake50 = result.hostWakeP50Us, let wake99 = result.hostWakeP99Us,
                  let return50 = result.returnP50Us, let return99 = result.returnP99Us else { continue }
            lines.append(String(format: "%@ lateness = host wake-up (p50 %.1f, p99 %.1f µs) + return into the guest (p50 %.1f, p99 %.1f µs)",
                                result.name, wake50, wake99, return50, return99))
        }
        for result in results where result.earlyWakes > 0 {
            lines.append(String(format: "! %@ woke before its deadline %d times (earliest %.1f µs early): a correctness failure",
                                result.name, result.earlyWakes, -result.minUs))
        }
        if let rounds = ratios.first?.rounds {
            lines.append("")
            lines.append("Per-round comparisons (median of \(rounds) rounds, [min – max]):")
            for ratio in ratios {
                let meaning = CyclicComparison.headline.first { $0.name == ratio.name }?.meaning ?? ""
                let value = ratio.kind == "ratio"
                    ? String(format: "%6.2f  [%.2f – %.2f]", ratio.median, ratio.min, ratio.max)
                    : String(format: "%+6.1f  [%+.1f – %+.1f] µs", ratio.median, ratio.min, ratio.max)
                lines.append("  " + ratio.name.padding(toLength: 48, withPad: " ", startingAt: 0) + value.padding(toLength: 30, withPad: " ", startingAt: 0) + meaning)
            }
        }
        let byName = Dictionary(uniqueKeysWithValues: results.map { ($0.name, $0) })
        if let longPoll = byName[CyclicPath.guestLongPoll.rawValue] {
            var targets: [String] = []
            if let compensated = byName[CyclicPath.hostCompensated.rawValue] {
                targets.append(target("guest-longpoll p99 ≤ 1.2 × host-compensated p99", longPoll.p99Us, 1.2 * compensated.p99Us))
                targets.append(target("guest-longpoll p50 ≤ host-compensated p50 + 1 µs", longPoll.p50Us, compensated.p50Us + 1))
            }
            if let interrupt = byName[CyclicPath.guestInterrupt.rawValue] {
                targets.append(target("guest-longpoll p99 ≤ 0.6 × guest-interrupt p99", longPoll.p99Us, 0.6 * interrupt.p99Us))
            }
            if !targets.isEmpty {
                lines.append("")
                lines.append("Targets (this run, percentiles over all samples):")
                lines += targets
            }
        }
        return lines.joined(separator: "\n")
    }

    static func target(_ name: String, _ value: Double, _ limit: Double) -> String {
        "  " + name.padding(toLength: 50, withPad: " ", startingAt: 0)
            + String(format: "%7.1f vs %7.1f µs  %@", value, limit, value <= limit ? "met" : "NOT met")
    }

    /// Steal and preemption per round, so that a noisy run shows in the output.
    static func noise<Path>(_ statistics: [PathStatistics<Path>], cpu: Int) -> String {
        var noisy = 0, total = 0
        var worst: (fraction: Double, round: Int, path: String) = (0, 0, "")
        for path in statistics {
            for (round, summary) in path.rounds.enumerated() {
                total += 1
                if summary.stealFraction > 0.01 { noisy += 1 }
                if summary.stealFraction > worst.fraction { worst = (summary.stealFraction, round + 1, path.path.name) }
            }
        }
        guard worst.fraction > 0 else { return "\nNoise: no steal time on CPU \(cpu) in any round." }
        return String(format: "\nNoise: steal time on CPU %d above 1%% in %d of %d path-rounds; worst %.1f%% (round %d, %@).",
                      cpu, noisy, total, worst.fraction * 100, worst.round, worst.path)
    }

    static func histogram<Path>(_ statistics: PathStatistics<Path>) -> String {
        let bounds: [Double] = [5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 500, 1000]
        var counts: [Int] = []
        var lower: UInt64 = 0
        for bound in bounds {
            let upper = UInt64(bound * 1000)
            counts.append(Int(statistics.total.count(within: lower...upper)))
            lower = upper + 1
        }
        counts.append(Int(statistics.total.count(within: lower...PathStatistics<Path>.highestTrackableNanoseconds)))
        let rows = TextHistogram(upperBounds: bounds, counts: counts).render(unit: "µs").map { "  " + $0 }
        return "\n\(statistics.path.name):\n" + rows.joined(separator: "\n")
    }
}

/// One self-updating progress line on stderr, only when stderr is a terminal.
final class ProgressLine: Sendable {
    let enabled: Bool

    init(enabled: Bool) { self.enabled = enabled }

    func show(_ text: String) {
        guard enabled else { return }
        FileHandle.standardError.write(Data(("\r\u{1B}[K  " + text).utf8))
    }

    func clear() {
        guard enabled else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
    }
}
