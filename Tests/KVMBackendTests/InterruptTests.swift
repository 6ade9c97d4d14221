import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import XCTest
import LongPoll
import RTVirtXCTestSupport

/// Interrupts on real KVM: several vCPUs with the in-kernel LAPIC, and an interrupt that ends
/// a vCPU's long poll so that the guest takes it at once.
final class InterruptTests: XCTestCase {
    /// With the in-kernel LAPIC, KVM holds application processors in wait-for-SIPI; setting them
    /// runnable lets them enter the guest.
    func testApplicationProcessorsRunWithTheInKernelLAPIC() throws {
        let kvm = try openKVMOrSkip()
        let vm = try kvm.makeKVMVirtualMachine()
        try vm.createInterruptController()
        _ = try vm.makeKVMVCPU(id: 0)
        let second = try vm.makeKVMVCPU(id: 1)
        XCTAssertEqual(try second.multiprocessingState(), .uninitialized, "KVM waits for INIT/SIPI")
        try second.setMultiprocessingState(.runnable)
        XCTAssertEqual(try second.multiprocessingState(), .runnable)

        let iterations: UInt64 = 1_000_000
        let machine = try BundledGuestMachine(system: kvm, vcpus: [
            BundledGuestVCPU(mode: .compute, arguments: (iterations, 1)),
            BundledGuestVCPU(mode: .compute, arguments: (iterations, 2)),
        ], interruptController: true)
        let runner = try machine.start()
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 60_000_000_000), [.guestRequested(status: 0), .guestRequested(status: 0)])
        for (id, seed) in [(0, UInt64(1)), (1, 2)] {
            let expected = BundledGuestMode.expectedComputeResult(iterations: iterations, seed: seed)
            XCTAssertEqual(machine.ports.results(ofVCPU: id), [expected & 0xFFFF_FFFF, expected >> 32], "vCPU \(id) ran")
        }
    }

    /// vCPU 0 is parked in a 10 s interruptible `timer.sleepUntil`; the VMM injects an interrupt
    /// for it and ends the long poll; the guest's handler runs, the call returns `interrupted`,
    /// and vCPU 1 computes undisturbed meanwhile.
    func testAnInjectedInterruptEndsAnInterruptibleLongPoll() throws {
        let kvm = try openKVMOrSkip()
        let probe = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .spin)])
        let tenSeconds = probe.tscMappings[0].frequencyHz * 10
        let iterations: UInt64 = 20_000_000
        let machine = try BundledGuestMachine(system: kvm, vcpus: [
            BundledGuestVCPU(mode: .interruptibleSleep, arguments: (tenSeconds, 0)),
            BundledGuestVCPU(mode: .compute, arguments: (iterations, 5)),
        ], interruptController: true)
        let dispatcher = try LongPollDispatcher(vcpuCount: 2)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        let start = monotonicNanoseconds()
        let runner = try machine.start(bus: machine.makeBus(server: server), dispatcher: dispatcher)
        defer { runner.stop() }
        while !dispatcher.isWaiting(vcpu: 0), monotonicNanoseconds() - start < 30_000_000_000 { usleep(100) }
        XCTAssertTrue(dispatcher.isWaiting(vcpu: 0), "hang detector: vCPU 0 parks in its sleep")

        let injectedAt = monotonicNanoseconds()
        XCTAssertTrue(try machine.vm.signalLocalAPICInterrupt(apicID: 0, vector: UInt8(GuestLayout.injectedVector)))
        dispatcher.interrupt(vcpu: 0)
        let reasons = runner.waitForAll(timeoutNanoseconds: 60_000_000_000)
        let elapsed = monotonicNanoseconds() - start
        XCTAssertEqual(reasons, [.guestRequested(status: 0), .guestRequested(status: 0)])
        XCTAssertEqual(machine.ports.results(ofVCPU: 0),
                       [GuestLayout.injectedMark, UInt64(VMRPCStatus.interrupted.rawValue), 1],
                       "the handler ran once, then the call returned `interrupted`")
        let handlerAt = try XCTUnwrap(machine.ports.resultTimes(ofVCPU: 0).first)
        print("interrupt injected into a parked vCPU: handler ran \(Double(handlerAt - injectedAt) / 1000) µs later")
        XCTAssertLessThan(elapsed, 10_000_000_000, "the 10 s sleep ended early")
        let expected = BundledGuestMode.expectedComputeResult(iterations: iterations, seed: 5)
        XCTAssertEqual(machine.ports.results(ofVCPU: 1), [expected & 0xFFFF_FFFF, expected >> 32], "vCPU 1 was unaffected")
    }
}
