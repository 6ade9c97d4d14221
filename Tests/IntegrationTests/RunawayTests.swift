import CgroupScheduler
import KVMBackend
import RTVirtCore
import RTVirtTesting
@testable import rtvirt
import XCTest
import RTVirtXCTestSupport

/// Root, cgroup v1 with RT group scheduling and cpuset, `/dev/kvm` and a second CPU, or a skip
/// naming the one that is absent. Any other error (a KVM ioctl that fails, say) fails the test.
func realHostOrSkip(test: String) throws -> (CgroupHierarchy, KVMSystem, CPUSet) {
    guard geteuid() == 0 else { throw unavailable("\(test) skipped: needs root for cgroups and SCHED_FIFO") }
    let hierarchy = CgroupHierarchy.detect()
    guard hierarchy.rtGroupScheduling, hierarchy.v1Mount(for: "cpuset") != nil else {
        throw unavailable("\(test) skipped: cgroup v1 cpu.rt_runtime_us and cpuset are not available here (layout \(hierarchy.layout))")
    }
    let system: KVMSystem
    do {
        system = try KVMSystem()
    } catch .deviceMissing(let path) {
        throw unavailable("\(test) skipped: \(path) is not present on this machine")
    } catch .permissionDenied(let path) {
        throw unavailable("\(test) skipped: no permission to open \(path)")
    }
    let online = try ThreadScheduling.affinity()
    guard online.cpus.count >= 2 else { throw unavailable("\(test) skipped: a second CPU is not available") }
    return (hierarchy, system, online)
}

/// `rtvirt runaway`, shorter: a guest spinning on a SCHED_FIFO vCPU inside a 50 % partition gets
/// at most its budget of the CPU, and the housekeeping thread on the same CPU the rest; the VM
/// is torn down before the partition, and everything is cleaned up.
final class RunawayTests: XCTestCase {
    func testPartitionKeepsTheCPUForHousekeepingAndCleansUp() throws {
        let (hierarchy, system, online) = try realHostOrSkip(test: "runaway test")
        let rtCPU = online.cpus.last!
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let plan = PartitionPlan(name: "runawaytest", realtimeCPUs: [rtCPU], housekeepingCPUs: CPUSet(online.cpus.dropLast()),
                                 budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        defer { _ = try? partition.remove() }
        let run = try RunawayCommand.measure(system: system, cpu: rtCPU, seconds: 1, partition: partition)
        let cleanupNanoseconds = run.stopNanoseconds + (try partition.remove())
        let phase = run.phase
        print("50 % partition: vCPU share \(phase.vcpuShare), housekeeping share \(phase.housekeepingShare), "
              + "steal \(phase.stealShare ?? -1); cleanup \(Double(cleanupNanoseconds) / 1e6) ms")
        // RT throttling caps the vCPU's CPU time at its budget (plus the odd tick); steal only lowers it.
        XCTAssertLessThanOrEqual(phase.vcpuShare, plan.budget.fraction + 0.05, "the vCPU got more than its RT budget")
        XCTAssertGreaterThan(phase.vcpuShare, 0.1, "the vCPU really spun")
        XCTAssertGreaterThan(phase.housekeepingShare + (phase.stealShare ?? 0), 0.3, "the budget must leave the housekeeping thread a real share")
        XCTAssertLessThan(Double(cleanupNanoseconds) / 1e9, 10, "hang detector")
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/runawaytest-") }, [])
    }

    /// The same spinning guest in the deadline budget mode: a SCHED_DEADLINE vCPU with a 50 %
    /// budget. Here no root domain of the RT CPU exists, so the vCPU may run on every CPU of the
    /// root domain, with a housekeeping thread spinning on each; the kernel's constant-bandwidth
    /// server holds it to its budget. The vCPU's share is the budget's property (<= 0.55); the
    /// housekeeping thread also shares its CPU with whatever else runs on this shared machine
    /// (builds), so the test asks for more than 0.3, as the rtGroup test does; `rtvirt runaway`
    /// reports the measured shares (README). The overrun watchdog reports the vCPU.
    func testDeadlineBudgetKeepsTheCPUForHousekeepingAndTheWatchdogReportsIt() throws {
        let (hierarchy, system, online) = try realHostOrSkip(test: "deadline runaway test")
        let rtCPU = online.cpus.last!
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let budget = RTBudget(parsing: "50ms/100ms")!
        let plan = PartitionPlan(name: "runawaydl", realtimeCPUs: [rtCPU], housekeepingCPUs: CPUSet(online.cpus.dropLast()),
                                 budget: budget, budgetMode: .deadline)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        defer { _ = try? partition.remove() }
        let run = try RunawayCommand.measure(system: system, cpu: rtCPU, seconds: 1, partition: partition,
                                             watchdog: OverrunWatchdog.Configuration(budget: budget, cpus: plan.housekeepingCPUs))
        let cleanupNanoseconds = run.stopNanoseconds + (try partition.remove())
        let phase = run.phase
        print("deadline 50 %: \(phase.vcpuScheduling); vCPU share \(phase.vcpuShare), housekeeping on CPU \(rtCPU) \(phase.housekeepingShare), "
              + "others \(phase.otherHousekeepingShares), steal \(phase.stealShare ?? -1), watchdog \(phase.watchdogDetectionMs ?? -1) ms; "
              + "cleanup \(Double(cleanupNanoseconds) / 1e6) ms")
        XCTAssertEqual(phase.mode, "deadline")
        XCTAssertTrue(phase.vcpuScheduling.hasPrefix("SCHED_DEADLINE"), phase.vcpuScheduling)
        XCTAssertLessThanOrEqual(phase.vcpuShare, budget.fraction + 0.05, "the vCPU got more than its deadline budget")
        XCTAssertGreaterThan(phase.vcpuShare, 0.1, "the vCPU really spun")
        XCTAssertGreaterThan(phase.housekeepingShare + (phase.stealShare ?? 0), 0.3, "housekeeping keeps a real share of the RT CPU")
        XCTAssertNotNil(phase.watchdogDetectionMs, "the watchdog reported the vCPU that used its whole budget")
        XCTAssertLessThan(Double(cleanupNanoseconds) / 1e9, 10, "hang detector")
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/runawaydl-") }, [])
    }

    func testRunawayTableShowsEveryPhase() {
        let phases = [RunawayReport.Phase(mode: "rtGroup", vcpuScheduling: "SCHED_FIFO 10, CPUs 1", seconds: 2, housekeepingShare: 0.5,
                                          vcpuShare: 0.5, stealShare: 0, watchdogDetectionMs: 300, watchdogAction: "report", cleanupMs: 60),
                      RunawayReport.Phase(mode: "deadline", vcpuScheduling: "SCHED_DEADLINE 50/100 ms, CPUs 0-1", seconds: 2,
                                          housekeepingShare: 0.53, otherHousekeepingShares: ["0": 0.5], vcpuShare: 0.5, stealShare: nil,
                                          watchdogAction: "report"),
                      RunawayReport.Phase(mode: "none", seconds: 2, housekeepingShare: 0.05, vcpuShare: 0.95)]
        let table = RunawayCommand.table(RunawayReport(kvmModule: "kvm_pvm", budget: "50 %", cpu: 1, seconds: 2, globalRTFraction: 0.95,
                                                       phases: phases, leftoverGroups: 0, numa: ""))
        let lines = table.split(separator: "\n")
        XCTAssertEqual(lines.count, 6, table)
        XCTAssertTrue(lines[1].hasPrefix("rtGroup") && lines[1].contains("report after 300 ms"), table)
        XCTAssertTrue(lines[2].hasPrefix("deadline") && lines[2].contains("0:0.50") && lines[2].contains("no report"), table)
        XCTAssertTrue(lines[3].hasPrefix("none") && lines[3].contains("0.95"), table)
    }

    func testStealColumnOfProcStat() {
        let stat = "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 10 0 20 30 0 0 1 99 0 0\ncpu1 11 0 21 31 0 0 2 123 0 0\nintr 5\n"
        XCTAssertEqual(CPUAccounting.stealTicks(stat, cpu: 1), 123)
        XCTAssertEqual(CPUAccounting.stealTicks(stat, cpu: 0), 99)
        XCTAssertNil(CPUAccounting.stealTicks(stat, cpu: 2))
        XCTAssertNil(CPUAccounting.stealTicks("cpu0 1 2 3\n", cpu: 0), "too few columns")
    }
}
