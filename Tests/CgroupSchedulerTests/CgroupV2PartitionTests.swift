import CgroupScheduler
import Foundation
import RealtimeVCPU
import RTVirtCore
import XCTest

/// cgroup v2 partitions against a fixture cgroupfs of v2 layout (these machines are hybrid:
/// their v2 hierarchy has no cpuset), through the same backend protocol as the real one.
final class CgroupV2PartitionTests: XCTestCase {
    let pid = getpid()
    let budget = RTBudget(parsing: "50ms/100ms")!

    func plan(_ name: String = "vm", rt: CPUSet = [1], housekeeping: CPUSet = [0], mode: BudgetMode = .automatic) -> PartitionPlan {
        PartitionPlan(name: name, realtimeCPUs: rt, housekeepingCPUs: housekeeping, budget: budget, budgetMode: mode)
    }

    func make(_ fixture: CgroupFixture, answers: [String: String] = [:], probe: ScriptedProbe? = nil)
        throws -> (CgroupHierarchy, SimulatedV2Kernel, ScriptedProbe) {
        let hierarchy = try fixture.v2()
        try fixture.write("unified/cpuset.cpus.isolated", "\n") // a kernel with cpuset.cpus.exclusive (6.7+)
        let kernel = SimulatedV2Kernel(fixture: fixture)
        kernel.partitionAnswers = answers
        let probe = probe ?? ScriptedProbe([[1]: [.admitted]])
        probe.afterPlace = { kernel.exit($0) }
        return (hierarchy, kernel, probe)
    }

    func testV2PartitionWritesInOrderAndReadsBackTheKernelsState() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, kernel, probe) = try make(fixture)
        XCTAssertTrue(hierarchy.usesV2Partitions)
        let partition = try CgroupPartition(plan: plan(), hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)
        XCTAssertEqual(partition.budgetMode.mode, .deadline, "automatic picks deadline on v2: \(partition.budgetMode)")
        XCTAssertEqual(partition.cgroupVersion, 2)
        let vm = "unified/rtvirt/vm-\(pid)"
        let expected: [String] = [
            "mkdir unified/rtvirt",
            "write unified/rtvirt/cgroup.subtree_control = +cpuset",
            "write unified/rtvirt/cpuset.cpus = 0-1",
            "write unified/rtvirt/cpuset.mems = 0",
            "write unified/rtvirt/cpuset.cpus.exclusive = 1",
            "mkdir \(vm)",
            "write \(vm)/cgroup.subtree_control = +cpuset",
            "write \(vm)/cpuset.cpus = 0-1",
            "write \(vm)/cpuset.mems = 0",
            "write \(vm)/cpuset.cpus.exclusive = 1",
            "mkdir \(vm)/realtime",
            "write \(vm)/realtime/cgroup.type = threaded",
            "write \(vm)/realtime/cpuset.cpus = 1",
            "write \(vm)/realtime/cpuset.mems = 0",
            "write \(vm)/realtime/cpuset.cpus.exclusive = 1",
            "mkdir \(vm)/housekeeping",
            "write \(vm)/housekeeping/cgroup.type = threaded",
            "write \(vm)/housekeeping/cpuset.cpus = 0",
            "write \(vm)/housekeeping/cpuset.mems = 0",
            "write \(vm)/cgroup.procs = \(pid)",
            "write \(vm)/realtime/cpuset.cpus.partition = isolated",
            "write \(vm)/realtime/cgroup.threads = \(ScriptedProbe.probeThread)",
        ]
        XCTAssertEqual(fixture.writes.map(\.description), expected)
        XCTAssertEqual(fixture.read("unified/rtvirt/cgroup.subtree_control"), "+cpuset")
        XCTAssertEqual(fixture.read("unified/cgroup.subtree_control"), "cpuset cpu memory pids\n", "the root's is never written")
        XCTAssertEqual(partition.deadlinePlacement?.partitionState, "isolated")
        XCTAssertEqual(partition.deadlinePlacement?.affinity, [1])
        XCTAssertEqual(partition.deadlinePlacement?.pinned, true)
        XCTAssertEqual(probe.asked.map(\.cpus), [[1]])
        XCTAssertEqual(probe.asked.map(\.placed), [true], "the probe thread joined the real-time group first")
        XCTAssertEqual(kernel.group(of: pid), "rtvirt/vm-\(pid)", "the process joined its VM group (the threaded domain)")

        // A real-time thread gets SCHED_DEADLINE with the budget, pinned to the partition.
        let policy = partition.realtimePolicy(for: RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [1], timerSlackNanoseconds: 1))
        XCTAssertEqual(policy.schedulingClass, .deadline(runtime: 50_000_000, deadline: 100_000_000, period: 100_000_000))
        XCTAssertEqual(policy.cpus, [1])
        XCTAssertEqual(policy.timerSlackNanoseconds, 1)

        // Threads move inside the process's threaded subtree (cgroup.threads).
        try partition.assignRealtimeThread(4242)
        XCTAssertEqual(kernel.group(of: 4242), "rtvirt/vm-\(pid)/realtime")
        try partition.releaseThread(4242)
        XCTAssertEqual(kernel.group(of: 4242), "rtvirt/vm-\(pid)", "back into the VM group, not out of the subtree")
        kernel.exit(4242)

        try partition.remove()
        XCTAssertEqual(kernel.group(of: pid), "", "the process went back to its own group")
        XCTAssertFalse(fixture.exists("unified/rtvirt"), "everything under rtvirt is gone")
        XCTAssertTrue(fixture.writes.contains { $0.description == "write \(vm)/realtime/cpuset.cpus.partition = member" },
                      "the partition gave its CPUs back before its group went")
        fixture.assertOnlySubtreeWritten(mounts: ["unified"])
    }

    func testIsolatedThatIsInvalidOrRefusedFallsBackToRoot() throws {
        // The kernel reports "isolated invalid": root is tried next.
        let fixture = try CgroupFixture()
        let (hierarchy, kernel, probe) = try make(fixture, answers: ["isolated": "isolated invalid (partition config conflicts with housekeeping setup)"])
        let partition = try CgroupPartition(plan: plan(), hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)
        XCTAssertEqual(partition.deadlinePlacement?.partitionState, "root")
        try partition.remove()

        // Isolated CPUs share the default root domain: when the kernel will not admit a pinned
        // deadline thread there, a root partition (a root domain of its own) is made instead.
        let second = try CgroupFixture()
        let refusing = ScriptedProbe([[1]: [.refused(.affinityBelowRootDomain(affinity: [1], rootDomain: nil)), .admitted]])
        let (hierarchy2, kernel2, probe2) = try make(second, probe: refusing)
        let rooted = try CgroupPartition(plan: plan(), hierarchy: hierarchy2, backend: kernel2, lock: second.lock, probe: probe2)
        XCTAssertEqual(rooted.deadlinePlacement?.partitionState, "root")
        XCTAssertEqual(refusing.asked.count, 2)
        try rooted.remove()

        // A kernel without "isolated" (before 5.15) refuses the write.
        let third = try CgroupFixture()
        let (hierarchy3, kernel3, probe3) = try make(third)
        kernel3.writesRefused = ["cpuset.cpus.partition=isolated"]
        let old = try CgroupPartition(plan: plan(), hierarchy: hierarchy3, backend: kernel3, lock: third.lock, probe: probe3)
        XCTAssertEqual(old.deadlinePlacement?.partitionState, "root")
        try old.remove()
        for fixture in [fixture, second, third] { fixture.assertOnlySubtreeWritten(mounts: ["unified"]) }
    }

    func testRootInvalidIsATypedErrorAndNothingIsLeft() throws {
        let fixture = try CgroupFixture()
        let state = "root invalid (Cpu list in cpuset.cpus not exclusive)"
        let (hierarchy, kernel, probe) = try make(fixture, answers: ["isolated": "isolated invalid (Cpu list in cpuset.cpus not exclusive)", "root": state])
        XCTAssertThrowsError(try CgroupPartition(plan: plan(), hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)) {
            XCTAssertEqual($0 as? CgroupError, .partitionInvalid(group: "rtvirt/vm-\(self.pid)/realtime", state: state))
            XCTAssertTrue("\($0)".contains("root invalid (Cpu list in cpuset.cpus not exclusive)"), "\($0)")
        }
        XCTAssertFalse(fixture.exists("unified/rtvirt"), "the failed partition was removed")
        XCTAssertEqual(kernel.group(of: pid), "", "and the process went back")
        fixture.assertOnlySubtreeWritten(mounts: ["unified"])
    }

    func testDeadlineRefusalsAreTypedErrors() throws {
        let fixture = try CgroupFixture()
        let busy = ScriptedProbe([[1]: [.refused(.bandwidthUnavailable(cpus: [1]))]])
        let (hierarchy, kernel, probe) = try make(fixture, probe: busy)
        XCTAssertThrowsError(try CgroupPartition(plan: plan(), hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)) {
            XCTAssertEqual($0 as? CgroupError, .deadline(.bandwidthUnavailable(cpus: [1])))
            XCTAssertTrue("\($0)".contains("EBUSY"), "\($0)")
        }
        XCTAssertFalse(fixture.exists("unified/rtvirt"))
        // Parameters the kernel would refuse with EINVAL are refused before anything is written.
        let tiny = PartitionPlan(name: "tiny", realtimeCPUs: [1], housekeepingCPUs: [0],
                                 budget: RTBudget(runtimeMicroseconds: 10, periodMicroseconds: 50), budgetMode: .deadline)
        let before = fixture.writes.count
        XCTAssertThrowsError(try CgroupPartition(plan: tiny, hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)) {
            guard case .deadline(.periodOutOfRange(50, _, _))? = $0 as? CgroupError else { return XCTFail("\($0)") }
        }
        XCTAssertEqual(fixture.writes.count, before, "nothing was created for it")
    }

    func testV2ErrorsSayWhatIsMissing() throws {
        let fixture = try CgroupFixture()
        let kernel = SimulatedV2Kernel(fixture: fixture)
        // The hybrid host's case: the v2 hierarchy has no cpuset (it is bound to v1).
        let hybridLike = try fixture.v2(controllers: ["hugetlb"], delegated: [])
        XCTAssertThrowsError(try CgroupPartition(plan: plan(), hierarchy: hybridLike, backend: kernel, lock: fixture.lock)) {
            XCTAssertEqual($0 as? CgroupError, .v2ControllerUnavailable(controller: "cpuset", available: ["hugetlb"]))
            XCTAssertFalse("\($0)".contains("missing"), "not the old misleading 'missing cpuset controller'")
        }
        // The root offers cpuset but does not delegate it: RTVirt says what an administrator would write.
        let undelegated = try fixture.v2(delegated: ["memory", "pids"])
        XCTAssertThrowsError(try CgroupPartition(plan: plan(), hierarchy: undelegated, backend: kernel, lock: fixture.lock)) {
            XCTAssertEqual($0 as? CgroupError, .v2ControllerNotDelegated(controller: "cpuset", file: fixture.root + "/unified/cgroup.subtree_control"))
            XCTAssertTrue("\($0)".contains("echo +cpuset > \(fixture.root)/unified/cgroup.subtree_control"), "\($0)")
        }
        // rtGroup asked for on v2: there is no per-group RT budget there.
        let v2 = try fixture.v2()
        XCTAssertThrowsError(try CgroupPartition(plan: plan(mode: .rtGroup), hierarchy: v2, backend: kernel, lock: fixture.lock)) {
            XCTAssertEqual($0 as? CgroupError, .noRTGroupScheduling)
            XCTAssertTrue("\($0)".contains("deadline"), "the message names the substitute: \($0)")
        }
        XCTAssertTrue(fixture.writes.isEmpty, "nothing was written: \(fixture.writes)")
    }

    func testTheSharedGroupIsNarrowedWhenAPartitionGoes() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, kernel, probe) = try make(fixture)
        // Another VMM (pid 1 is alive) holds CPUs 2-3 with CPU 3 exclusive.
        try kernel.createGroup("rtvirt", controller: unifiedHierarchy)
        try kernel.createGroup("rtvirt/other-1", controller: unifiedHierarchy)
        try fixture.write("unified/rtvirt/cpuset.cpus", "2-3\n")
        try fixture.write("unified/rtvirt/cpuset.cpus.exclusive", "3\n")
        try fixture.write("unified/rtvirt/other-1/cpuset.cpus", "2-3\n")
        try fixture.write("unified/rtvirt/other-1/cpuset.cpus.exclusive", "3\n")
        let partition = try CgroupPartition(plan: plan(), hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)
        XCTAssertEqual(fixture.read("unified/rtvirt/cpuset.cpus"), "0-3")
        XCTAssertEqual(fixture.read("unified/rtvirt/cpuset.cpus.exclusive"), "1,3")
        try partition.remove()
        XCTAssertEqual(fixture.read("unified/rtvirt/cpuset.cpus"), "2-3", "narrowed to what remains")
        XCTAssertEqual(fixture.read("unified/rtvirt/cpuset.cpus.exclusive"), "3")
        XCTAssertTrue(fixture.exists("unified/rtvirt/other-1"), "the other VM's group stays")
        let narrowing = fixture.writes.map(\.description).filter { $0.hasPrefix("write unified/rtvirt/cpuset.cpus") }.suffix(2)
        XCTAssertEqual(Array(narrowing), ["write unified/rtvirt/cpuset.cpus.exclusive = 3", "write unified/rtvirt/cpuset.cpus = 2-3"],
                       "exclusive CPUs narrow before CPUs")
        fixture.assertOnlySubtreeWritten(mounts: ["unified"])
    }

    func testOnePartitionPerProcessOnV2() throws {
        let fixture = try CgroupFixture()
        let (hierarchy, kernel, probe) = try make(fixture)
        let first = try CgroupPartition(plan: plan("one"), hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)
        XCTAssertThrowsError(try CgroupPartition(plan: plan("two"), hierarchy: hierarchy, backend: kernel, lock: fixture.lock, probe: probe)) {
            XCTAssertEqual($0 as? CgroupError, .oneV2PartitionPerProcess(existing: "rtvirt/one-\(self.pid)"))
        }
        try first.remove()
        XCTAssertFalse(fixture.exists("unified/rtvirt"))
    }
}
