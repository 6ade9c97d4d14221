import CgroupScheduler
import Foundation
import RTVirtCore
import RealtimeVCPU
import RTVirtTesting
import XCTest
import RTVirtXCTestSupport

/// Skips unless this host has cgroup v1 cpuset and cpu with RT group scheduling, and we are root.
func realHierarchyOrSkip() throws -> CgroupHierarchy {
    let hierarchy = CgroupHierarchy.detect()
    guard geteuid() == 0 else { throw unavailable("real-cgroup test skipped: needs root to create cgroups") }
    guard hierarchy.v1Mount(for: "cpuset") != nil, hierarchy.v1Mount(for: "cpu") != nil, hierarchy.rtGroupScheduling else {
        throw unavailable("real-cgroup test skipped: cgroup v1 cpuset + cpu with cpu.rt_runtime_us is not available here (layout \(hierarchy.layout))")
    }
    return hierarchy
}

/// The online CPUs, or a skip when there is only one (a partition needs a second for housekeeping).
func twoCPUsOrSkip() throws -> CPUSet {
    let online = try ThreadScheduling.affinity()
    guard online.cpus.count >= 2 else { throw unavailable("real-cgroup test skipped: a second CPU is not available") }
    return online
}

final class PartitionPlanTests: XCTestCase {
    let online = CPUSet([0, 1, 2, 3])

    func testBudgetParsing() {
        XCTAssertEqual(RTBudget(parsing: "500ms/1s"), RTBudget(runtimeMicroseconds: 500_000, periodMicroseconds: 1_000_000))
        XCTAssertEqual(RTBudget(parsing: "50ms/100ms")?.fraction, 0.5)
        XCTAssertEqual(RTBudget(parsing: "950000us/1000000us")?.runtimeMicroseconds, 950_000)
        for bad in ["", "5", "5ms", "a/b", "-1ms/1s", "1ms/1s/1s", "1h/1s"] { XCTAssertNil(RTBudget(parsing: bad), bad) }
    }

    func testValidation() {
        func plan(_ rt: CPUSet, _ hk: CPUSet, _ budget: String = "50ms/100ms", name: String = "vm", node: Int? = nil) -> PartitionPlan {
            PartitionPlan(name: name, realtimeCPUs: rt, housekeepingCPUs: hk, budget: RTBudget(parsing: budget)!, memoryNode: node)
        }
        func error(_ plan: PartitionPlan, available: Double = 0.95) -> PartitionPlanError? {
            do { try plan.validate(onlineCPUs: online, nodeCount: 1, availableRTFraction: available); return nil } catch { return error }
        }
        XCTAssertNil(error(plan([1], [0])))
        XCTAssertEqual(error(plan([], [0])), .emptyCPUSet(which: "real-time"))
        XCTAssertEqual(error(plan([1], [])), .emptyCPUSet(which: "housekeeping"))
        XCTAssertEqual(error(plan([1, 7], [0])), .cpusNotOnline(which: "real-time", cpus: [1, 7], online: online))
        XCTAssertEqual(error(plan([1, 2], [2, 3])), .overlappingCPUSets([2]))
        XCTAssertEqual(error(plan([1], [0], "0ms/1s")), .invalidBudget(RTBudget(runtimeMicroseconds: 0, periodMicroseconds: 1_000_000)))
        XCTAssertEqual(error(plan([1], [0], "2s/1s")), .invalidBudget(RTBudget(runtimeMicroseconds: 2_000_000, periodMicroseconds: 1_000_000)))
        XCTAssertEqual(error(plan([1], [0], "900ms/1s"), available: 0.5), .budgetExceedsParent(requested: 0.9, available: 0.5))
        XCTAssertEqual(error(plan([1], [0], name: "../etc")), .invalidName("../etc"))
        XCTAssertEqual(error(plan([1], [0], name: "")), .invalidName(""))
        XCTAssertEqual(error(plan([1], [0], node: 3)), .noSuchMemoryNode(3, nodeCount: 1))
    }

    func testPlannedWritesRaiseParentsFirst() {
        let plan = PartitionPlan(name: "vm", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "50ms/100ms")!)
        let writes = CgroupPartition.plannedWrites(plan, vmGroup: "rtvirt/vm-42", currentParentRuntime: 100_000)
        let runtimes = writes.filter { $0.file == "cpu.rt_runtime_us" }.map(\.description)
        XCTAssertEqual(runtimes, ["cpu:/rtvirt/cpu.rt_runtime_us = 600000", "cpu:/rtvirt/vm-42/cpu.rt_runtime_us = 500000",
                                  "cpu:/rtvirt/vm-42/realtime/cpu.rt_runtime_us = 50000",
                                  "cpu:/rtvirt/vm-42/housekeeping/cpu.rt_runtime_us = 0"])
        XCTAssertTrue(writes.allSatisfy { $0.group.hasPrefix("rtvirt") })
        let shared = CgroupPartition.plannedWrites(plan, vmGroup: "rtvirt/vm-43", currentParentRuntime: 0, currentParentCPUs: [2, 3])
        XCTAssertEqual(shared.first { $0.group == "rtvirt" && $0.file == "cpuset.cpus" }?.value, "0-3",
                       "the shared group keeps the CPUs of partitions already there")
        let realtimePeriod = writes.firstIndex { $0.group.hasSuffix("realtime") && $0.file == "cpu.rt_period_us" }!
        let realtimeRuntime = writes.firstIndex { $0.group.hasSuffix("realtime") && $0.file == "cpu.rt_runtime_us" }!
        XCTAssertLessThan(realtimePeriod, realtimeRuntime)
    }
}

final class CgroupFileBackendTests: XCTestCase {
    /// The partition's logic against a temporary directory standing for the mount points.
    func testCreateRemoveAndReclaimInATemporaryTree() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-cg-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        for controller in ["cpu", "cpuset"] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(controller)", withIntermediateDirectories: true)
        }
        try "950000\n".write(toFile: "\(root)/cpu/cpu.rt_runtime_us", atomically: true, encoding: .utf8)
        let backend = FileCgroupBackend(mounts: ["cpu": "\(root)/cpu", "cpuset": "\(root)/cpuset"])
        let hierarchy = CgroupHierarchy(layout: .v1, mounts: [CgroupMount(path: "\(root)/cpu", version: 1, controllers: ["cpu"]),
                                                              CgroupMount(path: "\(root)/cpuset", version: 1, controllers: ["cpuset"])],
                                        rtGroupScheduling: true)
        // A partition left by a process that died (no pid 2^30 exists) is reclaimed at the next start.
        for controller in ["cpu", "cpuset"] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(controller)/rtvirt/dead-1073741824/realtime", withIntermediateDirectories: true)
        }
        let plan = PartitionPlan(name: "test", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(root)/cpu/rtvirt/dead-1073741824"), "the leftover was reclaimed")
        let group = "\(root)/cpu/\(partition.realtimeGroup)"
        XCTAssertEqual(try String(contentsOfFile: group + "/cpu.rt_runtime_us", encoding: .utf8), "50000")
        XCTAssertEqual(try String(contentsOfFile: "\(root)/cpuset/\(partition.housekeepingGroup)/cpuset.cpus", encoding: .utf8), "0")
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: "rtvirt", controller: "cpu"), "500000")
        XCTAssertEqual(CgroupPartition.leftoverGroups(backend: backend), [], "our own process is alive")
        XCTAssertEqual(CgroupPartition.leftoverGroups(backend: backend, isAlive: { _ in false }), [partition.vmGroup])
        try partition.remove()
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(root)/cpu/rtvirt"), "everything under rtvirt is gone")
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(root)/cpu/cpu.rt_runtime_us"), "nothing outside it is touched")
        XCTAssertThrowsError(try backend.createGroup("../escape", controller: "cpu")) {
            XCTAssertEqual($0 as? CgroupError, .outsideSubtree("../escape"))
        }
        XCTAssertThrowsError(try backend.setValue("1", name: "tasks", group: "", controller: "cpu"))
    }

    /// A group path from /proc/<pid>/cgroup can hold ".." (a group outside the cgroup
    /// namespace): moving a task there is refused, and nothing outside the subtree is created.
    func testMovingOutRefusesDotDotAndCreatesNothing() throws {
        let fixture = try CgroupFixture()
        let (_, backend) = try fixture.v1()
        try fixture.write("cpu/outside/placeholder", "")
        for path in ["..", "../escape", "outside/../../escape", "/../escape"] {
            XCTAssertThrowsError(try backend.moveOut(thread: 1_073_741_824, to: path, controller: "cpu")) {
                XCTAssertEqual($0 as? CgroupError, .unsafeGroupPath(path))
            }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: fixture.root + "/escape/tasks"), "nothing created outside the mount")
        XCTAssertFalse(FileManager.default.fileExists(atPath: fixture.root + "/tasks"))
        // A group without a tasks file (no real cgroup): an error, and no file is created.
        XCTAssertThrowsError(try backend.moveOut(thread: 1_073_741_824, to: "outside", controller: "cpu")) {
            guard case .file(_, _, .noSuchFileOrDirectory)? = $0 as? CgroupError else { return XCTFail("\($0)") }
        }
        XCTAssertFalse(fixture.exists("cpu/outside/tasks"), "a control file is never created outside the subtree")
    }

    /// A task with no home of its own outside the subtree (here: gone from /proc) goes to the
    /// VMM process's home, never to the hierarchy's root.
    func testATaskWithoutAHomeGoesToTheVMMsHomeNotTheRoot() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, backend) = try fixture.v1()
        for controller in ["cpu", "cpuset"] { try fixture.write("\(controller)/vmm/tasks", "") }
        let plan = PartitionPlan(name: "home", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, lock: fixture.lock,
                                            processHome: ["cpu": "vmm", "cpuset": "vmm"])
        try fixture.write("cpu/\(partition.realtimeGroup)/tasks", "1073741824\n") // no such task: no /proc/<pid>/cgroup
        XCTAssertEqual(try partition.evictUnplacedTasks(), [1_073_741_824])
        XCTAssertEqual(fixture.read("cpu/vmm/tasks"), "1073741824", "moved to the VMM's home")
        XCTAssertEqual(fixture.read("cpu/tasks"), "", "nothing moved to the root")
        try fixture.write("cpu/\(partition.realtimeGroup)/tasks", "") // the kernel would have moved it
        try partition.remove()
        XCTAssertFalse(fixture.exists("cpu/rtvirt"))
        XCTAssertFalse(fixture.writes.contains { $0.path == "cpu/tasks" || $0.path == "cpuset/tasks" }, "the roots were never written")
    }

    /// With no home outside the subtree at all, such a task stays and the partition is busy.
    func testATaskWithNoHomeAnywhereKeepsThePartitionBusy() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, backend) = try fixture.v1()
        let plan = PartitionPlan(name: "homeless", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, lock: fixture.lock,
                                            processHome: ["cpu": "rtvirt/elsewhere", "cpuset": "rtvirt/elsewhere"]) // inside: not a home
        try fixture.write("cpu/\(partition.realtimeGroup)/tasks", "1073741824\n")
        XCTAssertThrowsError(try partition.evictUnplacedTasks()) {
            XCTAssertEqual($0 as? CgroupError, .partitionBusy(group: partition.realtimeGroup, tasks: [1_073_741_824]))
        }
        XCTAssertThrowsError(try partition.remove()) {
            XCTAssertEqual($0 as? CgroupError, .partitionBusy(group: partition.realtimeGroup, tasks: [1_073_741_824]))
        }
        XCTAssertEqual(fixture.read("cpu/tasks"), "", "nothing moved to the root")
        XCTAssertFalse(fixture.writes.contains { $0.path == "cpu/tasks" || $0.path == "cpuset/tasks" }, "the roots were never written")
        try fixture.write("cpu/\(partition.realtimeGroup)/tasks", "")
        try partition.remove()
        XCTAssertFalse(fixture.exists("cpu/rtvirt"))
    }

    /// A task the partition cannot move out keeps the whole partition, budgets included; once
    /// it is gone, removal completes.
    func testRemovalWithATaskItCannotMoveGivesNoBudgetBack() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-cg-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        for controller in ["cpu", "cpuset"] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(controller)", withIntermediateDirectories: true)
        }
        let backend = FileCgroupBackend(mounts: ["cpu": "\(root)/cpu", "cpuset": "\(root)/cpuset"])
        let hierarchy = CgroupHierarchy(layout: .v1, mounts: [CgroupMount(path: "\(root)/cpu", version: 1, controllers: ["cpu"]),
                                                              CgroupMount(path: "\(root)/cpuset", version: 1, controllers: ["cpuset"])],
                                        rtGroupScheduling: true)
        let plan = PartitionPlan(name: "busy", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        // A plain file does not let the task go the way the kernel would: it stays listed.
        let stuck = "\(root)/cpu/\(partition.realtimeGroup)/tasks"
        try "1073741824\n".write(toFile: stuck, atomically: true, encoding: .utf8)
        XCTAssertEqual(backend.tasks(in: partition.realtimeGroup, controller: "cpu"), [1_073_741_824])
        XCTAssertThrowsError(try partition.remove()) {
            XCTAssertEqual($0 as? CgroupError, .partitionBusy(group: partition.realtimeGroup, tasks: [1_073_741_824]))
        }
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: partition.realtimeGroup, controller: "cpu"), "50000")
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: partition.vmGroup, controller: "cpu"), "500000")
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: "rtvirt", controller: "cpu"), "500000", "no budget given back")
        try FileManager.default.removeItem(atPath: stuck)
        try partition.remove()
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(root)/cpu/rtvirt"), "the second removal completes")
        XCTAssertNoThrow(try partition.remove(), "removing again does nothing")
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(root)/cpu/rtvirt"))
    }

    /// The shared group keeps exactly what the VM groups left in it hold.
    func testRemovalSettlesTheSharedGroupOnWhatRemains() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-cg-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        for controller in ["cpu", "cpuset"] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(controller)/rtvirt/other-1", withIntermediateDirectories: true)
        }
        // Another live VM group holds 200 ms; the shared group has 400 ms (drifted: 200 ms too many).
        try "200000\n".write(toFile: "\(root)/cpu/rtvirt/other-1/cpu.rt_runtime_us", atomically: true, encoding: .utf8)
        try "400000\n".write(toFile: "\(root)/cpu/rtvirt/cpu.rt_runtime_us", atomically: true, encoding: .utf8)
        let backend = FileCgroupBackend(mounts: ["cpu": "\(root)/cpu", "cpuset": "\(root)/cpuset"])
        let hierarchy = CgroupHierarchy(layout: .v1, mounts: [CgroupMount(path: "\(root)/cpu", version: 1, controllers: ["cpu"]),
                                                              CgroupMount(path: "\(root)/cpuset", version: 1, controllers: ["cpuset"])],
                                        rtGroupScheduling: true)
        let plan = PartitionPlan(name: "settle", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend) // pid 1 is alive: other-1 is no leftover
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: "rtvirt", controller: "cpu"), "900000")
        try partition.remove()
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: "rtvirt", controller: "cpu"), "200000")
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(root)/cpu/rtvirt/other-1"), "the other VM's group stays")
    }

    func testV2OnlyHierarchyIsRefusedWithAReason() {
        // Was `.missingController("cpuset")`, which is wrong on v2: there the cpuset
        // controller is a v2 one, and only the rtGroup mode is impossible (CgroupV2PartitionTests).
        let backend = FileCgroupBackend(mounts: [:])
        let hierarchy = CgroupHierarchy(layout: .v2, mounts: [CgroupMount(path: "/sys/fs/cgroup", version: 2, controllers: ["cpuset", "cpu"])],
                                        rtGroupScheduling: false, v2DelegatedControllers: ["cpuset", "cpu"])
        let plan = PartitionPlan(name: "v2", realtimeCPUs: [1], housekeepingCPUs: [0], budget: RTBudget(parsing: "50ms/100ms")!, budgetMode: .rtGroup)
        XCTAssertThrowsError(try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)) {
            XCTAssertEqual($0 as? CgroupError, .noRTGroupScheduling)
        }
    }
}

final class RealCgroupPartitionTests: XCTestCase {
    func testPartitionOnTheRealHierarchyPlacesThreadsAndCleansUp() throws {
        let hierarchy = try realHierarchyOrSkip()
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let online = try twoCPUsOrSkip()
        let plan = PartitionPlan(name: "unittest", realtimeCPUs: [online.cpus.last!], housekeepingCPUs: [online.cpus.first!],
                                 budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        defer { _ = try? partition.remove() }
        let phase = ConditionLock(0)
        let thread = try HostThread(name: "in-partition") {
            phase.wait(until: { $0 == 1 }) { _, _ in }
        }
        let tid = thread.kernelThreadID
        try partition.assignRealtimeThread(tid)
        let cgroups = try String(contentsOfFile: "/proc/self/task/\(tid)/cgroup", encoding: .utf8)
        XCTAssertTrue(cgroups.contains("cpu:/\(partition.realtimeGroup)"), cgroups)
        XCTAssertTrue(cgroups.contains("cpuset:/\(partition.realtimeGroup)"), cgroups)
        XCTAssertEqual(try ThreadScheduling.affinity(of: tid), plan.realtimeCPUs, "the cpuset confines the thread")
        try ThreadScheduling.setSchedulingClass(.fifo(priority: 10), of: tid)
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tid), .fifo(priority: 10))
        try ThreadScheduling.setSchedulingClass(.other(), of: tid)
        try partition.releaseThread(tid)
        let after = try String(contentsOfFile: "/proc/self/task/\(tid)/cgroup", encoding: .utf8)
        XCTAssertFalse(after.contains("rtvirt"), after)
        phase.withLockAndBroadcast { $0 = 1 }
        thread.join()
        let milliseconds = Double(try partition.remove()) / 1e6
        print("partition removed in \(milliseconds) ms")
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/unittest-") }, [])
    }

    /// Threads created from a real-time thread in the partition inherit its groups (and here
    /// its class: it is set without reset-on-fork). The partition moves them out when asked,
    /// when the next thread is assigned, and when it is removed without any help.
    func testTasksItDidNotPlaceAreMovedOutAndRemovalGivesTheWholeBudgetBack() throws {
        let hierarchy = try realHierarchyOrSkip()
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let online = try twoCPUsOrSkip()
        let sharedBefore = backend.value(name: "cpu.rt_runtime_us", group: "rtvirt", controller: "cpu")
        let plan = PartitionPlan(name: "unplaced", realtimeCPUs: [online.cpus.last!], housekeepingCPUs: [online.cpus.first!],
                                 budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        defer { _ = try? partition.remove() }
        let children = LockedValue<[pid_t]>([])
        let phase = ConditionLock(0)
        // The parent starts a child when the phase is 1 and when it is 3, answering with 2 and 4;
        // everyone ends at 9.
        let parent = try HostThread(name: "rt-parent") {
            var childThreads: [HostThread] = []
            for request in [1, 3] {
                phase.wait(until: { $0 == request }) { _, _ in }
                if let child = try? HostThread(name: "rt-child", { phase.wait(until: { $0 == 9 }) { _, _ in } }) {
                    childThreads.append(child)
                    children.withLock { $0.append(child.kernelThreadID) }
                }
                phase.withLockAndBroadcast { $0 = request + 1 }
            }
            phase.wait(until: { $0 == 9 }) { _, _ in }
            for child in childThreads { child.join() }
        }
        defer { phase.withLockAndBroadcast { $0 = 9 }; parent.join() }
        try partition.assignRealtimeThread(parent.kernelThreadID)
        try ThreadScheduling.setSchedulingClass(.fifo(priority: 10), of: parent.kernelThreadID) // no reset-on-fork
        phase.withLockAndBroadcast { $0 = 1 }
        phase.wait(until: { $0 == 2 }) { _, _ in }
        let first = children.withLock { $0[0] }
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: first), .fifo(priority: 10), "the child inherited the class")
        XCTAssertEqual(Set(backend.tasks(in: partition.realtimeGroup, controller: "cpu")), [parent.kernelThreadID, first])
        XCTAssertEqual(try partition.evictUnplacedTasks(), [first])
        XCTAssertEqual(backend.tasks(in: partition.realtimeGroup, controller: "cpu"), [parent.kernelThreadID])
        XCTAssertEqual(backend.tasks(in: partition.realtimeGroup, controller: "cpuset"), [parent.kernelThreadID])
        XCTAssertTrue(backend.tasks(in: partition.housekeepingGroup, controller: "cpu").contains(first))
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: first), .other(nice: 0))
        XCTAssertEqual(try ThreadScheduling.affinity(of: first), plan.housekeepingCPUs, "the housekeeping cpuset confines it")

        // A second child; then the partition is removed while the parent is still SCHED_FIFO in it.
        phase.withLockAndBroadcast { $0 = 3 }
        phase.wait(until: { $0 == 4 }) { _, _ in }
        XCTAssertEqual(children.withLock { $0.count }, 2)
        let second = children.withLock { $0[1] }
        XCTAssertTrue(backend.tasks(in: partition.realtimeGroup, controller: "cpu").contains(second))
        try partition.remove()
        for tid in [parent.kernelThreadID, first, second] {
            let groups = try String(contentsOfFile: "/proc/self/task/\(tid)/cgroup", encoding: .utf8)
            XCTAssertFalse(groups.contains("rtvirt/unplaced-"), "\(tid) is out: \(groups)")
        }
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: second), .other(nice: 0), "an unplaced task leaves with SCHED_OTHER")
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: parent.kernelThreadID), .fifo(priority: 10),
                       "the assigned thread goes back where it came from as it is")
        try ThreadScheduling.setSchedulingClass(.other(), of: parent.kernelThreadID)
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/unplaced-") }, [])
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: "rtvirt", controller: "cpu"), sharedBefore,
                       "the whole budget went back (or the shared group went away with the last partition)")
    }
}

/// The deadline mode and mode selection on the real host (these machines are hybrid: the v1 path).
final class RealDeadlinePartitionTests: XCTestCase {
    func testTheHybridHostTakesTheV1PathAndAutomaticPicksRTGroup() throws {
        let hierarchy = try realHierarchyOrSkip()
        let online = try twoCPUsOrSkip()
        XCTAssertFalse(hierarchy.usesV2Partitions, "v1 controllers present: partitions are built on v1")
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let plan = PartitionPlan(name: "automatic", realtimeCPUs: [online.cpus.last!], housekeepingCPUs: [online.cpus.first!],
                                 budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        defer { _ = try? partition.remove() }
        XCTAssertEqual(partition.cgroupVersion, 1)
        XCTAssertEqual(partition.budgetMode.mode, .rtGroup, "\(partition.budgetMode)")
        XCTAssertTrue(partition.budgetMode.reason.hasPrefix("automatic"))
        XCTAssertTrue(backend.groupExists(partition.realtimeGroup, controller: "cpu"))
        XCTAssertFalse(backend.groupExists(partition.vmGroup, controller: unifiedHierarchy), "nothing in the v2 hierarchy")
        try partition.remove()
    }

    /// A vCPU-like thread in a deadline partition gets SCHED_DEADLINE with the budget and the
    /// affinity the kernel admits; here (the root cpuset balances load over every CPU) that is
    /// the root domain's, and the partition says so. Restoring and removal leave nothing.
    func testADeadlineThreadRunsWithTheRootDomainsAffinityAndIsRestored() throws {
        let hierarchy = try realHierarchyOrSkip()
        let online = try twoCPUsOrSkip()
        guard KernelDeadlineProbe.hasSysNice() else { throw unavailable("deadline test skipped: SCHED_DEADLINE needs CAP_SYS_NICE") }
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let rtCPU = online.cpus.last!
        let plan = PartitionPlan(name: "deadlinetest", realtimeCPUs: [rtCPU], housekeepingCPUs: [online.cpus.first!],
                                 budget: RTBudget(parsing: "20ms/100ms")!, budgetMode: .deadline)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        defer { _ = try? partition.remove() }
        let placement = try XCTUnwrap(partition.deadlinePlacement)
        print("deadline placement: \(placement)")
        let rootBalances = backend.value(name: "cpuset.sched_load_balance", group: "", controller: "cpuset") != "0"
        if rootBalances {
            XCTAssertFalse(placement.pinned, "one root domain: a deadline thread cannot be pinned to CPU \(rtCPU)")
            XCTAssertEqual(placement.affinity, online)
            XCTAssertTrue(placement.message.contains("root domain's affinity"), placement.message)
        }
        XCTAssertFalse(backend.groupExists(partition.vmGroup, controller: "cpu"), "no RT group in the deadline mode")
        let outcome = LockedValue<Result<(SchedulingClass, CPUSet, Bool), any Error>?>(nil)
        let phase = ConditionLock(0)
        let thread = try HostThread(name: "dl-vcpu") {
            do {
                let saved = try RealtimeThreadPolicy.apply(RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [rtCPU]), partition: partition)
                outcome.withLock { $0 = .success((try! ThreadScheduling.schedulingClass(), try! ThreadScheduling.affinity(),
                                                  try! ThreadScheduling.resetsOnFork())) } // the calling thread's own, just set
                RealtimeThreadPolicy.restore(saved, partition: partition)
            } catch {
                outcome.withLock { $0 = .failure(error) }
            }
            phase.withLockAndBroadcast { $0 = 1 }
        }
        thread.join()
        let (schedulingClass, affinity, resetOnFork) = try XCTUnwrap(outcome.withLock { $0 }).get()
        XCTAssertEqual(schedulingClass, .deadline(runtime: 20_000_000, deadline: 100_000_000, period: 100_000_000))
        XCTAssertEqual(affinity, placement.affinity)
        XCTAssertTrue(resetOnFork)
        try partition.remove()
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/deadlinetest-") }, [])
    }

    /// The kernel's rule, seen directly: pinned to one CPU of a larger root domain, a
    /// SCHED_DEADLINE thread is refused (EPERM), and the probe says why.
    func testTheProbeSeesTheRootDomainRule() throws {
        _ = try realHierarchyOrSkip()
        let online = try twoCPUsOrSkip()
        guard KernelDeadlineProbe.hasSysNice() else { throw unavailable("probe test skipped: SCHED_DEADLINE needs CAP_SYS_NICE") }
        let parameters = DeadlineParameters(budget: RTBudget(parsing: "5ms/10ms")!)
        XCTAssertEqual(KernelDeadlineProbe().probe(parameters, cpus: online, place: nil), .admitted)
        let backend = FileCgroupBackend(hierarchy: CgroupHierarchy.detect())
        if backend.value(name: "cpuset.sched_load_balance", group: "", controller: "cpuset") != "0" {
            XCTAssertEqual(KernelDeadlineProbe().probe(parameters, cpus: [online.cpus.last!], place: nil),
                           .refused(.affinityBelowRootDomain(affinity: [online.cpus.last!], rootDomain: nil)))
        }
    }
}
