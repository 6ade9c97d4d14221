import CgroupScheduler
import Foundation
import RealtimeVCPU
import RTVirtCore
import XCTest

/// Mode selection, SCHED_DEADLINE admission rules, root domains, and the v1 partitions of
/// both modes against fixtures: every path they write is inside `rtvirt/`.
final class BudgetModeTests: XCTestCase {
    let budget = RTBudget(parsing: "50ms/100ms")!

    func testModeSelectionReportsTheChoiceAndWhyOthersAreAbsent() throws {
        let hybrid = CgroupHierarchy(layout: .hybrid, mounts: [CgroupMount(path: "/c/cpu", version: 1, controllers: ["cpu"]),
                                                               CgroupMount(path: "/c/cpuset", version: 1, controllers: ["cpuset"]),
                                                               CgroupMount(path: "/c/unified", version: 2, controllers: [])],
                                     rtGroupScheduling: true)
        XCTAssertFalse(hybrid.usesV2Partitions, "a hybrid host with v1 controllers takes the v1 path")
        let hybridSupport = BudgetModeSupport.detect(hierarchy: hybrid, hasSysNice: true)
        XCTAssertEqual(hybridSupport.map(\.supported), [true, true])
        let automatic = try BudgetModeSupport.choose(.automatic, support: hybridSupport)
        XCTAssertEqual(automatic.mode, .rtGroup)
        XCTAssertTrue(automatic.reason.hasPrefix("automatic"), automatic.reason)
        XCTAssertEqual(try BudgetModeSupport.choose(.deadline, support: hybridSupport).mode, .deadline)

        let v2 = CgroupHierarchy(layout: .v2, mounts: [CgroupMount(path: "/c", version: 2, controllers: ["cpuset", "cpu"])],
                                 rtGroupScheduling: false, v2DelegatedControllers: ["cpuset"])
        let v2Support = BudgetModeSupport.detect(hierarchy: v2, hasSysNice: true)
        XCTAssertEqual(v2Support.map(\.supported), [false, true])
        XCTAssertTrue(v2Support[0].reason.contains("cgroup v2 has no per-group RT budget"), v2Support[0].reason)
        XCTAssertEqual(try BudgetModeSupport.choose(.automatic, support: v2Support).mode, .deadline)
        XCTAssertThrowsError(try BudgetModeSupport.choose(.rtGroup, support: v2Support)) {
            XCTAssertEqual($0 as? CgroupError, .noRTGroupScheduling)
        }
        let unprivileged = BudgetModeSupport.detect(hierarchy: v2, hasSysNice: false)
        XCTAssertThrowsError(try BudgetModeSupport.choose(.automatic, support: unprivileged)) {
            guard case .noBudgetMode(let reasons)? = $0 as? CgroupError else { return XCTFail("\($0)") }
            XCTAssertEqual(reasons.count, 2)
            XCTAssertTrue(reasons[1].contains("CAP_SYS_NICE"), "\(reasons)")
        }
    }

    func testDeadlineAdmissionRules() {
        let limits = DeadlineLimits(periodMinimumMicroseconds: 100, periodMaximumMicroseconds: 4_194_304, bandwidthPerCPU: 0.95)
        func error(_ runtime: Int64, _ period: Int64, cpus: Int = 1) -> DeadlineAdmissionError? {
            do {
                try DeadlineParameters(budget: RTBudget(runtimeMicroseconds: runtime, periodMicroseconds: period)).validate(limits: limits, rootDomainCPUs: cpus)
                return nil
            } catch { return error }
        }
        XCTAssertNil(error(50_000, 100_000))
        XCTAssertEqual(DeadlineParameters(budget: budget).schedulingClass, .deadline(runtime: 50_000_000, deadline: 100_000_000, period: 100_000_000))
        XCTAssertEqual(error(0, 100_000), .runtimeTooShort(nanoseconds: 0))
        XCTAssertEqual(error(10, 50), .periodOutOfRange(microseconds: 50, minimum: 100, maximum: 4_194_304))
        XCTAssertEqual(error(10, 5_000_000), .periodOutOfRange(microseconds: 5_000_000, minimum: 100, maximum: 4_194_304))
        guard case .inconsistent? = error(200, 100) else { return XCTFail("runtime above period") }
        XCTAssertEqual(error(99_000, 100_000), .bandwidthExceedsRootDomain(requested: 0.99, capacity: 0.95))
        XCTAssertNil(error(99_000, 100_000, cpus: 2), "two CPUs in the root domain hold it")
        XCTAssertTrue("\(DeadlineAdmissionError.affinityBelowRootDomain(affinity: [1], rootDomain: [0, 1]))".contains("EPERM"))
    }

    func testRootDomainsOfAV1Hierarchy() throws {
        let fixture = try CgroupFixture()
        let (_, backend) = try fixture.v1()
        try fixture.write("cpuset/cpuset.effective_cpus", "0-3\n")
        try fixture.write("cpuset/cpuset.sched_load_balance", "1\n")
        let balanced = RootDomainReport.v1(realtimeCPUs: [3], backend: backend, online: [0, 1, 2, 3])
        XCTAssertEqual(balanced.span, [0, 1, 2, 3])
        XCTAssertFalse(balanced.ownRootDomain)
        XCTAssertTrue(balanced.reason.contains("sched_load_balance=1"), balanced.reason)
        XCTAssertEqual(balanced.administratorRecipe?.last?.contains("echo 0 > \(fixture.root)/cpuset/cpuset.sched_load_balance") ?? false
                       || balanced.administratorRecipe?.last?.contains("cpuset.sched_load_balance") ?? false, true)

        // An administrator's layout: no balancing at the root, exclusive load-balanced cpusets.
        try fixture.write("cpuset/cpuset.sched_load_balance", "0\n")
        try fixture.write("cpuset/housekeeping/cpuset.cpus", "0-1\n")
        try fixture.write("cpuset/rt/cpuset.cpus", "3\n")
        try fixture.write("cpuset/rtvirt/cpuset.cpus", "0-3\n") // RTVirt's own groups never count
        let own = RootDomainReport.v1(realtimeCPUs: [3], backend: backend, online: [0, 1, 2, 3])
        XCTAssertEqual(own.span, [3])
        XCTAssertTrue(own.ownRootDomain)
        XCTAssertNil(own.administratorRecipe)
        let uncovered = RootDomainReport.v1(realtimeCPUs: [2], backend: backend, online: [0, 1, 2, 3])
        XCTAssertEqual(uncovered.span, [2], "CPU 2 is in no balanced cpuset: the default root domain holds only it")
    }

    /// The rtGroup mode on a v1 fixture writes only inside rtvirt/ (besides moving threads back).
    func testRTGroupModeWritesOnlyInsideTheSubtree() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, backend) = try fixture.v1()
        let plan = PartitionPlan(name: "rt", realtimeCPUs: [1], housekeepingCPUs: [0], budget: budget, budgetMode: .rtGroup)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, lock: fixture.lock)
        XCTAssertEqual(partition.budgetMode.mode, .rtGroup)
        XCTAssertNil(partition.deadlinePlacement)
        XCTAssertEqual(partition.realtimePolicy(for: RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [1])).schedulingClass,
                       .fifo(priority: 10), "the rtGroup mode keeps the thread's own class")
        let tid = ThreadScheduling.currentThreadID()
        try partition.assignRealtimeThread(tid)
        XCTAssertEqual(fixture.read("cpu/\(partition.realtimeGroup)/tasks"), "\(tid)")
        try partition.releaseThread(tid)
        try FileManager.default.removeItem(atPath: "\(fixture.root)/cpu/\(partition.realtimeGroup)/tasks") // the kernel would have moved it
        try FileManager.default.removeItem(atPath: "\(fixture.root)/cpuset/\(partition.realtimeGroup)/tasks")
        try partition.remove()
        XCTAssertFalse(fixture.exists("cpu/rtvirt"))
        fixture.assertOnlySubtreeWritten(mounts: ["cpu", "cpuset"])
        XCTAssertTrue(fixture.writes.contains { $0.path == "cpu/tasks" && $0.value == "\(tid)" }, "the thread went back to its group")
    }

    /// The deadline mode on v1: cpusets only (no RT runtime anywhere); where the kernel refuses
    /// a deadline thread pinned to the RT CPUs, the real-time cpuset is the root domain.
    func testV1DeadlineModeUsesTheRootDomainWhereTheRTCPUsHaveNone() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, backend) = try fixture.v1()
        try fixture.write("cpuset/cpuset.effective_cpus", "0-1\n")
        let probe = ScriptedProbe([[1]: [.refused(.affinityBelowRootDomain(affinity: [1], rootDomain: nil))], [0, 1]: [.admitted]])
        let plan = PartitionPlan(name: "dl", realtimeCPUs: [1], housekeepingCPUs: [0], budget: budget, budgetMode: .deadline)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, lock: fixture.lock, probe: probe)
        XCTAssertEqual(partition.budgetMode.mode, .deadline)
        XCTAssertEqual(partition.cgroupVersion, 1)
        let placement = try XCTUnwrap(partition.deadlinePlacement)
        XCTAssertEqual(placement.affinity, [0, 1])
        XCTAssertFalse(placement.pinned)
        XCTAssertTrue(placement.message.contains("no root domain of CPUs 1 exists"), placement.message)
        XCTAssertEqual(probe.asked.map(\.cpus), [[1], [0, 1]])
        XCTAssertEqual(fixture.read("cpuset/\(partition.realtimeGroup)/cpuset.cpus"), "0-1")
        XCTAssertEqual(fixture.read("cpuset/\(partition.housekeepingGroup)/cpuset.cpus"), "0")
        XCTAssertFalse(fixture.exists("cpu/rtvirt"), "no RT runtime is reserved in the deadline mode")
        let policy = partition.realtimePolicy(for: RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [1]))
        XCTAssertEqual(policy.schedulingClass, .deadline(runtime: 50_000_000, deadline: 100_000_000, period: 100_000_000))
        XCTAssertEqual(policy.cpus, [0, 1])
        try partition.remove()
        XCTAssertFalse(fixture.exists("cpuset/rtvirt"))
        fixture.assertOnlySubtreeWritten(mounts: ["cpu", "cpuset"])

        // Where an administrator gave the RT CPUs their own root domain (no balancing at the
        // root), RTVirt's groups do not balance load either, and the vCPU is pinned.
        let admin = try CgroupFixture()
        let (hierarchy2, backend2) = try admin.v1()
        try admin.write("cpuset/cpuset.sched_load_balance", "0\n")
        try admin.write("cpuset/rt/cpuset.cpus", "1\n")
        let pinned = try CgroupPartition(plan: plan, hierarchy: hierarchy2, backend: backend2, lock: admin.lock, probe: ScriptedProbe([[1]: [.admitted]]))
        XCTAssertEqual(pinned.deadlinePlacement?.affinity, [1])
        XCTAssertEqual(pinned.deadlinePlacement?.pinned, true)
        for group in ["rtvirt", pinned.vmGroup, pinned.realtimeGroup, pinned.housekeepingGroup] {
            XCTAssertEqual(admin.read("cpuset/\(group)/cpuset.sched_load_balance"), "0", group)
        }
        XCTAssertNil(admin.read("cpuset/cpuset.sched_load_balance").flatMap { $0 == "0\n" ? nil : $0 }, "the root's is untouched")
        try pinned.remove()
        admin.assertOnlySubtreeWritten(mounts: ["cpu", "cpuset"])

        // Refusals are typed: no CAP_SYS_NICE.
        let third = try CgroupFixture()
        let (hierarchy3, backend3) = try third.v1()
        XCTAssertThrowsError(try CgroupPartition(plan: plan, hierarchy: hierarchy3, backend: backend3, lock: third.lock,
                                                 probe: ScriptedProbe([[1]: [.refused(.notPermitted)]]))) {
            XCTAssertEqual($0 as? CgroupError, .deadline(.notPermitted))
        }
        XCTAssertFalse(third.exists("cpuset/rtvirt"))
    }

    /// v1: the shared cpuset narrows to what the remaining VM groups hold.
    func testV1SharedCpusetIsNarrowedWhenAPartitionGoes() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, backend) = try fixture.v1()
        try fixture.write("cpuset/rtvirt/other-1/cpuset.cpus", "2-3\n")
        try fixture.write("cpuset/rtvirt/cpuset.cpus", "2-3\n")
        try fixture.write("cpu/rtvirt/other-1/cpu.rt_runtime_us", "100000\n")
        try fixture.write("cpu/rtvirt/cpu.rt_runtime_us", "100000\n")
        let plan = PartitionPlan(name: "narrow", realtimeCPUs: [1], housekeepingCPUs: [0], budget: budget)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, lock: fixture.lock)
        XCTAssertEqual(fixture.read("cpuset/rtvirt/cpuset.cpus"), "0-3")
        XCTAssertEqual(fixture.read("cpu/rtvirt/cpu.rt_runtime_us"), "600000")
        try partition.remove()
        XCTAssertEqual(fixture.read("cpuset/rtvirt/cpuset.cpus"), "2-3", "narrowed again")
        XCTAssertEqual(fixture.read("cpu/rtvirt/cpu.rt_runtime_us"), "100000")
        fixture.assertOnlySubtreeWritten(mounts: ["cpu", "cpuset"])
    }

    /// The shared runtime is checked under the lock: a budget the shared group cannot give any
    /// more is refused with a typed error, and nothing is written.
    func testBudgetThatNoLongerFitsIsRefusedUnderTheLock() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, backend) = try fixture.v1()
        try fixture.write("cpu/rtvirt/cpu.rt_runtime_us", "900000\n")
        try fixture.write("cpu/rtvirt/other-1/cpu.rt_runtime_us", "900000\n")
        let plan = PartitionPlan(name: "late", realtimeCPUs: [1], housekeepingCPUs: [0], budget: budget)
        XCTAssertThrowsError(try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, lock: fixture.lock)) {
            guard case .budgetUnavailable(let requested, _)? = $0 as? CgroupError else { return XCTFail("\($0)") }
            XCTAssertEqual(requested, 0.5)
        }
        XCTAssertFalse(fixture.writes.contains { $0.operation != "read" && $0.path.contains("late-") })
    }

    /// Threads of one process take the lock in turn: 4 threads × 25 partitions on one fixture,
    /// each a different name; the shared runtime and cpuset end where they began (gone).
    func testConcurrentPartitionsInOneProcessKeepTheSharedGroupConsistent() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, backend) = try fixture.v1()
        let failures = LockedValue<[String]>([])
        let lock = fixture.lock
        var threads: [HostThread] = []
        for index in 0..<4 {
            let plan = PartitionPlan(name: "t\(index)", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "10ms/100ms")!)
            threads.append(try HostThread(name: "partitions\(index)") {
                for _ in 0..<25 {
                    do {
                        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, lock: lock)
                        try partition.remove()
                    } catch {
                        failures.withLock { $0.append("\(error)") }
                    }
                }
            })
        }
        for thread in threads { XCTAssertTrue(thread.waitForFinish(timeoutNanoseconds: 120_000_000_000), "hang detector") }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertFalse(fixture.exists("cpu/rtvirt"), "clean: the last removal deleted the shared group")
        XCTAssertFalse(fixture.exists("cpuset/rtvirt"))
    }
}
