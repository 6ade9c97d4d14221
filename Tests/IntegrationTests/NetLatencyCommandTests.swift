#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KVMBackend
import NetLatency
import RealtimeVCPU
import RTVirtCore
import RTVirtTesting
@testable import rtvirt
import VMRPCSockets
import XCTest
import RTVirtXCTestSupport

/// `rtvirt netlatency`: a short run of every path, its JSON, and the teardown on the way out,
/// on Ctrl-C and after a crash (root, /dev/kvm, iproute2; run under flock /tmp/rtvirt-hw.lock).
final class NetLatencyCommandTests: XCTestCase {
    func requirements() throws {
        guard geteuid() == 0 else { throw unavailable("netlatency needs root for network namespaces") }
        do { _ = try KVMSystem() } catch { throw unavailable("/dev/kvm is not available (\(error))") }
        guard access("/usr/sbin/ip", X_OK) == 0 || access("/sbin/ip", X_OK) == 0 else { throw unavailable("iproute2 is not installed") }
        guard try ThreadScheduling.affinity().cpus.count >= 2 else { throw unavailable("netlatency needs two CPUs (tester and services)") }
    }

    /// This process's namespaces and veths of the instrument.
    func leftovers(of pid: pid_t = getpid()) -> [String] {
        let namespaces = ((try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? [])
            .filter { $0.hasPrefix("rtvirt-netlat") && $0.contains("-\(pid)-") }
        let links = ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/net")) ?? []).filter { $0.hasPrefix("rtv\(pid)h") }
        return namespaces + links
    }

    func testAShortRunMeasuresEveryPathReportsJSONAndRemovesEverything() throws {
        try requirements()
        let command = try NetLatencyCommand.parse(["--duration", "1.6", "--rounds", "2", "--rate", "500", "--breakdown", "--json"])
        let outcome = try NetLatencyCommand.measure(command, cancel: CancellationFlag(), progressEnabled: false)
        let report = outcome.report
        XCTAssertEqual(report.paths.map(\.name), ["host-echo", "guest-longpoll", "guest-interrupt", "guest-busypoll"])
        XCTAssertEqual(report.requestsPerRound, 100)
        for path in report.paths {
            XCTAssertEqual(path.sent, 200, path.name)
            XCTAssertEqual(path.samples + path.lost + path.missingTimestamps, path.sent, "\(path.name): every request accounted for")
            XCTAssertGreaterThan(path.samples, 0, "\(path.name) answered")
            XCTAssertGreaterThan(path.cpuFraction, 0, "\(path.name)'s service used CPU")
            XCTAssertLessThanOrEqual(path.minUs, path.p50Us)
            XCTAssertLessThanOrEqual(path.p50Us, path.p99Us)
        }
        XCTAssertEqual(report.timestamping == "hardware" || report.timestamping == "software", true)
        XCTAssertGreaterThan(report.instrumentFloorUs, 0)
        XCTAssertFalse(report.ratios.isEmpty)
        XCTAssertFalse(report.interrupted)
        XCTAssertTrue(outcome.text.contains("instrument floor"))
        XCTAssertTrue(outcome.text.contains("Targets"))
        XCTAssertEqual(leftovers(), [], "namespaces and veth removed")
        XCTAssertEqual(ProcessMemoryLock.referenceCount, 0, "every memory-lock reference was given back (the process is unlocked)")

        let json = try JSONEncoder().encode(report)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: json) as? [String: Any])
        for key in ["paths", "ratios", "timestamping", "instrumentFloorUs"] { XCTAssertNotNil(object[key], key) }
        let first = try XCTUnwrap((object["paths"] as? [[String: Any]])?.first)
        for key in ["name", "samples", "lost", "minUs", "p50Us", "p99Us", "p999Us", "maxUs", "cpuFraction"] { XCTAssertNotNil(first[key], key) }
        let ratio = try XCTUnwrap((object["ratios"] as? [[String: Any]])?.first)
        for key in ["name", "kind", "numerator", "denominator", "percentile", "median", "min", "max", "rounds"] { XCTAssertNotNil(ratio[key], key) }
    }

    func testACancelledRunStopsEarlyAndRemovesEverything() throws {
        try requirements()
        let command = try NetLatencyCommand.parse(["--duration", "60", "--rounds", "3", "--paths", "host-echo,guest-interrupt"])
        let cancel = CancellationFlag()
        let trigger = try HostThread(name: "cancel") {
            // Cancel once the first round runs (the instrument's namespaces exist by then).
            let pid = getpid()
            for _ in 0..<6000 {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
                if names.contains(where: { $0.hasPrefix("rtvirt-netlat") && $0.contains("-\(pid)-") }) { break }
                usleep(10_000)
            }
            usleep(1_500_000)
            cancel.set()
        }
        let start = monotonicNanoseconds()
        let outcome = try NetLatencyCommand.measure(command, cancel: cancel, progressEnabled: false)
        trigger.join()
        XCTAssertTrue(outcome.report.interrupted)
        XCTAssertLessThan(Double(monotonicNanoseconds() - start) / 1e9, 50, "hang detector: the 60 s run stopped early")
        for path in outcome.report.paths { XCTAssertEqual(path.samples + path.lost + path.missingTimestamps, path.sent, path.name) }
        XCTAssertEqual(leftovers(), [], "namespaces and veth removed after the cancellation")
    }

    /// The tool as a process: Ctrl-C ends it with everything removed; a SIGKILL leaves its
    /// namespaces behind, and the next run (here: the reclaim it starts with) removes them.
    func testCtrlCRemovesEverythingAndACrashedRunsLeftoversAreReclaimed() throws {
        try requirements()
        let tool = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("rtvirt")
        let executable = FileManager.default.isExecutableFile(atPath: tool.path) ? tool
            : Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("rtvirt")
        guard FileManager.default.isExecutableFile(atPath: executable.path) else {
            XCTFail("the rtvirt executable is not next to the tests (\(executable.path)); swift build builds it")
            return
        }
        func launch() throws -> Process {
            let process = Process()
            process.executableURL = executable
            process.arguments = ["netlatency", "--duration", "120", "--rounds", "4", "--paths", "host-echo,guest-longpoll"]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            // Hang detector: its namespaces appear once it has set up.
            XCTAssertTrue(waitUntil(seconds: 60) { leftovers(of: process.processIdentifier).count >= 2 }, "the tool set its network up")
            usleep(1_000_000) // into the measuring rounds
            return process
        }

        let interrupted = try launch()
        kill(interrupted.processIdentifier, SIGINT)
        XCTAssertTrue(waitUntil(seconds: 60) { !interrupted.isRunning }, "hang detector: Ctrl-C ends the run")
        interrupted.waitUntilExit()
        XCTAssertEqual(interrupted.terminationStatus, 130)
        XCTAssertEqual(leftovers(of: interrupted.processIdentifier), [], "Ctrl-C removed the namespaces and the veth")

        let crashed = try launch()
        kill(crashed.processIdentifier, SIGKILL)
        crashed.waitUntilExit()
        XCTAssertFalse(leftovers(of: crashed.processIdentifier).isEmpty, "a killed run cannot clean up")
        let reclaimed = NetworkNamespace.reclaimLeftovers()
        XCTAssertTrue(reclaimed.contains { $0.contains("-\(crashed.processIdentifier)-") }, "reclaimed: \(reclaimed)")
        XCTAssertEqual(leftovers(of: crashed.processIdentifier), [], "the next run finds nothing left over")
    }

    func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while monotonicNanoseconds() < deadline {
            if condition() { return true }
            usleep(10_000)
        }
        return condition()
    }

    func testPathOrderRotatesAndComparisonsNameTheirPaths() {
        let paths = NetPath.allCases
        XCTAssertEqual(NetLatencyCommand.rotated(paths, by: 0), paths)
        XCTAssertEqual(NetLatencyCommand.rotated(paths, by: 1), Array(paths[1...]) + [paths[0]])
        for round in 0..<4 { XCTAssertEqual(NetLatencyCommand.rotated(paths, by: round)[0], paths[round], "each path leads one round in four") }
        XCTAssertEqual(PathComparison<NetPath>.netHeadline.first?.name, "guest-longpoll p99 / host-echo p99")
        XCTAssertEqual(Set(NetPath.allCases.map(\.port)).count, 4, "one port per path")
    }

    func testOptionsOutOfRangeAreRefused() {
        XCTAssertThrowsError(try NetLatencyCommand.parse(["--size", "8"]))
        XCTAssertThrowsError(try NetLatencyCommand.parse(["--rate", "0"]))
        XCTAssertThrowsError(try NetLatencyCommand.parse(["--paths", "guest-magic"]))
        XCTAssertThrowsError(try NetLatencyCommand.parse(["--interrupt", "polling"]))
        XCTAssertThrowsError(try NetLatencyCommand.parse(["--duration", "0.2", "--rounds", "10"]), "fewer than 10 requests per round")
        XCTAssertNoThrow(try NetLatencyCommand.parse([]))
    }

    /// When kernel timestamps do not come, the report says so and why, instead of dropping the packets.
    func testMissingTimestampsAreReportedWithTheReason() {
        let result = NetPathResult(name: "host-echo", samples: 90, lost: 0, minUs: 1, p50Us: 2, p99Us: 3, p999Us: 4, maxUs: 5,
                                   cpuFraction: 0.1, sent: 100, reordered: 2, duplicates: 0, stale: 1, missingTimestamps: 10,
                                   sendFailures: 0, stealFraction: 0, testerStealFraction: 0, involuntaryContextSwitches: 0,
                                   rounds: 1, breakdown: nil)
        var counters = NetPathCounters()
        counters.missingTimestamps = 10
        counters.reordered = 2
        counters.stale = 1
        let text = NetLatencyCommand.table([result], ratios: [], counters: [counters], paths: [.hostEcho], cpu: 1)
        XCTAssertTrue(text.contains("10 replies without a kernel timestamp"), text)
        XCTAssertTrue(text.contains("2 reordered"), text)
        XCTAssertTrue(text.contains("1 stale"), text)
        XCTAssertTrue("\(NetLatencyError.timestampingUnavailable("setsockopt(SO_TIMESTAMPING) failed: Operation not supported"))"
            .contains("Operation not supported"))
    }
}
