import CgroupScheduler
import KVMBackend
import RTVirtCore
import RTVirtTesting
@testable import rtvirt
import XCTest

/// A skip for a host feature that is absent (a failure under `RTVIRT_REQUIRE_REAL=1`).
func unavailable(_ message: String) -> any Error {
    RealHostRequirement.isRequired ? RealHostRequirement.Missing(message) : XCTSkip(message)
}

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

/// `rtvirt runaway`, shorter: a guest spinning on a SCHED_FIFO vCPU inside a 50 % partition
/// leaves the housekeeping thread on the same CPU about half of it; everything is cleaned up.
final class RunawayTests: XCTestCase {
    func testPartitionKeepsTheCPUForHousekeepingAndCleansUp() throws {
        let (hierarchy, system, online) = try realHostOrSkip(test: "runaway test")
        let rtCPU = online.cpus.last!
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let plan = PartitionPlan(name: "runawaytest", realtimeCPUs: [rtCPU], housekeepingCPUs: CPUSet(online.cpus.dropLast()),
                                 budget: RTBudget(parsing: "50ms/100ms")!)
        let idle = try ProgressCounter.rate(cpu: rtCPU, seconds: 0.3)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        defer { _ = try? partition.remove() }
        var cleanupNanoseconds: UInt64 = 0
        let rate = try RunawayCommand.measure(system: system, cpu: rtCPU, seconds: 1, partition: partition) { stopStart in
            cleanupNanoseconds = monotonicNanoseconds() - stopStart + ((try? partition.remove()) ?? 0)
        } statBeforeCleanup: {}
        let share = rate / idle
        print("housekeeping share with a 50 % partition: \(share); cleanup \(Double(cleanupNanoseconds) / 1e6) ms")
        XCTAssertGreaterThan(share, 0.3, "the budget must leave the housekeeping thread a real share")
        XCTAssertLessThan(Double(cleanupNanoseconds) / 1e9, 1)
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/runawaytest-") }, [])
    }
}
