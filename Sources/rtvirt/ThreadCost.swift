#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RTVirtCore

/// What the calling thread and its CPU had used at one moment: wall time, the thread's CPU
/// time (`/proc/thread-self/schedstat`), its involuntary context switches
/// (`getrusage(RUSAGE_THREAD)`) and the steal time of one CPU (`/proc/stat`).
struct ThreadCostSample: Sendable {
    var wallNanoseconds: UInt64
    var cpuNanoseconds: UInt64
    var involuntarySwitches: Int
    var stealNanoseconds: UInt64

    /// Samples the calling thread now; `cpu` is the CPU whose steal time is read.
    static func now(stealOfCPU cpu: Int, files: HostFiles = HostFiles()) -> ThreadCostSample {
        var usage = rusage()
        // RUSAGE_THREAD (1) is Linux's "the calling thread"; Glibc's enum is not imported by name.
        _ = getrusage(__rusage_who_t(1), &usage)
        return ThreadCostSample(wallNanoseconds: monotonicNanoseconds(),
                                cpuNanoseconds: CPUAccounting.currentThreadCPUNanoseconds(files: files) ?? 0,
                                involuntarySwitches: usage.ru_nivcsw,
                                stealNanoseconds: CPUAccounting.stealNanoseconds(cpu: cpu, files: files) ?? 0)
    }

    /// Samples the threads `threads` of this process from outside (their CPU times and
    /// involuntary switches added up); `cpu` is the CPU whose steal time is read. A thread that
    /// has ended contributes nothing.
    static func of(threads: [pid_t], stealOfCPU cpu: Int, files: HostFiles = HostFiles()) -> ThreadCostSample {
        var cpuTime: UInt64 = 0
        var switches = 0
        for thread in threads where thread > 0 {
            cpuTime += CPUAccounting.threadCPUNanoseconds(thread, files: files) ?? 0
            switches += files.read("/proc/self/task/\(thread)/status").flatMap(parseInvoluntarySwitches) ?? 0
        }
        return ThreadCostSample(wallNanoseconds: monotonicNanoseconds(), cpuNanoseconds: cpuTime, involuntarySwitches: switches,
                                stealNanoseconds: CPUAccounting.stealNanoseconds(cpu: cpu, files: files) ?? 0)
    }

    /// `nonvoluntary_ctxt_switches` of a `/proc/.../status` file.
    static func parseInvoluntarySwitches(_ text: String) -> Int? {
        for line in text.split(separator: "\n") where line.hasPrefix("nonvoluntary_ctxt_switches:") {
            return Int(line.dropFirst("nonvoluntary_ctxt_switches:".count).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }
}

/// What a thread used between two samples, added up over rounds.
struct ThreadCost: Sendable, Equatable {
    var wallNanoseconds: UInt64 = 0
    var cpuNanoseconds: UInt64 = 0
    var involuntarySwitches: Int = 0
    var stealNanoseconds: UInt64 = 0

    /// The difference `end - start` (counters that went backwards count as 0).
    init(from start: ThreadCostSample, to end: ThreadCostSample) {
        wallNanoseconds = end.wallNanoseconds &- start.wallNanoseconds
        cpuNanoseconds = end.cpuNanoseconds >= start.cpuNanoseconds ? end.cpuNanoseconds - start.cpuNanoseconds : 0
        involuntarySwitches = max(0, end.involuntarySwitches - start.involuntarySwitches)
        stealNanoseconds = end.stealNanoseconds >= start.stealNanoseconds ? end.stealNanoseconds - start.stealNanoseconds : 0
    }

    /// Nothing used.
    init() {}

    /// The thread's CPU time over wall time.
    var cpuFraction: Double { wallNanoseconds == 0 ? 0 : Double(cpuNanoseconds) / Double(wallNanoseconds) }
    /// The CPU's steal time over wall time.
    var stealFraction: Double { wallNanoseconds == 0 ? 0 : Double(stealNanoseconds) / Double(wallNanoseconds) }

    static func += (total: inout ThreadCost, round: ThreadCost) {
        total.wallNanoseconds += round.wallNanoseconds
        total.cpuNanoseconds += round.cpuNanoseconds
        total.involuntarySwitches += round.involuntarySwitches
        total.stealNanoseconds += round.stealNanoseconds
    }
}
