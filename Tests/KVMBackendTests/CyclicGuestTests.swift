import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import XCTest
import LongPoll
import RTVirtXCTestSupport

/// The cyclic guest modes on real KVM, short runs. Latency targets are checked by
/// `rtvirt cyclictest`, not here; these tests check that each path works and what it records.
final class CyclicGuestTests: XCTestCase {
    func testLongPollCyclicGuestSleepsEachPeriod() throws {
        let kvm = try openKVMOrSkip()
        let periods = 200
        let probe = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .spin)])
        let period = probe.tscMappings[0].frequencyHz / 1000 // 1 ms
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .cyclicLongPoll, arguments: (UInt64(periods), period))])
        let strategy = DeadlineTimerStrategy()
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, timerStrategy: strategy)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        let start = monotonicNanoseconds()
        let runner = try machine.start(bus: machine.makeBus(server: server), dispatcher: dispatcher)
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 30_000_000_000), [.guestRequested(status: 0)])
        let elapsed = Double(monotonicNanoseconds() - start) / 1e6
        XCTAssertGreaterThan(elapsed, Double(periods) * 0.95, "the guest really waited \(periods) periods of 1 ms")
        let data = try machine.readSignedData(ofVCPU: 0, count: 2 * periods)
        // Per period: the lateness after the guest's own spin, and its arrival before that spin.
        // (Lateness >= 0 holds by construction, as the guest spins to its deadline; what can go
        // wrong is the record: the spin only moves time forward, and an arrival past the deadline
        // leaves nothing to spin.) Whether the mapping ever releases the guest before its
        // deadline is tested without the spin, in GuestTSCMappingTests.
        // The host releases a sleep at most `ReturnLatencyEstimator`'s maximum (100 µs) early by
        // its clock, so with a correct TSC mapping no arrival is earlier than that.
        let earliestArrival = -Int64(Double(probe.tscMappings[0].frequencyHz) * 100e-6)
        for period in 0..<periods {
            let lateness = data[2 * period], arrival = data[2 * period + 1]
            XCTAssertGreaterThanOrEqual(lateness, arrival, "period \(period): resumed (\(lateness)) before it arrived (\(arrival))")
            XCTAssertGreaterThanOrEqual(arrival, earliestArrival, "period \(period): released more than 100 µs before its deadline")
        }
        XCTAssertEqual(server.statistics(vcpu: 0)?.parkedCalls, UInt64(periods))
        XCTAssertGreaterThan(strategy.statistics.timedWakes, 0)
        server.shutdown()
    }

    func testInterruptCyclicGuestTakesTimerInterrupts() throws {
        let kvm = try openKVMOrSkip()
        let periods = 100
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .cyclicInterrupt, arguments: (UInt64(periods), 0))],
                                              interruptController: true)
        var registers = try machine.vcpus[0].registers()
        registers.rdx = machine.tscMappings[0].frequencyHz / 1000
        try machine.vcpus[0].setRegisters(registers)
        let start = monotonicNanoseconds()
        let runner = try machine.start()
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 60_000_000_000), [.guestRequested(status: 0)])
        let elapsed = Double(monotonicNanoseconds() - start) / 1e6
        XCTAssertGreaterThan(elapsed, Double(periods) * 0.95)
        let lateness = try machine.readSignedData(ofVCPU: 0, count: periods)
        XCTAssertTrue(lateness.allSatisfy { $0 >= 0 }, "interrupts never arrive before the deadline")
    }
}

final class IndependentLongPollTests: XCTestCase {
    /// One vCPU long-polls for 2 s; the other keeps running and finishes meanwhile.
    func testOneVCPUParkedForTwoSecondsDoesNotHoldUpAnother() throws {
        let kvm = try openKVMOrSkip()
        let probe = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .spin)])
        let twoSeconds = probe.tscMappings[0].frequencyHz * 2
        let iterations: UInt64 = 50_000_000
        let machine = try BundledGuestMachine(system: kvm, vcpus: [
            BundledGuestVCPU(mode: .cyclicLongPoll, arguments: (1, twoSeconds)),
            BundledGuestVCPU(mode: .compute, arguments: (iterations, 3)),
        ])
        let dispatcher = try LongPollDispatcher(vcpuCount: 2)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        defer { server.shutdown() }
        let start = monotonicNanoseconds()
        let runner = try machine.start(bus: machine.makeBus(server: server), dispatcher: dispatcher)
        while runner.stopReasons[1] == nil && monotonicNanoseconds() - start < 10_000_000_000 { usleep(1000) }
        let computeDone = Double(monotonicNanoseconds() - start) / 1e9
        print("compute vCPU finished after \(computeDone) s while the other slept")
        // Independence without a wall-clock bound: when vCPU 1 is done, vCPU 0 is still parked.
        XCTAssertEqual(runner.stopReasons[1], .guestRequested(status: 0))
        XCTAssertNil(runner.stopReasons[0], "vCPU 0 is still parked")
        XCTAssertTrue(dispatcher.isWaiting(vcpu: 0))
        let expected = BundledGuestMode.expectedComputeResult(iterations: iterations, seed: 3)
        XCTAssertEqual(machine.ports.results(ofVCPU: 1), [expected & 0xFFFF_FFFF, expected >> 32])
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 10_000_000_000), [.guestRequested(status: 0), .guestRequested(status: 0)])
        XCTAssertGreaterThanOrEqual(Double(monotonicNanoseconds() - start) / 1e9, 2.0, "vCPU 0 slept its 2 s")
    }
}
