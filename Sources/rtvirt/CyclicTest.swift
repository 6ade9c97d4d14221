import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import Synchronization
import VMRPC
import LongPoll
import RealtimeVCPU

/// The settings every path of `rtvirt cyclictest` shares.
struct CyclicSettings: Sendable {
    var intervalMicroseconds: Int
    var policy: RealtimePolicy
    /// The CPU the measuring threads are pinned to (its steal time is what is reported).
    var measuringCPU: Int
    /// The percentile of learned return latencies `guest-longpoll` releases its vCPU early by.
    var earlyReleasePercentile: Double = 0.9
}

/// What one round of one path cost, besides its samples.
struct CyclicRoundOutcome {
    var cost: ThreadCost
    /// CPU time spent spinning before deadlines (nil: the path does not spin).
    var spinNanoseconds: Double?
    /// Wall time spent waiting for deadlines.
    var waitedNanoseconds: Double
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

/// One path, measured a round at a time on its own real-time thread (a host thread, or the
/// vCPU thread of a VM that lives as long as the runner).
protocol CyclicPathRunner: AnyObject {
    var path: CyclicPath { get }
    /// Runs `periods` periods. `waiting` is called on the calling thread about every 200 ms
    /// while the round runs; `record` gets each wake-up's lateness (ns) after the round, and,
    /// where the path knows it, when the host woke up for it (ns after the deadline).
    func runRound(periods: Int, waiting: () -> Void, record: (_ lateness: Int64, _ hostWake: Int64?) -> Void) throws -> CyclicRoundOutcome
}

/// Applies the measuring policy on the thread it runs on and samples the thread's cost at the
/// start and end of a round. Used by the host threads and as the vCPU thread hooks.
final class MeasuringThreadHooks: Sendable {
    private struct State {
        var saved: SavedThreadScheduling?
        var failure: String?
        var start: ThreadCostSample?
        var cost: ThreadCost?
    }
    private let settings: CyclicSettings
    private let state = LockedValue(State())

    init(_ settings: CyclicSettings) { self.settings = settings }

    /// On the measuring thread, first: the policy, then the first sample. False when the
    /// policy could not be applied (the thread then must not measure).
    @discardableResult
    func started() -> Bool {
        do {
            let saved = try RealtimeThreadPolicy.apply(settings.policy)
            let start = ThreadCostSample.now(stealOfCPU: settings.measuringCPU)
            state.withLock { $0.saved = saved; $0.start = start }
            return true
        } catch {
            state.withLock { $0.failure = "\(error)" }
            return false
        }
    }

    /// On the measuring thread, last: the second sample, then the thread's old policy.
    func ended() {
        let end = ThreadCostSample.now(stealOfCPU: settings.measuringCPU)
        let saved = state.withLock { state -> SavedThreadScheduling? in
            if let start = state.start { state.cost = ThreadCost(from: start, to: end) }
            defer { state.saved = nil }
            return state.saved
        }
        if let saved { RealtimeThreadPolicy.restore(saved) }
    }

    /// The round's cost, or the policy failure.
    func outcome() throws -> ThreadCost {
        let (failure, cost) = state.withLock { ($0.failure, $0.cost) }
        if let failure { throw CyclicTestError.policy(failure) }
        return cost ?? ThreadCost()
    }
}

/// `host` (`clock_nanosleep(TIMER_ABSTIME)`) and `host-compensated` (the long-poll
/// dispatcher's deadline wait with a `DeadlineTimerStrategy`, exactly as a parked vCPU waits)
/// on a host thread with the measuring policy.
final class HostCyclicRunner: CyclicPathRunner {
    let path: CyclicPath
    private let settings: CyclicSettings
    /// The compensated path's dispatcher and strategy; they live across rounds, so the learned
    /// margin does too (as for the guest).
    private let dispatcher: LongPollDispatcher?
    private let strategy: DeadlineTimerStrategy?
    /// Written by the measuring thread only while the round runs; read after it was joined.
    private let buffer: SampleBuffer

    init(path: CyclicPath, settings: CyclicSettings, maximumPeriods: Int) throws {
        precondition(path == .host || path == .hostCompensated)
        self.path = path
        self.settings = settings
        if path == .hostCompensated {
            let strategy = DeadlineTimerStrategy()
            self.strategy = strategy
            dispatcher = try LongPollDispatcher(vcpuCount: 1, timerStrategy: strategy)
        } else {
            strategy = nil
            dispatcher = nil
        }
        // Allocated and touched now, so the round does not page-fault on it.
        buffer = SampleBuffer(count: maximumPeriods)
    }

    func runRound(periods: Int, waiting: () -> Void, record: (Int64, Int64?) -> Void) throws -> CyclicRoundOutcome {
        let hooks = MeasuringThreadHooks(settings)
        let interval = UInt64(settings.intervalMicroseconds) * 1000
        let dispatcher = self.dispatcher
        strategy?.resetStatistics()
        let thread = try HostThread(name: path == .host ? "host-cyclic" : "host-comp") { [buffer] in
            guard hooks.started() else { return }
            defer { hooks.ended() }
            buffer.samples.withLock { samples in
                var next = monotonicNanoseconds()
                for index in 0..<min(periods, samples.count) {
                    next += interval
                    if let dispatcher {
                        _ = dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: next))
                    } else {
                        var target = timespec(tv_sec: Int(next / 1_000_000_000), tv_nsec: Int(next % 1_000_000_000))
                        while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &target, nil) == EINTR {}
                    }
                    samples[index] = Int64(bitPattern: monotonicNanoseconds() &- next)
                }
            }
        }
        while !thread.waitForFinish(timeoutNanoseconds: 200_000_000) { waiting() }
        thread.join()
        let cost = try hooks.outcome()
        buffer.samples.withLock { samples in for index in 0..<min(periods, samples.count) { record(samples[index], nil) } }
        let statistics = strategy?.statistics
        return CyclicRoundOutcome(cost: cost, spinNanoseconds: statistics.map { Double($0.spinNanoseconds) },
                                  waitedNanoseconds: statistics.map { Double($0.waitNanoseconds) } ?? Double(cost.wallNanoseconds))
    }
}

/// The lateness samples of one host round, allocated once.
final class SampleBuffer: Sendable {
    let samples: LockedValue<[Int64]>
    init(count: Int) { samples = LockedValue([Int64](repeating: 0, count: count)) }
}

/// A bundled guest in a cyclic mode on a real-time vCPU thread: `guest-longpoll` (16-byte
/// `timer.sleepUntil`, dispatcher with a `DeadlineTimerStrategy`), `guest-longpoll-raw`
/// (8-byte form, a dispatcher without strategy, no guest spin) or `guest-interrupt` (LAPIC
/// TSC-deadline timer). One VM per path lives across rounds; each round re-enters the guest.
final class GuestCyclicRunner: CyclicPathRunner {
    let path: CyclicPath
    private let settings: CyclicSettings
    private let mode: BundledGuestMode
    private let machine: BundledGuestMachine
    private let dispatcher: LongPollDispatcher
    private let strategy: DeadlineTimerStrategy?
    private let server: VMRPCServer?
    private let bus: IOBus
    private let periodCycles: UInt64

    init(path: CyclicPath, settings: CyclicSettings, system: KVMSystem) throws {
        self.path = path
        self.settings = settings
        switch path {
        case .guestLongPoll: mode = .cyclicLongPoll
        case .guestLongPollRaw: mode = .cyclicLongPollRaw
        case .guestInterrupt: mode = .cyclicInterrupt
        case .host, .hostCompensated: preconditionFailure("not a guest path")
        }
        machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: mode)],
                                          interruptController: mode == .cyclicInterrupt)
        periodCycles = machine.tscMappings[0].frequencyHz * UInt64(settings.intervalMicroseconds) / 1_000_000
        strategy = path == .guestLongPoll ? DeadlineTimerStrategy() : nil
        dispatcher = try LongPollDispatcher(vcpuCount: 1, timerStrategy: strategy)
        if mode == .cyclicInterrupt {
            server = nil
            bus = try machine.makeBus()
        } else {
            let server = try machine.makeVMRPCServer(dispatcher: dispatcher,
                                                     earlyReleasePercentile: settings.earlyReleasePercentile)
            self.server = server
            bus = try machine.makeBus(server: server)
        }
    }

    deinit { server?.shutdown() }

    func runRound(periods: Int, waiting: () -> Void, record: (Int64, Int64?) -> Void) throws -> CyclicRoundOutcome {
        try machine.reenter(vcpu: 0, BundledGuestVCPU(mode: mode, arguments: (UInt64(periods), periodCycles)))
        // The previous round's runner stopped the vCPU on release: clear its kick and cancellation.
        machine.vcpus[0].acknowledgeKick()
        dispatcher.resume(vcpu: 0)
        strategy?.resetStatistics()
        let hooks = MeasuringThreadHooks(settings)
        let start = monotonicNanoseconds()
        let expected = Double(periods * settings.intervalMicroseconds) * 1000
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: bus, dispatcher: dispatcher,
                                              onThreadStart: { _ in hooks.started() }, onThreadEnd: { _ in hooks.ended() })
        var reasons = runner.waitForAll(timeoutNanoseconds: 200_000_000)
        while reasons.contains(where: { $0 == nil }) {
            waiting()
            if Double(monotonicNanoseconds() - start) > expected * 3 + 10e9 { runner.stop() }
            reasons = runner.waitForAll(timeoutNanoseconds: 200_000_000)
        }
        let cost = try hooks.outcome()
        guard reasons == [.guestRequested(status: 0)] else { throw CyclicTestError.guest(path.rawValue, reasons) }
        let nanosecondsPerCycle = 1e9 / Double(machine.tscMappings[0].frequencyHz)
        func nanoseconds(_ cycles: Int64) -> Int64 { Int64((Double(cycles) * nanosecondsPerCycle).rounded()) }
        if mode == .cyclicInterrupt {
            for cycles in try machine.readSignedData(ofVCPU: 0, count: periods) { record(nanoseconds(cycles), nil) }
            return CyclicRoundOutcome(cost: cost, spinNanoseconds: nil, waitedNanoseconds: Double(cost.wallNanoseconds))
        }
        let data = try machine.readSignedData(ofVCPU: 0, count: 2 * periods)
        var guestSpin = 0.0
        for index in stride(from: 0, to: data.count, by: 2) {
            if mode == .cyclicLongPoll {
                record(nanoseconds(data[index]), nil)
                // An arrival before the deadline is the time the guest spun.
                if data[index + 1] < 0 { guestSpin += Double(-data[index + 1]) * nanosecondsPerCycle }
            } else {
                // The raw mode also reports when the host woke up for it (its result's guest TSC).
                record(nanoseconds(data[index]), nanoseconds(data[index + 1]))
            }
        }
        guard let statistics = strategy?.statistics else {
            return CyclicRoundOutcome(cost: cost, spinNanoseconds: nil, waitedNanoseconds: Double(cost.wallNanoseconds))
        }
        return CyclicRoundOutcome(cost: cost, spinNanoseconds: Double(statistics.spinNanoseconds) + guestSpin,
                                  waitedNanoseconds: max(Double(statistics.waitNanoseconds), expected))
    }
}

/// Threads that keep the other CPUs busy while the paths are measured (`--load`).
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
