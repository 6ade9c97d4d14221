#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Dispatch
import Foundation
import KVMBackend
import NetLatency
import RTVirtCore
import RealtimeVCPU
import VMRPCSockets

/// One path in `rtvirt netlatency --json` (`paths[]`).
struct NetPathResult: Codable, Equatable, Sendable {
    /// The path's stable name (`NetPath`).
    var name: String
    /// Round-trip times measured (answered requests with both kernel timestamps).
    var samples: Int
    /// Requests without a reply by the end of their round's grace period.
    var lost: Int
    var minUs: Double
    var p50Us: Double
    var p99Us: Double
    var p999Us: Double
    var maxUs: Double
    /// The service threads' CPU time (host thread; vCPU thread; vCPU and I/O thread) over the
    /// wall time of the rounds.
    var cpuFraction: Double
    /// Requests sent.
    var sent: Int
    /// Replies after a reply to a later request; second replies; replies of an earlier round.
    var reordered: Int
    var duplicates: Int
    var stale: Int
    /// Answered requests without a round-trip time (a kernel timestamp did not come).
    var missingTimestamps: Int
    /// Requests whose send failed (not sent, not lost).
    var sendFailures: Int
    /// The real-time CPU's steal time over wall time while this path ran.
    var stealFraction: Double
    /// The tester's CPU's steal time over wall time while this path ran (a request taken off
    /// the CPU between its timestamp and its delivery waits that long).
    var testerStealFraction: Double
    /// Involuntary context switches of the service threads.
    var involuntaryContextSwitches: Int
    var rounds: Int
    /// With `--breakdown`: where the round trip goes, p50 and p99 of each part over the rounds in
    /// which the service's marks lined up with the requests.
    var breakdown: NetBreakdown?
}

/// A round trip split at the service's receive and send (`--breakdown`), microseconds.
struct NetBreakdown: Codable, Equatable, Sendable {
    /// Requests the split covers.
    var samples: Int
    /// Tester's transmit timestamp → the service's receive returned (network, wake-up).
    var toServiceP50Us: Double
    var toServiceP99Us: Double
    /// The service's receive → its send (for a guest: the entry into the guest, the guest's work, the exit).
    var inServiceP50Us: Double
    var inServiceP99Us: Double
    /// The service's send → the tester's receive timestamp.
    var fromServiceP50Us: Double
    var fromServiceP99Us: Double
    /// The largest of each part (where the extreme round trips lost their time).
    var toServiceMaxUs: Double
    var inServiceMaxUs: Double
    var fromServiceMaxUs: Double
}

/// The calibration: the tester's own echo over loopback in its namespace.
struct NetInstrumentFloor: Codable, Equatable, Sendable {
    var samples: Int
    var lost: Int
    var minUs: Double
    var p50Us: Double
    var p99Us: Double
}

/// What `rtvirt netlatency --json` prints.
struct NetLatencyReport: Codable {
    var kvmModule: String
    var nested: Bool
    var requestsPerSecond: Double
    var payloadBytes: Int
    var rounds: Int
    var requestsPerRound: Int
    var policy: String
    /// The real-time CPU of every service thread, and the housekeeping CPU of the tester.
    var cpu: Int
    var testerCpu: Int
    var load: Bool
    var cpuDMALatencyHeld: Bool
    /// How guest-interrupt's I/O thread raises its interrupt (irqfd or msi).
    var interrupt: String
    /// `software` or `hardware`: where the round-trip times' timestamps come from.
    var timestamping: String
    /// The tester interface's capabilities, and why the source is what it is.
    var timestampingDetail: String
    /// The median round-trip time of the calibration echo (what the instrument resolves).
    var instrumentFloorUs: Double
    var instrumentFloor: NetInstrumentFloor
    var paths: [NetPathResult]
    /// The per-round comparisons (median over rounds of the per-round values, with their range).
    var ratios: [CyclicRatio]
    /// Whether the run was stopped early (Ctrl-C).
    var interrupted: Bool
}

/// Counters of one path over all rounds, besides its histogram.
struct NetPathCounters {
    var testerSteal = ThreadCost()
    var sent = 0, lost = 0, reordered = 0, duplicates = 0, stale = 0, missingTimestamps = 0, sendFailures = 0, foreign = 0
    var scheduledTransmitSamples = 0

    mutating func add(_ result: LatencyProbeResult) {
        sent += result.sent
        lost += result.lost
        reordered += result.reordered
        duplicates += result.duplicates
        stale += result.stale
        missingTimestamps += result.missingTransmitTimestamps + result.missingReceiveTimestamps
        sendFailures += result.sendFailures
        foreign += result.foreign
        scheduledTransmitSamples += result.scheduledTransmitSamples
    }
}

extension PathComparison where Path == NetPath {
    /// The comparisons `rtvirt netlatency` reports for every round, in the order of the table.
    static let netHeadline: [PathComparison<NetPath>] = [
        PathComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .hostEcho, percentile: 99,
                       meaning: "virtualization tax of the long-poll echo (target ≤ 1.3)"),
        PathComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .guestInterrupt, percentile: 99,
                       meaning: "long polling vs the interrupt-driven ring (target ≤ 0.6)"),
        PathComparison(kind: .ratio, numerator: .guestBusyPoll, denominator: .hostEcho, percentile: 99,
                       meaning: "busy polling vs the host"),
        PathComparison(kind: .ratio, numerator: .guestInterrupt, denominator: .hostEcho, percentile: 99,
                       meaning: "the conventional path vs the host"),
        PathComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .hostEcho, percentile: 50, meaning: ""),
        PathComparison(kind: .ratio, numerator: .guestLongPoll, denominator: .guestInterrupt, percentile: 50, meaning: ""),
        PathComparison(kind: .difference, numerator: .guestLongPoll, denominator: .hostEcho, percentile: 50,
                       meaning: "median added by the guest"),
        PathComparison(kind: .difference, numerator: .guestInterrupt, denominator: .hostEcho, percentile: 50, meaning: ""),
    ]
}

struct NetLatencyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "netlatency",
        abstract: "Probe-free UDP round-trip latency of four echo paths, host and guest, from a tester in its own namespace.",
        discussion: """
            A tester in a network namespace of its own, joined by a veth pair to the VM's namespace, sends UDP requests at \
            a fixed rate (each at a random moment in the first half of its period), with sequence numbers, and takes the \
            kernel's SO_TIMESTAMPING timestamps of each request leaving and each reply arriving; the round-trip time is \
            their difference, so nothing runs inside the measured system but the service itself, and the tester's own \
            scheduling is not in it. Lost, reordered, duplicate and stale replies are counted. Paths (stable names): \
            'host-echo' (a host thread in the VM's namespace: blocking recvfrom, then sendto), 'guest-longpoll' (the \
            bundled guest's UDP echo over outsourced sockets; its receive is a long poll), 'guest-interrupt' (an I/O \
            thread copies each datagram into a receive ring in guest memory and raises an interrupt through KVM; the \
            guest, halted at CPL 0, echoes through a transmit ring and a doorbell), 'guest-busypoll' (the guest spins on \
            a non-blocking receive). Every service thread runs with the same real-time policy on --cpu; the tester on \
            --tester-cpu. The paths are measured in interleaved rounds, the order rotated each round; each ratio is the \
            median of the per-round ratios, with their range. Calibration: the tester against a host echo over loopback \
            in the tester's own namespace (the echo on --cpu with the services' policy): the instrument's floor. \
            --breakdown splits each round trip at the service's receive and send. Everything (namespaces, veth, VMs) is removed at the end, on Ctrl-C and on error; \
            leftovers of a crashed run are reclaimed at the start.
            """)

    @Option(help: "Requests per second.") var rate: Double = 1000
    @Option(help: "Payload bytes per request (16...1400).") var size = 64
    @Option(help: "Measuring time over all paths: seconds, or with s, m, h (40s, 10m).") var duration = CyclicDuration(seconds: 40)
    @Option(help: "Rounds (each measures every path once).") var rounds = 10
    @Option(help: "Comma-separated paths (default: all four).") var paths = NetPath.allCases.map(\.rawValue).joined(separator: ",")
    @Option(help: "SCHED_FIFO priority of the service threads and the tester (0: SCHED_OTHER).") var priority: Int32 = 50
    @Option(help: "The real-time CPU of every service thread (default: the last online CPU).") var cpu: Int?
    @Option(help: "The housekeeping CPU of the tester (default: the first online CPU other than --cpu).") var testerCpu: Int?
    @Flag(help: "Keep every CPU but --cpu busy with a CPU hog while measuring.") var load = false
    @Option(help: "How guest-interrupt's I/O thread raises its interrupt: irqfd (an eventfd routed to an MSI) or msi (KVM_SIGNAL_MSI).")
    var interrupt = "irqfd"
    @Flag(help: "Do not hold /dev/cpu_dma_latency at 0 while measuring.") var noDMALatency = false
    @Option(help: "Write an SVG plot of the round-trip time distributions to this file.") var plot: String?
    @Option(help: "The plot's axis: log or linear.") var plotScale: CyclicPlotScale = .log
    @Flag(help: "Also mark when each service receives and sends (two clock reads per request) and split each round trip there.")
    var breakdown = false
    @Flag(help: "Print one JSON object instead of the table.") var json = false

    var selectedPaths: [NetPath] {
        get throws {
            var selected: [NetPath] = []
            for name in paths.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !name.isEmpty {
                guard let path = NetPath(rawValue: name) else {
                    throw ValidationError("unknown path '\(name)'; paths: \(NetPath.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                if !selected.contains(path) { selected.append(path) }
            }
            guard !selected.isEmpty else { throw ValidationError("--paths names no path") }
            return selected
        }
    }

    /// Requests per path per round.
    func requestsPerRound(pathCount: Int) -> Int {
        Int((duration.seconds / Double(max(1, pathCount * rounds)) * rate).rounded(.down))
    }

    func validate() throws {
        guard (1...100_000).contains(rate) else { throw ValidationError("--rate must be 1...100000 per second") }
        guard (LatencyProbeWire.headerSize...1400).contains(size) else { throw ValidationError("--size must be \(LatencyProbeWire.headerSize)...1400") }
        guard (0...99).contains(priority) else { throw ValidationError("--priority must be 0...99") }
        guard rounds >= 1 else { throw ValidationError("--rounds must be at least 1") }
        guard NetInterruptMechanism(rawValue: interrupt) != nil else { throw ValidationError("--interrupt is irqfd or msi") }
        let perRound = requestsPerRound(pathCount: try selectedPaths.count)
        guard perRound >= 10 else { throw ValidationError("--duration gives \(perRound) requests per path per round; at least 10 are needed") }
        guard perRound <= LatencyProbeWire.maximumRequests else { throw ValidationError("more than \(LatencyProbeWire.maximumRequests) requests per round; raise --rounds") }
    }

    func run() throws {
        let cancel = CancellationFlag()
        let signals = cancel.catchInterrupts()
        defer { signals.forEach { $0.cancel() } }
        let outcome = try Self.measure(self, cancel: cancel)
        if json {
            try printJSON(outcome.report)
        } else {
            print(outcome.text)
        }
        if outcome.report.interrupted { throw ExitCode(130) }
    }

    /// What a run produced.
    struct Outcome {
        var report: NetLatencyReport
        var text: String
        var statistics: [PathStatistics<NetPath>]
    }

    /// Sets everything up, runs the rounds, tears everything down (also when it throws).
    static func measure(_ options: NetLatencyCommand, cancel: CancellationFlag, progressEnabled: Bool? = nil) throws -> Outcome {
        let module = KVMHostInfo.detectModule()
        let paths = try options.selectedPaths
        let perRound = options.requestsPerRound(pathCount: paths.count)
        let online = try ThreadScheduling.affinity()
        let rtCPU = options.cpu ?? online.cpus.last ?? 0
        let testerCPU = options.testerCpu ?? online.cpus.first(where: { $0 != rtCPU }) ?? rtCPU
        for cpu in [rtCPU, testerCPU] where !online.contains(cpu) {
            throw ValidationError("CPU \(cpu) is not available (online: \(online))")
        }
        let schedulingClass: SchedulingClass = options.priority == 0 ? .other() : .fifo(priority: options.priority)
        // Memory is locked once for the whole run (as `cyclictest -m` does), not by each service
        // thread's policy: those threads end without a restore, and the lock is process-wide.
        do { try ProcessMemoryLock.acquire() } catch { throw NetLatencyRunError.policy("cannot lock memory: \(error)") }
        defer { ProcessMemoryLock.release() }
        let servicePolicy = RealtimePolicy(schedulingClass: schedulingClass, cpus: CPUSet([rtCPU]), timerSlackNanoseconds: 1, lockMemory: false)
        let testerPolicy = RealtimePolicy(schedulingClass: schedulingClass, cpus: CPUSet([testerCPU]), timerSlackNanoseconds: 1, lockMemory: false)
        let mechanism = NetInterruptMechanism(rawValue: options.interrupt) ?? .irqfd
        let progress = ProgressLine(enabled: progressEnabled ?? (isatty(STDERR_FILENO) == 1 && !options.json))
        var lines: [String] = []

        let reclaimed = NetworkNamespace.reclaimLeftovers()
        if !reclaimed.isEmpty { lines.append("reclaimed \(reclaimed.count) namespaces left by a crashed run: \(reclaimed.joined(separator: ", "))") }
        let topology = try NetLatencyTopology(label: "netlat")
        defer { topology.remove() }
        let settings = NetServiceSettings(serviceAddress: topology.serviceAddress, testerAddress: topology.testerAddress,
                                          policy: servicePolicy, interrupt: mechanism, breakdown: options.breakdown)
        // Services first in, last out: their sockets close before the namespaces go.
        var runners: [NetPath: any NetServiceRunner] = [:]
        defer {
            for runner in runners.values { try? runner.stop() }
            runners.removeAll()
        }
        do {
            let system: KVMSystem? = paths.contains(where: { $0 != .hostEcho }) ? try KVMSystem() : nil
            for path in paths {
                switch path {
                case .hostEcho: runners[path] = try HostEchoRunner(namespace: topology.serviceNamespace, settings: settings)
                case .guestLongPoll, .guestBusyPoll:
                    runners[path] = try GuestSocketEchoRunner(path: path, system: system!, namespace: topology.serviceNamespace, settings: settings)
                case .guestInterrupt:
                    runners[path] = try GuestInterruptEchoRunner(system: system!, namespace: topology.serviceNamespace, settings: settings)
                }
            }
        } catch {
            throw ValidationError("cannot set up the paths: \(error)")
        }
        let testerSockets = try HostSocketBackend(namespace: topology.tester)
        let tester = KernelTimestampingTester(socket: try TimestampingUDPSocket(
            backend: testerSockets, bind: SocketEndpoint(topology.testerAddress, port: 0), interface: topology.testerInterface))

        let latencyRequest = options.noDMALatency ? nil : try? CPUDMALatencyRequest(microseconds: 0)
        defer { withExtendedLifetime(latencyRequest) {} }
        lines.append("rtvirt netlatency: \(paths.count) paths × \(options.rounds) rounds × \(perRound) requests at \(Self.format(options.rate))/s, "
                     + "\(options.size)-byte payloads, path order rotated each round; services \(schedulingClass) on CPU \(rtCPU), "
                     + "tester on CPU \(testerCPU)" + (options.load ? ", CPU hogs on every CPU but \(rtCPU)" : "")
                     + (latencyRequest != nil ? ", /dev/cpu_dma_latency held at 0" : ""))
        lines.append("KVM backend: \(module.rawValue) — \(module.implication)")
        lines.append("network: tester \(topology.testerAddress) (namespace \(topology.tester.name ?? "?"), veth \(topology.testerInterface)) ↔ "
                     + "services \(topology.serviceAddress) (namespace \(topology.serviceNamespace.name ?? "?"))")
        lines.append("timestamping: \(tester.timestampSource) — \(tester.timestampReason)")
        if paths.contains(.guestInterrupt) {
            lines.append("guest-interrupt: \(mechanism == .irqfd ? "KVM_IRQFD (an eventfd routed to an MSI)" : "KVM_SIGNAL_MSI") into the in-kernel LAPIC; "
                         + "halt_poll_ns \(HostFiles().readLine("/sys/module/kvm/parameters/halt_poll_ns") ?? "not present")")
        }

        // Calibration: the instrument's floor, over loopback in the tester's namespace.
        progress.show("calibrating the instrument (loopback echo in the tester's namespace)")
        let floor = try calibrate(backend: testerSockets, echoPolicy: servicePolicy, testerPolicy: testerPolicy, rate: options.rate,
                                  size: options.size, requests: min(max(perRound, 200), 2000), cancel: cancel)
        lines.append(String(format: "instrument floor (an echo over loopback in the tester's namespace, on CPU %d like the services): "
                            + "min %.1f  p50 %.1f  p99 %.1f µs (%d samples, %d lost)",
                            rtCPU, floor.minUs, floor.p50Us, floor.p99Us, floor.samples, floor.lost))

        var statistics = paths.map { PathStatistics<NetPath>(path: $0) }
        var counters = [NetPathCounters](repeating: NetPathCounters(), count: paths.count)
        var splits = [[ServiceTimeline.Split]](repeating: [], count: paths.count)
        let hogs = options.load ? try CPULoad(cpus: CPUSet(online.cpus.filter { $0 != rtCPU })) : nil
        defer { hogs?.finish() }
        var tag: UInt32 = 1
        roundLoop: for round in 0..<options.rounds {
            for (position, path) in rotated(paths, by: round).enumerated() {
                if cancel.isSet { break roundLoop }
                let index = paths.firstIndex(of: path)!
                let runner = runners[path]!
                progress.show("round \(round + 1)/\(options.rounds)  \(path.rawValue) (\(position + 1)/\(paths.count))")
                try runner.start()
                let threads = runner.serviceThreads
                let plan = LatencyProbePlan(target: SocketEndpoint(topology.serviceAddress, port: path.port), requestsPerSecond: options.rate,
                                            payloadSize: options.size, requests: perRound, tag: tag,
                                            seed: UInt64(round) << 8 | UInt64(index))
                tag = tag % 4095 + 1
                let before = ThreadCostSample.of(threads: threads, stealOfCPU: rtCPU)
                let testerBefore = ThreadCostSample.of(threads: [], stealOfCPU: testerCPU)
                let result: LatencyProbeResult
                do {
                    result = try runOnTesterThread(policy: testerPolicy) { try tester.probe(plan, isCancelled: { cancel.isSet }) }
                } catch {
                    try? runner.stop()
                    throw error
                }
                let after = ThreadCostSample.of(threads: threads, stealOfCPU: rtCPU)
                counters[index].testerSteal += ThreadCost(from: testerBefore, to: ThreadCostSample.of(threads: [], stealOfCPU: testerCPU))
                try runner.stop()
                if let split = runner.timeline?.split(result) { splits[index] += split }
                for rtt in result.roundTripNanoseconds { statistics[index].record(nanoseconds: rtt) }
                counters[index].add(result)
                if !result.cancelled || !result.roundTripNanoseconds.isEmpty {
                    statistics[index].endRound(cost: ThreadCost(from: before, to: after)) { _ in }
                }
                if path == .guestBusyPoll { restAfterBusyPolling(cancel) }
            }
        }
        progress.clear()

        let results = paths.indices.map { Self.result(statistics[$0], counters[$0], splits: options.breakdown ? splits[$0] : nil) }
        let ratios = CyclicComparisons.evaluate(PathComparison<NetPath>.netHeadline, statistics: statistics)
        if let plot = options.plot {
            try CyclicPlot.svg(statistics, title: "UDP round-trip time, \(Self.format(options.rate)) requests/s, \(options.size)-byte payloads (share of requests at or below)",
                               quantity: "round-trip time, kernel timestamps", scale: options.plotScale)
                .write(toFile: plot, atomically: true, encoding: .utf8)
        }
        let report = NetLatencyReport(
            kvmModule: module.rawValue, nested: module == .pvm, requestsPerSecond: options.rate, payloadBytes: options.size,
            rounds: options.rounds, requestsPerRound: perRound, policy: schedulingClass.description, cpu: rtCPU, testerCpu: testerCPU,
            load: options.load, cpuDMALatencyHeld: latencyRequest != nil, interrupt: mechanism.rawValue,
            timestamping: tester.timestampSource.rawValue, timestampingDetail: tester.timestampReason,
            instrumentFloorUs: floor.p50Us, instrumentFloor: floor, paths: results, ratios: ratios, interrupted: cancel.isSet)
        lines.append(table(results, ratios: ratios, counters: counters, paths: paths, cpu: rtCPU))
        lines.append(CyclicTestCommand.noise(statistics, cpu: rtCPU))
        for path in statistics { lines.append(CyclicTestCommand.histogram(path)) }
        if let plot = options.plot { lines.append("\nPlot written to \(plot)") }
        if cancel.isSet { lines.append("\ninterrupted: the rounds measured so far are shown; everything was removed") }
        return Outcome(report: report, text: lines.joined(separator: "\n"), statistics: statistics)
    }

    /// A spinning real-time thread uses up its CPU's real-time budget (`sched_rt_runtime_us` of
    /// each `sched_rt_period_us`), and the kernel throttles real-time threads on that CPU for the
    /// rest of the period: that is the busy poller's own cost, shown in its tail, but it must not
    /// land on the path measured next. One period's rest lets the budget refill.
    static func restAfterBusyPolling(_ cancel: CancellationFlag) {
        let period = HostFiles().readInteger("/proc/sys/kernel/sched_rt_period_us") ?? 1_000_000
        let end = monotonicNanoseconds() + UInt64(max(period, 0)) * 1000 + 50_000_000
        while monotonicNanoseconds() < end, !cancel.isSet { usleep(20_000) }
    }

    /// The paths of round `round`, rotated left by it.
    static func rotated(_ paths: [NetPath], by round: Int) -> [NetPath] {
        guard !paths.isEmpty else { return [] }
        let shift = round % paths.count
        return Array(paths[shift...] + paths[..<shift])
    }

    /// Runs `body` on a new thread with the tester's policy and returns what it returned.
    static func runOnTesterThread<T: Sendable>(policy: RealtimePolicy, _ body: @escaping @Sendable () throws -> T) throws -> T {
        let outcome = LockedValue<Result<T, any Error>?>(nil)
        let thread = try HostThread(name: "netlat-tester") {
            do {
                _ = try RealtimeThreadPolicy.apply(policy)
                let value = try body()
                outcome.withLock { $0 = .success(value) }
            } catch {
                outcome.withLock { $0 = .failure(error) }
            }
        }
        thread.join()
        guard let result = outcome.withLock({ $0 }) else { throw NetLatencyRunError.policy("the tester thread ended without a result") }
        return try result.get()
    }

    /// The instrument's floor: the tester and a host echo over loopback in the tester's own
    /// namespace, the echo with the services' policy on their CPU — host-echo without the veth
    /// and without the VM's namespace, so nothing of the measured system.
    static func calibrate(backend: HostSocketBackend, echoPolicy: RealtimePolicy, testerPolicy policy: RealtimePolicy, rate: Double,
                          size: Int, requests: Int, cancel: CancellationFlag) throws -> NetInstrumentFloor {
        let loopback = SocketEndpoint(IPAddress.loopback(.ipv4), port: 7000)
        let hook = ServicePolicyHook(echoPolicy)
        let echo = try HostUDPEcho(backend: backend, at: loopback, name: "netlat-floor", onThreadStart: { try? hook.apply() })
        defer { echo.stop() }
        try hook.check()
        let socket = try TimestampingUDPSocket(backend: backend, bind: SocketEndpoint(IPAddress.loopback(.ipv4), port: 0), interface: "lo")
        let probe = KernelTimestampingTester(socket: socket)
        let plan = LatencyProbePlan(target: loopback, requestsPerSecond: rate, payloadSize: size, requests: requests, tag: 4095, seed: 99)
        let result = try runOnTesterThread(policy: policy) { try probe.probe(plan, isCancelled: { cancel.isSet }) }
        var statistics = PathStatistics<NetPath>(path: .hostEcho)
        for rtt in result.roundTripNanoseconds { statistics.record(nanoseconds: rtt) }
        statistics.endRound(cost: ThreadCost()) { _ in }
        return NetInstrumentFloor(samples: statistics.count, lost: result.lost,
                                  minUs: statistics.count == 0 ? 0 : Double(statistics.minimumNanoseconds) / 1000,
                                  p50Us: statistics.microseconds(atPercentile: 50), p99Us: statistics.microseconds(atPercentile: 99))
    }

    static func result(_ statistics: PathStatistics<NetPath>, _ counters: NetPathCounters, splits: [ServiceTimeline.Split]?) -> NetPathResult {
        let count = statistics.count
        var breakdown: NetBreakdown?
        if let splits, !splits.isEmpty {
            func percentile(_ values: [Int64], _ fraction: Double) -> Double {
                LatencySummary.percentile(values.map { Double($0) / 1000 }.sorted(), fraction)
            }
            let to = splits.map(\.toService), inside = splits.map(\.inService), from = splits.map(\.fromService)
            breakdown = NetBreakdown(samples: splits.count, toServiceP50Us: percentile(to, 0.5), toServiceP99Us: percentile(to, 0.99),
                                     inServiceP50Us: percentile(inside, 0.5), inServiceP99Us: percentile(inside, 0.99),
                                     fromServiceP50Us: percentile(from, 0.5), fromServiceP99Us: percentile(from, 0.99),
                                     toServiceMaxUs: Double(to.max() ?? 0) / 1000, inServiceMaxUs: Double(inside.max() ?? 0) / 1000,
                                     fromServiceMaxUs: Double(from.max() ?? 0) / 1000)
        }
        return NetPathResult(
            name: statistics.path.rawValue, samples: count, lost: counters.lost,
            minUs: count == 0 ? 0 : Double(statistics.minimumNanoseconds) / 1000, p50Us: statistics.microseconds(atPercentile: 50),
            p99Us: statistics.microseconds(atPercentile: 99), p999Us: statistics.microseconds(atPercentile: 99.9),
            maxUs: count == 0 ? 0 : Double(statistics.maximumNanoseconds) / 1000, cpuFraction: statistics.cost.cpuFraction,
            sent: counters.sent, reordered: counters.reordered, duplicates: counters.duplicates, stale: counters.stale,
            missingTimestamps: counters.missingTimestamps, sendFailures: counters.sendFailures,
            stealFraction: statistics.cost.stealFraction, testerStealFraction: counters.testerSteal.stealFraction,
            involuntaryContextSwitches: statistics.cost.involuntarySwitches,
            rounds: statistics.rounds.count, breakdown: breakdown)
    }

    static func format(_ rate: Double) -> String { rate == rate.rounded() ? String(Int(rate)) : String(rate) }

    // MARK: Output

    static func table(_ results: [NetPathResult], ratios: [CyclicRatio], counters: [NetPathCounters], paths: [NetPath], cpu: Int) -> String {
        let cell = CyclicTestCommand.cell
        var lines: [String] = [""]
        lines.append("path               sent  samples   lost     min     p50     p99   p99.9      max (µs)   cpu  steal  t.steal  inv.cs")
        for result in results {
            var line = result.name.padding(toLength: 16, withPad: " ", startingAt: 0)
            line += cell("\(result.sent)", 7) + cell("\(result.samples)", 9) + cell("\(result.lost)", 7)
            for value in [result.minUs, result.p50Us, result.p99Us, result.p999Us] { line += cell(String(format: "%.1f", value), 8) }
            line += cell(String(format: "%.1f", result.maxUs), 9) + "    " + cell(String(format: "%.2f", result.cpuFraction), 6)
            line += cell(String(format: "%.3f", result.stealFraction), 7) + cell(String(format: "%.3f", result.testerStealFraction), 9)
            line += cell("\(result.involuntaryContextSwitches)", 8)
            lines.append(line)
        }
        lines.append("(round-trip times from the kernel's timestamps of each request leaving and each reply arriving at the tester;")
        lines.append(" cpu: the service threads' CPU time over the rounds' wall time — host-echo its thread, guest-longpoll and")
        lines.append(" guest-busypoll the vCPU thread, guest-interrupt the vCPU and I/O threads; steal, t.steal: the steal time of")
        lines.append(" CPU \(cpu) and of the tester's CPU over wall time — time the hypervisor below took the CPU away)")
        for (result, counter) in zip(results, counters) {
            var notes: [String] = []
            if counter.reordered > 0 { notes.append("\(counter.reordered) reordered") }
            if counter.duplicates > 0 { notes.append("\(counter.duplicates) duplicates") }
            if counter.stale > 0 { notes.append("\(counter.stale) stale replies (after their round's grace period; counted lost there)") }
            if counter.foreign > 0 { notes.append("\(counter.foreign) datagrams that were no reply") }
            if counter.sendFailures > 0 { notes.append("\(counter.sendFailures) sends failed") }
            if counter.missingTimestamps > 0 {
                notes.append("\(counter.missingTimestamps) replies without a kernel timestamp of the request or the reply (no RTT: "
                             + "the error queue overflowed or the interface did not timestamp them)")
            }
            if counter.scheduledTransmitSamples > 0 {
                notes.append("\(counter.scheduledTransmitSamples) RTTs from the scheduler's transmit timestamp (no driver timestamp came)")
            }
            if !notes.isEmpty { lines.append("  \(result.name): " + notes.joined(separator: "; ")) }
        }
        if results.contains(where: { $0.breakdown != nil }) {
            lines.append("")
            lines.append("Breakdown at the service's receive and send (p50 / p99 / max µs):")
            lines.append("                  tester → service           in the service             service → tester")
            for result in results {
                guard let split = result.breakdown else {
                    lines.append("  \(result.name): the service's marks did not line up with the requests (loss or stale datagrams)")
                    continue
                }
                func part(_ p50: Double, _ p99: Double, _ maximum: Double) -> String {
                    String(format: "%6.1f / %6.1f / %-8.1f ", p50, p99, maximum)
                }
                lines.append("  " + result.name.padding(toLength: 16, withPad: " ", startingAt: 0)
                             + part(split.toServiceP50Us, split.toServiceP99Us, split.toServiceMaxUs)
                             + part(split.inServiceP50Us, split.inServiceP99Us, split.inServiceMaxUs)
                             + part(split.fromServiceP50Us, split.fromServiceP99Us, split.fromServiceMaxUs) + "(\(split.samples) requests)")
            }
        }
        if let rounds = ratios.first?.rounds {
            lines.append("")
            lines.append("Per-round comparisons (median of \(rounds) rounds, [min – max]):")
            for ratio in ratios {
                let meaning = PathComparison<NetPath>.netHeadline.first { $0.name == ratio.name }?.meaning ?? ""
                let value = ratio.kind == "ratio"
                    ? String(format: "%6.2f  [%.2f – %.2f]", ratio.median, ratio.min, ratio.max)
                    : String(format: "%+6.1f  [%+.1f – %+.1f] µs", ratio.median, ratio.min, ratio.max)
                lines.append("  " + ratio.name.padding(toLength: 44, withPad: " ", startingAt: 0) + value.padding(toLength: 30, withPad: " ", startingAt: 0) + meaning)
            }
        }
        let byName = Dictionary(uniqueKeysWithValues: results.map { ($0.name, $0) })
        if let longPoll = byName[NetPath.guestLongPoll.rawValue] {
            var targets: [String] = []
            func perRound(_ name: String) -> String {
                ratios.first { $0.name == name }.map { String(format: "  (per-round median %.2f [%.2f – %.2f])", $0.median, $0.min, $0.max) } ?? ""
            }
            if let host = byName[NetPath.hostEcho.rawValue] {
                targets.append(CyclicTestCommand.target("guest-longpoll p99 ≤ 1.3 × host-echo p99", longPoll.p99Us, 1.3 * host.p99Us)
                               + perRound("guest-longpoll p99 / host-echo p99"))
            }
            if let interrupt = byName[NetPath.guestInterrupt.rawValue] {
                targets.append(CyclicTestCommand.target("guest-longpoll p99 ≤ 0.6 × guest-interrupt p99", longPoll.p99Us, 0.6 * interrupt.p99Us)
                               + perRound("guest-longpoll p99 / guest-interrupt p99"))
            }
            let busy = byName[NetPath.guestBusyPoll.rawValue].map { String(format: " (guest-busypoll: %.2f)", $0.cpuFraction) } ?? ""
            targets.append("  " + "guest-longpoll cpuFraction ≤ 0.2".padding(toLength: 50, withPad: " ", startingAt: 0)
                           + String(format: "%7.2f vs %7.2f     %@", longPoll.cpuFraction, 0.2, longPoll.cpuFraction <= 0.2 ? "met" : "NOT met") + busy)
            let lost = results.reduce(0) { $0 + $1.lost }
            targets.append("  " + "0 lost replies (all paths)".padding(toLength: 50, withPad: " ", startingAt: 0)
                           + String(format: "%7d          %@", lost, lost == 0 ? "met" : "NOT met"))
            lines.append("")
            lines.append("Targets (this run, percentiles over all samples):")
            lines += targets
        }
        return lines.joined(separator: "\n")
    }
}

/// Set by Ctrl-C (SIGINT) or SIGTERM; the rounds and the tester look at it and stop early, and
/// the teardown runs as on any other exit.
final class CancellationFlag: Sendable {
    private let flag = LockedValue(false)

    var isSet: Bool { flag.withLock { $0 } }

    func set() { flag.withLock { $0 = true } }

    /// Routes SIGINT and SIGTERM to `set()`; cancel the returned sources to stop.
    func catchInterrupts() -> [any DispatchSourceSignal] {
        [SIGINT, SIGTERM].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { [self] in self.set() }
            source.activate()
            return source
        }
    }
}
