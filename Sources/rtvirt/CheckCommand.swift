import ArgumentParser
import CgroupScheduler
import Foundation
import KVMBackend
import RTVirtCore
import RealtimeVCPU

/// Everything `rtvirt check` reports, as one JSON object.
struct HostCheckReport: Codable {
    var kvm: KVMHostInfo
    var realtime: RealtimeHostInfo
    var cgroups: CgroupHierarchy
    /// Each budget mode: supported here or why not.
    var budgetModes: [BudgetModeSupport]
    /// What `--budget-mode automatic` picks here (nil: none works).
    var automaticBudgetMode: String?
    /// Whether a SCHED_DEADLINE vCPU can be pinned to the real-time CPUs.
    var deadlineRootDomain: DeadlineRootDomainCheck
    var numa: NUMATopology

    static func inspect() -> HostCheckReport {
        let hierarchy = CgroupHierarchy.detect()
        let modes = BudgetModeSupport.detect(hierarchy: hierarchy)
        return HostCheckReport(kvm: KVMHostInfo.inspect(), realtime: RealtimeHostInfo.inspect(), cgroups: hierarchy, budgetModes: modes,
                               automaticBudgetMode: (try? BudgetModeSupport.choose(.automatic, support: modes))?.mode.rawValue,
                               deadlineRootDomain: .inspect(hierarchy: hierarchy), numa: NUMATopology.current())
    }
}

/// A root domain for the real-time CPUs (the last online CPU, as `rtvirt partition` picks):
/// what SCHED_DEADLINE needs to pin a vCPU there.
struct DeadlineRootDomainCheck: Codable {
    /// The CPUs checked.
    var realtimeCPUs: String
    /// The root domain that holds them.
    var span: String
    /// Whether they are a root domain of their own.
    var present: Bool
    /// What the kernel answered a thread pinned to them asking for SCHED_DEADLINE (nil when not asked).
    var pinnedProbe: String?
    /// How it was found.
    var reason: String
    /// What an administrator would set (never done by RTVirt: it changes the whole host).
    var administratorRecipe: [String]?

    static func inspect(hierarchy: CgroupHierarchy) -> DeadlineRootDomainCheck {
        let online = (try? ThreadScheduling.affinity()) ?? CPUSet([0])
        let realtime = CPUSet([online.cpus.last ?? 0])
        let probe: String?
        if KernelDeadlineProbe.hasSysNice() {
            switch KernelDeadlineProbe().probe(DeadlineParameters(budget: RTBudget(runtimeMicroseconds: 1000, periodMicroseconds: 100_000)),
                                               cpus: realtime, place: nil) {
            case .admitted: probe = "admitted"
            case .refused(let error): probe = "\(error)"
            }
        } else {
            probe = nil
        }
        if hierarchy.usesV2Partitions {
            return DeadlineRootDomainCheck(realtimeCPUs: "\(realtime)", span: "\(realtime)", present: true, pinnedProbe: probe,
                                           reason: "cgroup v2: the deadline mode makes a cpuset partition root of the real-time CPUs under rtvirt/ (a root domain of their own)",
                                           administratorRecipe: nil)
        }
        let backend = FileCgroupBackend(hierarchy: hierarchy)
        let report = RootDomainReport.v1(realtimeCPUs: realtime, backend: backend, online: online)
        let recipe = report.ownRootDomain ? nil
            : RootDomainReport.administratorRecipe(realtimeCPUs: realtime, housekeeping: CPUSet(online.cpus.filter { !realtime.contains($0) }),
                                                   mount: hierarchy.v1Mount(for: "cpuset")?.path)
        return DeadlineRootDomainCheck(realtimeCPUs: "\(realtime)", span: "\(report.span)", present: report.ownRootDomain, pinnedProbe: probe,
                                       reason: report.reason, administratorRecipe: recipe)
    }
}

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Report this host's readiness for real-time guests.",
        discussion: "Exits non-zero only when the check itself could not run; a host that is not ready is reported, not an error.")

    @Flag(help: "Print one JSON object instead of text.")
    var json = false

    func run() throws {
        let report = HostCheckReport.inspect()
        if json {
            try printJSON(report)
        } else {
            print(Self.text(of: report))
        }
    }

    static func text(of report: HostCheckReport) -> String {
        var lines: [String] = []
        func section(_ title: String) { lines.append(""); lines.append(title) }
        func item(_ ok: Bool?, _ name: String, _ value: String) {
            let mark = ok.map { $0 ? "ok  " : "warn" } ?? "    "
            lines.append("  [\(mark)] \(name.count < 26 ? name.padding(toLength: 26, withPad: " ", startingAt: 0) : name) \(value)")
        }
        let kvm = report.kvm, rt = report.realtime, cg = report.cgroups
        lines.append("RTVirt host check")
        section("KVM")
        item(kvm.available, "/dev/kvm", kvm.available ? "opens, API version \(kvm.apiVersion ?? 0)" : (kvm.error ?? "unavailable"))
        item(kvm.module != .unknown, "backend module", kvm.module.rawValue)
        lines.append("         \(kvm.module.implication)")
        if kvm.available {
            let present = kvm.capabilities.filter { $0.value > 0 }.keys.sorted()
            let missing = kvm.capabilities.filter { $0.value <= 0 }.keys.sorted()
            item(true, "capabilities", present.joined(separator: " "))
            if !missing.isEmpty { item(false, "missing capabilities", missing.joined(separator: " ")) }
            item(nil, "max vCPUs per VM", "\(kvm.maximumVCPUs ?? 0)")
            switch kvm.tscOffsetMethod {
            case .kernelAttribute?: item(true, "guest TSC offset", "exact: KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)")
            case .msrSampling?: item(nil, "guest TSC offset", "sampled: KVM_GET_MSRS(IA32_TSC) between host TSC reads, with an error bound (rtvirt tsc-offset)")
            case nil: item(false, "guest TSC offset", "could not be probed (no scratch vCPU)")
            }
        }
        for (name, value) in kvm.parameters.sorted(by: { $0.key < $1.key }) { item(nil, "kvm.\(name)", value) }
        if kvm.parameters["nx_huge_pages"] != nil {
            lines.append("         nx_huge_pages* govern KVM's per-VM kvm-nx-lpage-recovery worker, started at a VM's first KVM_RUN;")
            lines.append("         RTVirt starts it before a vCPU turns real-time, so it stays out of RT partitions (Docs/CgroupScheduler.md)")
        }

        section("Real-time scheduling")
        item(rt.fifoPermitted, "SCHED_FIFO", rt.fifoPermitted ? "permitted" : (rt.fifoError ?? "not permitted"))
        item(nil, "RLIMIT_RTPRIO", rt.rtprioLimit.map(String.init) ?? "unlimited")
        item(nil, "effective uid", "\(rt.effectiveUserID)")
        let runtime = rt.schedRTRuntimeMicroseconds, period = rt.schedRTPeriodMicroseconds
        item(runtime.map { $0 >= 0 }, "sched_rt_runtime_us", runtime.map { $0 < 0 ? "-1 (no global RT throttling: a runaway RT thread can freeze a CPU)" : "\($0) of \(period ?? 0) per period" } ?? "unknown")
        item(rt.preemption.contains("PREEMPT_RT"), "preemption", rt.preemption)
        item(nil, "kernel", rt.kernelVersion ?? "unknown")
        item(nil, "default timer slack", "\(rt.defaultTimerSlackNanoseconds) ns")

        section("CPUs and time")
        item(nil, "online CPUs", "\(rt.onlineCPUs) (\(rt.onlineCPUCount))")
        item(!rt.isolatedCPUs.isEmpty ? true : nil, "isolcpus", rt.isolatedCPUs.isEmpty ? "none" : rt.isolatedCPUs)
        item(!rt.nohzFullCPUs.isEmpty ? true : nil, "nohz_full", rt.nohzFullCPUs.isEmpty ? "none" : rt.nohzFullCPUs)
        let tscGood = rt.tscFlags.contains("constant_tsc") && rt.tscFlags.contains("nonstop_tsc")
        item(tscGood, "TSC flags", rt.tscFlags.joined(separator: " "))
        item(nil, "clocksource", rt.clocksource ?? "unknown")
        item(nil, "host virtualized", rt.hostIsVirtualized ? "yes (CPU flag 'hypervisor')" : "no")

        section("cgroups")
        item(cg.layout != .none, "layout", cg.layout.rawValue)
        for mount in cg.mounts {
            item(nil, "v\(mount.version) \(mount.path)", mount.controllers.isEmpty ? "(no controllers)" : mount.controllers.joined(separator: ","))
        }
        item(cg.rtGroupScheduling, "RT group scheduling", cg.rtGroupScheduling
             ? "cpu.rt_runtime_us present: real-time partitions get their own RT budget"
             : "no cpu.rt_runtime_us: a partition needs a substitute budget (SCHED_DEADLINE)")
        item(nil, "partitions built on", cg.usesV2Partitions ? "cgroup v2 (unified hierarchy)" : "cgroup v1 controller hierarchies")

        section("Budget modes (rtvirt partition/runaway --budget-mode)")
        for mode in report.budgetModes {
            item(mode.supported, mode.mode.rawValue, (mode.supported ? "supported: " : "absent: ") + mode.reason)
        }
        item(report.automaticBudgetMode != nil, "automatic", report.automaticBudgetMode.map { "picks \($0)" } ?? "no mode works here")
        let domain = report.deadlineRootDomain
        item(domain.present, "root domain of CPU \(domain.realtimeCPUs)", domain.present
             ? "present: a SCHED_DEADLINE vCPU can be pinned there"
             : "absent: \(domain.reason); the deadline mode runs vCPUs with the root domain's affinity \(domain.span)")
        if let probe = domain.pinnedProbe { item(nil, "deadline pinned probe", probe) }
        if let recipe = domain.administratorRecipe {
            lines.append("         RTVirt does not change the host's root domains. An administrator would set (cgroup v1):")
            for command in recipe { lines.append("           \(command)") }
        }

        section("NUMA")
        item(nil, "nodes", report.numa.available ? "\(report.numa.nodeCount) (\(report.numa.cpusByNode.enumerated().map { "node\($0.offset): \($0.element)" }.joined(separator: ", ")))" : "libnuma: NUMA not available")
        return lines.joined(separator: "\n")
    }
}
