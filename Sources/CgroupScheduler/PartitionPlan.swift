import RTVirtCore

/// An RT budget: `runtime` of every `period`, in microseconds.
public struct RTBudget: Equatable, Codable, Sendable, CustomStringConvertible {
    /// CPU time per period, µs.
    public var runtimeMicroseconds: Int64
    /// The period, µs.
    public var periodMicroseconds: Int64

    /// A budget.
    public init(runtimeMicroseconds: Int64, periodMicroseconds: Int64) {
        self.runtimeMicroseconds = runtimeMicroseconds
        self.periodMicroseconds = periodMicroseconds
    }

    /// Parses "500ms/1s", "50ms/100ms", "950000us/1000000us" (units us, ms, s).
    public init?(parsing text: String) {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let runtime = Self.microseconds(parts[0]), let period = Self.microseconds(parts[1]) else { return nil }
        self.init(runtimeMicroseconds: runtime, periodMicroseconds: period)
    }

    static func microseconds(_ text: Substring) -> Int64? {
        for (suffix, scale) in [("us", 1.0), ("ms", 1e3), ("s", 1e6)] where text.hasSuffix(suffix) {
            guard let value = Double(text.dropLast(suffix.count)), value >= 0 else { return nil }
            return Int64((value * scale).rounded())
        }
        return nil
    }

    /// The share of a CPU.
    public var fraction: Double { periodMicroseconds > 0 ? Double(runtimeMicroseconds) / Double(periodMicroseconds) : 0 }

    public var description: String { "\(runtimeMicroseconds) µs every \(periodMicroseconds) µs (\(Int((fraction * 100).rounded())) %)" }
}

/// Why a partition plan is rejected. Nothing has been written when these are thrown.
public enum PartitionPlanError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidName(String)
    case emptyCPUSet(which: String)
    case cpusNotOnline(which: String, cpus: CPUSet, online: CPUSet)
    case overlappingCPUSets(CPUSet)
    case invalidBudget(RTBudget)
    case budgetExceedsParent(requested: Double, available: Double)
    case noSuchMemoryNode(Int, nodeCount: Int)

    public var description: String {
        switch self {
        case .invalidName(let name): return "partition name '\(name)' must be 1-32 of [A-Za-z0-9_-]"
        case .emptyCPUSet(let which): return "the \(which) CPU set is empty"
        case let .cpusNotOnline(which, cpus, online): return "\(which) CPUs \(cpus) are not all online (online: \(online))"
        case .overlappingCPUSets(let overlap): return "real-time and housekeeping CPUs overlap on \(overlap)"
        case .invalidBudget(let budget): return "invalid RT budget \(budget): need 0 < runtime <= period"
        case let .budgetExceedsParent(requested, available):
            return "RT budget \(Int((requested * 100).rounded())) % of a CPU exceeds what the parent can give (\(Int((available * 100).rounded())) %)"
        case let .noSuchMemoryNode(node, count): return "memory node \(node) does not exist (the host has \(count))"
        }
    }
}

/// A real-time partition and a housekeeping partition for one VM.
public struct PartitionPlan: Equatable, Sendable {
    /// A name for the VM's groups (the process id is appended, so leftovers can be found).
    public var name: String
    /// CPUs of the real-time partition.
    public var realtimeCPUs: CPUSet
    /// CPUs of the housekeeping partition.
    public var housekeepingCPUs: CPUSet
    /// The real-time partition's RT budget.
    public var budget: RTBudget
    /// Memory node for both partitions (nil: node 0).
    public var memoryNode: Int?
    /// How the budget is enforced: v1 RT group scheduling, SCHED_DEADLINE per real-time vCPU
    /// thread, or what the host supports (`CgroupPartition.budgetMode` reports the choice).
    public var budgetMode: BudgetMode

    /// A plan.
    public init(name: String, realtimeCPUs: CPUSet, housekeepingCPUs: CPUSet, budget: RTBudget, memoryNode: Int? = nil,
                budgetMode: BudgetMode = .automatic) {
        self.name = name; self.realtimeCPUs = realtimeCPUs; self.housekeepingCPUs = housekeepingCPUs
        self.budget = budget; self.memoryNode = memoryNode; self.budgetMode = budgetMode
    }

    /// Checks the plan against the host: names, CPUs online and disjoint, a budget that the
    /// parent (whose free share is `availableRTFraction`) can give, and the memory node.
    public func validate(onlineCPUs: CPUSet, nodeCount: Int, availableRTFraction: Double) throws(PartitionPlanError) {
        guard (1...32).contains(name.count), name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }), name.allSatisfy(\.isASCII) else {
            throw .invalidName(name)
        }
        guard !realtimeCPUs.isEmpty else { throw .emptyCPUSet(which: "real-time") }
        guard !housekeepingCPUs.isEmpty else { throw .emptyCPUSet(which: "housekeeping") }
        guard realtimeCPUs.intersection(onlineCPUs) == realtimeCPUs else {
            throw .cpusNotOnline(which: "real-time", cpus: realtimeCPUs, online: onlineCPUs)
        }
        guard housekeepingCPUs.intersection(onlineCPUs) == housekeepingCPUs else {
            throw .cpusNotOnline(which: "housekeeping", cpus: housekeepingCPUs, online: onlineCPUs)
        }
        let overlap = realtimeCPUs.intersection(housekeepingCPUs)
        guard overlap.isEmpty else { throw .overlappingCPUSets(overlap) }
        guard budget.periodMicroseconds > 0, budget.runtimeMicroseconds > 0, budget.runtimeMicroseconds <= budget.periodMicroseconds,
              budget.periodMicroseconds <= 1_000_000 else {
            throw .invalidBudget(budget)
        }
        guard budget.fraction <= availableRTFraction + 1e-9 else {
            throw .budgetExceedsParent(requested: budget.fraction, available: availableRTFraction)
        }
        let node = memoryNode ?? 0
        guard node >= 0, node < max(nodeCount, 1) else { throw .noSuchMemoryNode(node, nodeCount: nodeCount) }
    }
}

extension PartitionPlan {
    /// The real-time share a new partition may still take on this host, as a fraction of a CPU
    /// period: the global `sched_rt_runtime_us / sched_rt_period_us` (1 when RT throttling is
    /// off), less what RTVirt's shared `rtvirt` group already gives its partitions in the
    /// `rtGroup` mode. What `validate(onlineCPUs:nodeCount:availableRTFraction:)` needs.
    public static func availableRTFraction(hierarchy: CgroupHierarchy, backend: any CgroupBackend,
                                           mode: BudgetMode = .rtGroup, files: HostFiles = HostFiles()) -> Double {
        let runtime = Double(files.readInteger("/proc/sys/kernel/sched_rt_runtime_us") ?? 950_000)
        let period = Double(files.readInteger("/proc/sys/kernel/sched_rt_period_us") ?? 1_000_000)
        if runtime < 0 { return 1 }
        if mode == .deadline { return runtime / period }
        let used = Double(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu") ?? "0") ?? 0
        let usedPeriod = Double(backend.value(name: "cpu.rt_period_us", group: projectSubtree, controller: "cpu") ?? "") ?? period
        return max(0, runtime / period - used / max(usedPeriod, 1))
    }

    /// Checks the plan against this host as it is now: the CPUs this process may use, its NUMA
    /// nodes, and the real-time share still free (`availableRTFraction`).
    public func validate(hierarchy: CgroupHierarchy, backend: any CgroupBackend, mode: BudgetMode = .rtGroup) throws {
        try validate(onlineCPUs: ThreadScheduling.affinity(), nodeCount: NUMATopology.current().nodeCount,
                     availableRTFraction: Self.availableRTFraction(hierarchy: hierarchy, backend: backend, mode: mode))
    }
}
