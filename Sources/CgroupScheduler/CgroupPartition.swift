#if canImport(Glibc)
#endif
import Glibc
import RTVirtCore
import RealtimeVCPU

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
///
/// Only threads assigned with `assignRealtimeThread` belong in the real-time group. Any other
/// task found there (a thread created from a real-time vCPU thread inherits its cgroups, and
/// so would a kernel worker started from it) is moved to the housekeeping group with
/// SCHED_OTHER whenever a thread is assigned, by `evictUnplacedTasks()`, and at removal.
/// Removal gives RT runtime back only once every group of the VM is empty: either all of the
/// budget goes back, or none of it and `remove()` says why.
public final class CgroupPartition: CPUPartitionAssigner {
    /// The plan.
    public let plan: PartitionPlan
    /// `rtvirt/<name>-<pid>`.
    public let vmGroup: String
    private let backend: any CgroupBackend
    private struct State {
        var originalGroups: [pid_t: [String: String]] = [:]
        var realtimeThreads: Set<pid_t> = []
        var removed = false
    }
    // Held across each assignment, sweep and removal, so a sweep never sees a thread that is
    // being assigned before it is recorded.
    private let state = LockedValue(State())

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
            try? Self.removeVMGroup(vmGroup, backend: backend)
            throw error
        }
    }

    /// Moves thread `tid` into the real-time partition (remembering where it was), then moves
    /// out any task there that was not assigned (best effort; `remove()` does it for certain).
    public func assignRealtimeThread(_ threadID: pid_t) throws {
        try state.withLock { (state) throws(CgroupError) in
            try assign(threadID, to: realtimeGroup, state: &state)
            state.realtimeThreads.insert(threadID)
            _ = try? evictUnplaced(state)
        }
    }

    /// Moves thread `tid` into the housekeeping partition.
    public func assignHousekeepingThread(_ threadID: pid_t) throws {
        try state.withLock { (state) throws(CgroupError) in
            try assign(threadID, to: housekeepingGroup, state: &state)
            state.realtimeThreads.remove(threadID)
        }
    }

    private func assign(_ tid: pid_t, to group: String, state: inout State) throws(CgroupError) {
        if state.originalGroups[tid] == nil { state.originalGroups[tid] = HostTask.groups(of: tid) }
        for controller in Self.controllers { try backend.attach(thread: tid, group: group, controller: controller) }
    }

    /// Moves thread `tid` back to the groups it was in before it was assigned.
    public func releaseThread(_ threadID: pid_t) throws {
        try state.withLock { (state) throws(CgroupError) in try release(threadID, state: &state) }
    }

    private func release(_ tid: pid_t, state: inout State) throws(CgroupError) {
        state.realtimeThreads.remove(tid)
        guard let original = state.originalGroups.removeValue(forKey: tid) else { return }
        for controller in Self.controllers {
            try backend.moveOut(thread: tid, to: original[controller] ?? "", controller: controller)
        }
    }

    /// Moves every task in the real-time group that was not assigned with
    /// `assignRealtimeThread` out of it: threads of this process go to the housekeeping group,
    /// with SCHED_OTHER if they had a real-time class (a thread created from a real-time vCPU
    /// thread, a kernel worker started from one); tasks of other processes go back to the group
    /// of their own process. Returns the tasks it moved.
    /// - Throws: the backend's error for a task it could not move.
    @discardableResult
    public func evictUnplacedTasks() throws(CgroupError) -> [pid_t] {
        try state.withLock { (state) throws(CgroupError) in try evictUnplaced(state) }
    }

    private func evictUnplaced(_ state: State) throws(CgroupError) -> [pid_t] {
        guard !state.removed else { return [] }
        var evicted: [pid_t] = []
        var failure: CgroupError?
        for controller in Self.controllers {
            for tid in backend.tasks(in: realtimeGroup, controller: controller) where !state.realtimeThreads.contains(tid) {
                do throws(CgroupError) {
                    if HostTask.threadGroup(of: tid) == getpid() {
                        HostTask.demoteIfRealtime(tid)
                        try backend.attach(thread: tid, group: housekeepingGroup, controller: controller)
                    } else {
                        try Self.moveOut(tid, controller: controller, backend: backend)
                    }
                    if !evicted.contains(tid) { evicted.append(tid) }
                } catch {
                    failure = failure ?? error
                }
            }
        }
        if let failure { throw failure }
        return evicted
    }

    /// Removes the partition: assigned threads go back to the groups they came from, every
    /// other task in the VM's groups goes to its process's group (threads of this process with
    /// SCHED_OTHER), then, once every group is empty, each group's RT runtime goes to 0 before
    /// the group is deleted, bottom-up, and the shared `rtvirt` group keeps only what its
    /// remaining VM groups hold. Tear the VM down first: its vCPU threads should be back to
    /// their own class by then. Returns the nanoseconds it took. Safe to call twice.
    /// - Throws: `CgroupError.partitionBusy` when tasks could not be moved out (nothing was
    ///   deleted and no runtime given back: call it again), or the backend's error.
    @discardableResult
    public func remove() throws(CgroupError) -> UInt64 {
        let start = monotonicNanoseconds()
        try state.withLock { (state) throws(CgroupError) in
            guard !state.removed else { return }
            for tid in Array(state.originalGroups.keys) { try? release(tid, state: &state) }
            try Self.removeVMGroup(vmGroup, backend: backend)
            state.removed = true
        }
        return monotonicNanoseconds() - start
    }

    deinit { _ = try? remove() }

    /// Moves every task out of `vmGroup` and its two partitions, then, when they are empty,
    /// gives their RT runtime back bottom-up and deletes them, and settles `rtvirt`.
    static func removeVMGroup(_ vmGroup: String, backend: any CgroupBackend) throws(CgroupError) {
        let groups = [vmGroup + "/realtime", vmGroup + "/housekeeping", vmGroup]
        // Empty every group first. A task can appear meanwhile (a thread of a task just moved
        // started another), hence a few rounds.
        var remaining: [(group: String, tid: pid_t)] = []
        for _ in 0..<4 {
            remaining = []
            for group in groups {
                for controller in controllers {
                    for tid in backend.tasks(in: group, controller: controller) {
                        remaining.append((group, tid))
                        try? moveOut(tid, controller: controller, backend: backend)
                    }
                }
            }
            if remaining.isEmpty { break }
        }
        if !remaining.isEmpty {
            let left = groups.flatMap { group in controllers.flatMap { backend.tasks(in: group, controller: $0) }.map { (group, $0) } }
            if let first = left.first {
                throw .partitionBusy(group: first.0, tasks: Array(Set(left.filter { $0.0 == first.0 }.map(\.1))).sorted())
            }
        }
        // Every group is empty: no RT task can hold a runtime now. Each goes to 0 before its
        // group is deleted, so no deleted group keeps a reservation the kernel still counts.
        for group in groups {
            if backend.groupExists(group, controller: "cpu") {
                try backend.setValue("0", name: "cpu.rt_runtime_us", group: group, controller: "cpu")
            }
            for controller in controllers { try backend.deleteGroup(group, controller: controller) }
        }
        try settleSharedGroup(backend: backend)
    }

    /// Sets `rtvirt`'s RT runtime to what its VM groups still hold, and deletes it when none
    /// is left.
    static func settleSharedGroup(backend: any CgroupBackend) throws(CgroupError) {
        guard backend.groupExists(projectSubtree, controller: "cpu") || backend.groupExists(projectSubtree, controller: "cpuset") else { return }
        let children = backend.children(of: projectSubtree, controller: "cpu")
        let held = children.reduce(Int64(0)) { sum, child in
            sum + (Int64(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree + "/" + child, controller: "cpu") ?? "0") ?? 0)
        }
        if backend.groupExists(projectSubtree, controller: "cpu") {
            try backend.setValue("\(held)", name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu")
        }
        guard children.isEmpty, backend.children(of: projectSubtree, controller: "cpuset").isEmpty else { return }
        for controller in controllers {
            for tid in backend.tasks(in: projectSubtree, controller: controller) { try? moveOut(tid, controller: controller, backend: backend) }
            try backend.deleteGroup(projectSubtree, controller: controller)
        }
    }

    /// Moves `tid` out of the subtree into the group its process's main thread is in (the
    /// hierarchy's root when that is inside the subtree, or when the move is refused there: an
    /// RT task cannot enter a group without RT runtime). A thread of this process that has a
    /// real-time class gets SCHED_OTHER first: RTVirt did not place it.
    static func moveOut(_ tid: pid_t, controller: String, backend: any CgroupBackend) throws(CgroupError) {
        let process = HostTask.threadGroup(of: tid) ?? tid
        if process == getpid() { HostTask.demoteIfRealtime(tid) }
        let home = HostTask.groups(of: process)[controller] ?? ""
        let outside = home != projectSubtree && !home.hasPrefix(projectSubtree + "/")
        if outside && !home.isEmpty, (try? backend.moveOut(thread: tid, to: home, controller: controller)) != nil { return }
        try backend.moveOut(thread: tid, to: "", controller: controller)
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
        leftoverGroups(backend: backend, isAlive: isAlive).filter { (try? removeVMGroup($0, backend: backend)) != nil }
    }

    /// Every VM group under `rtvirt` (alive or not).
    public static func allVMGroups(backend: any CgroupBackend) -> [String] {
        Set(controllers.flatMap { backend.children(of: projectSubtree, controller: $0) }).map { "\(projectSubtree)/\($0)" }.sorted()
    }
}

/// What `/proc` says about a task: its process and its v1 groups.
enum HostTask {
    /// The thread-group id (process) of task `tid`, or nil when it is gone.
    static func threadGroup(of tid: pid_t) -> pid_t? {
        for line in (HostFiles().read("/proc/\(tid)/status") ?? "").split(separator: "\n") where line.hasPrefix("Tgid:") {
            return pid_t(String(line.dropFirst("Tgid:".count).filter { !$0.isWhitespace }))
        }
        return nil
    }

    /// The v1 groups (relative to each mount, "" for the root) of task `tid`, from `/proc/<tid>/cgroup`.
    static func groups(of tid: pid_t) -> [String: String] {
        var groups: [String: String] = [:]
        for line in (HostFiles().read("/proc/\(tid)/cgroup") ?? "").split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            for controller in fields[1].split(separator: ",") { groups[String(controller)] = String(fields[2].dropFirst()) }
        }
        return groups
    }

    /// Gives task `tid` SCHED_OTHER if it has a real-time class (best effort).
    static func demoteIfRealtime(_ tid: pid_t) {
        guard let current = try? ThreadScheduling.schedulingClass(of: tid), ThreadScheduling.isRealtime(current) else { return }
        try? ThreadScheduling.setSchedulingClass(.other(), of: tid)
    }
}
