#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore

/// How a partition keeps a runaway real-time vCPU to its budget.
public enum BudgetMode: String, Codable, Sendable, CaseIterable, CustomStringConvertible {
    /// cgroup v1 RT group scheduling: the real-time group's `cpu.rt_runtime_us` /
    /// `cpu.rt_period_us`; vCPU threads keep their own class (SCHED_FIFO, SCHED_RR).
    case rtGroup
    /// SCHED_DEADLINE: each real-time vCPU thread runs with runtime / deadline / period taken
    /// from the plan's budget; the kernel's constant-bandwidth server throttles it, with or
    /// without RT group scheduling.
    case deadline
    /// What the host supports: `rtGroup` where it exists (it keeps the vCPU pinned to its CPUs
    /// on any host), else `deadline`. The partition reports the choice and why.
    case automatic

    public var description: String { rawValue }
}

/// A resolved budget mode (never `automatic`) and why it was chosen.
public struct BudgetModeChoice: Equatable, Sendable, CustomStringConvertible {
    /// `rtGroup` or `deadline`.
    public var mode: BudgetMode
    /// Why: what was asked for, and for `automatic`, what the host supports.
    public var reason: String

    public var description: String { "\(mode) (\(reason))" }
}

/// SCHED_DEADLINE parameters in nanoseconds, from an `RTBudget`: runtime = the budget's
/// runtime, deadline = period = the budget's period.
public struct DeadlineParameters: Equatable, Sendable, CustomStringConvertible {
    /// CPU time per period.
    public var runtimeNanoseconds: UInt64
    /// Relative deadline of each period's runtime.
    public var deadlineNanoseconds: UInt64
    /// Period.
    public var periodNanoseconds: UInt64

    /// The parameters of `budget` (implicit deadline: deadline = period).
    public init(budget: RTBudget) {
        runtimeNanoseconds = UInt64(max(budget.runtimeMicroseconds, 0)) * 1000
        periodNanoseconds = UInt64(max(budget.periodMicroseconds, 0)) * 1000
        deadlineNanoseconds = periodNanoseconds
    }

    /// The scheduling class a vCPU thread gets.
    public var schedulingClass: SchedulingClass {
        .deadline(runtime: runtimeNanoseconds, deadline: deadlineNanoseconds, period: periodNanoseconds)
    }

    /// runtime / period.
    public var bandwidth: Double { periodNanoseconds > 0 ? Double(runtimeNanoseconds) / Double(periodNanoseconds) : 0 }

    public var description: String {
        "SCHED_DEADLINE runtime \(runtimeNanoseconds / 1000) µs, deadline \(deadlineNanoseconds / 1000) µs, period \(periodNanoseconds / 1000) µs"
    }

    /// The kernel's admission rules that can be checked before asking it (`sched_setattr`
    /// checks the same and answers EINVAL): runtime of at least 1024 ns, runtime <= deadline
    /// <= period, a period within `sched_deadline_period_{min,max}_us`, and a bandwidth the
    /// root domain can hold at all (`sched_rt_runtime_us / sched_rt_period_us` of each of its
    /// `rootDomainCPUs` CPUs). What other SCHED_DEADLINE tasks already hold is known only to
    /// the kernel (EBUSY when the thread's class is set; `.bandwidthUnavailable`).
    public func validate(limits: DeadlineLimits, rootDomainCPUs: Int) throws(DeadlineAdmissionError) {
        guard runtimeNanoseconds >= 1024 else { throw .runtimeTooShort(nanoseconds: runtimeNanoseconds) }
        guard runtimeNanoseconds <= deadlineNanoseconds, deadlineNanoseconds <= periodNanoseconds else {
            throw .inconsistent(self)
        }
        let periodMicroseconds = periodNanoseconds / 1000
        guard periodMicroseconds >= limits.periodMinimumMicroseconds, periodMicroseconds <= limits.periodMaximumMicroseconds else {
            throw .periodOutOfRange(microseconds: periodMicroseconds, minimum: limits.periodMinimumMicroseconds,
                                    maximum: limits.periodMaximumMicroseconds)
        }
        if let ratio = limits.bandwidthPerCPU {
            let capacity = ratio * Double(max(rootDomainCPUs, 1))
            guard bandwidth <= capacity + 1e-9 else { throw .bandwidthExceedsRootDomain(requested: bandwidth, capacity: capacity) }
        }
    }
}

/// The host's SCHED_DEADLINE limits (`/proc/sys/kernel`).
public struct DeadlineLimits: Equatable, Sendable {
    /// `sched_deadline_period_min_us` (kernel default 100).
    public var periodMinimumMicroseconds: UInt64
    /// `sched_deadline_period_max_us` (kernel default 4194304).
    public var periodMaximumMicroseconds: UInt64
    /// `sched_rt_runtime_us / sched_rt_period_us`: the share of each CPU that real-time and
    /// deadline tasks together may use; nil when `sched_rt_runtime_us` is -1 (no limit).
    public var bandwidthPerCPU: Double?

    /// Limits.
    public init(periodMinimumMicroseconds: UInt64 = 100, periodMaximumMicroseconds: UInt64 = 4_194_304, bandwidthPerCPU: Double? = 0.95) {
        self.periodMinimumMicroseconds = periodMinimumMicroseconds
        self.periodMaximumMicroseconds = periodMaximumMicroseconds
        self.bandwidthPerCPU = bandwidthPerCPU
    }

    /// The running kernel's.
    public static func current(files: HostFiles = HostFiles()) -> DeadlineLimits {
        let runtime = files.readInteger("/proc/sys/kernel/sched_rt_runtime_us") ?? 950_000
        let period = files.readInteger("/proc/sys/kernel/sched_rt_period_us") ?? 1_000_000
        return DeadlineLimits(periodMinimumMicroseconds: UInt64(max(files.readInteger("/proc/sys/kernel/sched_deadline_period_min_us") ?? 100, 0)),
                              periodMaximumMicroseconds: UInt64(max(files.readInteger("/proc/sys/kernel/sched_deadline_period_max_us") ?? 4_194_304, 0)),
                              bandwidthPerCPU: runtime < 0 || period <= 0 ? nil : Double(runtime) / Double(period))
    }
}

/// Why a SCHED_DEADLINE budget is not admitted.
public enum DeadlineAdmissionError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The runtime is below the kernel's minimum of 1024 ns.
    case runtimeTooShort(nanoseconds: UInt64)
    /// Not runtime <= deadline <= period.
    case inconsistent(DeadlineParameters)
    /// The period is outside `sched_deadline_period_min_us ... sched_deadline_period_max_us`.
    case periodOutOfRange(microseconds: UInt64, minimum: UInt64, maximum: UInt64)
    /// More bandwidth than the root domain can ever give.
    case bandwidthExceedsRootDomain(requested: Double, capacity: Double)
    /// The kernel said EBUSY: other SCHED_DEADLINE tasks hold the root domain's bandwidth.
    case bandwidthUnavailable(cpus: CPUSet)
    /// The kernel said EPERM although the process may use SCHED_DEADLINE: the affinity does
    /// not span the thread's root domain (a SCHED_DEADLINE task cannot be pinned to fewer CPUs).
    case affinityBelowRootDomain(affinity: CPUSet, rootDomain: CPUSet?)
    /// The process lacks CAP_SYS_NICE (SCHED_DEADLINE is not allowed through RLIMIT_RTPRIO).
    case notPermitted
    /// The kernel has no SCHED_DEADLINE, or the probe failed otherwise.
    case unavailable(String)

    public var description: String {
        switch self {
        case .runtimeTooShort(let ns): return "SCHED_DEADLINE runtime \(ns) ns is below the kernel's minimum of 1024 ns"
        case .inconsistent(let parameters): return "\(parameters): need runtime <= deadline <= period"
        case let .periodOutOfRange(period, minimum, maximum):
            return "SCHED_DEADLINE period \(period) µs is outside kernel.sched_deadline_period_min_us..max_us (\(minimum)...\(maximum))"
        case let .bandwidthExceedsRootDomain(requested, capacity):
            return "SCHED_DEADLINE bandwidth \(twoDecimals(requested)) exceeds what the root domain can ever admit (\(twoDecimals(capacity)): sched_rt_runtime_us/sched_rt_period_us per CPU)"
        case .bandwidthUnavailable(let cpus):
            return "SCHED_DEADLINE not admitted (EBUSY): other deadline tasks hold the bandwidth of the root domain of CPUs \(cpus)"
        case let .affinityBelowRootDomain(affinity, rootDomain):
            return "SCHED_DEADLINE not admitted (EPERM): affinity \(affinity) does not span its root domain"
                + (rootDomain.map { " (\($0))" } ?? "") + "; a deadline task may only be pinned to CPUs that form a root domain of their own"
        case .notPermitted: return "SCHED_DEADLINE needs CAP_SYS_NICE (root); RLIMIT_RTPRIO does not allow it"
        case .unavailable(let why): return "SCHED_DEADLINE unavailable: \(why)"
        }
    }
}

/// What the kernel answered when a thread asked for SCHED_DEADLINE with some affinity.
public enum DeadlineProbeOutcome: Equatable, Sendable {
    /// Admitted (the thread went back to SCHED_OTHER right away).
    case admitted
    /// Not admitted; why.
    case refused(DeadlineAdmissionError)
}

/// Asks the kernel whether a thread with affinity `cpus` is admitted to SCHED_DEADLINE with
/// `parameters`: the only reliable test of the root-domain rule (userspace cannot read root
/// domains without debugfs). `place`, if given, first moves the probing thread into a group.
public protocol DeadlineAdmissionProbe: Sendable {
    /// Probes once; the probing thread is SCHED_DEADLINE for at most a few microseconds.
    func probe(_ parameters: DeadlineParameters, cpus: CPUSet, place: (@Sendable (pid_t) throws -> Void)?) -> DeadlineProbeOutcome
}

/// The real probe: a short-lived thread pins itself, asks for SCHED_DEADLINE (with reset on
/// fork), goes back to SCHED_OTHER and ends.
public struct KernelDeadlineProbe: DeadlineAdmissionProbe {
    /// A probe.
    public init() {}

    public func probe(_ parameters: DeadlineParameters, cpus: CPUSet, place: (@Sendable (pid_t) throws -> Void)?) -> DeadlineProbeOutcome {
        let outcome = LockedValue<DeadlineProbeOutcome>(.refused(.unavailable("the probe thread did not run")))
        do {
            let thread = try HostThread(name: "rtvirt-dl-probe") {
                let result: DeadlineProbeOutcome
                do {
                    try place?(ThreadScheduling.currentThreadID())
                    try ThreadScheduling.setAffinity(cpus)
                    try ThreadScheduling.setSchedulingClass(parameters.schedulingClass, resetOnFork: true)
                    try? ThreadScheduling.setSchedulingClass(.other())
                    result = .admitted
                } catch let error as SchedulingError {
                    result = .refused(Self.classify(error, cpus: cpus))
                } catch {
                    result = .refused(.unavailable("\(error)"))
                }
                outcome.withLock { $0 = result }
            }
            thread.join()
        } catch {
            return .refused(.unavailable("cannot start the probe thread: \(error)"))
        }
        return outcome.withLock { $0 }
    }

    static func classify(_ error: SchedulingError, cpus: CPUSet) -> DeadlineAdmissionError {
        switch error {
        case .notPermitted: return hasSysNice() ? .affinityBelowRootDomain(affinity: cpus, rootDomain: nil) : .notPermitted
        case .notAdmitted(_, let errno) where errno == .notPermitted: return .affinityBelowRootDomain(affinity: cpus, rootDomain: nil)
        case .notAdmitted: return .bandwidthUnavailable(cpus: cpus)
        default: return .unavailable("\(error)")
        }
    }

    /// Whether this process has CAP_SYS_NICE (bit 23 of `CapEff` in `/proc/self/status`).
    public static func hasSysNice(files: HostFiles = HostFiles()) -> Bool {
        for line in (files.read("/proc/self/status") ?? "").split(separator: "\n") where line.hasPrefix("CapEff:") {
            guard let mask = UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: " \t"), radix: 16) else { return false }
            return mask & (1 << 23) != 0
        }
        return geteuid() == 0
    }
}

/// `value` with two decimals (no Foundation here).
func twoDecimals(_ value: Double) -> String {
    let hundredths = Int((value * 100).rounded())
    let fraction = abs(hundredths % 100)
    return "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
}

extension Substring {
    func trimmingCharacters(in set: String) -> String {
        var text = self
        while let first = text.first, set.contains(first) { text = text.dropFirst() }
        while let last = text.last, set.contains(last) { text = text.dropLast() }
        return String(text)
    }
}

/// The scheduler's root domain the real-time CPUs are in, read from the cpuset hierarchy
/// (read only: nothing is written to find it).
public struct RootDomainReport: Equatable, Sendable, CustomStringConvertible {
    /// The CPUs of the root domain that holds the real-time CPUs (what a SCHED_DEADLINE thread
    /// on them must have as its affinity).
    public var span: CPUSet
    /// Whether the real-time CPUs are a root domain of their own (a deadline vCPU can be pinned).
    public var ownRootDomain: Bool
    /// How it was found.
    public var reason: String
    /// What an administrator would set to give the real-time CPUs a root domain (nil when
    /// they have one, or RTVirt makes one itself as on cgroup v2).
    public var administratorRecipe: [String]?

    public var description: String { "root domain \(span)\(ownRootDomain ? " (the real-time CPUs' own)" : ""): \(reason)" }

    /// On cgroup v1: with `cpuset.sched_load_balance=1` at the root there is one root domain of
    /// every CPU in the root cpuset. With 0, load-balanced cpusets (the top-most of each
    /// branch, merged where they overlap) are the domains, and CPUs in none of them share the
    /// default root domain. `rtvirt/` is left out: its groups never balance load then.
    public static func v1(realtimeCPUs: CPUSet, backend: any CgroupBackend, online: CPUSet) -> RootDomainReport {
        let controller = "cpuset"
        func cpus(_ group: String) -> CPUSet {
            (backend.value(name: "cpuset.effective_cpus", group: group, controller: controller)
                ?? backend.value(name: "cpuset.cpus", group: group, controller: controller)).flatMap(CPUSet.init(listFormat:)) ?? []
        }
        let rootCPUs = cpus("").isEmpty ? online : cpus("")
        let recipe = administratorRecipe(realtimeCPUs: realtimeCPUs, housekeeping: CPUSet(rootCPUs.cpus.filter { !realtimeCPUs.contains($0) }),
                                         mount: nil)
        let rootBalance = backend.value(name: "cpuset.sched_load_balance", group: "", controller: controller) ?? "1"
        if rootBalance != "0" {
            return RootDomainReport(span: rootCPUs, ownRootDomain: rootCPUs == realtimeCPUs,
                                    reason: "the root cpuset balances load over CPUs \(rootCPUs) (cpuset.sched_load_balance=1): one root domain",
                                    administratorRecipe: rootCPUs == realtimeCPUs ? nil : recipe)
        }
        // Domains: top-most load-balanced cpusets outside rtvirt/, merged where they overlap.
        var domains: [CPUSet] = []
        var queue = backend.children(of: "", controller: controller).filter { $0 != projectSubtree }
        while let group = queue.first {
            queue.removeFirst()
            if backend.value(name: "cpuset.sched_load_balance", group: group, controller: controller) ?? "1" != "0" {
                var domain = cpus(group)
                guard !domain.isEmpty else { continue }
                while let overlapping = domains.firstIndex(where: { !$0.intersection(domain).isEmpty }) {
                    domain = CPUSet(domain.cpus + domains.remove(at: overlapping).cpus)
                }
                domains.append(domain)
            } else {
                queue += backend.children(of: group, controller: controller).map { group + "/" + $0 }
            }
        }
        let first = realtimeCPUs.cpus.first ?? 0
        if let domain = domains.first(where: { $0.contains(first) }) {
            let own = domain == realtimeCPUs
            return RootDomainReport(span: domain, ownRootDomain: own,
                                    reason: "the root cpuset does not balance load; a load-balanced cpuset spans CPUs \(domain)",
                                    administratorRecipe: own ? nil : recipe)
        }
        let uncovered = CPUSet(rootCPUs.cpus.filter { cpu in !domains.contains { $0.contains(cpu) } })
        return RootDomainReport(span: uncovered, ownRootDomain: uncovered == realtimeCPUs,
                                reason: "no load-balanced cpuset holds CPU \(first): it is in the default root domain with CPUs \(uncovered)",
                                administratorRecipe: uncovered == realtimeCPUs ? nil : recipe)
    }

    /// The commands an administrator would run on a v1 host to give `realtimeCPUs` a root
    /// domain (RTVirt never runs them: they change the whole host's scheduling).
    public static func administratorRecipe(realtimeCPUs: CPUSet, housekeeping: CPUSet, mount: String?) -> [String] {
        let root = mount ?? "/sys/fs/cgroup/cpuset"
        return [
            "mkdir \(root)/housekeeping \(root)/realtime",
            "echo \(housekeeping) > \(root)/housekeeping/cpuset.cpus; echo 0 > \(root)/housekeeping/cpuset.mems",
            "echo \(realtimeCPUs) > \(root)/realtime/cpuset.cpus; echo 0 > \(root)/realtime/cpuset.mems",
            "echo 1 > \(root)/housekeeping/cpuset.cpu_exclusive; echo 1 > \(root)/realtime/cpuset.cpu_exclusive",
            "for t in $(cat \(root)/tasks); do echo $t > \(root)/housekeeping/tasks; done   # every task that may move",
            "echo 0 > \(root)/cpuset.sched_load_balance   # last: each exclusive, load-balanced cpuset is now a root domain",
        ]
    }
}

/// Whether a budget mode works on this host, and why not when it does not.
public struct BudgetModeSupport: Codable, Equatable, Sendable {
    /// `rtGroup` or `deadline`.
    public var mode: BudgetMode
    /// Whether it works here.
    public var supported: Bool
    /// What it rests on, or why it is absent.
    public var reason: String

    /// A support entry.
    public init(mode: BudgetMode, supported: Bool, reason: String) {
        self.mode = mode; self.supported = supported; self.reason = reason
    }

    /// Both modes on this host (`hierarchy` as detected; `hasSysNice` from the process).
    public static func detect(hierarchy: CgroupHierarchy, files: HostFiles = HostFiles(),
                              hasSysNice: Bool = KernelDeadlineProbe.hasSysNice()) -> [BudgetModeSupport] {
        var rtGroup: BudgetModeSupport
        if hierarchy.rtGroupScheduling && hierarchy.v1Mount(for: "cpuset") != nil {
            rtGroup = BudgetModeSupport(mode: .rtGroup, supported: true, reason: "cgroup v1 cpu.rt_runtime_us and cpuset")
        } else if hierarchy.v1Mount(for: "cpu") == nil {
            rtGroup = BudgetModeSupport(mode: .rtGroup, supported: false,
                                        reason: "no v1 cpu controller: cgroup v2 has no per-group RT budget (its cpu controller refuses RT tasks under RT_GROUP_SCHED, and distributions build without it)")
        } else if !hierarchy.rtGroupScheduling {
            rtGroup = BudgetModeSupport(mode: .rtGroup, supported: false, reason: "the v1 cpu controller has no cpu.rt_runtime_us (kernel without RT_GROUP_SCHED)")
        } else {
            rtGroup = BudgetModeSupport(mode: .rtGroup, supported: false, reason: "no v1 cpuset hierarchy")
        }
        if !hasSysNice && rtGroup.supported { rtGroup.reason += " (real-time classes need root or CAP_SYS_NICE / RLIMIT_RTPRIO)" }

        let deadline: BudgetModeSupport
        if !files.exists("/proc/sys/kernel/sched_deadline_period_max_us") {
            deadline = BudgetModeSupport(mode: .deadline, supported: false, reason: "the kernel has no SCHED_DEADLINE")
        } else if !hasSysNice {
            deadline = BudgetModeSupport(mode: .deadline, supported: false, reason: "SCHED_DEADLINE needs CAP_SYS_NICE (root)")
        } else if hierarchy.v1Mount(for: "cpuset") != nil {
            deadline = BudgetModeSupport(mode: .deadline, supported: true, reason: "SCHED_DEADLINE per vCPU thread; cgroup v1 cpuset for placement")
        } else if let v2 = hierarchy.v2Mount {
            if !v2.controllers.contains("cpuset") {
                deadline = BudgetModeSupport(mode: .deadline, supported: false, reason: "\(CgroupError.v2ControllerUnavailable(controller: "cpuset", available: v2.controllers))")
            } else if !hierarchy.v2DelegatedControllers.contains("cpuset") {
                deadline = BudgetModeSupport(mode: .deadline, supported: false,
                                             reason: "\(CgroupError.v2ControllerNotDelegated(controller: "cpuset", file: v2.path + "/cgroup.subtree_control"))")
            } else {
                deadline = BudgetModeSupport(mode: .deadline, supported: true, reason: "SCHED_DEADLINE per vCPU thread; a cgroup v2 cpuset partition root for the real-time CPUs")
            }
        } else {
            deadline = BudgetModeSupport(mode: .deadline, supported: false, reason: "no cpuset hierarchy (neither v1 nor v2)")
        }
        return [rtGroup, deadline]
    }

    /// Resolves `requested` against `support`: `automatic` takes `rtGroup` where it works, else
    /// `deadline`; an explicit mode must be supported.
    public static func choose(_ requested: BudgetMode, support: [BudgetModeSupport]) throws(CgroupError) -> BudgetModeChoice {
        func entry(_ mode: BudgetMode) -> BudgetModeSupport? { support.first { $0.mode == mode } }
        switch requested {
        case .rtGroup, .deadline:
            guard let found = entry(requested), found.supported else {
                if requested == .rtGroup { throw .noRTGroupScheduling }
                throw .noBudgetMode(reasons: ["deadline: " + (entry(.deadline)?.reason ?? "unknown")])
            }
            return BudgetModeChoice(mode: requested, reason: "asked for; \(found.reason)")
        case .automatic:
            if let rt = entry(.rtGroup), rt.supported {
                return BudgetModeChoice(mode: .rtGroup, reason: "automatic: \(rt.reason) present")
            }
            if let dl = entry(.deadline), dl.supported {
                return BudgetModeChoice(mode: .deadline, reason: "automatic: rtGroup absent (\(entry(.rtGroup)?.reason ?? "?")); \(dl.reason)")
            }
            throw .noBudgetMode(reasons: support.map { "\($0.mode): \($0.reason)" })
        }
    }
}
