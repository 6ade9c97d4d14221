// The pieces main.swift uses: the VMM's own report device, a look at the vCPU's thread, the
// partition, and the report of a run.
#if canImport(Glibc)
import Glibc
#endif
import CgroupScheduler
import RealtimeVCPU
import RTVirtCore

/// Why the VMM stopped before it could report.
enum MinimalVMMError: Error, CustomStringConvertible {
    /// No real-time partition on this host, and one was required.
    case noPartition(String)
    /// The guest did not exit in time.
    case guestDidNotFinish(seconds: Int)

    var description: String {
        switch self {
        case .noPartition(let reason): return "no real-time partition: \(reason)"
        case .guestDidNotFinish(let seconds): return "the guest did not exit within \(seconds) s"
        }
    }
}

/// This VMM's own device: every write to its port appends the value, as a signed 32-bit number.
/// Called on the vCPU's (real-time) thread; the storage is reserved up front.
final class ReportPort: BusDevice {
    private let storage: LockedValue<[Int32]>

    /// A port with room for `capacity` values before it allocates.
    init(capacity: Int) {
        var values: [Int32] = []
        values.reserveCapacity(capacity)
        storage = LockedValue(values)
    }

    /// What the guest reported, in order.
    var values: [Int32] { storage.withLock { $0 } }

    func read(_ access: BusAccess) -> UInt64 { 0 }

    func write(_ access: BusAccess, value: UInt64) -> BusWriteResult {
        storage.withLock { $0.append(Int32(truncatingIfNeeded: value)) }
        return .handled
    }
}

/// A thread's scheduling and cgroup, as seen on the thread itself.
struct VCPUThreadState: Sendable {
    var threadID: pid_t
    var schedulingClass: SchedulingClass?
    var cpus: CPUSet?
    /// Its group in the cgroup v1 `cpu` hierarchy, for example `/rtvirt/minimalvmm-42/realtime`.
    var cpuGroup: String?

    /// The calling thread's state.
    static func current() -> VCPUThreadState {
        // /proc/thread-self/cgroup has one "id:controllers:path" line per hierarchy.
        let lines = HostFiles().read("/proc/thread-self/cgroup")?.split(separator: "\n") ?? []
        let cpuLine = lines.map { $0.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false) }
            .first { $0.count == 3 && $0[1].split(separator: ",").contains("cpu") }
        return VCPUThreadState(threadID: ThreadScheduling.currentThreadID(), schedulingClass: try? ThreadScheduling.schedulingClass(),
                               cpus: try? ThreadScheduling.affinity(), cpuGroup: cpuLine.map { String($0[2]) })
    }
}

/// Creates a real-time partition: `realtimeCPU` with `budget`, the other allowed CPUs for
/// housekeeping. Throws `.noPartition` with the reason when this host cannot have one (cgroup
/// v2 only, no RT group scheduling, not root, a single CPU, not enough RT budget left).
func makePartition(realtimeCPU: Int, allowed: CPUSet, budget: RTBudget) throws(MinimalVMMError) -> CgroupPartition {
    let hierarchy = CgroupHierarchy.detect()
    guard hierarchy.rtGroupScheduling else {
        throw .noPartition("no cgroup v1 `cpu` controller with cpu.rt_runtime_us (cgroup layout: \(hierarchy.layout.rawValue))")
    }
    let plan = PartitionPlan(name: "minimalvmm", realtimeCPUs: [realtimeCPU],
                             housekeepingCPUs: CPUSet(allowed.cpus.filter { $0 != realtimeCPU }), budget: budget)
    do {
        let backend = try LibcgroupBackend(hierarchy: hierarchy)
        try plan.validate(hierarchy: hierarchy, backend: backend) // CPUs, NUMA node, the RT share still free
        return try CgroupPartition(plan: plan, hierarchy: hierarchy, backend: backend)
    } catch {
        throw .noPartition("\(error)") // a CgroupError or a PartitionPlanError
    }
}

/// Prints what happened and returns the checks that failed.
func report(_ run: GuestRun, realtimeCPU: Int, partition: CgroupPartition?) -> [String] {
    var failures: [String] = []
    func check(_ condition: Bool, _ failure: @autoclosure () -> String) { if !condition { failures.append(failure()) } }

    // The guest's exit status: 0, or 0x100 × step + the VMRPC status of the call that failed.
    if case .guestRequested(let status) = run.stopReason {
        let steps = [1: "null", 2: "clock.read", 3: "timer.sleepUntil"]
        print("guest exited with status \(status)"
              + (status == 0 ? " after \(sleeps) sleeps of \(periodMicroseconds) µs"
                             : " (\(steps[Int(status >> 8)] ?? "?") failed with VMRPC status \(status & 0xFF))"))
        check(status == 0, "the guest's exit status is \(status)")
    } else {
        check(false, "the vCPU stopped without the guest's exit: \(run.stopReason)")
    }

    let stats = run.vmrpc
    print("VMRPC: \(stats.doorbells) doorbells, \(stats.completedCalls) calls completed, \(stats.parkedCalls) parked the vCPU "
          + "in the host, \(stats.rejectedCalls) rejected")
    check(stats.completedCalls == sleeps + 2 && stats.rejectedCalls == 0, "VMRPC calls: \(stats)")
    check(stats.parkedCalls == sleeps, "\(stats.parkedCalls) of \(sleeps) sleeps parked the vCPU")

    if let thread = run.vcpuThread {
        print("vCPU 0 thread \(thread.threadID): \(thread.schedulingClass.map { "\($0)" } ?? "?"), CPUs \(thread.cpus.map { "\($0)" } ?? "?"), "
              + "cgroup cpu:\(thread.cpuGroup ?? "?") (seen on the thread when the guest had exited)")
        check(thread.schedulingClass == .fifo(priority: 50), "the vCPU thread was not SCHED_FIFO 50")
        check(thread.cpus == [realtimeCPU], "the vCPU thread was not pinned to CPU \(realtimeCPU)")
        if let partition { check(thread.cpuGroup == "/" + partition.realtimeGroup, "the vCPU thread was not in \(partition.realtimeGroup)") }
    } else {
        check(false, "the vCPU thread never ended its run")
    }

    // Per sleep the guest reported (arrival, lateness) in nanoseconds by its own TSC.
    check(run.reports.count == Int(sleeps) * 2, "the guest reported \(run.reports.count) values, not \(sleeps * 2)")
    let arrivals = stride(from: 0, to: run.reports.count, by: 2).map { run.reports[$0] }
    let lateness = stride(from: 1, to: run.reports.count, by: 2).map { run.reports[$0] }
    if !lateness.isEmpty {
        print("sleeps, by the guest's TSC against its deadlines (µs):    p50     p99     max")
        print("  back from the host (negative: released early)     " + summary(arrivals))
        print("  after the guest's spin to its deadline            " + summary(lateness))
        check(lateness.allSatisfy { $0 >= 0 }, "a sleep ended before its deadline")
    }
    return failures
}

/// p50, p99 and max of nanosecond values, in microseconds.
func summary(_ nanoseconds: [Int32]) -> String {
    let sorted = nanoseconds.sorted()
    func at(_ fraction: Double) -> Int32 { sorted[min(sorted.count - 1, Int(fraction * Double(sorted.count)))] }
    return [at(0.5), at(0.99), sorted.last!].map { microseconds($0) }.joined(separator: " ")
}

func microseconds(_ nanoseconds: Int32) -> String {
    let text = String(Double(Int(Double(nanoseconds) / 100)) / 10) // one decimal
    return String(repeating: " ", count: max(0, 7 - text.count)) + text
}

func milliseconds(_ nanoseconds: UInt64) -> String { String(Double(nanoseconds / 10_000) / 100) }
