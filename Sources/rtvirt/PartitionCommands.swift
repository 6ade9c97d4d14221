import ArgumentParser
import CgroupScheduler
import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import Synchronization
import Logging
import RealtimeVCPU

extension CPUSet: ExpressibleByArgument {
    public init?(argument: String) { self.init(listFormat: argument) }
}

extension RTBudget: ExpressibleByArgument {
    public init?(argument: String) { self.init(parsing: argument) }
}

extension BudgetMode: ExpressibleByArgument {}
extension OverrunAction: ExpressibleByArgument {}

/// A logger for library events the tool prints itself: errors only.
func quietLogger(_ label: String = "rtvirt.cgroup") -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = .error
    return logger
}

/// The mode `requested` resolves to on this host, or the typed error that says why none.
func resolveBudgetMode(_ requested: BudgetMode, hierarchy: CgroupHierarchy) throws -> BudgetModeChoice {
    try BudgetModeSupport.choose(requested, support: BudgetModeSupport.detect(hierarchy: hierarchy))
}

struct PartitionCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "partition",
        abstract: "Create (or show) a real-time and a housekeeping cgroup partition, or reclaim leftovers.",
        discussion: """
            Groups live under 'rtvirt/' only: in the v1 cpuset (and, for the rtGroup budget mode, cpu) hierarchies, or on a \
            cgroup v2 host in the unified hierarchy. Without --dry-run the partition is created, shown, and removed again when \
            the command ends (a VMM keeps it for the VM's lifetime). --repeat creates and removes it that many times (two \
            such commands at once exercise the cross-process lock).
            """)

    @Option(name: .customLong("rt-cpus"), help: "CPUs of the real-time partition, for example 1 or 2-3.")
    var rtCPUs: CPUSet?

    @Option(name: .customLong("housekeeping-cpus"), help: "CPUs of the housekeeping partition.")
    var housekeepingCPUs: CPUSet?

    @Option(help: "RT budget of the real-time partition, runtime/period, for example 500ms/1s.")
    var budget = RTBudget(runtimeMicroseconds: 500_000, periodMicroseconds: 1_000_000)

    @Option(name: .customLong("budget-mode"), help: "rtGroup (v1 cpu.rt_runtime_us), deadline (SCHED_DEADLINE per RT vCPU thread) or automatic.")
    var budgetMode: BudgetMode = .automatic

    @Option(help: "Memory node.")
    var node = 0

    @Option(help: "Partition name.")
    var name = "cli"

    @Option(help: "Create and remove the partition this many times.")
    var `repeat` = 1

    @Flag(help: "Print the plan and every file it would write; change nothing.")
    var dryRun = false

    @Flag(help: "Delete partitions left behind by processes that died.")
    var cleanup = false

    func validate() throws {
        guard (1...100_000).contains(`repeat`) else { throw ValidationError("--repeat must be in 1...100000") }
    }

    func run() throws {
        let hierarchy = CgroupHierarchy.detect()
        let backend: any CgroupBackend = dryRun ? FileCgroupBackend(hierarchy: hierarchy) : try LibcgroupBackend(hierarchy: hierarchy)
        if cleanup {
            let reclaimed = CgroupPartition.reclaimLeftovers(backend: backend)
            print(reclaimed.isEmpty ? "No leftover partitions." : "Reclaimed: " + reclaimed.joined(separator: ", "))
            return
        }
        let online = try ThreadScheduling.affinity()
        let plan = PartitionPlan(name: name, realtimeCPUs: rtCPUs ?? CPUSet([online.cpus.last ?? 0]),
                                 housekeepingCPUs: housekeepingCPUs ?? CPUSet(online.cpus.dropLast()), budget: budget, memoryNode: node,
                                 budgetMode: budgetMode)
        let choice = try resolveBudgetMode(budgetMode, hierarchy: hierarchy)
        let available = PartitionPlan.availableRTFraction(hierarchy: hierarchy, backend: backend, mode: choice.mode)
        try plan.validate(onlineCPUs: online, nodeCount: NUMATopology.current().nodeCount, availableRTFraction: available)
        if `repeat` > 1 { return try cycle(plan, hierarchy: hierarchy, backend: backend) }
        print("cgroup layout: \(hierarchy.layout.rawValue); RT group scheduling: \(hierarchy.rtGroupScheduling ? "yes (cpu.rt_runtime_us)" : "no")")
        print("budget mode: \(choice)")
        print("plan: real-time CPUs \(plan.realtimeCPUs), housekeeping CPUs \(plan.housekeepingCPUs), budget \(plan.budget), node \(node)")
        var affinity: CPUSet?
        if choice.mode == .deadline, !hierarchy.usesV2Partitions {
            // Asks the kernel (a thread is SCHED_DEADLINE for microseconds); writes nothing.
            let placement = try CgroupPartition.previewV1DeadlinePlacement(plan, backend: backend)
            affinity = placement.affinity
            print("deadline: \(placement)")
        }
        print(dryRun ? "would write:" : "writes:")
        for write in CgroupPartition.plannedWrites(plan, mode: choice.mode, hierarchy: hierarchy, backend: backend, deadlineAffinity: affinity) {
            let mount = write.controller == unifiedHierarchy ? hierarchy.v2Mount?.path : hierarchy.v1Mount(for: write.controller)?.path
            print("  \(mount ?? "<\(write.controller) not mounted>")/\(write.group)/\(write.file) = \(write.value)")
        }
        if hierarchy.usesV2Partitions && choice.mode == .deadline {
            print("  (then this process joins \(CgroupPartition.vmGroup(for: plan))/cgroup.procs, and cpuset.cpus.partition is read back; isolated, else root)")
        }
        if dryRun { return }
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, logger: quietLogger())
        print("created \(partition.realtimeGroup) and \(partition.housekeepingGroup) (cgroup v\(partition.cgroupVersion))")
        if let placement = partition.deadlinePlacement { print("deadline: \(placement)") }
        print(String(format: "removed again in %.2f ms", Double(try partition.remove()) / 1e6))
    }

    /// Creates and removes the partition `repeat` times; stops at the first error.
    private func cycle(_ plan: PartitionPlan, hierarchy: CgroupHierarchy, backend: any CgroupBackend) throws {
        let start = monotonicNanoseconds()
        for index in 0..<`repeat` {
            do {
                let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, logger: quietLogger())
                try partition.remove()
            } catch {
                throw ValidationError("cycle \(index + 1) of \(`repeat`): \(error)")
            }
        }
        print(String(format: "%d partitions (%@) created and removed in %.2f s", `repeat`, plan.name, Double(monotonicNanoseconds() - start) / 1e9))
    }
}

/// What `rtvirt runaway --json` prints.
struct RunawayReport: Codable {
    /// One phase: CPU time over wall time of the vCPU thread and of the housekeeping threads
    /// next to it, from `/proc/self/task/TID/schedstat` over the same interval.
    struct Phase: Codable, Equatable {
        /// `rtGroup`, `deadline` or `none` (no partition: plain SCHED_FIFO under the global limit).
        var mode: String = "none"
        /// The vCPU thread's class and CPUs in this phase.
        var vcpuScheduling: String = ""
        /// The interval's wall time, seconds.
        var seconds: Double
        /// The housekeeping thread's CPU time / wall time, on the real-time CPU.
        var housekeepingShare: Double
        /// The housekeeping threads' shares on the other CPUs the vCPU may run on (a deadline
        /// vCPU without a root domain of its own runs on every CPU of its root domain).
        var otherHousekeepingShares: [String: Double] = [:]
        /// The spinning vCPU thread's CPU time / wall time: at most its budget (plus a little)
        /// when the budget works. This is the evidence `nr_throttled` cannot give on cgroup v1,
        /// where it counts CFS bandwidth throttling only.
        var vcpuShare: Double
        /// Steal time on the real-time CPU / wall time (`/proc/stat`); what neither thread got
        /// because the hypervisor below ran something else.
        var stealShare: Double?
        /// With `--watchdog`: from the vCPU's start to the watchdog's first report, ms.
        var watchdogDetectionMs: Double?
        /// With `--watchdog`: what it did.
        var watchdogAction: String?
        /// Stopping the vCPU, tearing the VM down and removing the partition, ms.
        var cleanupMs: Double?
        /// What the partition said about its budget (the mode's reason, the deadline placement).
        var note: String?
        /// The 1-minute load average when the phase began (`/proc/loadavg`; it counts the
        /// phase's own vCPU and housekeeping threads too).
        var loadAverage: Double?
        /// CPU time of the measured CPUs (the real-time CPU, and the others the vCPU may run
        /// on) that neither the vCPU nor the housekeeping threads nor steal took, over wall
        /// time: other work on this shared machine (builds). It takes from the housekeeping
        /// threads, not from the vCPU (SCHED_OTHER threads of other sessions get equal shares
        /// through autogroup, whatever the housekeeping threads' nice value).
        var otherWorkShare: Double?
    }
    var kvmModule: String
    var budget: String
    var cpu: Int
    var seconds: Double
    /// `kernel.sched_rt_runtime_us / sched_rt_period_us`: the vCPU's share without a partition.
    var globalRTFraction: Double
    /// One per budget mode, then `none`.
    var phases: [Phase]
    var leftoverGroups: Int
    var numa: String
}

struct RunawayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "runaway",
        abstract: "A guest spinning forever on a real-time vCPU: with a budget the host keeps its CPU; without, it mostly does not.",
        discussion: """
            A housekeeping thread (SCHED_OTHER) spins on the real-time CPU next to the vCPU (and on every other CPU the vCPU \
            may run on). Each thread's CPU time over wall time comes from /proc/self/task/TID/schedstat over the same \
            interval. One phase per budget mode (default: every mode this host supports: rtGroup is a SCHED_FIFO vCPU in a \
            v1 RT group; deadline is a SCHED_DEADLINE vCPU), then plain SCHED_FIFO under only the global \
            kernel.sched_rt_runtime_us. The VM is torn down before its partition is removed; everything is cleaned up, also \
            on errors. --watchdog runs the overrun watchdog in every phase and shows when it reported the vCPU.
            """)

    @Option(help: "RT budget of the partition.")
    var budget = RTBudget(runtimeMicroseconds: 50_000, periodMicroseconds: 100_000)

    @Option(name: .customLong("budget-mode"), help: "A budget mode to measure (rtGroup, deadline, automatic); repeat for several. Default: every mode the host supports.")
    var budgetModes: [BudgetMode] = []

    @Option(help: "Seconds per phase.")
    var seconds: Double = 2

    @Option(help: "The real-time CPU (default: the last online CPU).")
    var cpu: Int?

    @Flag(help: "Run the overrun watchdog (3 periods at 90 % of the runtime) and show its detection time.")
    var watchdog = false

    @Option(name: .customLong("watchdog-action"), help: "What the watchdog does: report, demote (to SCHED_OTHER) or pause (stops the VM).")
    var watchdogAction: OverrunAction = .report

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard seconds > 0, seconds <= 3600 else { throw ValidationError("--seconds must be in (0, 3600]") }
    }

    func run() throws {
        let hierarchy = CgroupHierarchy.detect()
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        CgroupPartition.reclaimLeftovers(backend: backend)
        let online = try ThreadScheduling.affinity()
        let rtCPU = cpu ?? online.cpus.last ?? 0
        guard online.cpus.count >= 2 else { throw ValidationError("needs at least 2 CPUs (one stays free for the host)") }
        let support = BudgetModeSupport.detect(hierarchy: hierarchy)
        var modes: [BudgetMode] = []
        for requested in budgetModes.isEmpty ? support.filter(\.supported).map(\.mode) : budgetModes {
            let mode = try BudgetModeSupport.choose(requested, support: support).mode
            if !modes.contains(mode) { modes.append(mode) }
        }
        let housekeepingCPUs = CPUSet(online.cpus.filter { $0 != rtCPU })
        let system = try KVMSystem()
        let module = KVMHostInfo.detectModule()
        if !json {
            print("KVM backend: \(module.rawValue); real-time CPU \(rtCPU); budget \(budget); \(seconds) s per phase; modes: "
                  + (modes.map(\.rawValue) + ["none"]).joined(separator: ", "))
        }
        var phases: [RunawayReport.Phase] = []
        var numaMessage = ""
        for mode in modes {
            let plan = PartitionPlan(name: "runaway", realtimeCPUs: [rtCPU], housekeepingCPUs: housekeepingCPUs, budget: budget, budgetMode: mode)
            try plan.validate(onlineCPUs: online, nodeCount: NUMATopology.current().nodeCount,
                              availableRTFraction: PartitionPlan.availableRTFraction(hierarchy: hierarchy, backend: backend, mode: mode))
            // The VM is gone when `measure` returns; then the partition goes.
            let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, logger: quietLogger())
            let run: RunawayRun
            do {
                run = try Self.measure(system: system, cpu: rtCPU, seconds: seconds, partition: partition, watchdog: watchdogConfiguration(housekeepingCPUs)) { machine in
                    // Guest memory on the plan's node (libnuma); a no-op that says so on one-node hosts.
                    let region = machine.vm.memoryRegions[0]
                    numaMessage = NUMABinding.bindMemory(region.mapping.pointer, size: Int(region.size), node: plan.memoryNode ?? 0)
                }
            } catch {
                _ = try? partition.remove()
                throw error
            }
            var phase = run.phase
            phase.mode = mode.rawValue
            phase.note = partition.deadlinePlacement?.message ?? partition.budgetMode.reason
            phase.cleanupMs = Double(run.stopNanoseconds + (try partition.remove())) / 1e6
            phases.append(phase)
        }
        let leftovers = CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/runaway-") }.count
        // Without: plain SCHED_FIFO under only the global limit.
        let without = try Self.measure(system: system, cpu: rtCPU, seconds: seconds, partition: nil, watchdog: watchdogConfiguration(housekeepingCPUs))
        var withoutPhase = without.phase
        withoutPhase.cleanupMs = Double(without.stopNanoseconds) / 1e6
        phases.append(withoutPhase)
        let report = RunawayReport(kvmModule: module.rawValue, budget: budget.description, cpu: rtCPU, seconds: seconds,
                                   globalRTFraction: Self.globalRTFraction(), phases: phases, leftoverGroups: leftovers, numa: numaMessage)
        if json {
            try printJSON(report)
            return
        }
        print(Self.table(report))
        for phase in phases { if let note = phase.note { print("\(phase.mode): \(note)") } }
        print("leftover groups: \(leftovers); NUMA: \(numaMessage)")
    }

    /// `kernel.sched_rt_runtime_us / sched_rt_period_us`.
    static func globalRTFraction() -> Double {
        let files = HostFiles()
        let runtime = Double(files.readInteger("/proc/sys/kernel/sched_rt_runtime_us") ?? 950_000)
        let period = Double(files.readInteger("/proc/sys/kernel/sched_rt_period_us") ?? 1_000_000)
        return runtime < 0 ? 1 : runtime / period
    }

    private func watchdogConfiguration(_ housekeeping: CPUSet) -> OverrunWatchdog.Configuration? {
        guard watchdog else { return nil }
        var logger = Logger(label: "rtvirt.watchdog")
        logger.logLevel = json ? .critical : .error // the table shows the reports
        return OverrunWatchdog.Configuration(budget: budget, action: watchdogAction, cpus: housekeeping, logger: logger)
    }

    /// The phases side by side.
    static func table(_ report: RunawayReport) -> String {
        func cell(_ text: String, _ width: Int) -> String { text.count >= width ? text + " " : text.padding(toLength: width, withPad: " ", startingAt: 0) }
        let withWatchdog = report.phases.contains { $0.watchdogAction != nil }
        var lines = [cell("mode", 10) + cell("vCPU thread", 34) + cell("vCPU", 6) + cell("hk CPU \(report.cpu)", 10)
                     + cell("hk other CPUs", 15) + cell("steal", 7) + cell("others", 7) + cell("cleanup", 10) + (withWatchdog ? "watchdog" : "")]
        for phase in report.phases {
            let others = phase.otherHousekeepingShares.sorted { $0.key < $1.key }.map { "\($0.key):\(String(format: "%.2f", $0.value))" }
            var line = cell(phase.mode, 10) + cell(phase.vcpuScheduling, 34) + cell(String(format: "%.2f", phase.vcpuShare), 6)
                + cell(String(format: "%.2f", phase.housekeepingShare), 10) + cell(others.isEmpty ? "-" : others.joined(separator: " "), 15)
                + cell(phase.stealShare.map { String(format: "%.2f", $0) } ?? "n/a", 7)
                + cell(phase.otherWorkShare.map { String(format: "%.2f", $0) } ?? "-", 7)
                + cell(phase.cleanupMs.map { String(format: "%.1f ms", $0) } ?? "-", 10)
            if withWatchdog {
                line += phase.watchdogDetectionMs.map { String(format: "%@ after %.0f ms", phase.watchdogAction ?? "", $0) } ?? "no report"
            }
            lines.append(line)
        }
        lines.append(String(format: "budget %@; without a partition only the global sched_rt_runtime_us (%.2f) limits the vCPU",
                            report.budget, report.globalRTFraction))
        lines.append("hk: a SCHED_OTHER housekeeping thread spinning on that CPU; others: what other work on the measured CPUs took (it takes from hk, not from the vCPU)")
        return lines.joined(separator: "\n")
    }

    /// What one phase measured, and how long stopping the vCPU and tearing the VM down took.
    struct RunawayRun {
        var phase: RunawayReport.Phase
        var stopNanoseconds: UInt64
    }

    /// Runs a spinning guest on a SCHED_FIFO vCPU pinned to `cpu` (in `partition` if given; a
    /// deadline partition makes it SCHED_DEADLINE with its own affinity) next to a SCHED_OTHER
    /// housekeeping thread on every CPU the vCPU may run on, and measures the threads' CPU time
    /// over `seconds`, with the overrun watchdog if configured. Returns when the vCPU has
    /// stopped and the VM is gone.
    static func measure(system: KVMSystem, cpu: Int, seconds: Double, partition: CgroupPartition?,
                        watchdog: OverrunWatchdog.Configuration? = nil,
                        onMachine: (BundledGuestMachine) -> Void = { _ in }) throws -> RunawayRun {
        var stopStart: UInt64 = 0
        let phase = try measureWithMachine(system: system, cpu: cpu, seconds: seconds, partition: partition, watchdog: watchdog,
                                           onMachine: onMachine, stopping: { stopStart = monotonicNanoseconds() })
        // The runner and the machine are released: vCPU threads joined, descriptors closed, and
        // with them KVM's per-VM worker.
        return RunawayRun(phase: phase, stopNanoseconds: monotonicNanoseconds() - stopStart)
    }

    private static func measureWithMachine(system: KVMSystem, cpu: Int, seconds: Double, partition: CgroupPartition?,
                                           watchdog watchdogConfiguration: OverrunWatchdog.Configuration?,
                                           onMachine: (BundledGuestMachine) -> Void, stopping: () -> Void) throws -> RunawayReport.Phase {
        let machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: .spin)])
        onMachine(machine)
        let policy = RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [cpu])
        let effective = partition?.realtimePolicy(for: policy) ?? policy
        let scheduler = RealtimeVCPUScheduler(policies: [0: policy], partition: partition, logger: quietLogger("rtvirt.realtime"))
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(),
                                              onThreadStart: scheduler.threadStarted, onThreadEnd: scheduler.threadEnded,
                                              logger: quietLogger("rtvirt.runner"))
        defer {
            stopping()
            runner.stop()
            runner.waitForAll()
        }
        let vcpuThread = runner.threads[0].kernelThreadID
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while scheduler.status(vcpu: 0) == .untouched && monotonicNanoseconds() < deadline { usleep(1000) }
        switch scheduler.status(vcpu: 0) {
        case .applied: break
        case .failed(let message): throw ValidationError("real-time policy: \(message)")
        case let other: throw ValidationError("real-time policy not applied within 5 s (\(other))")
        }
        var watchdog: OverrunWatchdog?
        if var configuration = watchdogConfiguration {
            if configuration.action == .pause { configuration.pause = { _ in runner.stop() } }
            let started = OverrunWatchdog(configuration: configuration)
            started.watch(vcpu: 0, threadID: vcpuThread)
            try started.start()
            watchdog = started
        }
        defer { watchdog?.stop() }
        // A housekeeping thread on every CPU the vCPU may run on; the real-time CPU's first.
        let cpus = [cpu] + (effective.cpus ?? [cpu]).cpus.filter { $0 != cpu }
        var spinners: [CPUSpinner] = []
        defer { for spinner in spinners { spinner.stop() } }
        for spinCPU in cpus { spinners.append(try CPUSpinner(cpu: spinCPU)) }
        usleep(50_000) // every thread is running
        let load = HostFiles().readLine("/proc/loadavg")?.split(separator: " ").first.flatMap { Double($0) }
        let threads = [vcpuThread] + spinners.map(\.threadID)
        let start = CPUTimeSample(threads: threads, cpu: cpu)
        usleep(UInt32(min(seconds * 1e6, Double(UInt32.max))))
        let end = CPUTimeSample(threads: threads, cpu: cpu)
        var phase = end.phase(since: start, vcpuThread: vcpuThread, housekeepingThread: spinners[0].threadID)
        for (index, spinner) in spinners.enumerated().dropFirst() {
            phase.otherHousekeepingShares["\(cpus[index])"] = end.share(since: start, of: spinner.threadID)
        }
        phase.mode = partition?.budgetMode.mode.rawValue ?? "none"
        phase.loadAverage = load
        let taken = phase.vcpuShare + phase.housekeepingShare + phase.otherHousekeepingShares.values.reduce(0, +) + (phase.stealShare ?? 0)
        phase.otherWorkShare = max(0, Double(cpus.count) - taken)
        let schedulingClass: String
        if case let .deadline(runtime, _, period) = effective.schedulingClass {
            schedulingClass = "SCHED_DEADLINE \(runtime / 1_000_000)/\(period / 1_000_000) ms"
        } else {
            schedulingClass = "\(effective.schedulingClass)"
        }
        phase.vcpuScheduling = "\(schedulingClass), CPUs \(effective.cpus.map { "\($0)" } ?? "any")"
        if let watchdog {
            phase.watchdogAction = watchdog.configuration.action.rawValue
            if let first = watchdog.events.first {
                // From the policy's application (the guest spins from its first instruction).
                phase.watchdogDetectionMs = Double(first.detectedAfterNanoseconds) / 1e6
            }
        }
        return phase
    }
}

/// CPU times of some threads and the steal time of a CPU (`CPUAccounting`), at one instant.
struct CPUTimeSample {
    var wallNanoseconds: UInt64
    var threadNanoseconds: [pid_t: UInt64]
    var stealNanoseconds: UInt64?

    init(threads: [pid_t], cpu: Int, files: HostFiles = HostFiles()) {
        wallNanoseconds = monotonicNanoseconds()
        threadNanoseconds = [:]
        for tid in threads { threadNanoseconds[tid] = CPUAccounting.threadCPUNanoseconds(tid, files: files) }
        stealNanoseconds = CPUAccounting.stealNanoseconds(cpu: cpu, files: files)
    }

    /// Thread `tid`'s CPU time since `start` over the wall time.
    func share(since start: CPUTimeSample, of tid: pid_t) -> Double {
        let wall = Double(wallNanoseconds - start.wallNanoseconds)
        guard let end = threadNanoseconds[tid], let begin = start.threadNanoseconds[tid], end >= begin, wall > 0 else { return 0 }
        return Double(end - begin) / wall
    }

    /// The shares since `start`.
    func phase(since start: CPUTimeSample, vcpuThread: pid_t, housekeepingThread: pid_t) -> RunawayReport.Phase {
        let wall = Double(wallNanoseconds - start.wallNanoseconds)
        func share(_ tid: pid_t) -> Double { self.share(since: start, of: tid) }
        var steal: Double?
        if let end = stealNanoseconds, let begin = start.stealNanoseconds, end >= begin, wall > 0 {
            steal = Double(end - begin) / wall
        }
        return RunawayReport.Phase(seconds: wall / 1e9, housekeepingShare: share(housekeepingThread), vcpuShare: share(vcpuThread),
                                   stealShare: steal)
    }
}

/// A SCHED_OTHER thread pinned to one CPU that spins until stopped.
final class CPUSpinner: Sendable {
    private final class Flag: Sendable { let running = Atomic<Bool>(true) }
    private let flag = Flag()
    private let thread: HostThread
    /// The spinning thread's kernel id.
    var threadID: pid_t { thread.kernelThreadID }

    init(cpu: Int) throws {
        let flag = flag
        thread = try HostThread(name: "housekeeping") {
            try? ThreadScheduling.setAffinity([cpu])
            while flag.running.load(ordering: .relaxed) {}
        }
    }

    func stop() {
        flag.running.store(false, ordering: .relaxed)
        thread.join()
    }
}
