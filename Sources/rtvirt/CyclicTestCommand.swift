import ArgumentParser
import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage

/// What `rtvirt cyclictest --json` prints.
struct CyclicTestReport: Codable {
    var kvmModule: String
    var nested: Bool
    var intervalUs: Int
    var policy: String
    var cpu: Int
    var load: Bool
    var cpuDMALatencyHeld: Bool
    var paths: [CyclicPathResult]
}

struct CyclicTestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cyclictest",
        abstract: "Timer wake-up lateness: host clock_nanosleep vs. the guest through VMRPC long polling vs. the guest's LAPIC timer interrupt.",
        discussion: """
            Measures three paths one after the other, each on a thread with the same real-time policy on the same CPU: \
            'host' (clock_nanosleep(TIMER_ABSTIME), this host's own limit), 'guest-longpoll' (the bundled guest at CPL 3 \
            calling VMRPC timer.sleepUntil; its vCPU waits in the host, which wakes early by a learned margin and spins to \
            the deadline; no interrupt reaches the guest), and 'guest-interrupt' (the conventional path: LAPIC TSC-deadline \
            timer, sti; hlt, an interrupt handler at CPL 0). Lateness is the TSC (or clock) at resume minus the deadline.
            """)

    @Option(help: "Period in microseconds.")
    var interval = 1000

    @Option(help: "Periods per path (overrides --duration).")
    var count: Int?

    @Option(help: "Seconds per path.")
    var duration: Double = 5

    @Option(help: "SCHED_FIFO priority of the measuring threads (0: SCHED_OTHER).")
    var priority: Int32 = 50

    @Option(help: "CPU to run the measuring threads on (default: the last online CPU).")
    var cpu: Int?

    @Flag(help: "Keep every other CPU busy with a CPU hog while measuring.")
    var load = false

    @Flag(help: "Do not hold /dev/cpu_dma_latency at 0 while measuring (cyclictest holds it; idle states then add latency).")
    var noDMALatency = false

    @Option(help: "Write an SVG plot of the latency distributions to this file.")
    var plot: String?

    @Flag(help: "Print one JSON object instead of the table.")
    var json = false

    func validate() throws {
        guard (50...1_000_000).contains(interval) else { throw ValidationError("--interval must be 50...1000000 µs") }
        guard (0...99).contains(priority) else { throw ValidationError("--priority must be 0...99") }
        if let count { guard (10...131_072).contains(count) else { throw ValidationError("--count must be 10...131072") } }
        guard duration > 0 else { throw ValidationError("--duration must be positive") }
    }

    func run() throws {
        let module = KVMHostInfo.detectModule()
        let system: KVMSystem
        do { system = try KVMSystem() } catch { throw ValidationError("cannot use KVM: \(error)") }
        let online = try ThreadScheduling.affinity()
        let measuringCPU = cpu ?? online.cpus.last ?? 0
        guard online.contains(measuringCPU) else { throw ValidationError("CPU \(measuringCPU) is not available (online: \(online))") }
        let periods = count ?? min(131_072, max(10, Int(duration * 1e6) / interval))
        let policy = RealtimePolicy(schedulingClass: priority == 0 ? .other() : .fifo(priority: priority),
                                    cpus: CPUSet([measuringCPU]), timerSlackNanoseconds: 1, lockMemory: true)
        let quiet = json
        let settings = CyclicSettings(intervalMicroseconds: interval, periods: periods, policy: policy) { path, fraction in
            guard !quiet else { return }
            FileHandle.standardError.write(Data(String(format: "\r  measuring %@ %3.0f%%   ", path, fraction * 100).utf8))
        }
        if !json {
            print("rtvirt cyclictest: \(periods) periods of \(interval) µs per path, \(policy.schedulingClass) on CPU \(measuringCPU)"
                  + (load ? ", CPU hogs on the other CPUs" : "") + (noDMALatency ? "" : ", /dev/cpu_dma_latency held at 0"))
            print("KVM backend: \(module.rawValue) — \(module.implication)")
        }
        var results: [CyclicPathResult] = []
        let latencyRequest = noDMALatency ? nil : try? CPUDMALatencyRequest(microseconds: 0)
        defer { withExtendedLifetime(latencyRequest) {} }
        if !json, !noDMALatency, latencyRequest == nil {
            print("note: could not hold /dev/cpu_dma_latency at 0; idle-state exits add to every path")
        }
        let hogs = load ? try CPULoad(cpus: CPUSet(online.cpus.filter { $0 != measuringCPU })) : nil
        defer { hogs?.finish() }
        do {
            results.append(try HostNativeCyclic.run(settings))
            results.append(try GuestCyclic.run(settings, mode: .cyclicLongPoll, system: system))
            results.append(try GuestCyclic.run(settings, mode: .cyclicInterrupt, system: system))
        } catch {
            if !json { FileHandle.standardError.write(Data("\n".utf8)) }
            throw ValidationError("\(error)")
        }
        if !json { FileHandle.standardError.write(Data("\r".utf8 + Array(repeating: UInt8(ascii: " "), count: 40) + "\r".utf8)) }
        if let plot { try CyclicPlot.svg(results, intervalMicroseconds: interval).write(toFile: plot, atomically: true, encoding: .utf8) }
        let report = CyclicTestReport(kvmModule: module.rawValue, nested: module == .pvm, intervalUs: interval,
                                      policy: policy.schedulingClass.description, cpu: measuringCPU, load: load,
                                      cpuDMALatencyHeld: latencyRequest != nil, paths: results)
        if json {
            try printJSON(report)
        } else {
            print(Self.table(results))
            if let plot { print("\nPlot written to \(plot)") }
        }
    }

    static func table(_ results: [CyclicPathResult]) -> String {
        var lines: [String] = [""]
        func cell(_ text: String, _ width: Int) -> String {
            text.count >= width ? text : String(repeating: " ", count: width - text.count) + text
        }
        lines.append("path             samples     min     avg     p50     p99   p99.9     max  (µs)   p50/host  p99/host")
        let host = results.first { $0.name == "host" }
        for result in results {
            var line = result.name.padding(toLength: 15, withPad: " ", startingAt: 0) + cell("\(result.samples)", 9)
            for value in [result.minUs, result.avgUs, result.p50Us, result.p99Us, result.p999Us, result.maxUs] {
                line += cell(String(format: "%.1f", value), 8)
            }
            if let host {
                line += "      " + cell(String(format: "%.2f", result.p50Us / host.p50Us), 9) + cell(String(format: "%.2f", result.p99Us / host.p99Us), 10)
            }
            lines.append(line)
        }
        if let longPoll = results.first(where: { $0.name == "guest-longpoll" }),
           let interrupt = results.first(where: { $0.name == "guest-interrupt" }) {
            lines.append("")
            lines.append(String(format: "guest-longpoll p99 / guest-interrupt p99: %.2f", longPoll.p99Us / interrupt.p99Us))
            if let spin = longPoll.spinCpuFraction {
                lines.append(String(format: "guest-longpoll spinCpuFraction: %.3f (share of each wait spent spinning before the deadline)", spin))
            }
        }
        let bounds: [Double] = [5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 500, 1000]
        for result in results {
            lines.append("")
            lines.append("\(result.name):")
            lines += TextHistogram(samples: result.latenciesUs, upperBounds: bounds).render(unit: "µs").map { "  " + $0 }
        }
        return lines.joined(separator: "\n")
    }
}

/// An SVG of each path's latency distribution (cumulative, log-scaled tail).
enum CyclicPlot {
    static func svg(_ results: [CyclicPathResult], intervalMicroseconds: Int) -> String {
        let width = 800.0, height = 480.0, left = 70.0, bottom = 60.0, top = 40.0, right = 160.0
        let maximum = max(1, (results.map(\.p999Us).max() ?? 1) * 1.2)
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
        func x(_ value: Double) -> Double { left + min(value, maximum) / maximum * (width - left - right) }
        // y: fraction of samples at or below a latency, on a "nines" scale: 0, 0.9, 0.99, 0.999.
        func y(_ fraction: Double) -> Double {
            let nines = min(3.5, -log10(max(1e-4, 1 - fraction)))
            return height - bottom - nines / 3.5 * (height - bottom - top)
        }
        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(Int(left))" y="22" font-size="15">Timer wake-up lateness, \(intervalMicroseconds) µs period (cumulative)</text>

            """
        for (label, fraction) in [("0", 0.0), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999)] {
            svg += "<line x1=\"\(left)\" x2=\"\(width - right)\" y1=\"\(y(fraction))\" y2=\"\(y(fraction))\" stroke=\"#ddd\"/>"
            svg += "<text x=\"\(left - 8)\" y=\"\(y(fraction) + 4)\" text-anchor=\"end\">\(label)</text>\n"
        }
        for step in 0...5 {
            let value = maximum * Double(step) / 5
            svg += "<text x=\"\(x(value))\" y=\"\(height - bottom + 18)\" text-anchor=\"middle\">\(Int(value))</text>\n"
        }
        svg += "<text x=\"\((left + width - right) / 2)\" y=\"\(height - 15)\" text-anchor=\"middle\">lateness (µs)</text>\n"
        for (index, result) in results.enumerated() {
            let sorted = result.latenciesUs.sorted()
            guard !sorted.isEmpty else { continue }
            var points: [String] = []
            let step = max(1, sorted.count / 2000)
            for position in stride(from: 0, to: sorted.count, by: step) + [sorted.count - 1] {
                points.append(String(format: "%.1f,%.1f", x(sorted[position]), y(Double(position + 1) / Double(sorted.count))))
            }
            let color = colors[index % colors.count]
            svg += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(points.joined(separator: " "))\"/>\n"
            svg += "<text x=\"\(width - right + 10)\" y=\"\(top + 20 + Double(index) * 18)\" fill=\"\(color)\">\(result.name) (p99 \(String(format: "%.1f", result.p99Us)))</text>\n"
        }
        return svg + "</svg>\n"
    }
}
