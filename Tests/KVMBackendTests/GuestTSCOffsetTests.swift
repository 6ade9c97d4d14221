import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import XCTest
import LongPoll
import RealtimeVCPU
import RTVirtXCTestSupport

/// The guest TSC offset of a vCPU that never runs is constant, so every reading of it can be
/// checked against one reference: the kernel's own value where it reports one.
final class GuestTSCOffsetTests: XCTestCase {
    private func vcpuThatNeverRuns() throws -> KVMVirtualCPU {
        try openKVMOrSkip().makeKVMVirtualMachine().makeKVMVCPU(id: 0)
    }

    private func ticks(microseconds: Double, _ vcpu: KVMVirtualCPU) -> UInt64 {
        UInt64(microseconds * Double(vcpu.tscFrequencyKHz() ?? 1_000_000) / 1000)
    }

    private func report(_ name: String, _ readings: [TSCOffsetReading], reference: Int64, _ vcpu: KVMVirtualCPU) {
        let perMicrosecond = Double(vcpu.tscFrequencyKHz() ?? 1_000_000) / 1000
        let deviations = readings.map { Double(($0.offset - reference).magnitude) / perMicrosecond }.sorted()
        let bounds = readings.map { Double($0.errorBound) / perMicrosecond }.sorted()
        print(String(format: "%@: %d readings, deviation from the reference p50 %.3f p99 %.3f max %.3f µs; bound p50 %.3f max %.3f µs",
                     name, readings.count, deviations[deviations.count / 2], deviations[deviations.count * 99 / 100],
                     deviations.last!, bounds[bounds.count / 2], bounds.last!))
    }

    /// What every user gets (`readTSCOffset()` with its defaults): 20,000 readings deviate from
    /// the true offset by at most 2 µs or their own reported bound.
    func testTwentyThousandReadingsDeviateByAtMostTwoMicrosecondsOrTheirBound() throws {
        let vcpu = try vcpuThatNeverRuns()
        let exact = try? vcpu.readTSCOffset(method: .kernelAttribute)
        print("KVM_VCPU_TSC_OFFSET: \(exact.map { "offset \($0.offset) ticks" } ?? "not offered by this kernel; readings are sampled")")
        let readings = try (0..<20_000).map { _ in try vcpu.readTSCOffset() }
        let reference = exact?.offset ?? readings.map(\.offset).sorted()[readings.count / 2]
        report("readTSCOffset()", readings, reference: reference, vcpu)
        let twoMicroseconds = ticks(microseconds: 2, vcpu)
        let outside = readings.filter { ($0.offset - reference).magnitude > max(twoMicroseconds, $0.errorBound) }
        XCTAssertEqual(outside.count, 0, "readings off by more than 2 µs and their bound: \(outside.prefix(5))")
        if exact != nil {
            XCTAssertTrue(readings.allSatisfy { $0 == TSCOffsetReading(offset: reference, errorBound: 0, method: .kernelAttribute, samples: 1) })
        }
    }

    /// The fallback, forced: each sampled reading's interval holds the true offset, and the
    /// bound stays within half the widest bracket accepted.
    func testSampledReadingsHoldTheTrueOffsetWithinTheirBound() throws {
        let vcpu = try vcpuThatNeverRuns()
        let limits = TSCSamplingLimits()
        let readings = try (0..<20_000).map { _ in try vcpu.readTSCOffset(method: .msrSampling, limits: limits) }
        XCTAssertTrue(readings.allSatisfy { $0.method == .msrSampling && $0.samples == limits.samples })
        let halfWindow = ticks(microseconds: Double(limits.maximumWindowNanoseconds) / 2000, vcpu)
        XCTAssertTrue(readings.allSatisfy { $0.errorBound <= halfWindow + 1 }, "a bound wider than half the widest bracket")
        if let exact = try? vcpu.readTSCOffset(method: .kernelAttribute) {
            report("sampled", readings, reference: exact.offset, vcpu)
            let outside = readings.filter { ($0.offset - exact.offset).magnitude > $0.errorBound }
            XCTAssertEqual(outside.count, 0, "sampled intervals that miss the kernel's offset: \(outside.prefix(5))")
        } else {
            let reference = readings.map(\.offset).sorted()[readings.count / 2]
            report("sampled", readings, reference: reference, vcpu)
            let twoMicroseconds = ticks(microseconds: 2, vcpu)
            XCTAssertTrue(readings.allSatisfy { ($0.offset - reference).magnitude <= max(twoMicroseconds, 2 * $0.errorBound) })
        }
    }

    func testImpossibleSamplingLimitsAreTypedErrors() throws {
        let vcpu = try vcpuThatNeverRuns()
        XCTAssertThrowsError(try vcpu.readTSCOffset(method: .msrSampling, limits: TSCSamplingLimits(samples: 0))) {
            XCTAssertEqual($0 as? KVMError, .invalidTSCSamplingLimits)
        }
        // No bracket around an ioctl is 1 ns wide.
        XCTAssertThrowsError(try vcpu.readTSCOffset(method: .msrSampling, limits: TSCSamplingLimits(maximumAttempts: 50, maximumWindowNanoseconds: 1))) {
            guard case .tscOffsetUnbounded(_, 1, 50)? = $0 as? KVMError else { return XCTFail("\($0)") }
        }
    }
}

/// The guest's own clock is the judge: with the TSC mapping RTVirt builds, a sleep never ends
/// before its deadline by the guest's TSC, even without the guest-side spin that hides early
/// releases in the cyclic modes.
final class GuestSleepDeadlineTests: XCTestCase {
    func testTenThousandShortSleepsNeverResumeBeforeTheirDeadline() throws {
        let kvm = try openKVMOrSkip()
        let sleeps = 10_000
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .sleepCheck, arguments: (UInt64(sleeps), 0))])
        let mapping = machine.tscMappings[0]
        var registers = try machine.vcpus[0].registers()
        // 200 µs: well beyond a doorbell round trip (~20 µs from CPL 3 on kvm_pvm), so that a
        // deadline converted too early is still ahead when the host releases the guest.
        registers.rdx = mapping.frequencyHz / 5_000
        try machine.vcpus[0].setRegisters(registers)
        // The host wakes early and spins to the deadline by its own clock, so the guest resumes
        // one return trip after it: an offset error larger than that shows as an early resume.
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, timerStrategy: DeadlineTimerStrategy())
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        defer { server.shutdown() }
        // SCHED_FIFO with 1 ns timer slack (when permitted) makes the host wake close to the
        // deadline, so that smaller offset errors show too.
        let scheduler = RealtimeVCPUScheduler(policies: [0: RealtimePolicy(schedulingClass: .fifo(priority: 50))])
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(server: server), dispatcher: dispatcher,
                                              onThreadStart: scheduler.threadStarted, onThreadEnd: scheduler.threadEnded)
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 300_000_000_000), [.guestRequested(status: 0)])
        print("vCPU thread: \(scheduler.status(vcpu: 0))")
        XCTAssertEqual(server.statistics(vcpu: 0)?.parkedCalls, UInt64(sleeps), "every sleep parked the vCPU")
        let lateness = try machine.readSignedData(ofVCPU: 0, count: sleeps)
        let microseconds = lateness.map { Double($0) * 1e6 / Double(mapping.frequencyHz) }.sorted()
        print(String(format: "%d sleeps of 200 µs, mapping bound %.3f µs: resumed after the deadline by min %.1f p50 %.1f p99 %.1f max %.1f µs",
                     sleeps, mapping.offsetErrorBoundNanoseconds / 1000, microseconds[0], microseconds[sleeps / 2],
                     microseconds[sleeps * 99 / 100], microseconds[sleeps - 1]))
        let early = lateness.enumerated().filter { $0.element < 0 }
        XCTAssertEqual(early.count, 0, "sleeps resumed before their deadline (index, cycles): \(early.prefix(10).map { ($0.offset, $0.element) })")
    }
}
