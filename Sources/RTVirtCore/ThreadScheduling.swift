#if canImport(Glibc)
import Glibc
#endif
import CLinuxSupport
import SystemPackage

/// A Linux scheduling class with its parameters.
public enum SchedulingClass: Equatable, Sendable, CustomStringConvertible {
    /// SCHED_OTHER (CFS) with a nice value.
    case other(nice: Int32 = 0)
    /// SCHED_FIFO at priority 1...99.
    case fifo(priority: Int32)
    /// SCHED_RR at priority 1...99.
    case roundRobin(priority: Int32)
    /// SCHED_DEADLINE: `runtime` of CPU every `period`, finished by `deadline` (nanoseconds).
    case deadline(runtime: UInt64, deadline: UInt64, period: UInt64)

    public var description: String {
        switch self {
        case .other(let nice): return "SCHED_OTHER (nice \(nice))"
        case .fifo(let priority): return "SCHED_FIFO \(priority)"
        case .roundRobin(let priority): return "SCHED_RR \(priority)"
        case let .deadline(runtime, deadline, period): return "SCHED_DEADLINE \(runtime)/\(deadline)/\(period) ns"
        }
    }
}

/// Why a scheduling change failed.
public enum SchedulingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The kernel said EPERM: real-time classes need root, CAP_SYS_NICE or RLIMIT_RTPRIO.
    case notPermitted(what: String, rtprioLimit: UInt64?)
    /// A parameter the kernel rejected (EINVAL), or one out of range before asking it.
    case invalid(what: String)
    /// The RT budget cannot admit this thread (EBUSY from SCHED_DEADLINE admission control,
    /// or a cgroup without `cpu.rt_runtime_us`), or, with EPERM for a privileged process,
    /// SCHED_DEADLINE refused an affinity that does not span the thread's root domain.
    case notAdmitted(what: String, errno: Errno)
    /// Another failure.
    case failed(what: String, errno: Errno)

    public var description: String {
        switch self {
        case let .notPermitted(what, limit):
            return "\(what): not permitted (EPERM); run as root, grant CAP_SYS_NICE, or raise RLIMIT_RTPRIO (now \(limit.map(String.init) ?? "unlimited"))"
        case let .invalid(what): return "\(what): invalid parameters"
        case let .notAdmitted(what, errno): return "\(what): not admitted by the RT budget (\(errno))"
        case let .failed(what, errno): return "\(what): \(errno)"
        }
    }

    static func from(_ code: Int32, _ what: String) -> SchedulingError {
        switch code {
        case EPERM: return .notPermitted(what: what, rtprioLimit: ThreadScheduling.rtprioLimit())
        case EINVAL: return .invalid(what: what)
        case EBUSY: return .notAdmitted(what: what, errno: Errno(rawValue: code))
        default: return .failed(what: what, errno: Errno(rawValue: code))
        }
    }
}

/// Scheduling of threads by kernel thread id (0: the calling thread): class, affinity,
/// timer slack, memory locking. Thin typed wrappers over the syscalls.
public enum ThreadScheduling {
    /// The scheduling class of thread `tid`.
    public static func schedulingClass(of tid: pid_t = 0) throws(SchedulingError) -> SchedulingClass {
        var policy: UInt32 = 0, runtime: UInt64 = 0, deadline: UInt64 = 0, period: UInt64 = 0
        let result = rtv_get_deadline(tid, &policy, &runtime, &deadline, &period)
        guard result == 0 else { throw .from(result, "sched_getattr") }
        var parameters = sched_param()
        guard sched_getparam(tid, &parameters) == 0 else { throw .from(errno, "sched_getparam") }
        switch Int32(policy) {
        case SCHED_FIFO: return .fifo(priority: parameters.sched_priority)
        case SCHED_RR: return .roundRobin(priority: parameters.sched_priority)
        case rtv_sched_deadline(): return .deadline(runtime: runtime, deadline: deadline, period: period)
        default:
            errno = 0
            let nice = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid))
            return .other(nice: nice)
        }
    }

    /// Sets the scheduling class of thread `tid`.
    ///
    /// With `resetOnFork` (`SCHED_RESET_ON_FORK`, `SCHED_FLAG_RESET_ON_FORK` for SCHED_DEADLINE)
    /// every task created from the thread starts as SCHED_OTHER with nice 0 instead of
    /// inheriting the class: threads the thread starts, and kernel workers of the process created
    /// from it, such as KVM's `kvm-nx-lpage-recovery`. A SCHED_DEADLINE thread without it cannot
    /// create tasks at all (EAGAIN). Setting a class without it clears it.
    public static func setSchedulingClass(_ schedulingClass: SchedulingClass, of tid: pid_t = 0,
                                          resetOnFork: Bool = false) throws(SchedulingError) {
        let what = "set \(schedulingClass) on thread \(tid == 0 ? rtv_gettid() : tid)"
        let flag = resetOnFork ? rtv_sched_reset_on_fork() : 0
        switch schedulingClass {
        case .other(let nice):
            var parameters = sched_param(sched_priority: 0)
            guard sched_setscheduler(tid, SCHED_OTHER | flag, &parameters) == 0 else { throw .from(errno, what) }
            guard setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid), nice) == 0 else { throw .from(errno, what) }
        case .fifo(let priority), .roundRobin(let priority):
            guard (1...99).contains(priority) else { throw .invalid(what: what) }
            var parameters = sched_param(sched_priority: priority)
            let policy = schedulingClass == .fifo(priority: priority) ? SCHED_FIFO : SCHED_RR
            guard sched_setscheduler(tid, policy | flag, &parameters) == 0 else { throw .from(errno, what) }
        case let .deadline(runtime, deadline, period):
            guard runtime > 0, runtime <= deadline, deadline <= period else { throw .invalid(what: what) }
            let result = rtv_set_deadline(tid, runtime, deadline, period, resetOnFork ? 1 : 0)
            // As root, EPERM from SCHED_DEADLINE means the affinity is narrower than the root domain.
            if result == EPERM && geteuid() == 0 {
                throw .notAdmitted(what: what + ": its affinity does not span its root domain (a SCHED_DEADLINE thread cannot be pinned to part of one)",
                                   errno: Errno(rawValue: result))
            }
            guard result == 0 else { throw .from(result, what) }
        }
    }

    /// Whether tasks created from thread `tid` start as SCHED_OTHER (`SCHED_RESET_ON_FORK`).
    public static func resetsOnFork(_ tid: pid_t = 0) throws(SchedulingError) -> Bool {
        var flag: Int32 = 0
        let result = rtv_get_reset_on_fork(tid, &flag)
        guard result == 0 else { throw .from(result, "sched_getattr") }
        return flag != 0
    }

    /// Whether `schedulingClass` is a real-time class (FIFO, RR or DEADLINE).
    public static func isRealtime(_ schedulingClass: SchedulingClass) -> Bool {
        if case .other = schedulingClass { return false }
        return true
    }

    /// The CPUs thread `tid` may run on.
    public static func affinity(of tid: pid_t = 0) throws(SchedulingError) -> CPUSet {
        var cpus = [Int32](repeating: 0, count: 1024)
        let count = cpus.withUnsafeMutableBufferPointer { rtv_get_affinity(tid, $0.baseAddress, Int32($0.count)) }
        guard count >= 0 else { throw .from(-count, "sched_getaffinity") }
        return CPUSet(cpus.prefix(Int(count)).map(Int.init))
    }

    /// Pins thread `tid` to `cpus`.
    public static func setAffinity(_ cpus: CPUSet, of tid: pid_t = 0) throws(SchedulingError) {
        let numbers = cpus.cpus.map(Int32.init)
        let result = numbers.withUnsafeBufferPointer { rtv_set_affinity(tid, $0.baseAddress, Int32($0.count)) }
        guard result == 0 else { throw .from(result, "pin thread to CPUs \(cpus)") }
    }

    /// The calling thread's timer slack, nanoseconds.
    public static func timerSlack() -> UInt64 { UInt64(max(rtv_get_timer_slack(), 0)) }

    /// Sets the calling thread's timer slack (0: the kernel's minimum, 1 ns).
    public static func setTimerSlack(_ nanoseconds: UInt64) throws(SchedulingError) {
        let result = rtv_set_timer_slack(UInt(nanoseconds))
        guard result == 0 else { throw .from(result, "set timer slack") }
    }

    /// Locks all current and future memory of the process (`mlockall`).
    public static func lockAllMemory() throws(SchedulingError) {
        let result = rtv_mlockall()
        guard result == 0 else { throw .from(result, "mlockall") }
    }

    /// Unlocks all memory of the process (`munlockall`); undoes `lockAllMemory`.
    public static func unlockAllMemory() { _ = munlockall() }

    /// The calling thread's kernel id.
    public static func currentThreadID() -> pid_t { rtv_gettid() }

    /// `RLIMIT_RTPRIO` soft limit (nil: unlimited).
    public static func rtprioLimit() -> UInt64? {
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(UInt32(rtv_rlimit_rtprio())), &limit)
        return limit.rlim_cur == rlim_t.max ? nil : UInt64(limit.rlim_cur) // RLIM_INFINITY is all ones
    }
}
