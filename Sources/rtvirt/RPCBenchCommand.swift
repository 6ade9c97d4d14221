import ArgumentParser
import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import LongPoll

/// What `rtvirt rpc-bench --json` prints.
struct RPCBenchReport: Codable {
    var kvmModule: String
    var nested: Bool
    /// Samples per path.
    var pairs: Int
    /// Calls per path in each interleaved round.
    var block: Int
    var vcpuCPU: Int?
    var pollerCPUs: String
    var pollerClass: String
    var pollerIdleMicroseconds: Double
    var bareExitNs: Double
    var nullCallNs: Double
    /// Doorbell null call ÷ bare exit (medians).
    var ratio: Double
    /// Exitless null call, poller warm (median).
    var exitlessNullCallNs: Double
    /// Exitless null call, poller asleep: falls back to the doorbell (median).
    var exitlessAsleepNullCallNs: Double
    /// Exitless null call (warm) ÷ bare exit (medians).
    var exitlessRatio: Double
    /// Exitless null call (asleep) ÷ bare exit (medians).
    var exitlessAsleepRatio: Double
    /// The poller thread's CPU time over the wall time of the run (all four paths, interleaved).
    var pollerCpuFraction: Double
    /// The same over 1 s with the VM idle (its vCPU parked in a long sleep).
    var pollerIdleCpuFraction: Double
    /// Warm exitless calls that rang the doorbell anyway (the poller was not running in time).
    var warmCallsThatRang: Int
    /// Asleep exitless calls answered without a doorbell (the poller woke before the guest looked).
    var asleepCallsAnsweredExitless: Int
    var bareExit: LatencySummary
    var nullCall: LatencySummary
    var exitlessNullCall: LatencySummary
    var exitlessAsleepNullCall: LatencySummary
    var pollerAnsweredCalls: UInt64
    var pollerSleeps: UInt64
}

/// What `rtvirt rpc-bench --switching N --json` prints.
struct RPCSwitchReport: Codable {
    var kvmModule: String
    var nested: Bool
    var calls: UInt64
    var seed: UInt64
    /// Calls the host's counting procedure ran (must equal `calls`).
    var hostCount: UInt64
    /// 0 when every count the guest got was the next one and the host ran each call once.
    var lostOrDuplicated: UInt64
    var guestExitlessAnswered: UInt64
    var guestRangAfterSpinning: UInt64
    var guestShortSpins: UInt64
    var guestPostedAndRung: UInt64
    var guestOrdinary: UInt64
    var guestBlocking: UInt64
    var guestIdleGaps: UInt64
    var hostExitlessCalls: UInt64
    var hostPostedDoorbellCalls: UInt64
    var hostLateDoorbells: UInt64
    var hostHandoffs: UInt64
    var seconds: Double
}

struct RPCBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rpc-bench",
        abstract: "Measure a VMRPC null call, with the doorbell and exitless, against a bare exit, from a guest at CPL 3.",
        discussion: """
            The guest runs four paths in interleaved rounds of --block calls each, timing every call with its TSC: \
            a bare exit (an `out` to a port whose device does nothing), a `null` call with the doorbell, a `null` call \
            exitless with the poller warm (the guest posts, the poller thread answers, no exit), and a `null` call \
            exitless with the poller asleep (the guest waits until the poller has set needs_doorbell, posts, and rings: \
            the doorbell fallback, which also wakes the poller). The poller's CPU time is measured over the run and over \
            1 s with the VM idle. With --switching N the guest instead makes N counted calls switching at random between \
            the exitless and doorbell paths and checks that none is lost or answered twice.
            """)

    @Option(help: "Samples per path (100...32768).")
    var pairs = 20_000

    @Option(help: "Calls per path in each interleaved round.")
    var block = 100

    @Option(help: "Host CPU to pin the vCPU thread to (default: the last CPU this process may use, when it may use two or more).")
    var cpu: Int?

    @Option(help: "Housekeeping CPUs for the poller, in list format (default: the allowed CPUs other than the vCPU's).")
    var pollerCPUs: String?

    @Option(help: "SCHED_FIFO priority of the poller thread (1...99); 0 leaves it SCHED_OTHER.")
    var pollerPriority: Int32 = 0

    @Option(help: "Microseconds the poller spins without a call before it sleeps.")
    var idleMicroseconds: UInt64 = 50

    @Option(help: "Instead of the latency run: this many counted calls switching at random between the paths.")
    var switching: UInt64?

    @Option(help: "Seed of the switching run.")
    var seed: UInt64 = 0x5EED

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard (100...32_768).contains(pairs) else { throw ValidationError("--pairs must be 100...32768") }
        guard (1...0xFFFF).contains(block) else { throw ValidationError("--block must be 1...65535") }
        guard (0...99).contains(pollerPriority) else { throw ValidationError("--poller-priority must be 0...99") }
        if let switching { guard switching >= 1 else { throw ValidationError("--switching must be at least 1") } }
    }

    /// The vCPU's CPU and the poller's CPUs.
    func placement() throws -> (vcpu: Int?, poller: CPUSet) {
        let allowed = try ThreadScheduling.affinity()
        let vcpu = cpu ?? (allowed.cpus.count >= 2 ? allowed.cpus.last : nil)
        if let pollerCPUs {
            guard let set = CPUSet(listFormat: pollerCPUs), !set.isEmpty else { throw ValidationError("--poller-cpus: not a CPU list") }
            return (vcpu, set)
        }
        let others = CPUSet(allowed.cpus.filter { $0 != vcpu })
        return (vcpu, others.isEmpty ? allowed : others)
    }

    func run() throws {
        let module = KVMHostInfo.detectModule()
        let system = try KVMSystem()
        let (vcpuCPU, pollerCPUs) = try placement()
        let pollerClass: SchedulingClass? = pollerPriority > 0 ? .fifo(priority: pollerPriority) : nil
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(
            cpus: pollerCPUs, realtimeCPUs: vcpuCPU.map { CPUSet([$0]) } ?? [], idleNanoseconds: idleMicroseconds * 1_000,
            schedulingClass: pollerClass))
        defer { poller.stop() }
        if let switching {
            return try runSwitching(system: system, module: module, poller: poller, vcpuCPU: vcpuCPU, calls: switching)
        }
        let idleMilliseconds: UInt64 = 1_500
        let machine = try BundledGuestMachine(system: system, vcpus: [
            BundledGuestVCPU(mode: .rpcBenchExitless, arguments: (UInt64(pairs), UInt64(block) | idleMilliseconds << 32)),
        ])
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        try poller.attach(server)
        let start = poller.statistics
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(server: server), dispatcher: dispatcher,
                                              onThreadStart: { _ in if let vcpuCPU { _ = try? ThreadScheduling.setAffinity(CPUSet([vcpuCPU])) } })
        // The rounds end when the guest parks in its final sleep: the VM is idle from then on.
        let deadline = monotonicNanoseconds() + 600_000_000_000
        while !dispatcher.isWaiting(vcpu: 0) && runner.stopReasons[0] == nil && monotonicNanoseconds() < deadline { usleep(1_000) }
        let endOfRun = poller.statistics
        usleep(1_000_000)
        let endOfIdle = poller.statistics
        let reasons = runner.waitForAll(timeoutNanoseconds: 600_000_000_000)
        server.shutdown()
        let reported = machine.ports.results(ofVCPU: 0)
        if reasons == [.guestRequested(status: GuestLayout.noExitlessStatus)] {
            throw ValidationError("the host does not offer the exitless feature")
        }
        guard reasons == [.guestRequested(status: 0)], reported.count == 4 else {
            throw ValidationError("the benchmark guest did not finish cleanly: \(reasons), reports \(reported)")
        }
        let cycles = try machine.readData(ofVCPU: 0, count: 4 * pairs)
        let nanosecondsPerCycle = 1e9 / Double(machine.tscMappings[0].frequencyHz)
        let path = { (index: Int) in stride(from: index, to: cycles.count, by: 4).map { Double(cycles[$0]) * nanosecondsPerCycle } }
        let bare = LatencySummary(path(0)), null = LatencySummary(path(1))
        let warm = LatencySummary(path(2)), asleep = LatencySummary(path(3))
        let report = RPCBenchReport(
            kvmModule: module.rawValue, nested: module == .pvm, pairs: pairs, block: block, vcpuCPU: vcpuCPU,
            pollerCPUs: pollerCPUs.description, pollerClass: (pollerClass ?? .other()).description,
            pollerIdleMicroseconds: Double(idleMicroseconds),
            bareExitNs: bare.p50, nullCallNs: null.p50, ratio: null.p50 / bare.p50,
            exitlessNullCallNs: warm.p50, exitlessAsleepNullCallNs: asleep.p50,
            exitlessRatio: warm.p50 / bare.p50, exitlessAsleepRatio: asleep.p50 / bare.p50,
            pollerCpuFraction: endOfRun.cpuFraction(since: start), pollerIdleCpuFraction: endOfIdle.cpuFraction(since: endOfRun),
            warmCallsThatRang: Int(reported[1]), asleepCallsAnsweredExitless: Int(reported[3]),
            bareExit: bare, nullCall: null, exitlessNullCall: warm, exitlessAsleepNullCall: asleep,
            pollerAnsweredCalls: endOfRun.answeredCalls - start.answeredCalls, pollerSleeps: endOfRun.sleeps - start.sleeps)
        if json {
            try printJSON(report)
            return
        }
        print("KVM backend: \(module.rawValue) — \(module.implication)")
        print("\(pairs) samples per path from a guest at CPL 3 in interleaved rounds of \(block), TSC \(machine.tscMappings[0].frequencyHz / 1_000_000) MHz")
        print("vCPU on CPU \(vcpuCPU.map(String.init) ?? "any"); poller on CPUs \(pollerCPUs), \(report.pollerClass), idle \(idleMicroseconds) µs")
        print("")
        print("path                        median       p99     p99.9       min (ns)   ÷ bare exit")
        for (name, summary) in [("bare exit", bare), ("null, doorbell", null), ("null, exitless (warm)", warm),
                                ("null, exitless (asleep)", asleep)] {
            print(name.padding(toLength: 26, withPad: " ", startingAt: 0)
                  + String(format: "%8.0f  %8.0f  %8.0f  %8.0f   %8.3f", summary.p50, summary.p99, summary.p999, summary.minimum,
                           summary.p50 / bare.p50))
        }
        print("")
        print(String(format: "exitless ratio (warm exitless null call / bare exit, medians): %.3f", report.exitlessRatio))
        print("warm exitless calls that rang anyway: \(report.warmCallsThatRang) of \(pairs); "
              + "asleep calls the poller answered first: \(report.asleepCallsAnsweredExitless)")
        print(String(format: "poller CPU: %.1f %% of a CPU over the run, %.3f %% over 1 s with the VM idle",
                     100 * report.pollerCpuFraction, 100 * report.pollerIdleCpuFraction))
    }

    private func runSwitching(system: KVMSystem, module: KVMModule, poller: VMRPCPoller, vcpuCPU: Int?, calls: UInt64) throws {
        let machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: .rpcSwitch, arguments: (calls, seed))])
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let counter = BundledGuestCallCounter()
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher, extra: [counter.procedure])
        try poller.attach(server)
        let started = monotonicNanoseconds()
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(server: server), dispatcher: dispatcher,
                                              onThreadStart: { _ in if let vcpuCPU { _ = try? ThreadScheduling.setAffinity(CPUSet([vcpuCPU])) } })
        let reasons = runner.waitForAll(timeoutNanoseconds: 24 * 3_600_000_000_000)
        let seconds = Double(monotonicNanoseconds() - started) / 1e9
        server.shutdown()
        let reported = machine.ports.results(ofVCPU: 0)
        let statistics = server.statistics(vcpu: 0)
        guard reasons == [.guestRequested(status: 0)] || reasons == [.guestRequested(status: GuestLayout.countMismatchStatus)] else {
            throw ValidationError("the switching guest did not finish: \(reasons), reports \(reported)")
        }
        let clean = reasons == [.guestRequested(status: 0)] && reported.count == 7 && counter.count(vcpu: 0) == calls
        let value = { (index: Int) in clean ? reported[index] : 0 }
        let report = RPCSwitchReport(
            kvmModule: module.rawValue, nested: module == .pvm, calls: calls, seed: seed, hostCount: counter.count(vcpu: 0),
            lostOrDuplicated: clean ? 0 : max(1, calls > counter.count(vcpu: 0) ? calls - counter.count(vcpu: 0) : counter.count(vcpu: 0) - calls),
            guestExitlessAnswered: value(0), guestRangAfterSpinning: value(1), guestShortSpins: value(2), guestPostedAndRung: value(3),
            guestOrdinary: value(4), guestBlocking: value(5), guestIdleGaps: value(6),
            hostExitlessCalls: statistics?.exitlessCalls ?? 0, hostPostedDoorbellCalls: statistics?.postedDoorbellCalls ?? 0,
            hostLateDoorbells: statistics?.lateDoorbells ?? 0, hostHandoffs: statistics?.handoffs ?? 0, seconds: seconds)
        if json {
            try printJSON(report)
        } else {
            print("KVM backend: \(module.rawValue) — \(module.implication)")
            print("\(calls) counted calls switching at random between the exitless and doorbell paths in \(String(format: "%.1f", seconds)) s")
            print("guest: exitless answered \(report.guestExitlessAnswered), rang after spinning \(report.guestRangAfterSpinning), "
                  + "short spins \(report.guestShortSpins), posted and rung \(report.guestPostedAndRung), ordinary \(report.guestOrdinary), "
                  + "blocking \(report.guestBlocking), idle gaps \(report.guestIdleGaps)")
            print("host: poller answered \(report.hostExitlessCalls), doorbells took \(report.hostPostedDoorbellCalls) posted calls, "
                  + "\(report.hostLateDoorbells) late doorbells, \(report.hostHandoffs) hand-backs; counted \(report.hostCount)")
            print(clean ? "lost or duplicated calls: 0" : "LOST OR DUPLICATED CALLS: guest reports \(reported)")
        }
        if !clean { throw ExitCode.failure }
    }
}
