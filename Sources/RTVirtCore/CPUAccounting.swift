#if canImport(Glibc)
import Glibc
#endif

/// Where CPU time went, as Linux accounts it: a thread's time on a CPU (`schedstat`) and a
/// CPU's steal time (`/proc/stat`). The measurements of shares and costs (a vCPU's CPU
/// fraction, a housekeeping thread's share under an RT budget) all read these.
public enum CPUAccounting {
    /// Nanoseconds thread `threadID` of this process has run on a CPU
    /// (`/proc/self/task/TID/schedstat`), or nil when it cannot be read (the thread ended).
    public static func threadCPUNanoseconds(_ threadID: pid_t, files: HostFiles = HostFiles()) -> UInt64? {
        files.read("/proc/self/task/\(threadID)/schedstat").flatMap(schedstatRuntime)
    }

    /// Nanoseconds the calling thread has run on a CPU (`/proc/thread-self/schedstat`).
    public static func currentThreadCPUNanoseconds(files: HostFiles = HostFiles()) -> UInt64? {
        files.read("/proc/thread-self/schedstat").flatMap(schedstatRuntime)
    }

    /// Steal time of CPU `cpu` so far, nanoseconds (`/proc/stat`), or nil when not reported.
    public static func stealNanoseconds(cpu: Int, files: HostFiles = HostFiles()) -> UInt64? {
        guard let ticks = files.read("/proc/stat").flatMap({ stealTicks($0, cpu: cpu) }) else { return nil }
        return ticks * 1_000_000_000 / UInt64(max(1, sysconf(Int32(_SC_CLK_TCK))))
    }

    /// The first field of a `schedstat` file: nanoseconds spent on a CPU.
    public static func schedstatRuntime(_ text: String) -> UInt64? {
        text.split(whereSeparator: { $0 == " " || $0 == "\n" }).first.flatMap { UInt64($0) }
    }

    /// The steal column (the 8th number) of the `cpuN` line of `/proc/stat` text, in clock ticks.
    public static func stealTicks(_ stat: String, cpu: Int) -> UInt64? {
        let label = "cpu\(cpu)"
        for line in stat.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.first.map(String.init) == label, fields.count > 8 else { continue }
            return UInt64(fields[8])
        }
        return nil
    }
}
