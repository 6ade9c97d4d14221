import ArgumentParser
import CgroupScheduler
import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import Synchronization
import RealtimeVCPU

extension CPUSet: ExpressibleByArgument {
    public init?(argument: String) { self.init(listFormat: argument) }
}

extension RTBudget: ExpressibleByArgument {
    public init?(argument: String) { self.init(parsing: argument) }
}

/// The host's free RT share for a new partition: the global limit minus what `rtvirt` holds.
func availableRTFraction(hierarchy: CgroupHierarchy, backend: any CgroupBackend) -> Double {
    let files = HostFiles()
    let runtime = Double(files.readInteger("/proc/sys/kernel/sched_rt_runtime_us") ?? 950_000)
    let period = Double(files.readInteger("/proc/sys/kernel/sched_rt_period_us") ?? 1_000_000)
    let used = Double(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu") ?? "0") ?? 0
    return runtime < 0 ? 1 : max(0, runtime / period - used / 1_000_000)
}

struct PartitionCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "partition",
        abstract: "Create (or show) a real-time and a housekeeping cgroup partition, or reclaim leftovers.",
        discussion: "Groups live under 'rtvirt/' in the cpuset and cpu hierarchies only. Without --dry-run the partition is created, shown, and removed again when the command ends (a VMM keeps it for the VM's lifetime).")

    @Option(name: .customLong("rt-cpus"), help: "CPUs of the real-time partition, for example 1 or 2-3.")
    var rtCPUs: CPUSet?

    @Option(name: .customLong("housekeeping-cpus"), help: "CPUs of the housekeeping partition.")
    var housekeepingCPUs: CPUSet?

    @Option(help: "RT budget of the real-time partition, runtime/period, for example 500ms/1s.")
    var budget = RTBudget(runtimeMicroseconds: 500_000, periodMicroseconds: 1_000_000)

    @Option(help: "Memory node.")
    var node = 0

    @Option(help: "Partition name.")
    var name = "cli"

    @Flag(help: "Print the plan and every file it would write; change nothing.")
    var dryRun = false

    @Flag(help: "Delete partitions left behind by processes that died.")
    var cleanup = false

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
                                 housekeepingCPUs: housekeepingCPUs ?? CPUSet(online.cpus.dropLast()), budget: budget, memoryNode: node)
        let available = availableRTFraction(hierarchy: hierarchy, backend: backend)
        try plan.validate(onlineCPUs: online, nodeCount: NUMATopology.current().nodeCount, availableRTFraction: available)
        print("cgroup layout: \(hierarchy.layout.rawValue); RT group scheduling: \(hierarchy.rtGroupScheduling ? "yes (cpu.rt_runtime_us)" : "no")")
        if !hierarchy.rtGroupScheduling {
            print("No RT budget per group here: the substitute is the global kernel.sched_rt_runtime_us (\(HostFiles().readLine("/proc/sys/kernel/sched_rt_runtime_us") ?? "?") µs per period) or SCHED_DEADLINE per vCPU thread.")
        }
        print("plan: real-time CPUs \(plan.realtimeCPUs), housekeeping CPUs \(plan.housekeepingCPUs), budget \(plan.budget), node \(node)")
        print(dryRun ? "would write:" : "writes:")
        for write in CgroupPartition.plannedWrites(plan, backend: backend) {
            let mount = hierarchy.v1Mount(for: write.controller)?.path ?? "<\(write.controller) not mounted>"
            print("  \(mount)/\(write.group)/\(write.file) = \(write.value)")
        }
        if dryRun { return }
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        print("created \(partition.realtimeGroup) and \(partition.housekeepingGroup)")
        print(String(format: "removed again in %.2f ms", Double(try partition.remove()) / 1e6))
    }
}

/// What `rtvirt runaway --json` prints.
struct RunawayReport: Codable {
    /// One phase: CPU time over wall time of the vCPU thread and of the housekeeping thread on
    /// the real-time CPU, from `/proc/self/task/TID/schedstat` over the same interval.
    struct Phase: Codable, Equatable {
        /// The interval's wall time, seconds.
        var seconds: Double
        /// The housekeeping thread's CPU time / wall time.
        var housekeepingShare: Double
        /// The spinning vCPU thread's CPU time / wall time: at most its RT budget (plus a
        /// little) when RT throttling works. This is the evidence `nr_throttled` cannot give on
        /// cgroup v1, where it counts CFS bandwidth throttling only.
        var vcpuShare: Double
        /// Steal time on the real-time CPU / wall time (`/proc/stat`); what neither thread got
        /// because the hypervisor below ran something else.
        var stealShare: Double?
    }
    var kvmModule: String
    var budget: String
    var cpu: Int
    var seconds: Double
    /// `kernel.sched_rt_runtime_us / sched_rt_period_us`: the vCPU's share without a partition.
    var globalRTFraction: Double
    var withPartition: Phase
    var withoutPartition: Phase
    var cleanupMs: Double
    var leftoverGroups: Int
    var numa: String
}

struct RunawayCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "runaway",
        abstract: "A guest spinning forever on a SCHED_FIFO vCPU: with an RT-budget partition the host keeps its CPU; without, it mostly does not.",
        discussion: """
            A housekeeping thread (SCHED_OTHER) spins on the real-time CPU next to the vCPU. Both threads' CPU time over \
            wall time comes from /proc/self/task/TID/schedstat over the same interval. First with a partition (--budget \
            on that CPU), then with plain SCHED_FIFO under only the global kernel.sched_rt_runtime_us. The VM is torn down \
            before its partition is removed; everything is cleaned up, also on errors.
            """)

    @Option(help: "RT budget of the partition.")
    var budget = RTBudget(runtimeMicroseconds: 50_000, periodMicroseconds: 100_000)

    @Option(help: "Seconds per phase.")
    var seconds: Double = 2

    @Option(help: "The real-time CPU (default: the last online CPU).")
    var cpu: Int?

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
        let plan = PartitionPlan(name: "runaway", realtimeCPUs: [rtCPU], housekeepingCPUs: CPUSet(online.cpus.filter { $0 != rtCPU }),
                                 budget: budget)
        try plan.validate(onlineCPUs: online, nodeCount: NUMATopology.current().nodeCount,
                          availableRTFraction: availableRTFraction(hierarchy: hierarchy, backend: backend))
        let system = try KVMSystem()
        let module = KVMHostInfo.detectModule()
        if !json { print("KVM backend: \(module.rawValue); real-time CPU \(rtCPU); budget \(budget); \(seconds) s per phase") }

        // With the partition. The VM is gone when `measure` returns; then the partition goes.
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        var numaMessage = ""
        let withPhase: RunawayReport.Phase
        let cleanupMs: Double
        do {
            let run: RunawayRun
            do {
                run = try Self.measure(system: system, cpu: rtCPU, seconds: seconds, partition: partition) { machine in
                    // Guest memory on the plan's node (libnuma); a no-op that says so on one-node hosts.
                    let region = machine.vm.memoryRegions[0]
                    numaMessage = NUMABinding.bindMemory(region.mapping.pointer, size: Int(region.size), node: plan.memoryNode ?? 0)
                }
            } catch {
                _ = try? partition.remove()
                throw error
            }
            withPhase = run.phase
            let removal = try partition.remove()
            cleanupMs = Double(run.stopNanoseconds + removal) / 1e6
        }
        let leftovers = CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/runaway-") }.count
        // Without: plain SCHED_FIFO under only the global limit.
        let withoutPhase = try Self.measure(system: system, cpu: rtCPU, seconds: seconds, partition: nil).phase
        let files = HostFiles()
        let globalRuntime = Double(files.readInteger("/proc/sys/kernel/sched_rt_runtime_us") ?? 950_000)
        let globalPeriod = Double(files.readInteger("/proc/sys/kernel/sched_rt_period_us") ?? 1_000_000)
        let report = RunawayReport(kvmModule: module.rawValue, budget: budget.description, cpu: rtCPU, seconds: seconds,
                                   globalRTFraction: globalRuntime < 0 ? 1 : globalRuntime / globalPeriod,
                                   withPartition: withPhase, withoutPartition: withoutPhase,
                                   cleanupMs: cleanupMs, leftoverGroups: leftovers, numa: numaMessage)
        if json {
            try printJSON(report)
            return
        }
        func line(_ phase: RunawayReport.Phase) -> String {
            String(format: "vCPU %.2f, housekeeping %.2f, steal %@ of CPU %d over %.2f s", phase.vcpuShare, phase.housekeepingShare,
                   phase.stealShare.map { String(format: "%.2f", $0) } ?? "n/a", rtCPU, phase.seconds)
        }
        print("with partition:    \(line(withPhase)) (budget \(String(format: "%.2f", budget.fraction)))")
        print("without partition: \(line(withoutPhase)) (global sched_rt_runtime_us \(String(format: "%.2f", report.globalRTFraction)))")
        print(String(format: "stop to everything cleaned (vCPU stopped, VM torn down, partition removed): %.2f ms; leftover groups: %d",
                     cleanupMs, leftovers))
        print("NUMA: \(numaMessage)")
    }

    /// What one phase measured, and how long stopping the vCPU and tearing the VM down took.
    struct RunawayRun {
        var phase: RunawayReport.Phase
        var stopNanoseconds: UInt64
    }

    /// Runs a spinning guest on a SCHED_FIFO vCPU pinned to `cpu` (in `partition` if given)
    /// next to a SCHED_OTHER housekeeping thread pinned to the same CPU, and measures both
    /// threads' CPU time over `seconds`. Returns when the vCPU has stopped and the VM is gone.
    static func measure(system: KVMSystem, cpu: Int, seconds: Double, partition: CgroupPartition?,
                        onMachine: (BundledGuestMachine) -> Void = { _ in }) throws -> RunawayRun {
        var stopStart: UInt64 = 0
        let phase = try measureWithMachine(system: system, cpu: cpu, seconds: seconds, partition: partition,
                                           onMachine: onMachine, stopping: { stopStart = monotonicNanoseconds() })
        // The runner and the machine are released: vCPU threads joined, descriptors closed, and
        // with them KVM's per-VM worker.
        return RunawayRun(phase: phase, stopNanoseconds: monotonicNanoseconds() - stopStart)
    }

    private static func measureWithMachine(system: KVMSystem, cpu: Int, seconds: Double, partition: CgroupPartition?,
                                           onMachine: (BundledGuestMachine) -> Void, stopping: () -> Void) throws -> RunawayReport.Phase {
        let machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: .spin)])
        onMachine(machine)
        let scheduler = RealtimeVCPUScheduler(policies: [0: RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [cpu])],
                                              partition: partition)
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(),
                                              onThreadStart: scheduler.threadStarted, onThreadEnd: scheduler.threadEnded)
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
        let housekeeping = try CPUSpinner(cpu: cpu)
        defer { housekeeping.stop() }
        usleep(50_000) // both threads are running on the CPU
        let start = CPUTimeSample(threads: [vcpuThread, housekeeping.threadID], cpu: cpu)
        usleep(UInt32(min(seconds * 1e6, Double(UInt32.max))))
        let end = CPUTimeSample(threads: [vcpuThread, housekeeping.threadID], cpu: cpu)
        return end.phase(since: start, vcpuThread: vcpuThread, housekeepingThread: housekeeping.threadID)
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

    /// The shares since `start`.
    func phase(since start: CPUTimeSample, vcpuThread: pid_t, housekeepingThread: pid_t) -> RunawayReport.Phase {
        let wall = Double(wallNanoseconds - start.wallNanoseconds)
        func share(_ tid: pid_t) -> Double {
            guard let end = threadNanoseconds[tid], let begin = start.threadNanoseconds[tid], end >= begin, wall > 0 else { return 0 }
            return Double(end - begin) / wall
        }
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
