import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import XCTest
import LongPoll
import RTVirtXCTestSupport

/// A real guest on KVM calling VMRPC through the C header.
final class VMRPCGuestTests: XCTestCase {
    func testGuestMakesNullClockReadAndServesReverseCalls() async throws {
        let kvm = try openKVMOrSkip()
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .rpcDemo), BundledGuestVCPU(mode: .spin)])
        let dispatcher = try LongPollDispatcher(vcpuCount: 2)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        let runner = try machine.start(bus: machine.makeBus(server: server), dispatcher: dispatcher)

        // Reverse calls from the host, answered by the guest through poll/reply.
        let sum = try await server.reverseCall(vcpu: 0, procedure: GuestLayout.reverseAdd,
                                               payload: [40, 0, 0, 0, 2, 0, 0, 0])
        XCTAssertEqual(sum, VMRPCReverseCallReply(status: 0, payload: [42, 0, 0, 0]))
        let unknown = try await server.reverseCall(vcpu: 0, procedure: 99, payload: [])
        XCTAssertEqual(unknown.status, 1, "the guest reports procedures it does not know")
        let stop = try await server.reverseCall(vcpu: 0, procedure: GuestLayout.reverseStop, payload: [])
        XCTAssertEqual(stop.status, 0)

        let deadline = monotonicNanoseconds() + 10_000_000_000
        while runner.stopReasons[0] == nil && monotonicNanoseconds() < deadline { usleep(1000) }
        XCTAssertEqual(runner.stopReasons[0], .guestRequested(status: 0))
        XCTAssertNil(runner.stopReasons[1], "the other vCPU keeps spinning meanwhile")

        let reported = machine.ports.results(ofVCPU: 0)
        XCTAssertEqual(reported.count, 2 + 8 + 3, "\(reported)")
        guard reported.count == 13 else { return }
        XCTAssertEqual(reported[0], UInt64(VMRPCStatus.ok.rawValue), "null")
        XCTAssertEqual(reported[1], UInt64(VMRPCStatus.ok.rawValue), "clock.read, through the MMIO doorbell")
        let hostNanoseconds = reported[2] | reported[3] << 32
        let guestTSCAtCall = reported[4] | reported[5] << 32
        let tscHz = reported[6] | reported[7] << 32
        let guestTSCAfter = reported[8] | reported[9] << 32
        let mapping = machine.tscMappings[0]
        XCTAssertEqual(tscHz, mapping.frequencyHz)
        XCTAssertLessThan(hostNanoseconds, monotonicNanoseconds())
        XCTAssertGreaterThan(guestTSCAfter, guestTSCAtCall, "the guest's own TSC after the call is later")
        let gapSeconds = Double(guestTSCAfter - guestTSCAtCall) / Double(tscHz)
        XCTAssertLessThan(gapSeconds, 0.5, "clock.read's guest TSC is the guest's TSC (gap \(gapSeconds) s)")
        XCTAssertEqual(Array(reported[10...]), [UInt64(GuestLayout.reverseAdd), 99, UInt64(GuestLayout.reverseStop)])
        XCTAssertEqual(server.statistics(vcpu: 0)?.rejectedCalls, 0)

        runner.stopAndWait()
        server.shutdown()
    }

    func testStoppingTheVMFailsPendingReverseCallsAndCancelsAParkedPoll() async throws {
        let kvm = try openKVMOrSkip()
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .rpcDemo)])
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        let runner = try machine.start(bus: machine.makeBus(server: server), dispatcher: dispatcher)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while !dispatcher.isWaiting(vcpu: 0) && monotonicNanoseconds() < deadline { usleep(100) }
        XCTAssertTrue(dispatcher.isWaiting(vcpu: 0), "the guest parks in poll")
        let start = monotonicNanoseconds()
        runner.stop()
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 5_000_000_000), [.stopRequested])
        print("stop of a vCPU parked in poll: \(Double(monotonicNanoseconds() - start) / 1e6) ms")
        server.shutdown()
        do {
            _ = try await server.reverseCall(vcpu: 0, procedure: GuestLayout.reverseAdd, payload: [])
            XCTFail("no calls after the VM stopped")
        } catch {
            XCTAssertEqual(error, .vmStopped)
        }
    }
}
