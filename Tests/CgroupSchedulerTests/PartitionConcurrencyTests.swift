import CgroupScheduler
import Foundation
import Logging
import RTVirtCore
import XCTest

/// Two VMMs at once: two processes create and remove partitions on the real hierarchy 100
/// times each, one in the rtGroup mode and one in the deadline mode, so that both the shared
/// RT runtime and the shared cpuset are read, modified and written concurrently. The cross-
/// process lock keeps every step consistent: no error, and nothing is left.
final class PartitionConcurrencyTests: XCTestCase {
    static let childVariable = "RTVIRT_PARTITION_CYCLES_CHILD"
    static let cycles = 100

    func testTwoProcessesCreateAndRemovePartitionsConcurrently() throws {
        if ProcessInfo.processInfo.environment[Self.childVariable] != nil { return } // a child runs the helper only
        let hierarchy = try realHierarchyOrSkip()
        let online = try twoCPUsOrSkip()
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let runtimeBefore = backend.value(name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu")
        let cpusetBefore = backend.value(name: "cpuset.cpus", group: projectSubtree, controller: "cpuset")
        var children: [(Process, Pipe)] = []
        for (name, mode) in [("concrt", "rtGroup"), ("concdl", "deadline")] {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/proc/self/exe")
            process.arguments = ["CgroupSchedulerTests.PartitionConcurrencyTests/testHelperCyclesPartitions"]
            var environment = ProcessInfo.processInfo.environment
            environment[Self.childVariable] = "\(name):\(mode):\(online.cpus.last!):\(online.cpus.first!)"
            process.environment = environment
            let output = Pipe()
            process.standardOutput = output
            process.standardError = output
            try process.run()
            children.append((process, output))
        }
        for (process, output) in children {
            let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            XCTAssertEqual(process.terminationStatus, 0, "a child failed:\n\(text.suffix(3000))")
            XCTAssertTrue(text.contains("cycled \(Self.cycles) partitions"), "the child did its cycles:\n\(text.suffix(3000))")
        }
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/conc") }, [], "no partition is left")
        XCTAssertEqual(backend.value(name: "cpu.rt_runtime_us", group: projectSubtree, controller: "cpu"), runtimeBefore,
                       "the shared RT runtime is back where it was (or gone with the shared group)")
        XCTAssertEqual(backend.value(name: "cpuset.cpus", group: projectSubtree, controller: "cpuset"), cpusetBefore)
        if CgroupPartition.allVMGroups(backend: backend).isEmpty {
            XCTAssertFalse(backend.groupExists(projectSubtree, controller: "cpu"), "clean: rtvirt is gone")
            XCTAssertFalse(backend.groupExists(projectSubtree, controller: "cpuset"))
        }
    }

    /// Runs only in a child process started by the test above.
    func testHelperCyclesPartitions() throws {
        guard let spec = ProcessInfo.processInfo.environment[Self.childVariable] else { return }
        let fields = spec.split(separator: ":").map(String.init)
        let hierarchy = CgroupHierarchy.detect()
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let plan = PartitionPlan(name: fields[0], realtimeCPUs: [Int(fields[2])!], housekeepingCPUs: [Int(fields[3])!],
                                 budget: RTBudget(parsing: "20ms/100ms")!, budgetMode: BudgetMode(rawValue: fields[1])!)
        var logger = Logger(label: "rtvirt.cgroup")
        logger.logLevel = .error
        for cycle in 1...Self.cycles {
            do {
                let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend, logger: logger)
                try partition.remove()
            } catch {
                XCTFail("cycle \(cycle): \(error)")
                return
            }
        }
        print("cycled \(Self.cycles) partitions (\(fields[1]))")
    }
}
