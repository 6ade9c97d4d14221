#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import Synchronization

/// One file write a partition makes, for `--dry-run` and logs.
public struct CgroupWrite: Equatable, Sendable, CustomStringConvertible {
    public var controller: String
    public var group: String
    public var file: String
    public var value: String
    public var description: String { "\(controller):/\(group)/\(file) = \(value)" }
}

/// A real-time partition and a housekeeping partition for one VM, on cgroup v1 (`cpuset` and
/// `cpu` with `cpu.rt_runtime_us`): `rtvirt/<name>-<pid>/realtime` and `.../housekeeping`.
///
/// Creating it raises the RT runtime of the project's groups (`rtvirt`, `rtvirt/<vm>`) by
/// the plan's share, top-down, before giving the real-time group its budget; removing it moves
/// threads back where they came from, deletes its groups bottom-up and gives the runtime back.
/// Nothing outside the `rtvirt` subtree is created, changed or removed.
public final class CgroupPartition: CPUPartitionAssigner {
    /// The plan.
    public let plan: PartitionPlan
    /// `rtvirt/<name>-<pid>`.
    public let vmGroup: String
    private let backend: any CgroupBackend
    private let restorer: FileCgroupBackend
    private struct State {
        var originalGroups: [pid_t: [String: String]] = [:]
        var removed = false
    }
    private let state = Mutex(State())

    static let controllers = ["cpuset", "cpu"]
    /// The RT period of the project's intermediate groups (the kernel default), µs.
    static let parentPeriod: Int64 = 1_000_000

    /// The group of the real-time partition.
    public var realtimeGroup: String { vmGroup + "/realtime" }
    /// The group of the housekeeping partition.
    public var housekeepingGroup: String { vmGroup + "/housekeeping" }

    /// The writes `create` makes, in order (for `--dry-run`). `currentParentRuntime` and
    /// `currentParentCPUs` are the `rtvirt` group's `cpu.rt_runtime_us` and `cpuset.cpus` now
    /// (0 and empty when it does not exist): other VMs' partitions may already use them, so the
    /// shared group only ever grows.
    public static func plannedWrites(_ plan: PartitionPlan, vmGroup: String, currentParentRuntime: Int64,
                                     currentParentCPUs: CPUSet = []) -> [CgroupWrite] {
        let share = Int64((plan.budget.fraction * Double(parentPeriod)).rounded(.up))
        let node = "\(plan.memoryNode ?? 0)"
        let all = CPUSet(plan.realtimeCPUs.cpus + plan.housekeepingCPUs.cpus).description
        let parentCPUs = CPUSet(plan.realtimeCPUs.cpus + plan.housekeepingCPUs.cpus + currentParentCPUs.cpus).description
        var writes: [CgroupWrite] = []
        func add(_ controller: String, _ group: String, _ file: String, _ value: String) {
            writes.append(CgroupWrite(controller: controller, group: group, file: file, value: value))
        }
        add("cpuset", projectSubtree, "cpuset.cpus", parentCPUs)
        add("cpuset", projectSubtree, "cpuset.mems", node)
        add("cpu", projectSubtree, "cpu.rt_runtime_us", "\(currentParentRuntime + share)")
        add("cpuset", vmGroup, "cpuset.cpus", all)
        add("cpuset", vmGroup, "cpuset.mems", node)
        add("cpu", vmGroup, "cpu.rt_runtime_us", "\(share)")
        add("cpuset", vmGroup + "/realtime", "cpuset.cpus", plan.realtimeCPUs.description)
        add("cpuset", vmGroup + "/realtime", "cpuset.mems", node)
        add("cpu", vmGroup + "/realtime", "cpu.rt_period_us", "\(plan.budget.periodMicroseconds)")
        add("cpu", vmGroup + "/realtime", "cpu.rt_runtime_us", "\(plan.budget.runtimeMicroseconds)")
        add("cpuset", vmGroup + "/housekeeping", "cpuset.cpus", plan.housekeepingCPUs.description)
        add("cpuset", vmGroup + "/housekeeping", "cpuset.mems", node)
        add("cpu", vmGroup + "/housekeeping", "cpu.rt_runtime_us", "0")
        return writes
    }

    /// The writes creating `plan`'s partition in this process would make now, given what the
    /// shared `rtvirt` group holds in `backend`.
    public static func plannedWrites(_ plan: PartitionPlan, backend: any CgroupBackend) -> [CgroupWrite] {
        let parentRuntime = Int64(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu") ?? "0") ?? 0
        let parentCPUs = backend.value(name: "cpuset.cpus", group: projectSubtree, controller: "cpuset").flatMap(CPUSet.init(listFormat:)) ?? []
        return plannedWrites(plan, vmGroup: vmGroup(for: plan), currentParentRuntime: parentRuntime, currentParentCPUs: parentCPUs)
    }

    /// The VM group name for `plan` in this process.
    public static func vmGroup(for plan: PartitionPlan, pid: pid_t = getpid()) -> String {
        "\(projectSubtree)/\(plan.name)-\(pid)"
    }

    /// Creates the partition, first reclaiming partitions left by processes that died. On
    /// failure everything created is removed again.
    /// - Throws: `CgroupError.noRTGroupScheduling` on hierarchies without `cpu.rt_runtime_us`,
    ///   `.missingController`, or the backend's errors.
    public init(plan: PartitionPlan, hierarchy: CgroupHierarchy, backend: any CgroupBackend) throws(CgroupError) {
        guard hierarchy.v1Mount(for: "cpuset") != nil else { throw .missingController("cpuset") }
        guard hierarchy.v1Mount(for: "cpu") != nil else { throw .missingController("cpu") }
        guard hierarchy.rtGroupScheduling else { throw .noRTGroupScheduling }
        self.plan = plan
        self.backend = backend
        restorer = FileCgroupBackend(hierarchy: hierarchy)
        vmGroup = Self.vmGroup(for: plan)
        Self.reclaimLeftovers(backend: backend) // partitions of processes that died
        do {
            for write in Self.plannedWrites(plan, backend: backend) {
                if !backend.groupExists(write.group, controller: write.controller) {
                    try backend.createGroup(write.group, controller: write.controller)
                }
                try backend.setValue(write.value, name: write.file, group: write.group, controller: write.controller)
            }
        } catch {
            Self.deleteVMGroup(vmGroup, backend: backend)
            throw error
        }
    }

    /// Moves thread `tid` into the real-time partition (remembering where it was).
    public func assignRealtimeThread(_ threadID: pid_t) throws { try assign(threadID, to: realtimeGroup) }

    /// Moves thread `tid` into the housekeeping partition.
    public func assignHousekeepingThread(_ threadID: pid_t) throws { try assign(threadID, to: housekeepingGroup) }

    private func assign(_ tid: pid_t, to group: String) throws(CgroupError) {
        let original = Self.currentGroups(of: tid)
        state.withLock { state in if state.originalGroups[tid] == nil { state.originalGroups[tid] = original } }
        for controller in Self.controllers { try backend.attach(thread: tid, group: group, controller: controller) }
    }

    /// Moves thread `tid` back to the groups it was in before it was assigned.
    public func releaseThread(_ threadID: pid_t) throws {
        guard let original = state.withLock({ $0.originalGroups.removeValue(forKey: threadID) }) else { return }
        for controller in Self.controllers {
            try restorer.restoreThread(threadID, toOriginalGroup: original[controller] ?? "", controller: controller)
        }
    }

    /// The v1 groups (relative to each mount) thread `tid` is in, from `/proc/<tid>/cgroup`.
    static func currentGroups(of tid: pid_t) -> [String: String] {
        var groups: [String: String] = [:]
        for line in (HostFiles().read("/proc/\(getpid())/task/\(tid)/cgroup") ?? "").split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            for controller in fields[1].split(separator: ",") { groups[String(controller)] = String(fields[2].dropFirst()) }
        }
        return groups
    }

    /// Threads still in the partition are moved back, the groups deleted, the RT runtime given
    /// back. Returns the nanoseconds it took. Safe to call twice.
    @discardableResult
    public func remove() -> UInt64 {
        let start = monotonicNanoseconds()
        let threads = state.withLock { state -> [pid_t] in
            guard !state.removed else { return [] }
            state.removed = true
            return Array(state.originalGroups.keys)
        }
        for tid in threads { try? releaseThread(tid) }
        Self.deleteVMGroup(vmGroup, backend: backend)
        return monotonicNanoseconds() - start
    }

    deinit { remove() }

    /// Deletes `vmGroup` (children first) and gives its RT runtime back to `rtvirt`; deletes
    /// `rtvirt` itself when nothing is left in it.
    static func deleteVMGroup(_ vmGroup: String, backend: any CgroupBackend) {
        let share = Int64(backend.value(name: "cpu.rt_runtime_us", group: vmGroup, controller: "cpu") ?? "0") ?? 0
        for controller in controllers {
            // Tasks left inside (threads of a process that died are gone already) go up to the
            // VM group's parent inside the subtree before deletion.
            for child in ["realtime", "housekeeping"] {
                try? backend.setValue("0", name: "cpu.rt_runtime_us", group: vmGroup + "/" + child, controller: "cpu")
                try? backend.deleteGroup(vmGroup + "/" + child, controller: controller)
            }
        }
        try? backend.setValue("0", name: "cpu.rt_runtime_us", group: vmGroup, controller: "cpu")
        for controller in controllers { try? backend.deleteGroup(vmGroup, controller: controller) }
        let parent = Int64(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu") ?? "0") ?? 0
        try? backend.setValue("\(max(0, parent - share))", name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu")
        if backend.children(of: projectSubtree, controller: "cpu").isEmpty && backend.children(of: projectSubtree, controller: "cpuset").isEmpty {
            for controller in controllers { try? backend.deleteGroup(projectSubtree, controller: controller) }
        }
    }

    /// VM groups under `rtvirt` whose process is gone.
    public static func leftoverGroups(backend: any CgroupBackend, isAlive: (pid_t) -> Bool = { kill($0, 0) == 0 || errno == EPERM }) -> [String] {
        var groups = Set<String>()
        for controller in controllers {
            for child in backend.children(of: projectSubtree, controller: controller) {
                guard let pid = child.split(separator: "-").last.flatMap({ pid_t($0) }), !isAlive(pid) else { continue }
                groups.insert("\(projectSubtree)/\(child)")
            }
        }
        return groups.sorted()
    }

    /// Deletes the groups of VMs whose process died. Returns those it deleted.
    @discardableResult
    public static func reclaimLeftovers(backend: any CgroupBackend, isAlive: (pid_t) -> Bool = { kill($0, 0) == 0 || errno == EPERM }) -> [String] {
        let leftovers = leftoverGroups(backend: backend, isAlive: isAlive)
        for group in leftovers { deleteVMGroup(group, backend: backend) }
        return leftovers
    }

    /// Every VM group under `rtvirt` (alive or not).
    public static func allVMGroups(backend: any CgroupBackend) -> [String] {
        Set(controllers.flatMap { backend.children(of: projectSubtree, controller: $0) }).map { "\(projectSubtree)/\($0)" }.sorted()
    }
}
