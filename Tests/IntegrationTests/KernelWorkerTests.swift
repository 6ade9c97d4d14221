import CgroupScheduler
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import XCTest
import RealtimeVCPU

/// One task of this process: its name, scheduling class and v1 `cpu`/`cpuset` groups.
struct ProcessTask {
    var tid: pid_t
    var name: String
    var schedulingClass: SchedulingClass?
    var groups: [String: String]

    /// Every task of this process now (threads that end meanwhile are left out).
    static func all() -> [ProcessTask] {
        let files = HostFiles()
        return files.list("/proc/self/task").compactMap { entry in
            guard let tid = pid_t(entry), let name = files.readLine("/proc/self/task/\(tid)/comm"),
                  let cgroup = files.read("/proc/self/task/\(tid)/cgroup") else { return nil }
            var groups: [String: String] = [:]
            for line in cgroup.split(separator: "\n") {
                let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
                guard fields.count == 3 else { continue }
                for controller in fields[1].split(separator: ",") { groups[String(controller)] = String(fields[2].dropFirst()) }
            }
            return ProcessTask(tid: tid, name: name, schedulingClass: try? ThreadScheduling.schedulingClass(of: tid), groups: groups)
        }
    }

    var isRealtime: Bool { schedulingClass.map(ThreadScheduling.isRealtime) ?? false }

    func isIn(_ group: String) -> Bool { groups["cpu"] == group || groups["cpuset"] == group }
}

/// KVM starts a per-VM worker (`kvm-nx-lpage-recovery`, Linux 6.13 and later) in the VMM's own
/// thread group, from the thread of the VM's first KVM_RUN. It must not land in the real-time
/// partition or class of the vCPU thread that runs first.
final class KernelWorkerTests: XCTestCase {
    func testAfterAnRTVCPUsFirstRunOnlyRTVCPUThreadsAreRealtime() throws {
        let (hierarchy, system, online) = try realHostOrSkip(test: "kernel worker test")
        let rtCPU = online.cpus.last!
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        let plan = PartitionPlan(name: "workertest", realtimeCPUs: [rtCPU], housekeepingCPUs: CPUSet(online.cpus.dropLast()),
                                 budget: RTBudget(parsing: "50ms/100ms")!)
        let partition = try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
        var workers: [ProcessTask] = []
        do {
            // One vCPU, real-time: its thread does the VM's first KVM_RUN.
            let machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: .spin)])
            let scheduler = RealtimeVCPUScheduler(policies: [0: RealtimePolicy(schedulingClass: .fifo(priority: 10), cpus: [rtCPU])],
                                                  partition: partition)
            let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(),
                                                  onThreadStart: scheduler.threadStarted, onThreadEnd: scheduler.threadEnded)
            defer { runner.stopAndWait() }
            let vcpuThread = runner.threads[0].kernelThreadID
            let deadline = monotonicNanoseconds() + 5_000_000_000
            while scheduler.status(vcpu: 0) == .untouched && monotonicNanoseconds() < deadline { usleep(1000) }
            XCTAssertEqual(scheduler.status(vcpu: 0), .applied(threadID: vcpuThread))
            usleep(100_000) // inside KVM_RUN, spinning in the guest
            XCTAssertEqual(runner.stopReasons, [nil])

            let tasks = ProcessTask.all()
            workers = tasks.filter { $0.name.hasPrefix("kvm-nx-lpage") }
            print("tasks: " + tasks.map { "\($0.tid) \($0.name) \($0.schedulingClass.map { "\($0)" } ?? "?") cpu:/\($0.groups["cpu"] ?? "?")" }
                .joined(separator: "; "))
            XCTAssertEqual(tasks.filter { $0.isIn(partition.realtimeGroup) }.map(\.tid), [vcpuThread],
                           "only the RT vCPU thread is in the real-time group")
            XCTAssertEqual(tasks.filter(\.isRealtime).map(\.tid), [vcpuThread], "only the RT vCPU thread has a real-time class")
            if workers.isEmpty { print("this kernel started no kvm-nx-lpage-recovery worker in the process") }
        }
        // The VM is gone (runner and machine released): its worker has stopped with it.
        let remaining = Set(ProcessTask.all().map(\.tid))
        XCTAssertTrue(workers.allSatisfy { !remaining.contains($0.tid) }, "KVM's worker ends with its VM")
        try partition.remove()
        XCTAssertEqual(CgroupPartition.allVMGroups(backend: backend).filter { $0.hasPrefix("rtvirt/workertest-") }, [])
    }
}
