import ArgumentParser
import CgroupScheduler
import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import Synchronization

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
    struct Phase: Codable {
        var housekeepingShare: Double
        var throttledPeriods: Int64?
        var cpuStat: [String: Int64]?
    }
    var kvmModule: String
    var budget: String
    var cpu: Int
    var seconds: Double
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
            A housekeeping thread (SCHED_OTHER) pinned to the real-time CPU counts its progress; its share is that \
            progress relative to the same CPU when idle. First with a partition (--budget on that CPU), then with plain \
            SCHED_FIFO under only the global kernel.sched_rt_runtime_us. Everything is cleaned up, also on errors.
            """)

    @Option(help: "RT budget of the partition.")
    var budget = RTBudget(runtimeMicroseconds: 50_000, periodMicroseconds: 100_000)

    @Option(help: "Seconds per phase.")
    var seconds: Double = 2

    @Option(help: "The real-time CPU (default: the last online CPU).")
    var cpu: Int?

    @Flag(help: "Print one JSON object.")
    var json = false

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

        let idleRate = try ProgressCounter.rate(cpu: rtCPU, seconds: min(seconds, 0.5))
        // With the partition.
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        var cleanupMs = 0.0
        var withPhase = RunawayReport.Phase(housekeepingShare: 0)
        var numaMessage = ""
        do {
            defer {
                // Whatever happened, stop the guest and remove the partition; time it.
                cleanupMs = cleanupMs == 0 ? Double((try? partition.remove()) ?? 0) / 1e6 : cleanupMs
            }
            let rate = try Self.measure(system: system, cpu: rtCPU, seconds: seconds, partition: partition, onMachine: { machine in
                // Guest memory on the plan's node (libnuma); a no-op that says so on one-node hosts.
                let region = machine.vm.guestMemory.regions[0]
                numaMessage = NUMABinding.bindMemory(region.mapping.pointer, size: Int(region.size), node: plan.memoryNode ?? 0)
            }) { stopStart in
                let stopNanoseconds = monotonicNanoseconds() - stopStart
                cleanupMs = Double(stopNanoseconds + ((try? partition.remove()) ?? 0)) / 1e6
            } statBeforeCleanup: {
                withPhase.cpuStat = Self.cpuStat(backend: backend, group: partition.realtimeGroup)
            }
            withPhase.housekeepingShare = rate / idleRate
            withPhase.throttledPeriods = withPhase.cpuStat?["nr_throttled"]
        }
        let leftovers = CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/runaway-") }.count
        // Without: plain SCHED_FIFO under only the global limit.
        let withoutRate = try Self.measure(system: system, cpu: rtCPU, seconds: seconds, partition: nil) { _ in } statBeforeCleanup: {}
        let report = RunawayReport(kvmModule: module.rawValue, budget: budget.description, cpu: rtCPU, seconds: seconds,
                                   withPartition: withPhase,
                                   withoutPartition: RunawayReport.Phase(housekeepingShare: withoutRate / idleRate),
                                   cleanupMs: cleanupMs, leftoverGroups: leftovers, numa: numaMessage)
        if json {
            try printJSON(report)
            return
        }
        print(String(format: "with partition:    housekeeping got %.2f of CPU %d; cpu.stat nr_throttled %@", report.withPartition.housekeepingShare,
                     rtCPU, report.withPartition.throttledPeriods.map(String.init) ?? "n/a"))
        print(String(format: "without partition: housekeeping got %.2f of CPU %d (global sched_rt_runtime_us only)", report.withoutPartition.housekeepingShare, rtCPU))
        print(String(format: "stop to everything cleaned: %.2f ms; leftover groups: %d", cleanupMs, leftovers))
        print("NUMA: \(numaMessage)")
    }

    /// Runs a spinning guest on a SCHED_FIFO vCPU pinned to `cpu` (in `partition` if given)
    /// while a counter on the same CPU runs; returns the counter's rate.
    static func measure(system: KVMSystem, cpu: Int, seconds: Double, partition: CgroupPartition?,
                        onMachine: (BundledGuestMachine) -> Void = { _ in },
                        stopped: (UInt64) -> Void, statBeforeCleanup: () -> Void) throws -> Double {
        let machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: .spin)])
        onMachine(machine)
        let scheduler = RealtimeVCPUScheduler(policies: [0: RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [cpu])],
                                              partition: partition)
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(),
                                              onThreadStart: scheduler.threadStarted, onThreadEnd: scheduler.threadEnded)
        let rate: Double
        do {
            defer {
                statBeforeCleanup()
                let stopStart = monotonicNanoseconds()
                runner.stop()
                runner.waitForAll()
                stopped(stopStart)
            }
            usleep(50_000)
            if case .failed(let message) = scheduler.status(vcpu: 0) { throw ValidationError("real-time policy: \(message)") }
            rate = try ProgressCounter.rate(cpu: cpu, seconds: seconds)
        }
        return rate
    }

    static func cpuStat(backend: any CgroupBackend, group: String) -> [String: Int64]? {
        guard let text = HostFiles().read((CgroupHierarchy.detect().v1Mount(for: "cpu")?.path ?? "") + "/" + group + "/cpu.stat") else { return nil }
        var stat: [String: Int64] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let value = Int64(parts[1]) { stat[String(parts[0])] = value }
        }
        return stat
    }
}

/// A SCHED_OTHER thread pinned to one CPU that counts loop iterations.
enum ProgressCounter {
    /// Iterations per second over `seconds`.
    static func rate(cpu: Int, seconds: Double) throws -> Double {
        let result = Mutex<Double>(0)
        let thread = try HostThread(name: "housekeeping") {
            try? ThreadScheduling.setAffinity([cpu])
            let start = monotonicNanoseconds(), end = start + UInt64(seconds * 1e9)
            var count: UInt64 = 0, now = start
            while now < end {
                for _ in 0..<10_000 { count &+= 1 }
                now = monotonicNanoseconds()
            }
            result.withLock { $0 = Double(count) / (Double(now - start) / 1e9) }
        }
        thread.join()
        return result.withLock { $0 }
    }
}
