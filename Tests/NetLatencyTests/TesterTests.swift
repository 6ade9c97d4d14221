#if canImport(Glibc)
import Glibc
#endif
import NetLatency
import RTVirtCore
import VMRPCSockets
import XCTest
import RTVirtXCTestSupport

/// The plan and the probe format, without a network.
final class LatencyProbePlanTests: XCTestCase {
    let target = SocketEndpoint(IPAddress("198.18.20.2")!, port: 7001)

    func testSendTimesAreOnePerPeriodWithARandomPhaseInItsFirstHalf() {
        let plan = LatencyProbePlan(target: target, requestsPerSecond: 1000, requests: 2000, tag: 3, seed: 42)
        let offsets = plan.sendOffsets()
        XCTAssertEqual(offsets.count, 2000)
        var phases: [UInt64] = []
        for (index, offset) in offsets.enumerated() {
            let slot = UInt64(index) * 1_000_000
            XCTAssertGreaterThanOrEqual(offset, slot)
            XCTAssertLessThan(offset, slot + 500_000)
            phases.append(offset - slot)
        }
        // The phase is spread over the half period, not fixed.
        XCTAssertLessThan(phases.min()!, 50_000)
        XCTAssertGreaterThan(phases.max()!, 450_000)
        for (earlier, later) in zip(offsets, offsets.dropFirst()) { XCTAssertGreaterThanOrEqual(later - earlier, 500_000) }
        XCTAssertEqual(plan.sendOffsets(), offsets, "the same seed and tag, the same times")
        var other = plan
        other.seed = 43
        XCTAssertNotEqual(other.sendOffsets(), offsets)
    }

    func testPlansOutOfRangeAreRefused() {
        XCTAssertNoThrow(try LatencyProbePlan(target: target, requests: 10, tag: 1).validate())
        XCTAssertThrowsError(try LatencyProbePlan(target: target, requestsPerSecond: 0.5, requests: 10, tag: 1).validate())
        XCTAssertThrowsError(try LatencyProbePlan(target: target, payloadSize: 8, requests: 10, tag: 1).validate())
        XCTAssertThrowsError(try LatencyProbePlan(target: target, requests: 0, tag: 1).validate())
        XCTAssertThrowsError(try LatencyProbePlan(target: .none, requests: 10, tag: 1).validate())
    }

    func testProbeHeaderRoundTrips() {
        var bytes = [UInt8](repeating: 0, count: 64)
        bytes.withUnsafeMutableBytes { LatencyProbeWire.write(tag: 7, sequence: 123_456, into: $0) }
        let header = bytes.withUnsafeBytes { LatencyProbeWire.read($0) }
        XCTAssertEqual(header?.tag, 7)
        XCTAssertEqual(header?.sequence, 123_456)
        bytes[0] ^= 1
        XCTAssertNil(bytes.withUnsafeBytes { LatencyProbeWire.read($0) }, "not a probe")
        XCTAssertNil([UInt8](repeating: 0, count: 8).withUnsafeBytes { LatencyProbeWire.read($0) }, "too short")
    }
}

/// The instrument over real namespaces and a veth (root, iproute2; run under flock /tmp/rtvirt-hw.lock).
final class TesterTests: XCTestCase {
    func makeTester(_ topology: NetLatencyTopology) throws -> KernelTimestampingTester {
        let socket = try TimestampingUDPSocket(backend: try HostSocketBackend(namespace: topology.tester),
                                               bind: SocketEndpoint(topology.testerAddress, port: 0), interface: topology.testerInterface)
        return KernelTimestampingTester(socket: socket)
    }

    func testTopologySetupAndTeardownLeaveNothingBehind() throws {
        try requireNamespaces()
        let topology = try NetLatencyTopology(label: "netlat")
        let present = NetLatencyTopology.presentOfThisProcess()
        XCTAssertEqual(present.filter { $0.hasPrefix("rtvirt-") }.count, 2, "the tester's and the VM's namespaces: \(present)")
        XCTAssertFalse(present.contains(topology.testerInterface), "the veth's tester end is inside the tester's namespace, not here")
        topology.remove()
        topology.remove()
        XCTAssertEqual(NetLatencyTopology.presentOfThisProcess(), [], "both namespaces and the veth are gone")
    }

    func testACrashedRunsNamespacesAndVethAreReclaimed() throws {
        try requireNamespaces()
        let topology = try NetLatencyTopology(label: "netlat")
        XCTAssertFalse(NetLatencyTopology.presentOfThisProcess().isEmpty)
        // As the next run sees it when this process has died without removing anything:
        let me = getpid()
        let reclaimed = NetworkNamespace.reclaimLeftovers(isAlive: { $0 != me && NetworkNamespace.processIsAlive($0) })
        XCTAssertEqual(reclaimed.filter { $0.contains("-\(me)-") }.count, 2, "both namespaces reclaimed: \(reclaimed)")
        XCTAssertEqual(NetLatencyTopology.presentOfThisProcess(), [], "the veth went with its namespaces")
        topology.remove() // harmless afterwards
    }

    func testKernelTimestampsArriveForEveryPacketThroughTheVeth() throws {
        try requireNamespaces()
        let topology = try NetLatencyTopology(label: "netlat")
        defer { topology.remove() }
        let service = SocketEndpoint(topology.serviceAddress, port: 7001)
        let echo = try HostUDPEcho(backend: try HostSocketBackend(namespace: topology.serviceNamespace), at: service)
        defer { echo.stop() }
        let tester = try makeTester(topology)
        let result = try tester.probe(LatencyProbePlan(target: service, requestsPerSecond: 1000, payloadSize: 64, requests: 300, tag: 1),
                                      isCancelled: { false })
        print("veth echo: \(result.roundTripNanoseconds.count) RTTs, median \(result.roundTripNanoseconds.sorted()[result.roundTripNanoseconds.count / 2]) ns; \(tester.timestampReason)")
        XCTAssertEqual(result.sent, 300)
        XCTAssertEqual(result.answered, 300)
        XCTAssertEqual(result.lost, 0)
        XCTAssertEqual(result.missingTransmitTimestamps, 0, "a transmit timestamp for every request")
        XCTAssertEqual(result.missingReceiveTimestamps, 0, "a receive timestamp for every reply")
        XCTAssertEqual(result.roundTripNanoseconds.count, 300)
        XCTAssertEqual(result.scheduledTransmitSamples, 0, "the driver's transmit timestamps, not the scheduler's")
        XCTAssertTrue(result.roundTripNanoseconds.allSatisfy { $0 > 0 }, "replies arrive after their requests left")
        XCTAssertEqual(result.hardwareSamples + result.softwareSamples, 300)
        XCTAssertEqual(tester.timestampSource == .hardware, result.hardwareSamples == 300)
        XCTAssertTrue(tester.timestampReason.contains(topology.testerInterface), "the report names the interface: \(tester.timestampReason)")
        echo.stop() // joins its thread: its counters are final (it counts after each send)
        XCTAssertEqual(echo.statistics.echoed, 300)
    }

    func testTheCalibrationEchoOverLoopbackInTheTestersNamespace() throws {
        try requireNamespaces()
        let tester = try NetworkNamespace.create(label: "netlat-t")
        defer { tester.remove() }
        let backend = try HostSocketBackend(namespace: tester)
        let loopback = SocketEndpoint(IPAddress.loopback(.ipv4), port: 7000)
        let echo = try HostUDPEcho(backend: backend, at: loopback)
        defer { echo.stop() }
        let socket = try TimestampingUDPSocket(backend: backend, bind: SocketEndpoint(IPAddress.loopback(.ipv4), port: 0), interface: nil)
        let probe = KernelTimestampingTester(socket: socket)
        let result = try probe.probe(LatencyProbePlan(target: loopback, requests: 100, tag: 2), isCancelled: { false })
        XCTAssertEqual(result.roundTripNanoseconds.count, 100, "timestamps on loopback too")
        XCTAssertEqual(result.lost, 0)
    }

    func testALostReplyIsCountedNotHungOn() throws {
        try requireNamespaces()
        let topology = try NetLatencyTopology(label: "netlat")
        defer { topology.remove() }
        let service = SocketEndpoint(topology.serviceAddress, port: 7002)
        // A service that drops every tenth request.
        let echo = try HostUDPEcho(backend: try HostSocketBackend(namespace: topology.serviceNamespace), at: service,
                                   drop: { $0 % 10 == 9 })
        defer { echo.stop() }
        let tester = try makeTester(topology)
        let start = monotonicNanoseconds()
        let result = try tester.probe(LatencyProbePlan(target: service, requestsPerSecond: 2000, requests: 500, tag: 3,
                                                       replyGraceNanoseconds: 100_000_000), isCancelled: { false })
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        XCTAssertEqual(result.sent, 500)
        XCTAssertEqual(result.lost, 50)
        XCTAssertEqual(result.lossFraction, 0.1, accuracy: 1e-9, "10 % loss reported")
        XCTAssertEqual(result.answered, 450)
        XCTAssertEqual(result.roundTripNanoseconds.count, 450)
        echo.stop()
        XCTAssertEqual(echo.statistics.dropped, 50)
        XCTAssertLessThan(elapsed, 30, "hang detector: the round ends after its grace period")
    }

    func testACancelledRoundStopsSendingAndAccountsForWhatWasSent() throws {
        try requireNamespaces()
        let topology = try NetLatencyTopology(label: "netlat")
        defer { topology.remove() }
        let service = SocketEndpoint(topology.serviceAddress, port: 7003)
        let echo = try HostUDPEcho(backend: try HostSocketBackend(namespace: topology.serviceNamespace), at: service)
        defer { echo.stop() }
        let tester = try makeTester(topology)
        var polls = 0
        let result = try tester.probe(LatencyProbePlan(target: service, requestsPerSecond: 1000, requests: 100_000, tag: 4),
                                      isCancelled: { polls += 1; return polls > 200 })
        XCTAssertTrue(result.cancelled)
        XCTAssertLessThan(result.sent, 100_000)
        XCTAssertEqual(result.answered + result.lost, result.sent, "every request sent is accounted for")
    }
}
