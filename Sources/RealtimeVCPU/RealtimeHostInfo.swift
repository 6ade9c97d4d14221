#if canImport(Glibc)
import RTVirtCore
import Glibc
#endif
import CLinuxSupport

/// What the host offers real-time threads: scheduling limits, preemption, isolated CPUs,
/// and the time-stamp counter.
public struct RealtimeHostInfo: Codable, Equatable, Sendable {
    /// Whether this process could switch a thread to SCHED_FIFO (tried on a scratch thread).
    public var fifoPermitted: Bool
    /// Why not, when it could not (for example "EPERM: RLIMIT_RTPRIO is 0 and not root").
    public var fifoError: String?
    /// `RLIMIT_RTPRIO` soft limit (nil: unlimited).
    public var rtprioLimit: UInt64?
    /// Effective user id.
    public var effectiveUserID: UInt32
    /// `kernel.sched_rt_runtime_us` (-1: no limit).
    public var schedRTRuntimeMicroseconds: Int64?
    /// `kernel.sched_rt_period_us`.
    public var schedRTPeriodMicroseconds: Int64?
    /// The kernel's preemption model as far as it can be told.
    public var preemption: String
    /// Kernel version string (`/proc/sys/kernel/version`).
    public var kernelVersion: String?
    /// Online CPUs.
    public var onlineCPUs: String
    /// Count of online CPUs.
    public var onlineCPUCount: Int
    /// CPUs isolated from the scheduler (`isolcpus`).
    public var isolatedCPUs: String
    /// CPUs with the tick off when busy (`nohz_full`).
    public var nohzFullCPUs: String
    /// TSC-related CPU flags present: constant_tsc, nonstop_tsc, tsc_known_freq, tsc_deadline_timer.
    public var tscFlags: [String]
    /// Whether the CPU flags say the host itself is a virtual machine.
    public var hostIsVirtualized: Bool
    /// The current clock source.
    public var clocksource: String?
    /// This thread's timer slack in nanoseconds (SCHED_OTHER threads default to 50 000).
    public var defaultTimerSlackNanoseconds: Int64

    /// Inspects the host through `files` (the real `/` by default) and a scratch thread.
    public static func inspect(files: HostFiles = HostFiles()) -> RealtimeHostInfo {
        let probe = RealtimeSchedulingProbe.tryFIFO()
        let online = files.readLine("/sys/devices/system/cpu/online") ?? ""
        let flags = cpuFlags(cpuinfo: files.read("/proc/cpuinfo") ?? "")
        return RealtimeHostInfo(
            fifoPermitted: probe.permitted, fifoError: probe.error,
            rtprioLimit: ThreadScheduling.rtprioLimit(),
            effectiveUserID: geteuid(),
            schedRTRuntimeMicroseconds: files.readInteger("/proc/sys/kernel/sched_rt_runtime_us"),
            schedRTPeriodMicroseconds: files.readInteger("/proc/sys/kernel/sched_rt_period_us"),
            preemption: preemptionModel(files: files),
            kernelVersion: files.readLine("/proc/sys/kernel/version"),
            onlineCPUs: online, onlineCPUCount: CPUSet(listFormat: online)?.cpus.count ?? 0,
            isolatedCPUs: files.readLine("/sys/devices/system/cpu/isolated") ?? "",
            nohzFullCPUs: files.readLine("/sys/devices/system/cpu/nohz_full") ?? "",
            tscFlags: ["constant_tsc", "nonstop_tsc", "tsc_known_freq", "tsc_deadline_timer"].filter(flags.contains),
            hostIsVirtualized: flags.contains("hypervisor"),
            clocksource: files.readLine("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
            defaultTimerSlackNanoseconds: Int64(rtv_get_timer_slack()))
    }

    /// The flags of the first processor in `/proc/cpuinfo`.
    public static func cpuFlags(cpuinfo: String) -> Set<String> {
        for line in cpuinfo.split(separator: "\n") where line.hasPrefix("flags") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            return Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
        }
        return []
    }

    /// The preemption model: from debugfs when mounted (`/sys/kernel/debug/sched/preempt`,
    /// current mode in parentheses), else from the kernel version string and command line.
    public static func preemptionModel(files: HostFiles) -> String {
        let version = files.readLine("/proc/sys/kernel/version") ?? ""
        if version.contains("PREEMPT_RT") { return "PREEMPT_RT" }
        var mode: String?
        if let modes = files.readLine("/sys/kernel/debug/sched/preempt"),
           let open = modes.firstIndex(of: "("), let close = modes.firstIndex(of: ")"), open < close {
            mode = String(modes[modes.index(after: open)..<close])
        } else if let cmdline = files.readLine("/proc/cmdline"),
                  let argument = cmdline.split(separator: " ").first(where: { $0.hasPrefix("preempt=") }) {
            mode = String(argument.dropFirst("preempt=".count))
        }
        if version.contains("PREEMPT_DYNAMIC") {
            return "PREEMPT_DYNAMIC (mode: \(mode ?? "unknown; mount debugfs to read /sys/kernel/debug/sched/preempt"))"
        }
        if version.contains("PREEMPT") { return "PREEMPT (full)" }
        return mode.map { "preempt=\($0)" } ?? "none or voluntary (not PREEMPT_RT)"
    }
}

/// Tries real-time scheduling on a scratch thread, leaving the calling thread untouched.
public enum RealtimeSchedulingProbe {
    /// Whether a scratch thread could become SCHED_FIFO priority 1, and the error if not.
    public static func tryFIFO() -> (permitted: Bool, error: String?) {
        let result = ConditionLock<Int32?>(nil)
        do {
            let thread = try HostThread(name: "rtvirt-probe") {
                var parameters = sched_param(sched_priority: 1)
                let code = pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameters)
                result.withLockAndBroadcast { $0 = code }
            }
            thread.join()
        } catch {
            return (false, "\(error)")
        }
        let code = result.withLock { $0 } ?? -1
        if code == 0 { return (true, nil) }
        let name = code == EPERM ? "EPERM" : "error \(code)"
        return (false, "\(name): not root and RLIMIT_RTPRIO does not allow priority 1 (raise it with ulimit -r or run as root)")
    }
}
