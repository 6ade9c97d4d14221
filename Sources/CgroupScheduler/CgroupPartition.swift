#if canImport(Glibc)
#endif
import Glibc
import RTVirtCore
import Logging
import RealtimeVCPU

/// One file write a partition makes, for `--dry-run` and logs.
public struct CgroupWrite: Equatable, Sendable, CustomStringConvertible {
    /// The hierarchy: a v1 controller, or `unifiedHierarchy`.
    public var controller: String
    /// The group, relative to the hierarchy's mount point.
    public var group: String
    /// The control file.
    public var file: String
    /// What is written.
    public var value: String
    public var description: String { "\(controller):/\(group)/\(file) = \(value)" }
}

/// Where a deadline-mode partition runs its real-time vCPU threads.
public struct DeadlinePlacement: Equatable, Sendable, CustomStringConvertible {
    /// The SCHED_DEADLINE parameters each real-time vCPU thread gets (from the plan's budget).
    public var parameters: DeadlineParameters
    /// The affinity each real-time vCPU thread gets: the plan's real-time CPUs when they are a
    /// root domain of their own, else the root domain that holds them.
    public var affinity: CPUSet
    /// Whether `affinity` is the plan's real-time CPUs.
    public var pinned: Bool
    /// cgroup v2: `cpuset.cpus.partition` of the real-time group as the kernel reports it.
    public var partitionState: String?
    /// What was found and done, for logs and the tool.
    public var message: String

    public var description: String { message }
}

/// The group layout of a partition.
enum PartitionLayout: Equatable, Sendable {
    /// v1 `cpuset` and `cpu`; the budget is the real-time group's `cpu.rt_runtime_us`.
    case v1RTGroup
    /// v1 `cpuset` only; the budget is SCHED_DEADLINE.
    case v1Deadline
    /// The v2 hierarchy; `cpuset` partition root; the budget is SCHED_DEADLINE.
    case v2Deadline

    /// The hierarchies (backend controller keys) its groups live in.
    var controllers: [String] {
        switch self {
        case .v1RTGroup: return ["cpuset", "cpu"]
        case .v1Deadline: return ["cpuset"]
        case .v2Deadline: return [unifiedHierarchy]
        }
    }
}

/// A real-time partition and a housekeeping partition for one VM:
/// `rtvirt/<name>-<pid>/realtime` and `.../housekeeping`, with one of two budget modes
/// (`PartitionPlan.budgetMode`):
///
/// - `rtGroup`, on cgroup v1 (`cpuset` and `cpu` with `cpu.rt_runtime_us`): creating it raises
///   the RT runtime of the project's groups (`rtvirt`, `rtvirt/<vm>`) by the plan's share,
///   top-down, before giving the real-time group its budget.
/// - `deadline`: every real-time vCPU thread runs SCHED_DEADLINE with the plan's budget
///   (`realtimePolicy(for:)`). On v1 the groups are cpusets only; on v2 the real-time group is
///   a cpuset partition root (`isolated`, else `root`), so the real-time CPUs are a root domain
///   and a deadline thread may be pinned to them. Where no root domain of the real-time CPUs
///   exists (v1 hosts whose root cpuset balances load, like these), the threads run with the
///   affinity of the root domain that holds them, and `deadlinePlacement` says so.
///
/// Removing it moves threads back where they came from, deletes its groups bottom-up and
/// gives the runtime back; the shared `rtvirt` group keeps the union of the CPUs (and the sum
/// of the runtime) its remaining VM groups hold. Every read-modify-write of `rtvirt` happens
/// under a cross-process lock (`PartitionLock`). Nothing outside the `rtvirt` subtree is
/// created, changed or removed.
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
    /// The budget mode in force and why it was chosen.
    public let budgetMode: BudgetModeChoice
    /// For the deadline mode: the SCHED_DEADLINE parameters and affinity of real-time vCPU
    /// threads, and whether the real-time CPUs have a root domain of their own.
    public let deadlinePlacement: DeadlinePlacement?
    let layout: PartitionLayout
    /// Where this process lived when the partition was created, by hierarchy (only groups
    /// outside the subtree): tasks that have no home of their own outside the subtree go there.
    let processHomes: [String: String]
    private let backend: any CgroupBackend
    private let lock: PartitionLock
    private struct State {
        var originalGroups: [pid_t: [String: String]] = [:]
        var realtimeThreads: Set<pid_t> = []
        var removed = false
        /// cgroup v2: the group this process came from (it joined the VM group at creation).
        var processHome: String?
    }
    // Held across each assignment, sweep and removal, so a sweep never sees a thread that is
    // being assigned before it is recorded.
    private let state = LockedValue(State())

    /// Every hierarchy a partition may have groups in.
    static let allControllers = ["cpuset", "cpu", unifiedHierarchy]
    /// The RT period of the project's intermediate groups (the kernel default), µs.
    static let parentPeriod: Int64 = 1_000_000

    /// The group of the real-time partition.
    public var realtimeGroup: String { vmGroup + "/realtime" }
    /// The group of the housekeeping partition.
    public var housekeepingGroup: String { vmGroup + "/housekeeping" }
    /// 1 or 2: the cgroup version the groups are on.
    public var cgroupVersion: Int { layout == .v2Deadline ? 2 : 1 }

    /// The writes `create` makes for a v1 `rtGroup` partition, in order (for `--dry-run`).
    /// `currentParentRuntime` and `currentParentCPUs` are the `rtvirt` group's
    /// `cpu.rt_runtime_us` and `cpuset.cpus` now (0 and empty when it does not exist): other
    /// VMs' partitions may already use them, so the shared group only ever grows here.
    public static func plannedWrites(_ plan: PartitionPlan, vmGroup: String, currentParentRuntime: Int64,
                                     currentParentCPUs: CPUSet = []) -> [CgroupWrite] {
        plannedWrites(plan, layout: .v1RTGroup, vmGroup: vmGroup,
                      shared: SharedGroup(runtime: currentParentRuntime, cpus: currentParentCPUs, exclusive: []),
                      deadlineAffinity: nil, rootBalancesLoad: true, exclusiveCPUs: false)
    }

    /// What the shared `rtvirt` group holds now.
    struct SharedGroup {
        var runtime: Int64
        var cpus: CPUSet
        var exclusive: CPUSet

        static func read(_ backend: any CgroupBackend, layout: PartitionLayout) -> SharedGroup {
            let cpuset = layout == .v2Deadline ? unifiedHierarchy : "cpuset"
            func cpus(_ name: String) -> CPUSet {
                backend.value(name: name, group: projectSubtree, controller: cpuset).flatMap(CPUSet.init(listFormat:)) ?? []
            }
            return SharedGroup(runtime: Int64(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu") ?? "0") ?? 0,
                               cpus: cpus("cpuset.cpus"), exclusive: layout == .v2Deadline ? cpus("cpuset.cpus.exclusive") : [])
        }
    }

    static func plannedWrites(_ plan: PartitionPlan, layout: PartitionLayout, vmGroup: String, shared: SharedGroup,
                              deadlineAffinity: CPUSet?, rootBalancesLoad: Bool, exclusiveCPUs: Bool) -> [CgroupWrite] {
        let share = Int64((plan.budget.fraction * Double(parentPeriod)).rounded(.up))
        let node = "\(plan.memoryNode ?? 0)"
        let affinity = deadlineAffinity ?? plan.realtimeCPUs
        let vmCPUs = CPUSet(plan.realtimeCPUs.cpus + plan.housekeepingCPUs.cpus + (layout == .v1Deadline ? affinity.cpus : []))
        let parentCPUs = CPUSet(vmCPUs.cpus + shared.cpus.cpus)
        let realtime = vmGroup + "/realtime", housekeeping = vmGroup + "/housekeeping"
        var writes: [CgroupWrite] = []
        func add(_ controller: String, _ group: String, _ file: String, _ value: String) {
            writes.append(CgroupWrite(controller: controller, group: group, file: file, value: value))
        }
        switch layout {
        case .v1RTGroup, .v1Deadline:
            // On a host whose root cpuset does not balance load, an administrator has made the
            // root domains: RTVirt's groups must not balance load, or they would merge them.
            func cpuset(_ group: String, _ cpus: CPUSet) {
                if !rootBalancesLoad { add("cpuset", group, "cpuset.sched_load_balance", "0") }
                add("cpuset", group, "cpuset.cpus", cpus.description)
                add("cpuset", group, "cpuset.mems", node)
            }
            let rtGroup = layout == .v1RTGroup
            cpuset(projectSubtree, parentCPUs)
            if rtGroup { add("cpu", projectSubtree, "cpu.rt_runtime_us", "\(shared.runtime + share)") }
            cpuset(vmGroup, vmCPUs)
            if rtGroup { add("cpu", vmGroup, "cpu.rt_runtime_us", "\(share)") }
            cpuset(realtime, rtGroup ? plan.realtimeCPUs : affinity)
            if rtGroup {
                add("cpu", realtime, "cpu.rt_period_us", "\(plan.budget.periodMicroseconds)")
                add("cpu", realtime, "cpu.rt_runtime_us", "\(plan.budget.runtimeMicroseconds)")
            }
            cpuset(housekeeping, plan.housekeepingCPUs)
            if rtGroup { add("cpu", housekeeping, "cpu.rt_runtime_us", "0") }
        case .v2Deadline:
            let u = unifiedHierarchy
            // Widening: cpus before exclusive CPUs (exclusive CPUs must lie within cpus).
            add(u, projectSubtree, "cgroup.subtree_control", "+cpuset")
            add(u, projectSubtree, "cpuset.cpus", parentCPUs.description)
            add(u, projectSubtree, "cpuset.mems", node)
            if exclusiveCPUs { add(u, projectSubtree, "cpuset.cpus.exclusive", CPUSet(shared.exclusive.cpus + plan.realtimeCPUs.cpus).description) }
            add(u, vmGroup, "cgroup.subtree_control", "+cpuset")
            add(u, vmGroup, "cpuset.cpus", vmCPUs.description)
            add(u, vmGroup, "cpuset.mems", node)
            if exclusiveCPUs { add(u, vmGroup, "cpuset.cpus.exclusive", plan.realtimeCPUs.description) }
            add(u, realtime, "cgroup.type", "threaded")
            add(u, realtime, "cpuset.cpus", plan.realtimeCPUs.description)
            add(u, realtime, "cpuset.mems", node)
            if exclusiveCPUs { add(u, realtime, "cpuset.cpus.exclusive", plan.realtimeCPUs.description) }
            add(u, housekeeping, "cgroup.type", "threaded")
            add(u, housekeeping, "cpuset.cpus", plan.housekeepingCPUs.description)
            add(u, housekeeping, "cpuset.mems", node)
            add(u, realtime, "cpuset.cpus.partition", "isolated")
        }
        return writes
    }

    /// The layout `plan` gets on `hierarchy` in `mode` (`rtGroup` or `deadline`).
    static func layout(mode: BudgetMode, hierarchy: CgroupHierarchy) -> PartitionLayout {
        mode == .rtGroup ? .v1RTGroup : hierarchy.usesV2Partitions ? .v2Deadline : .v1Deadline
    }

    /// The writes creating `plan`'s partition in this process would make now in `mode`,
    /// given what the shared `rtvirt` group holds in `backend` (for `--dry-run`). For the
    /// deadline mode on v1 the real-time group's CPUs are `deadlineAffinity` (what the
    /// admission probe finds; the plan's real-time CPUs when nil). On v2 the last write makes
    /// the real-time group a partition root; the process joins the VM group first.
    public static func plannedWrites(_ plan: PartitionPlan, mode: BudgetMode, hierarchy: CgroupHierarchy,
                                     backend: any CgroupBackend, deadlineAffinity: CPUSet? = nil) -> [CgroupWrite] {
        let layout = layout(mode: mode, hierarchy: hierarchy)
        return plannedWrites(plan, layout: layout, vmGroup: vmGroup(for: plan), shared: .read(backend, layout: layout),
                             deadlineAffinity: deadlineAffinity, rootBalancesLoad: rootBalancesLoad(backend),
                             exclusiveCPUs: exclusiveCPUsSupported(backend, hierarchy: hierarchy))
    }

    /// Whether the v1 root cpuset balances load (`cpuset.sched_load_balance`, default 1).
    static func rootBalancesLoad(_ backend: any CgroupBackend) -> Bool {
        backend.value(name: "cpuset.sched_load_balance", group: "", controller: "cpuset") != "0"
    }

    /// Whether this v2 kernel has `cpuset.cpus.exclusive` (Linux 6.7 and later), which a
    /// partition root below groups that are not partition roots (a "remote" partition) needs.
    /// The root group has no such file; its `cpuset.cpus.isolated` (6.8) or an existing
    /// `rtvirt` group's `cpuset.cpus.exclusive` tells, else the kernel release.
    static func exclusiveCPUsSupported(_ backend: any CgroupBackend, hierarchy: CgroupHierarchy) -> Bool {
        guard hierarchy.usesV2Partitions else { return false }
        if backend.value(name: "cpuset.cpus.exclusive", group: projectSubtree, controller: unifiedHierarchy) != nil { return true }
        if backend.value(name: "cpuset.cpus.isolated", group: "", controller: unifiedHierarchy) != nil { return true }
        var name = utsname()
        uname(&name)
        // utsname.release is a fixed-size C char array inside the struct; read it as bytes.
        let release = withUnsafeBytes(of: name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        return parts.count == 2 && (parts[0], parts[1]) >= (6, 7)
    }

    /// The VM group name for `plan` in this process.
    public static func vmGroup(for plan: PartitionPlan, pid: pid_t = getpid()) -> String {
        "\(projectSubtree)/\(plan.name)-\(pid)"
    }

    /// Creates the partition, first reclaiming partitions left by processes that died, all
    /// under the cross-process `lock`. On failure everything created is removed again.
    ///
    /// The budget mode is `plan.budgetMode` resolved against the host (`budgetMode` says what
    /// was chosen and why). In the deadline mode, `probe` asks the kernel whether a thread with
    /// the real-time CPUs as its affinity is admitted to SCHED_DEADLINE with the plan's budget;
    /// when it is not because no root domain of those CPUs exists (v1), the affinity becomes
    /// the root domain's and `deadlinePlacement` says so (and `logger` logs it).
    /// - Throws: `CgroupError.noRTGroupScheduling` when `rtGroup` is asked for where there is
    ///   none, `.noBudgetMode`, `.deadline(...)` when the kernel will not admit the budget,
    ///   `.v2ControllerUnavailable` / `.v2ControllerNotDelegated` on a v2 host without a
    ///   delegated cpuset controller, `.partitionInvalid` when the kernel reports the v2
    ///   partition root invalid, `.budgetUnavailable`, `.missingController`, or the backend's
    ///   errors.
    ///
    /// `processHome` is where this process lives, by hierarchy (a v1 controller or
    /// `unifiedHierarchy`); nil: its groups in `/proc/self/cgroup` now. A task that leaves the
    /// partition goes to the group of its own process, or, when that is inside the subtree,
    /// to this home; with neither outside the subtree it stays (`CgroupError.partitionBusy`):
    /// nothing is ever moved to a hierarchy's root that is not one of those homes.
    public init(plan: PartitionPlan, hierarchy: CgroupHierarchy, backend: any CgroupBackend,
                lock: PartitionLock = .shared, probe: any DeadlineAdmissionProbe = KernelDeadlineProbe(),
                processHome: [String: String]? = nil,
                logger: Logger = Logger(label: "rtvirt.cgroup")) throws(CgroupError) {
        let support = BudgetModeSupport.detect(hierarchy: hierarchy)
        if plan.budgetMode == .rtGroup && !hierarchy.usesV2Partitions {
            // The v1 controllers the rtGroup mode needs, named when missing.
            guard hierarchy.v1Mount(for: "cpuset") != nil else { throw .missingController("cpuset") }
            guard hierarchy.v1Mount(for: "cpu") != nil else { throw .missingController("cpu") }
        }
        if hierarchy.usesV2Partitions, plan.budgetMode != .rtGroup, let v2 = hierarchy.v2Mount {
            // The v2 preconditions, with what an administrator would do (never done here).
            guard v2.controllers.contains("cpuset") else { throw .v2ControllerUnavailable(controller: "cpuset", available: v2.controllers) }
            guard hierarchy.v2DelegatedControllers.contains("cpuset") else {
                throw .v2ControllerNotDelegated(controller: "cpuset", file: v2.path + "/cgroup.subtree_control")
            }
        }
        let choice = try BudgetModeSupport.choose(plan.budgetMode, support: support)
        let layout = Self.layout(mode: choice.mode, hierarchy: hierarchy)
        if layout == .v2Deadline {
            // The parameters the kernel would refuse with EINVAL, before anything is written
            // (the partition root will be the real-time CPUs' own root domain).
            do throws(DeadlineAdmissionError) {
                try DeadlineParameters(budget: plan.budget).validate(limits: .current(), rootDomainCPUs: plan.realtimeCPUs.cpus.count)
            } catch {
                throw .deadline(error)
            }
        }
        let vmGroup = Self.vmGroup(for: plan)
        let homes = Self.outsideSubtree(processHome ?? HostTask.groups(of: getpid()))
        processHomes = homes
        self.plan = plan
        self.backend = backend
        self.lock = lock
        self.layout = layout
        self.budgetMode = choice
        self.vmGroup = vmGroup
        let state = state
        deadlinePlacement = try lock.withLock { () throws(CgroupError) -> DeadlinePlacement? in
            Self.reclaimLeftoversLocked(backend: backend, homes: homes) // partitions of processes that died
            if layout == .v2Deadline, let existing = Self.allVMGroups(backend: backend).first(where: { $0.hasSuffix("-\(getpid())") }) {
                throw .oneV2PartitionPerProcess(existing: existing)
            }
            let shared = SharedGroup.read(backend, layout: layout)
            if layout == .v1RTGroup {
                let available = Self.globalRTFraction() - Double(shared.runtime) / Double(Self.parentPeriod)
                guard plan.budget.fraction <= available + 1e-9 else { throw .budgetUnavailable(requested: plan.budget.fraction, available: max(available, 0)) }
            }
            var placement: DeadlinePlacement?
            if layout == .v1Deadline {
                placement = try Self.v1DeadlinePlacement(plan, backend: backend, probe: probe)
            }
            do throws(CgroupError) {
                let writes = Self.plannedWrites(plan, layout: layout, vmGroup: vmGroup, shared: shared,
                                                deadlineAffinity: placement?.affinity, rootBalancesLoad: Self.rootBalancesLoad(backend),
                                                exclusiveCPUs: Self.exclusiveCPUsSupported(backend, hierarchy: hierarchy))
                for write in writes where write.file != "cpuset.cpus.partition" {
                    if !backend.groupExists(write.group, controller: write.controller) {
                        try backend.createGroup(write.group, controller: write.controller)
                    }
                    try backend.setValue(write.value, name: write.file, group: write.group, controller: write.controller)
                }
                if layout == .v2Deadline {
                    // cgroup v2 moves threads only inside their process's threaded subtree: the
                    // process joins the VM group (the threaded domain) before any thread is placed.
                    let home = HostTask.groups(of: getpid())[unifiedHierarchy] ?? ""
                    state.withLock { $0.processHome = home }
                    try backend.setValue("\(getpid())", name: "cgroup.procs", group: vmGroup, controller: unifiedHierarchy)
                    placement = try Self.v2PartitionRoot(plan, vmGroup: vmGroup, backend: backend, probe: probe)
                }
            } catch {
                if let home = state.withLock({ $0.processHome }) { try? backend.moveOut(thread: getpid(), to: home, controller: unifiedHierarchy) }
                try? Self.removeVMGroupLocked(vmGroup, backend: backend, homes: homes)
                throw error
            }
            return placement
        }
        logger.info("partition created", metadata: ["group": "\(vmGroup)", "budget mode": "\(choice)",
                                                    "deadline": "\(deadlinePlacement.map { "\($0)" } ?? "-")"])
        if let placement = deadlinePlacement, !placement.pinned {
            logger.warning("\(placement.message)", metadata: ["group": "\(vmGroup)"])
        }
    }

    /// `kernel.sched_rt_runtime_us / sched_rt_period_us` (1 when unlimited).
    static func globalRTFraction(files: HostFiles = HostFiles()) -> Double {
        let runtime = Double(files.readInteger("/proc/sys/kernel/sched_rt_runtime_us") ?? 950_000)
        let period = Double(files.readInteger("/proc/sys/kernel/sched_rt_period_us") ?? 1_000_000)
        return runtime < 0 || period <= 0 ? 1 : runtime / period
    }

    /// What a v1 deadline partition of `plan` would run its real-time vCPU threads with: asks
    /// the kernel (a probing thread is SCHED_DEADLINE for microseconds) and writes nothing.
    public static func previewV1DeadlinePlacement(_ plan: PartitionPlan, backend: any CgroupBackend,
                                                  probe: any DeadlineAdmissionProbe = KernelDeadlineProbe()) throws(CgroupError) -> DeadlinePlacement {
        try v1DeadlinePlacement(plan, backend: backend, probe: probe)
    }

    /// v1 deadline: the real-time CPUs if the kernel admits a deadline thread pinned to them,
    /// else the span of their root domain (from the cpuset hierarchy), if it admits that.
    static func v1DeadlinePlacement(_ plan: PartitionPlan, backend: any CgroupBackend,
                                    probe: any DeadlineAdmissionProbe) throws(CgroupError) -> DeadlinePlacement {
        let parameters = DeadlineParameters(budget: plan.budget)
        let online = (try? ThreadScheduling.affinity()).map { CPUSet($0.cpus + plan.realtimeCPUs.cpus + plan.housekeepingCPUs.cpus) }
            ?? CPUSet(plan.realtimeCPUs.cpus + plan.housekeepingCPUs.cpus)
        let domain = RootDomainReport.v1(realtimeCPUs: plan.realtimeCPUs, backend: backend, online: online)
        do throws(DeadlineAdmissionError) {
            try parameters.validate(limits: .current(), rootDomainCPUs: domain.span.cpus.count)
        } catch {
            throw .deadline(error)
        }
        switch probe.probe(parameters, cpus: plan.realtimeCPUs, place: nil) {
        case .admitted:
            return DeadlinePlacement(parameters: parameters, affinity: plan.realtimeCPUs, pinned: true, partitionState: nil,
                                     message: "\(parameters) pinned to CPUs \(plan.realtimeCPUs), their own root domain")
        case .refused(.affinityBelowRootDomain):
            guard domain.span != plan.realtimeCPUs, !domain.span.isEmpty else {
                throw .deadline(.affinityBelowRootDomain(affinity: plan.realtimeCPUs, rootDomain: nil))
            }
            switch probe.probe(parameters, cpus: domain.span, place: nil) {
            case .admitted:
                return DeadlinePlacement(parameters: parameters, affinity: domain.span, pinned: false, partitionState: nil,
                                         message: "no root domain of CPUs \(plan.realtimeCPUs) exists (\(domain.reason); RTVirt does not change it): "
                                            + "real-time vCPU threads run \(parameters) with the root domain's affinity \(domain.span)")
            case .refused(let error): throw .deadline(error)
            }
        case .refused(let error): throw .deadline(error)
        }
    }

    /// v2: makes the real-time group a partition root, `isolated` where the kernel takes it
    /// (and admits a deadline thread pinned there; isolated CPUs share the default root
    /// domain), else `root`, reading back what the kernel reports. Called under the lock with
    /// this process in the VM group.
    static func v2PartitionRoot(_ plan: PartitionPlan, vmGroup: String, backend: any CgroupBackend,
                                probe: any DeadlineAdmissionProbe) throws(CgroupError) -> DeadlinePlacement {
        let parameters = DeadlineParameters(budget: plan.budget)
        let realtime = vmGroup + "/realtime"
        let place: @Sendable (pid_t) throws -> Void = { tid in try backend.attach(thread: tid, group: realtime, controller: unifiedHierarchy) }
        var lastRefusal: DeadlineAdmissionError?
        for wanted in ["isolated", "root"] {
            // A kernel without `isolated` (before 5.15) refuses the write.
            guard (try? backend.setValue(wanted, name: "cpuset.cpus.partition", group: realtime, controller: unifiedHierarchy)) != nil else { continue }
            let reported = backend.value(name: "cpuset.cpus.partition", group: realtime, controller: unifiedHierarchy) ?? "?"
            guard reported == wanted else {
                if wanted == "isolated" && reported.hasPrefix("isolated") { continue } // "isolated invalid (...)": try root
                throw .partitionInvalid(group: realtime, state: reported)
            }
            switch probe.probe(parameters, cpus: plan.realtimeCPUs, place: place) {
            case .admitted:
                return DeadlinePlacement(parameters: parameters, affinity: plan.realtimeCPUs, pinned: true, partitionState: reported,
                                         message: "\(parameters) pinned to CPUs \(plan.realtimeCPUs), a cpuset partition (\(reported)) of their own")
            case .refused(.affinityBelowRootDomain(let affinity, let domain)) where wanted == "isolated":
                lastRefusal = .affinityBelowRootDomain(affinity: affinity, rootDomain: domain)
                continue
            case .refused(let error): throw .deadline(error)
            }
        }
        if let lastRefusal { throw .deadline(lastRefusal) }
        throw .partitionInvalid(group: realtime, state: backend.value(name: "cpuset.cpus.partition", group: realtime, controller: unifiedHierarchy)
                                    ?? "cpuset.cpus.partition cannot be written (a kernel without cpuset partitions)")
    }

    /// The policy a real-time thread gets here: in the deadline mode SCHED_DEADLINE with the
    /// plan's budget and `deadlinePlacement`'s affinity (its timer slack and memory locking
    /// stay); in the rtGroup mode `policy` itself.
    public func realtimePolicy(for policy: RealtimePolicy) -> RealtimePolicy {
        guard let placement = deadlinePlacement else { return policy }
        var adjusted = policy
        adjusted.schedulingClass = placement.parameters.schedulingClass
        adjusted.cpus = placement.affinity
        return adjusted
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

    /// The threads assigned to the real-time partition now.
    public var realtimeThreads: Set<pid_t> { state.withLock { $0.realtimeThreads } }

    private func assign(_ tid: pid_t, to group: String, state: inout State) throws(CgroupError) {
        if state.originalGroups[tid] == nil {
            // On v2 a thread goes back into the VM group (its process's threaded domain).
            state.originalGroups[tid] = layout == .v2Deadline ? [unifiedHierarchy: vmGroup] : HostTask.groups(of: tid)
        }
        for controller in layout.controllers { try backend.attach(thread: tid, group: group, controller: controller) }
    }

    /// Moves thread `tid` back to the groups it was in before it was assigned.
    public func releaseThread(_ threadID: pid_t) throws {
        try state.withLock { (state) throws(CgroupError) in try release(threadID, state: &state) }
    }

    private func release(_ tid: pid_t, state: inout State) throws(CgroupError) {
        let wasRealtime = state.realtimeThreads.remove(tid) != nil
        guard let original = state.originalGroups.removeValue(forKey: tid) else { return }
        for controller in layout.controllers {
            // Where it was (read when it was assigned); if unknown, this process's home, never the root.
            guard let group = original[controller] ?? processHomes[controller] else {
                throw .partitionBusy(group: wasRealtime ? realtimeGroup : housekeepingGroup, tasks: [tid])
            }
            if layout == .v2Deadline {
                try backend.attach(thread: tid, group: group, controller: controller) // inside the subtree
            } else {
                try backend.moveOut(thread: tid, to: group, controller: controller)
            }
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
        for controller in layout.controllers {
            for tid in backend.tasks(in: realtimeGroup, controller: controller) where !state.realtimeThreads.contains(tid) {
                do throws(CgroupError) {
                    if HostTask.threadGroup(of: tid) == getpid() || layout == .v2Deadline {
                        HostTask.demoteIfRealtime(tid)
                        try backend.attach(thread: tid, group: housekeepingGroup, controller: controller)
                    } else {
                        try Self.moveOut(tid, from: realtimeGroup, controller: controller, homes: processHomes, backend: backend)
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

    /// Removes the partition: assigned threads go back to the groups they came from (on v2 the
    /// process goes back to its group), every other task in the VM's groups goes to its
    /// process's group (threads of this process with SCHED_OTHER), then, once every group is
    /// empty, each group's RT runtime goes to 0 (a v2 partition root becomes a member) before
    /// the group is deleted, bottom-up, and the shared `rtvirt` group keeps only what its
    /// remaining VM groups hold (runtime and CPUs), all under the cross-process lock. Tear
    /// the VM down first: its vCPU threads should be back to their own class by then. Returns
    /// the nanoseconds it took. Safe to call twice.
    /// - Throws: `CgroupError.partitionBusy` when tasks could not be moved out (nothing was
    ///   deleted and no runtime given back: call it again), or the backend's error.
    @discardableResult
    public func remove() throws(CgroupError) -> UInt64 {
        let start = monotonicNanoseconds()
        try state.withLock { (state) throws(CgroupError) in
            guard !state.removed else { return }
            for tid in Array(state.originalGroups.keys) { try? release(tid, state: &state) }
            if layout == .v2Deadline, let home = state.processHome {
                HostTask.demoteIfRealtime(getpid())
                try backend.moveOut(thread: getpid(), to: home, controller: unifiedHierarchy)
            }
            try lock.withLock { () throws(CgroupError) in try Self.removeVMGroupLocked(vmGroup, backend: backend, homes: processHomes) }
            state.removed = true
        }
        return monotonicNanoseconds() - start
    }

    deinit { _ = try? remove() }

    /// The hierarchies `backend` has (v1 `cpuset` and `cpu`, v2).
    static func hierarchies(_ backend: any CgroupBackend) -> [String] {
        allControllers.filter { backend.groupExists("", controller: $0) }
    }

    /// Moves every task out of `vmGroup` and its two partitions, then, when they are empty,
    /// gives their RT runtime back bottom-up and deletes them, and settles `rtvirt`. The
    /// caller holds the cross-process lock. `homes`: see `moveOut`.
    static func removeVMGroupLocked(_ vmGroup: String, backend: any CgroupBackend, homes: [String: String]) throws(CgroupError) {
        let groups = [vmGroup + "/realtime", vmGroup + "/housekeeping", vmGroup]
        let controllers = hierarchies(backend)
        // Empty every group first. A task can appear meanwhile (a thread of a task just moved
        // started another), hence a few rounds.
        var remaining: [(group: String, tid: pid_t)] = []
        for _ in 0..<4 {
            remaining = []
            for group in groups {
                for controller in controllers {
                    for tid in backend.tasks(in: group, controller: controller) {
                        remaining.append((group, tid))
                        try? moveOut(tid, from: group, controller: controller, homes: homes, backend: backend)
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
        // group is deleted, so no deleted group keeps a reservation the kernel still counts;
        // a v2 partition root gives its CPUs back as a member first.
        for group in groups {
            if backend.groupExists(group, controller: "cpu") {
                try backend.setValue("0", name: "cpu.rt_runtime_us", group: group, controller: "cpu")
            }
            if backend.groupExists(group, controller: unifiedHierarchy),
               let partition = backend.value(name: "cpuset.cpus.partition", group: group, controller: unifiedHierarchy), partition != "member" {
                try? backend.setValue("member", name: "cpuset.cpus.partition", group: group, controller: unifiedHierarchy)
            }
            for controller in controllers where backend.groupExists(group, controller: controller) {
                try backend.deleteGroup(group, controller: controller)
            }
        }
        try settleSharedGroupLocked(backend: backend, homes: homes)
    }

    /// Sets `rtvirt`'s RT runtime to what its VM groups still hold and narrows its CPUs (and
    /// v2 exclusive CPUs) to their union, and deletes it when none is left. The caller holds
    /// the cross-process lock. `homes`: see `moveOut`.
    static func settleSharedGroupLocked(backend: any CgroupBackend, homes: [String: String]) throws(CgroupError) {
        let controllers = hierarchies(backend).filter { backend.groupExists(projectSubtree, controller: $0) }
        guard !controllers.isEmpty else { return }
        if controllers.contains("cpu") {
            let held = backend.children(of: projectSubtree, controller: "cpu").reduce(Int64(0)) { sum, child in
                sum + (Int64(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree + "/" + child, controller: "cpu") ?? "0") ?? 0)
            }
            try backend.setValue("\(held)", name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu")
        }
        for controller in controllers where controller != "cpu" {
            let children = backend.children(of: projectSubtree, controller: controller)
            guard !children.isEmpty else { continue }
            func union(_ file: String) -> CPUSet {
                CPUSet(children.flatMap { child in
                    (backend.value(name: file, group: projectSubtree + "/" + child, controller: controller).flatMap(CPUSet.init(listFormat:)) ?? []).cpus
                })
            }
            // Narrowing: exclusive CPUs before CPUs (they must stay within them).
            if controller == unifiedHierarchy, backend.value(name: "cpuset.cpus.exclusive", group: projectSubtree, controller: controller) != nil {
                try backend.setValue(union("cpuset.cpus.exclusive").description, name: "cpuset.cpus.exclusive", group: projectSubtree, controller: controller)
            }
            let cpus = union("cpuset.cpus")
            if !cpus.isEmpty { try backend.setValue(cpus.description, name: "cpuset.cpus", group: projectSubtree, controller: controller) }
        }
        guard controllers.allSatisfy({ backend.children(of: projectSubtree, controller: $0).isEmpty }) else { return }
        for controller in controllers {
            for tid in backend.tasks(in: projectSubtree, controller: controller) {
                try? moveOut(tid, from: projectSubtree, controller: controller, homes: homes, backend: backend)
            }
            try backend.deleteGroup(projectSubtree, controller: controller)
        }
    }

    /// Moves `tid` out of the subtree, out of `group`: into the group its process's main thread
    /// is in, or, when that is inside the subtree (or unknown), into `homes[controller]`, where
    /// the VMM process lived when its partition was created; if the first refuses it, into the
    /// second. Never anywhere else, the hierarchy's root included: with no such group outside
    /// the subtree it throws `CgroupError.partitionBusy`. A thread of this process that has a
    /// real-time class gets SCHED_OTHER first: RTVirt did not place it.
    static func moveOut(_ tid: pid_t, from group: String, controller: String, homes: [String: String],
                        backend: any CgroupBackend) throws(CgroupError) {
        let process = HostTask.threadGroup(of: tid) ?? tid
        if process == getpid() { HostTask.demoteIfRealtime(tid) }
        var targets: [String] = []
        for home in [HostTask.groups(of: process)[controller], homes[controller]] {
            if let home, isOutsideSubtree(home), !targets.contains(home) { targets.append(home) }
        }
        guard !targets.isEmpty else { throw .partitionBusy(group: group, tasks: [tid]) }
        var failure: CgroupError?
        for target in targets {
            do throws(CgroupError) {
                try backend.moveOut(thread: tid, to: target, controller: controller)
                return
            } catch {
                failure = failure ?? error
            }
        }
        if let failure { throw failure }
    }

    /// Whether group `path` ("" is the root) is outside the project's subtree.
    static func isOutsideSubtree(_ path: String) -> Bool { path != projectSubtree && !path.hasPrefix(projectSubtree + "/") }

    /// `groups` without those inside the project's subtree.
    static func outsideSubtree(_ groups: [String: String]) -> [String: String] { groups.filter { isOutsideSubtree($0.value) } }

    /// VM groups under `rtvirt` whose process is gone.
    public static func leftoverGroups(backend: any CgroupBackend, isAlive: (pid_t) -> Bool = { kill($0, 0) == 0 || errno == EPERM }) -> [String] {
        var groups = Set<String>()
        for controller in hierarchies(backend) {
            for child in backend.children(of: projectSubtree, controller: controller) {
                guard let pid = child.split(separator: "-").last.flatMap({ pid_t($0) }), !isAlive(pid) else { continue }
                groups.insert("\(projectSubtree)/\(child)")
            }
        }
        return groups.sorted()
    }

    /// Deletes the groups of VMs whose process died, under the cross-process `lock`. Returns
    /// those it deleted.
    @discardableResult
    public static func reclaimLeftovers(backend: any CgroupBackend, lock: PartitionLock = .shared,
                                        isAlive: (pid_t) -> Bool = { kill($0, 0) == 0 || errno == EPERM }) -> [String] {
        let homes = outsideSubtree(HostTask.groups(of: getpid()))
        return (try? lock.withLock { () throws(CgroupError) in reclaimLeftoversLocked(backend: backend, homes: homes, isAlive: isAlive) }) ?? []
    }

    /// `homes`: where this process lives outside the subtree (see `moveOut`).
    @discardableResult
    static func reclaimLeftoversLocked(backend: any CgroupBackend, homes: [String: String],
                                       isAlive: (pid_t) -> Bool = { kill($0, 0) == 0 || errno == EPERM }) -> [String] {
        leftoverGroups(backend: backend, isAlive: isAlive).filter { (try? removeVMGroupLocked($0, backend: backend, homes: homes)) != nil }
    }

    /// Every VM group under `rtvirt` (alive or not).
    public static func allVMGroups(backend: any CgroupBackend) -> [String] {
        Set(hierarchies(backend).flatMap { backend.children(of: projectSubtree, controller: $0) }).map { "\(projectSubtree)/\($0)" }.sorted()
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

    /// The groups (relative to each mount, "" for the root) of task `tid` by v1 controller and
    /// `unifiedHierarchy`, from `/proc/<tid>/cgroup`.
    static func groups(of tid: pid_t) -> [String: String] {
        var groups: [String: String] = [:]
        for line in (HostFiles().read("/proc/\(tid)/cgroup") ?? "").split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            if fields[0] == "0" && fields[1].isEmpty { groups[unifiedHierarchy] = String(fields[2].dropFirst()); continue }
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
