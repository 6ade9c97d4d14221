import RTVirtCore
import RTVirtTesting
import VMRPC
import XCTest
import LongPoll

/// A guest clock on the real monotonic clock: 1 GHz, offset 0, so guest TSC = monotonic ns.
struct MonotonicGuestClock: GuestClockSource {
    func mapping(forVCPU vcpu: Int) -> GuestTSCMapping? { GuestTSCMapping(frequencyHz: 1_000_000_000, guestOffset: 0) }
    func sampleHost() -> HostClockSample {
        let now = monotonicNanoseconds()
        return HostClockSample(hostTSC: now, monotonicNanoseconds: now)
    }
}

/// The whole VMRPC path without KVM: mock vCPUs whose guest programs write requests into guest
/// memory and ring the doorbell port, the run loop, the bus, the server, the dispatcher's long
/// polls and reverse calls, and the responses the programs read back.
final class MockGuestPathTests: XCTestCase {
    static let doorbellPort: UInt16 = 0x518, exitPort: UInt16 = 0x511
    static let slots = VMRPCSlotLayout(base: GuestAddress(0x10000), count: 2)

    func makeMachine() throws -> (MockVirtualMachine, LongPollDispatcher, VMRPCServer, IOBus) {
        let vm = try MockHypervisor().makeMockVirtualMachine(memorySize: 0x20000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 2)
        let server = try VMRPCServer(memory: vm.guestMemory, slots: Self.slots, dispatcher: dispatcher,
                                     procedures: VMRPCStandardProcedures.all(clock: MonotonicGuestClock()))
        var bus = IOBus()
        try server.registerDoorbell(on: &bus, port: Self.doorbellPort)
        try bus.register(GuestExitDevice(), space: .port, base: UInt64(Self.exitPort), length: 1)
        return (vm, dispatcher, server, bus)
    }

    /// A guest's client for `vcpu` whose doorbell is a real exit through the mock vCPU.
    static func client(_ guest: MockGuest, vcpu: Int, features: VMRPCFeatures = []) -> VMRPCGuestClient {
        VMRPCGuestClient(memory: guest.memory, slot: slots.address(ofVCPU: vcpu)!, features: features) {
            guest.portOut(doorbellPort, size: 1, value: 0)
        }
    }

    func testCallsSleepsAndReverseCallsTravelTheWholePath() async throws {
        let (vm, dispatcher, server, bus) = try makeMachine()
        // vCPU 0: a null call, a 2 ms sleep, then a poll that answers the host's reverse call.
        let parked = try vm.makeMockVCPU(id: 0) { guest in
            let client = Self.client(guest, vcpu: 0, features: .reverseCalls)
            guard try client.null() == .ok else { return guest.portOut(Self.exitPort, value: 1) }
            let deadline = monotonicNanoseconds() + 2_000_000
            guard try client.sleepUntil(guestTSC: deadline).0 == .ok, monotonicNanoseconds() >= deadline else {
                return guest.portOut(Self.exitPort, value: 2)
            }
            let (status, call) = try client.poll(timeoutNanoseconds: 5_000_000_000)
            guard status == .ok, let call, call.payload.count == 2 else { return guest.portOut(Self.exitPort, value: 3) }
            let sum = UInt8(call.payload[0] + call.payload[1])
            guard try client.reply(callID: call.callID, status: 0, payload: [sum]) == .ok else {
                return guest.portOut(Self.exitPort, value: 4)
            }
            guest.portOut(Self.exitPort, value: 0)
        }
        // vCPU 1: 200 null calls, while vCPU 0 is parked.
        let busy = try vm.makeMockVCPU(id: 1) { guest in
            let client = Self.client(guest, vcpu: 1)
            for _ in 0..<200 where try client.null() != .ok { return guest.portOut(Self.exitPort, value: 1) }
            guest.portOut(Self.exitPort, value: 0)
        }
        let runner = try VirtualMachineRunner(vcpus: [parked, busy], bus: bus, dispatcher: dispatcher)
        let reply = try await server.reverseCall(vcpu: 0, procedure: 0x41, payload: [20, 22])
        XCTAssertEqual(reply, VMRPCReverseCallReply(status: 0, payload: [42]))
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 30_000_000_000), [.guestRequested(status: 0), .guestRequested(status: 0)])
        XCTAssertEqual(server.statistics(vcpu: 0)?.parkedCalls, 2, "the sleep and the poll parked vCPU 0")
        XCTAssertEqual(server.statistics(vcpu: 1)?.completedCalls, 200)
        XCTAssertFalse(parked.guestProgramFailed)
    }

    /// Stopping the VM ends a parked poll with `cancelled` and the outstanding reverse calls
    /// with `vmStopped`; the guest programs end when their vCPUs go.
    func testStoppingTheVMEndsParkedCallsAndReverseCalls() async throws {
        let (vm, dispatcher, server, bus) = try makeMachine()
        let pollStatus = LockedValue<VMRPCStatus?>(nil)
        weak var weakCPU: MockVirtualCPU?
        do {
            let cpu = try vm.makeMockVCPU(id: 0) { guest in
                let client = Self.client(guest, vcpu: 0, features: [.reverseCalls, .interruptible])
                while !guest.isStopped {
                    let (status, _) = try client.poll(timeoutNanoseconds: 60_000_000_000)
                    if status != .ok { pollStatus.withLock { $0 = status }; return }
                }
            }
            weakCPU = cpu
            let idle = try vm.makeMockVCPU(id: 1) { _ in } // a guest that never calls
            let runner = try VirtualMachineRunner(vcpus: [cpu, idle], bus: bus, dispatcher: dispatcher)
            while !dispatcher.isWaiting(vcpu: 0) { usleep(100) }
            // A call for vCPU 1, which never polls: outstanding until the stop.
            let pending = Task { try await server.reverseCall(vcpu: 1, procedure: 1, payload: []) }
            while server.outstandingReverseCalls(vcpu: 1) == 0 { await Task.yield() }
            runner.stop()
            XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 30_000_000_000), [.stopRequested, .stopRequested])
            let outcome = await outcome(of: pending)
            XCTAssertEqual(outcome, .failure(.vmStopped))
        }
        XCTAssertNil(weakCPU, "the vCPU went, and its guest program with it")
        XCTAssertEqual(pollStatus.withLock { $0 }, .cancelled)
    }
}
