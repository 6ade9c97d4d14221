import ArgumentParser
import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import LongPoll

/// What `rtvirt rpc-bench --json` prints.
struct RPCBenchReport: Codable {
    var kvmModule: String
    var nested: Bool
    var pairs: Int
    var bareExitNs: Double
    var nullCallNs: Double
    var ratio: Double
    var bareExit: LatencySummary
    var nullCall: LatencySummary
}

struct RPCBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rpc-bench",
        abstract: "Measure a VMRPC null call against a bare exit, from a guest at CPL 3.",
        discussion: """
            The guest alternates a bare exit (an `out` to a port whose device does nothing) and a `null` \
            VMRPC call (request in the call slot, `out` to the doorbell, response read back), timing each with \
            its TSC. Both run in one guest on one vCPU, interleaved, so drift and noise hit both alike.
            """)

    @Option(help: "Number of (bare exit, null call) pairs.")
    var pairs = 20_000

    @Option(help: "Host CPU to pin the vCPU thread to.")
    var cpu: Int?

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard (100...65_536).contains(pairs) else { throw ValidationError("--pairs must be 100...65536") }
    }

    func run() throws {
        let module = KVMHostInfo.detectModule()
        let system = try KVMSystem()
        let machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: .rpcBench, arguments: (UInt64(pairs), 0))])
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        let pin = cpu
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(server: server), dispatcher: dispatcher,
                                              onThreadStart: { _ in if let pin { _ = try? ThreadScheduling.setAffinity(CPUSet([pin])) } })
        let reasons = runner.waitForAll(timeoutNanoseconds: 600_000_000_000)
        server.shutdown()
        guard reasons == [.guestRequested(status: 0)] else {
            throw ValidationError("the benchmark guest did not finish cleanly: \(reasons)")
        }
        let cycles = try machine.readData(ofVCPU: 0, count: 2 * pairs)
        let nanosecondsPerCycle = 1e9 / Double(machine.tscMappings[0].frequencyHz)
        let bare = stride(from: 0, to: cycles.count, by: 2).map { Double(cycles[$0]) * nanosecondsPerCycle }
        let null = stride(from: 1, to: cycles.count, by: 2).map { Double(cycles[$0]) * nanosecondsPerCycle }
        let bareSummary = LatencySummary(bare), nullSummary = LatencySummary(null)
        let report = RPCBenchReport(kvmModule: module.rawValue, nested: module == .pvm, pairs: pairs,
                                    bareExitNs: bareSummary.p50, nullCallNs: nullSummary.p50,
                                    ratio: nullSummary.p50 / bareSummary.p50, bareExit: bareSummary, nullCall: nullSummary)
        if json {
            try printJSON(report)
            return
        }
        print("KVM backend: \(module.rawValue) — \(module.implication)")
        print("\(pairs) pairs from a guest at CPL 3, TSC \(machine.tscMappings[0].frequencyHz / 1_000_000) MHz")
        print("")
        print("path          median       p99     p99.9       min (ns)")
        for (name, summary) in [("bare exit", bareSummary), ("null VMRPC", nullSummary)] {
            print(name.padding(toLength: 12, withPad: " ", startingAt: 0)
                  + String(format: "%8.0f  %8.0f  %8.0f  %8.0f", summary.p50, summary.p99, summary.p999, summary.minimum))
        }
        print(String(format: "\nratio (null call / bare exit, medians): %.3f", report.ratio))
    }
}
