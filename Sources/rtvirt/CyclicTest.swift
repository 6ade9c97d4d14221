import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import Synchronization
import VMRPC

/// One measured path of `rtvirt cyclictest`.
struct CyclicPathResult: Codable {
    var name: String
    var samples: Int
    var minUs: Double
    var avgUs: Double
    var p50Us: Double
    var p99Us: Double
    var p999Us: Double
    var maxUs: Double
    var spinCpuFraction: Double?
    /// Lateness of every wake-up, microseconds (not in the JSON: large).
    var latenciesUs: [Double] = []

    enum CodingKeys: String, CodingKey { case name, samples, minUs, avgUs, p50Us, p99Us, p999Us, maxUs, spinCpuFraction }

    init(name: String, latenciesUs: [Double], spinCpuFraction: Double? = nil) {
        let summary = LatencySummary(latenciesUs)
        self.name = name
        samples = summary.count
        minUs = summary.minimum; avgUs = summary.average; p50Us = summary.p50
        p99Us = summary.p99; p999Us = summary.p999; maxUs = summary.maximum
        self.spinCpuFraction = spinCpuFraction
        self.latenciesUs = latenciesUs
    }
}

/// The settings shared by the three paths.
struct CyclicSettings {
    var intervalMicroseconds: Int
    var periods: Int
    var policy: RealtimePolicy
    var progress: @Sendable (String, Double) -> Void
}

/// The host's own limit: `clock_nanosleep(TIMER_ABSTIME)` on a thread with the same policy.
enum HostNativeCyclic {
    static func run(_ settings: CyclicSettings) throws -> CyclicPathResult {
        let latencies = Mutex<[Double]>([])
        let failure = Mutex<String?>(nil)
        let interval = UInt64(settings.intervalMicroseconds) * 1000
        let periods = settings.periods
        let progress = settings.progress
        let policy = settings.policy
        let thread = try HostThread(name: "host-cyclic") {
            let saved: SavedThreadScheduling
            do { saved = try RealtimeThreadPolicy.apply(policy) } catch {
                failure.withLock { $0 = "\(error)" }
                return
            }
            defer { RealtimeThreadPolicy.restore(saved) }
            var samples = [Double](repeating: 0, count: periods)
            var next = monotonicNanoseconds()
            for index in 0..<periods {
                next += interval
                var target = timespec(tv_sec: Int(next / 1_000_000_000), tv_nsec: Int(next % 1_000_000_000))
                while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &target, nil) == EINTR {}
                let now = monotonicNanoseconds()
                samples[index] = Double(Int64(bitPattern: now &- next)) / 1000
                if index % 500 == 0 { progress("host", Double(index) / Double(periods)) }
            }
            latencies.withLock { $0 = samples }
        }
        thread.join()
        if let failure = failure.withLock({ $0 }) { throw CyclicTestError.policy(failure) }
        return CyclicPathResult(name: "host", latenciesUs: latencies.withLock { $0 })
    }
}

enum CyclicTestError: Error, CustomStringConvertible {
    case policy(String)
    case guest(String, [VCPUStopReason?])

    var description: String {
        switch self {
        case .policy(let message): return "could not apply the real-time policy: \(message)"
        case let .guest(path, reasons): return "the \(path) guest did not finish cleanly: \(reasons)"
        }
    }
}

/// A bundled guest in one of the cyclic modes on a real-time vCPU thread.
enum GuestCyclic {
    static func run(_ settings: CyclicSettings, mode: BundledGuestMode, system: KVMSystem) throws -> CyclicPathResult {
        let name = mode == .cyclicLongPoll ? "guest-longpoll" : "guest-interrupt"
        let interruptController = mode == .cyclicInterrupt
        // The period in guest TSC cycles needs the TSC rate, which the machine measures.
        var machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: mode)],
                                              interruptController: interruptController)
        let period = machine.tscMappings[0].frequencyHz * UInt64(settings.intervalMicroseconds) / 1_000_000
        machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: mode, arguments: (UInt64(settings.periods), period))],
                                          interruptController: interruptController)
        let strategy = DeadlineTimerStrategy()
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, timerStrategy: strategy)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        defer { server.shutdown() }
        let scheduler = RealtimeVCPUScheduler(policies: [0: settings.policy])
        let start = monotonicNanoseconds()
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(server: server), dispatcher: dispatcher,
                                              onThreadStart: scheduler.threadStarted, onThreadEnd: scheduler.threadEnded)
        let expected = Double(settings.periods * settings.intervalMicroseconds) * 1000
        var reasons = runner.waitForAll(timeoutNanoseconds: 1)
        while reasons.contains(where: { $0 == nil }) {
            settings.progress(name, min(1, Double(monotonicNanoseconds() - start) / expected))
            reasons = runner.waitForAll(timeoutNanoseconds: 200_000_000)
            if Double(monotonicNanoseconds() - start) > expected * 3 + 10e9 { runner.stop() }
        }
        if case .failed(let message) = scheduler.status(vcpu: 0) { throw CyclicTestError.policy(message) }
        guard reasons == [.guestRequested(status: 0)] else { throw CyclicTestError.guest(name, reasons) }
        let microsecondsPerCycle = 1e6 / Double(machine.tscMappings[0].frequencyHz)
        guard mode == .cyclicLongPoll else {
            let latencies = try machine.readSignedData(ofVCPU: 0, count: settings.periods).map { Double($0) * microsecondsPerCycle }
            return CyclicPathResult(name: name, latenciesUs: latencies)
        }
        let data = try machine.readSignedData(ofVCPU: 0, count: 2 * settings.periods)
        let latencies = stride(from: 0, to: data.count, by: 2).map { Double(data[$0]) * microsecondsPerCycle }
        // CPU spent spinning before deadlines: the host's (before releasing the vCPU) plus the
        // guest's (after an early release), as a share of the time waited.
        let guestSpinNanoseconds = stride(from: 1, to: data.count, by: 2).reduce(0.0) { $0 + Double(max(0, -data[$1])) * microsecondsPerCycle * 1000 }
        let statistics = strategy.statistics
        let waited = max(Double(statistics.waitNanoseconds), Double(settings.periods * settings.intervalMicroseconds) * 1000)
        return CyclicPathResult(name: name, latenciesUs: latencies,
                                spinCpuFraction: (Double(statistics.spinNanoseconds) + guestSpinNanoseconds) / waited)
    }
}

/// Threads that keep the other CPUs busy while a path is measured (`--load`).
final class CPULoad {
    private final class Flag: Sendable { let stop = Atomic<Bool>(false) }
    private let flag = Flag()
    private var threads: [HostThread] = []

    init(cpus: CPUSet) throws {
        for cpu in cpus.cpus {
            let flag = self.flag
            threads.append(try HostThread(name: "load\(cpu)") {
                try? ThreadScheduling.setAffinity(CPUSet([cpu]))
                var x: UInt64 = 1
                while !flag.stop.load(ordering: .relaxed) {
                    for _ in 0..<10_000 { x = x &* 6_364_136_223_846_793_005 &+ 1 }
                }
                _ = x
            })
        }
    }

    func finish() {
        flag.stop.store(true, ordering: .relaxed)
        for thread in threads { thread.join() }
    }
}
