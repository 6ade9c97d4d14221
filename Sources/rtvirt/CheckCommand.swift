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
    var numa: NUMATopology

    static func inspect() -> HostCheckReport {
        HostCheckReport(kvm: KVMHostInfo.inspect(), realtime: RealtimeHostInfo.inspect(),
                        cgroups: CgroupHierarchy.detect(), numa: NUMATopology.current())
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
             : "no cpu.rt_runtime_us: a partition needs a substitute budget (global sched_rt_runtime_us or SCHED_DEADLINE)")

        section("NUMA")
        item(nil, "nodes", report.numa.available ? "\(report.numa.nodeCount) (\(report.numa.cpusByNode.enumerated().map { "node\($0.offset): \($0.element)" }.joined(separator: ", ")))" : "libnuma: NUMA not available")
        return lines.joined(separator: "\n")
    }
}
