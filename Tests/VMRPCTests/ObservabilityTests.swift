import Logging
import LongPoll
import MetricsTestKit
import RTVirtCore
import RTVirtTesting
import VMRPC
import XCTest

/// A log handler that keeps what it is given, for tests.
final class RecordingLogHandler: LogHandler, @unchecked Sendable {
    // @unchecked: `entries` sits behind a LockedValue; the other properties are set before use.
    let entries = LockedValue<[(level: Logger.Level, message: String)]>([])
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        entries.withLock { $0.append((event.level, "\(event.message)")) }
    }
}

/// The server emits swift-metrics and swift-log events a VMM can route to its own backends.
final class ObservabilityTests: XCTestCase {
    func testCallsEmitMetricsAndLifecycleEventsAreLogged() throws {
        let metrics = TestMetrics()
        let handler = RecordingLogHandler()
        let logger = Logger(label: "test.vmrpc") { _ in handler }
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x20000)
        let clock = ManualClock(start: 1_000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, clock: clock, waiter: ManualClockWaiter(clock: clock, lateness: 250),
                                                metrics: metrics)
        var limits = VMRPCLimits()
        limits.malformedCallBurst = 2
        limits.malformedCallsPerSecond = 0
        let server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: GuestAddress(0x10000), count: 1),
                                     dispatcher: dispatcher, procedures: VMRPCStandardProcedures.all(clock: ManualGuestClock(clock: clock)),
                                     limits: limits, completionContext: .endingThread, logger: logger, metrics: metrics)
        let client = VMRPCGuestClient(memory: memory, slot: GuestAddress(0x10000), features: .reverseCalls) { server.handleDoorbell(vcpu: 0) }
        XCTAssertEqual(try client.null(), .ok)
        XCTAssertEqual(try client.sleepUntil(guestTSC: 5_000).0, .ok)
        let vcpu = [("vcpu", "0")]
        XCTAssertEqual(try metrics.expectCounter("rtvirt_vmrpc_doorbells_total", vcpu).totalValue, 2)
        XCTAssertEqual(try metrics.expectCounter("rtvirt_vmrpc_calls_completed_total", vcpu).totalValue, 2)
        XCTAssertEqual(try metrics.expectTimer("rtvirt_vmrpc_park_duration", vcpu).values, [4_250], "parked from 1,000 to 5,250 ns")
        XCTAssertEqual(try metrics.expectTimer("rtvirt_longpoll_wake_lateness", vcpu).values, [250])

        // Reverse-call outcomes, and a timeout is logged.
        try server.reverseCall(vcpu: 0, procedure: 1, payload: [], timeoutNanoseconds: 1_000_000) { _ in }
        let call = try XCTUnwrap(try client.poll(timeoutNanoseconds: 0).1)
        XCTAssertEqual(try client.reply(callID: call.callID, status: 0, payload: []), .ok)
        let done = OutcomeLog()
        try server.reverseCall(vcpu: 0, procedure: 1, payload: [], timeoutNanoseconds: 1_000_000, completion: done.completion(0))
        XCTAssertTrue(done.wait(forKeys: 1), "hang detector")
        XCTAssertEqual(try metrics.expectCounter("rtvirt_vmrpc_reverse_calls_total", vcpu + [("outcome", "replied")]).totalValue, 1)
        XCTAssertEqual(try metrics.expectCounter("rtvirt_vmrpc_reverse_calls_total", vcpu + [("outcome", "timed_out")]).totalValue, 1)

        // A malformed-call storm breaks the channel once: counted and logged once.
        var bad = VMRPCRequestHeader(procedure: 1, sequence: 1, argumentLength: 0)
        bad.magic = 0
        for _ in 0..<5 { _ = try client.callRaw(header: bad, arguments: []) }
        XCTAssertEqual(try metrics.expectCounter("rtvirt_vmrpc_calls_rejected_total", vcpu).totalValue, 3,
                       "two within the burst, the third breaks the channel; then only channel_broken answers")
        XCTAssertEqual(try metrics.expectCounter("rtvirt_vmrpc_channel_broken_total", vcpu).totalValue, 1)
        server.repairChannel(vcpu: 0)
        let logged = handler.entries.withLock { $0 }
        XCTAssertEqual(logged.filter { $0.level == .warning && $0.message.contains("broken") }.count, 1)
        XCTAssertEqual(logged.filter { $0.message.contains("timed out") }.count, 1)
        XCTAssertEqual(logged.filter { $0.message.contains("repaired") }.count, 1)
        XCTAssertEqual(logged.count, 3, "nothing is logged per call: \(logged)")
    }
}
