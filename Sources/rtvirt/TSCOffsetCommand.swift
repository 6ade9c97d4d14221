import ArgumentParser
import CLinuxSupport
import KVMBackend
import RTVirtCore
import Synchronization

/// What `rtvirt tsc-offset --json` prints: per way of reading a vCPU's guest TSC offset, how
/// far its readings are from the reference offset.
struct TSCOffsetReport: Codable {
    struct Method: Codable {
        /// `single-bracket` (one host TSC read on each side of KVM_GET_MSRS, the midpoint: what
        /// RTVirt did before), `sampled` (readTSCOffset's fallback), `kernel-attribute`.
        var name: String
        var readings: Int
        /// |reading − reference|, microseconds.
        var deviationP50: Double
        var deviationP99: Double
        var deviationMax: Double
        /// Readings off by more than 20 µs.
        var over20Microseconds: Int
        /// Readings off by more than their own error bound (0 for a correct bound; nil: the
        /// method reports no bound).
        var outsideBound: Int?
        /// The reported error bound, microseconds (nil: the method reports none).
        var boundP50: Double?
        var boundMax: Double?
    }
    var kvmModule: String
    /// What the deviations are measured from: `kernel-attribute` (exact) or `median`.
    var reference: String
    var referenceOffset: Int64
    var tscFrequencyHz: UInt64
    var busyThreads: Int
    var methods: [Method]
}

struct TSCOffsetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tsc-offset",
        abstract: "How exactly a vCPU's guest TSC offset can be read here: the kernel attribute, bounded sampling, one bracket.",
        discussion: """
            Reads the offset of a vCPU that never runs (so the true offset is constant) many times each way and reports how \\
            far the readings are from the reference: KVM_VCPU_TSC_OFFSET where the kernel has it (exact), otherwise the \\
            median of the sampled readings. 'single-bracket' is one KVM_GET_MSRS(IA32_TSC) between two host TSC reads, \\
            the midpoint taken: how RTVirt read the offset before. --load adds one busy SCHED_OTHER thread per CPU.
            """)

    @Option(help: "Readings per method.")
    var readings = 20_000

    @Flag(help: "Run one busy thread per online CPU meanwhile.")
    var load = false

    @Flag(help: "Print one JSON object.")
    var json = false

    func validate() throws {
        guard (1...10_000_000).contains(readings) else { throw ValidationError("--readings must be 1...10000000") }
    }

    func run() throws {
        let vcpu = try KVMSystem().makeKVMVirtualMachine().makeKVMVCPU(id: 0)
        let frequency = vcpu.tscFrequencyKHz().map { $0 * 1000 } ?? GuestTSCMapping.measureHostTSCFrequency()
        let busy = load ? try BusyThreads(count: try ThreadScheduling.affinity().cpus.count) : nil
        defer { busy?.stop() }

        let single = try (0..<readings).map { _ in try Self.singleBracketOffset(vcpu) }
        let sampled = try (0..<readings).map { _ in try vcpu.readTSCOffset(method: .msrSampling) }
        let exact = try? vcpu.readTSCOffset(method: .kernelAttribute)
        let attribute = exact == nil ? [] : try (0..<readings).map { _ in try vcpu.readTSCOffset(method: .kernelAttribute) }
        busy?.stop()

        let reference = exact?.offset ?? sampled.map(\.offset).sorted()[sampled.count / 2]
        let perMicrosecond = Double(frequency) / 1e6
        func summary(_ name: String, _ offsets: [Int64], bounds: [UInt64]?) -> TSCOffsetReport.Method {
            let deviations = offsets.map { Double(($0 - reference).magnitude) / perMicrosecond }
            let sorted = deviations.sorted()
            let sortedBounds = bounds?.map { Double($0) / perMicrosecond }.sorted()
            let outside = bounds.map { bounds in zip(offsets, bounds).filter { ($0.0 - reference).magnitude > $0.1 }.count }
            return TSCOffsetReport.Method(
                name: name, readings: offsets.count, deviationP50: sorted[sorted.count / 2], deviationP99: sorted[sorted.count * 99 / 100],
                deviationMax: sorted.last!, over20Microseconds: deviations.filter { $0 > 20 }.count, outsideBound: outside,
                boundP50: sortedBounds.map { $0[$0.count / 2] }, boundMax: sortedBounds?.last)
        }
        var methods = [summary("single-bracket", single, bounds: nil),
                       summary("sampled", sampled.map(\.offset), bounds: sampled.map(\.errorBound))]
        if !attribute.isEmpty { methods.append(summary("kernel-attribute", attribute.map(\.offset), bounds: attribute.map(\.errorBound))) }
        let report = TSCOffsetReport(kvmModule: KVMHostInfo.detectModule().rawValue, reference: exact == nil ? "median" : "kernel-attribute",
                                     referenceOffset: reference, tscFrequencyHz: frequency, busyThreads: busy?.count ?? 0, methods: methods)
        if json {
            try printJSON(report)
            return
        }
        print("KVM backend: \(report.kvmModule); TSC \(frequency / 1_000_000) MHz; \(readings) readings per method"
              + (load ? ", \(report.busyThreads) busy threads" : ", no load"))
        print(exact.map { "KVM_VCPU_TSC_OFFSET: \($0.offset) ticks (exact; the reference)" }
              ?? "KVM_VCPU_TSC_OFFSET: not offered by this kernel; the reference is the median sampled reading")
        print("method              p50 (µs)  p99 (µs)  max (µs)  >20 µs  outside bound  bound p50/max (µs)")
        for method in methods {
            let bound = method.boundP50.map { String(format: "%.3f / %.3f", $0, method.boundMax ?? 0) } ?? "none reported"
            print(method.name.padding(toLength: 18, withPad: " ", startingAt: 0)
                  + String(format: " %9.3f %9.3f %9.1f %7d ", method.deviationP50, method.deviationP99, method.deviationMax,
                           method.over20Microseconds)
                  + (method.outsideBound.map(String.init) ?? "-").leftPadded(to: 14) + "  " + bound)
        }
    }

    /// One host TSC read on each side of `KVM_GET_MSRS(IA32_TSC)`, the midpoint taken.
    static func singleBracketOffset(_ vcpu: KVMVirtualCPU) throws -> Int64 {
        let before = rtv_rdtsc()
        let guest = try vcpu.readMSRs([X86MSR.timeStampCounter])[0].value
        let after = rtv_rdtsc()
        return Int64(bitPattern: guest &- (before &+ (after &- before) / 2))
    }
}

extension String {
    /// The string right-aligned in `width` columns.
    func leftPadded(to width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}

/// SCHED_OTHER threads that spin until stopped.
final class BusyThreads: Sendable {
    private final class Flag: Sendable { let running = Atomic<Bool>(true) }
    private let flag = Flag()
    private let threads: [HostThread]
    /// How many.
    var count: Int { threads.count }

    init(count: Int) throws {
        let flag = flag
        threads = try (0..<count).map { _ in try HostThread(name: "busy") { while flag.running.load(ordering: .relaxed) {} } }
    }

    func stop() {
        flag.running.store(false, ordering: .relaxed)
        for thread in threads { thread.join() }
    }
}
