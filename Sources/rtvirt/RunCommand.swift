import ArgumentParser
import KVMBackend
import RTVirtCore
import RTVirtGuestImage

extension BundledGuestMode: ExpressibleByArgument {
    public init?(argument: String) {
        guard let mode = Self.allCases.first(where: { String(describing: $0) == argument }) else { return nil }
        self = mode
    }
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot the bundled guest on KVM and report what it did.",
        discussion: """
            Each vCPU runs on its own host thread. In 'compute' mode the guest runs an LCG at CPL 3 and reports \
            the result through port I/O; RTVirt checks it against the same computation on the host.
            """)

    @Option(help: "Guest mode: \(BundledGuestMode.allCases.map { String(describing: $0) }.joined(separator: ", ")).")
    var mode: BundledGuestMode = .compute

    @Option(help: "Number of vCPUs, each running the mode.")
    var vcpus = 2

    @Option(help: "Iterations for compute mode.")
    var iterations: UInt64 = 100_000_000

    @Option(help: "Seconds before a guest that has not finished is stopped (spin mode always is).")
    var timeout: Double = 10

    func validate() throws {
        guard (1...64).contains(vcpus) else { throw ValidationError("--vcpus must be 1...64") }
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
    }

    func run() throws {
        let module = KVMHostInfo.detectModule()
        let system: KVMSystem
        do { system = try KVMSystem() } catch {
            throw ValidationError("cannot use KVM: \(error)")
        }
        print("KVM backend: \(module.rawValue) — \(module.implication)")
        let configurations = (0..<vcpus).map { BundledGuestVCPU(mode: mode, arguments: (iterations, UInt64($0) + 1)) }
        let machine = try BundledGuestMachine(system: system, vcpus: configurations)
        print("Booted the bundled guest (\(BundledGuest.image.count) bytes) with \(vcpus) vCPU(s) in \(mode) mode, "
              + "\(BundledGuestMachine.defaultMemorySize >> 20) MiB of RAM")
        let start = monotonicNanoseconds()
        let runner = try machine.start()
        var reasons = runner.waitForAll(timeoutNanoseconds: UInt64(timeout * 1e9))
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        if reasons.contains(where: { $0 == nil }) {
            let stopStart = monotonicNanoseconds()
            runner.stop()
            reasons = runner.waitForAll()
            print(String(format: "Stopped still-running vCPUs after %.2f s; kick to stop took %.3f ms", elapsed,
                         Double(monotonicNanoseconds() - stopStart) / 1e6))
        }
        var allGood = true
        for (id, reason) in reasons.enumerated() {
            let exits = runner.loops[id].statistics.exits.load(ordering: .relaxed)
            var line = "vCPU \(id) (thread \(runner.threads[id].kernelThreadID)): \(describe(reason)), \(exits) exits"
            if mode == .compute {
                let results = machine.ports.results(ofVCPU: id)
                let expected = BundledGuestMode.expectedComputeResult(iterations: iterations, seed: UInt64(id) + 1)
                let reported = results.count == 2 ? results[0] | results[1] << 32 : nil
                let matches = reported == expected
                allGood = allGood && matches
                line += ", result \(reported.map { "0x" + String($0, radix: 16) } ?? "none") "
                    + (matches ? "(matches the host)" : "(expected 0x\(String(expected, radix: 16)))")
            }
            print(line)
        }
        if mode == .compute {
            let perIteration = elapsed * 1e9 / Double(iterations)
            print(String(format: "Wall time %.3f s for %llu iterations per vCPU (%.2f ns per iteration at CPL 3)",
                         elapsed, iterations, perIteration))
        }
        if !allGood { throw ExitCode.failure }
    }

    private func describe(_ reason: VCPUStopReason?) -> String {
        switch reason {
        case .guestRequested(let status)?: return "guest exited with status \(status)"
        case .halted?: return "halted"
        case .shutdown?: return "shut down"
        case .stopRequested?: return "stopped by the host"
        case .fatalExit(let exit)?: return "fatal exit \(exit)"
        case .hypervisorError(let message)?: return "hypervisor error: \(message)"
        case nil: return "still running"
        }
    }
}
