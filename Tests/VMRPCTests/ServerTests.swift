import RTVirtCore
import RTVirtTesting
import VMRPC
import XCTest
import LongPoll

final class ServerTests: XCTestCase {
    func testNullCallAndFeatureNegotiation() throws {
        let harness = try ServerHarness()
        let response = try harness.client().call(VMRPCProcedureID.null)
        XCTAssertEqual(response.status, .ok)
        XCTAssertEqual(response.results, [])
        XCTAssertEqual(response.hostFeatures, .all)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.completedCalls, 1)
        XCTAssertEqual(harness.server.procedureIDs, [1, 2, 3, 4, 5])
    }

    func testEachMalformedFieldIsRejectedWithItsStatus() throws {
        let harness = try ServerHarness()
        let client = harness.client()
        func status(_ change: (inout VMRPCRequestHeader) -> Void, arguments: [UInt8] = []) throws -> VMRPCStatus? {
            var header = VMRPCRequestHeader(procedure: VMRPCProcedureID.null, sequence: 42, argumentLength: UInt32(arguments.count))
            change(&header)
            return try client.callRaw(header: header, arguments: arguments).status
        }
        XCTAssertEqual(try status { $0.magic = 0x1234 }, .badMagic)
        XCTAssertEqual(try status { $0.version = 2 }, .badVersion)
        XCTAssertEqual(try status { $0.headerSize = 32 }, .badHeaderSize)
        XCTAssertEqual(try status { $0.features = 1 << 7 }, .unsupportedFeature)
        XCTAssertEqual(try status { $0.reserved = 1 }, .reservedNotZero)
        XCTAssertEqual(try status { $0.argumentLength = 1985 }, .badArgumentLength)
        XCTAssertEqual(try status { $0.argumentLength = UInt32.max }, .badArgumentLength)
        XCTAssertEqual(try status({ $0.argumentLength = 4 }, arguments: [1, 2, 3, 4]), .badArgumentLength, "null takes no arguments")
        XCTAssertEqual(try status { $0.procedure = 0 }, .unknownProcedure)
        XCTAssertEqual(try status { $0.procedure = 0x100 }, .unknownProcedure)
        XCTAssertEqual(try status { $0.procedure = VMRPCProcedureID.timerSleepUntil; $0.argumentLength = 7 }, .badArgumentLength)
        // reply whose payload length disagrees with the argument length
        let badReply = VMRPCReplyArguments(callID: 1, status: 0, payload: [1, 2]).encoded.dropLast()
        XCTAssertEqual(try status({ $0.procedure = VMRPCProcedureID.reply; $0.argumentLength = UInt32(badReply.count); $0.features = 1 },
                                  arguments: Array(badReply)), .badArguments)
        // Order: the first failing check wins.
        XCTAssertEqual(try status { $0.magic = 0; $0.version = 9 }, .badMagic)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.rejectedCalls, 13)
        XCTAssertEqual(try client.null(), .ok, "a rejected call does not break a healthy channel")
    }

    func testClockRead() throws {
        let harness = try ServerHarness(clock: ManualClock(start: 5_000_000))
        let reading = try XCTUnwrap(try harness.client().clockRead())
        XCTAssertEqual(reading, VMRPCClockReading(hostMonotonicNanoseconds: 5_000_000, guestTSC: 5_000_000,
                                                  tscFrequencyHz: 1_000_000_000, guestTSCOffset: 0))
        XCTAssertEqual(try harness.client(vcpu: 1).clockRead()?.guestTSC, 5_000_000)
    }

    func testSleepUntilParksUntilTheDeadline() throws {
        let harness = try ServerHarness(lateness: 250)
        let (status, wake) = try harness.client().sleepUntil(guestTSC: 3_000_000)
        XCTAssertEqual(status, .ok)
        XCTAssertEqual(wake?.guestTSC, 3_000_250)
        XCTAssertEqual(harness.clock.nowNanoseconds(), 3_000_250)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.parkedCalls, 1)
        // A deadline in the past returns at once, without blocking.
        let blocks = harness.waiter.blockCount.load(ordering: .relaxed)
        XCTAssertEqual(try harness.client().sleepUntil(guestTSC: 10).0, .ok)
        XCTAssertEqual(harness.waiter.blockCount.load(ordering: .relaxed), blocks)
        // Beyond the park limit (10 s): timed out at the limit.
        let start = harness.clock.nowNanoseconds()
        XCTAssertEqual(try harness.client().sleepUntil(guestTSC: start + 100_000_000_000).0, .timedOut)
        XCTAssertEqual(harness.clock.nowNanoseconds(), start + 10_000_000_000 + 250)
        // TSC comparisons wrap: a deadline more than 2^63 ticks ahead counts as past.
        XCTAssertEqual(try harness.client().sleepUntil(guestTSC: UInt64.max).0, .ok)
        // A cancelled vCPU gets `cancelled`.
        harness.dispatcher.cancel(vcpu: 0)
        XCTAssertEqual(try harness.client().sleepUntil(guestTSC: harness.clock.nowNanoseconds() + 1_000).0, .cancelled)
    }

    func testReverseCallRoundTrip() throws {
        let harness = try ServerHarness()
        let answer = LockedValue<Result<VMRPCReverseCallReply, VMRPCReverseCallError>?>(nil)
        try harness.server.reverseCall(vcpu: 1, procedure: 0x77, payload: [1, 2, 3]) { result in answer.withLock { $0 = result } }
        XCTAssertEqual(harness.server.outstandingReverseCalls(vcpu: 1), 1)
        let guest = harness.client(vcpu: 1, features: .reverseCalls)
        let (status, delivery) = try guest.poll(timeoutNanoseconds: 1_000_000)
        XCTAssertEqual(status, .ok)
        let call = try XCTUnwrap(delivery)
        XCTAssertEqual(call.procedure, 0x77)
        XCTAssertEqual(call.payload, [1, 2, 3])
        XCTAssertNotEqual(call.callID, 0)
        XCTAssertEqual(try harness.client(vcpu: 0, features: .reverseCalls).reply(callID: call.callID, status: 0, payload: []),
                       .noSuchCall, "only the vCPU the call went to can answer it")
        XCTAssertEqual(try guest.reply(callID: call.callID ^ (1 << 32), status: 0, payload: []), .noSuchCall, "wrong generation")
        XCTAssertEqual(try guest.reply(callID: call.callID, status: 5, payload: [9, 9]), .ok)
        XCTAssertEqual(answer.withLock { $0 }, .success(VMRPCReverseCallReply(status: 5, payload: [9, 9])))
        XCTAssertEqual(try guest.reply(callID: call.callID, status: 5, payload: []), .noSuchCall, "answered once")
        XCTAssertEqual(try guest.poll(timeoutNanoseconds: 1_000).0, .timedOut)
        XCTAssertEqual(try harness.client(vcpu: 1).poll(timeoutNanoseconds: 1).0, .unsupportedFeature,
                       "poll needs the reverse-calls bit")
    }

    func testReverseCallsQueuedWhileNobodyPollsAreKeptInOrderAndBounded() throws {
        var limits = VMRPCLimits()
        limits.reverseCallsPerVCPU = 3
        let harness = try ServerHarness(limits: limits)
        for procedure in 1...3 as ClosedRange<UInt32> {
            try harness.server.reverseCall(vcpu: 0, procedure: procedure, payload: []) { _ in }
        }
        XCTAssertThrowsError(try harness.server.reverseCall(vcpu: 0, procedure: 4, payload: []) { _ in }) {
            XCTAssertEqual($0 as? VMRPCReverseCallError, .queueFull(vcpu: 0, capacity: 3))
        }
        XCTAssertThrowsError(try harness.server.reverseCall(vcpu: 0, procedure: 4, payload: [UInt8](repeating: 0, count: 4000)) { _ in }) {
            XCTAssertEqual($0 as? VMRPCReverseCallError, .payloadTooLarge(4000))
        }
        XCTAssertThrowsError(try harness.server.reverseCall(vcpu: 9, procedure: 4, payload: []) { _ in })
        let guest = harness.client(features: .reverseCalls)
        XCTAssertEqual(try (1...3).map { _ in try guest.poll(timeoutNanoseconds: 0).1?.procedure }, [1, 2, 3])
    }

    func testShutdownFailsOutstandingReverseCalls() async throws {
        let harness = try ServerHarness()
        let failures = LockedValue<[VMRPCReverseCallError]>([])
        try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: []) { result in
            if case .failure(let error) = result { failures.withLock { $0.append(error) } }
        }
        // One delivered but not answered, one still queued.
        _ = try harness.client(features: .reverseCalls).poll(timeoutNanoseconds: 0)
        try harness.server.reverseCall(vcpu: 0, procedure: 2, payload: []) { result in
            if case .failure(let error) = result { failures.withLock { $0.append(error) } }
        }
        harness.server.shutdown()
        XCTAssertEqual(failures.withLock { $0 }, [.vmStopped, .vmStopped])
        do {
            _ = try await harness.server.reverseCall(vcpu: 1, procedure: 1, payload: [])
            XCTFail("a stopped server takes no calls")
        } catch {
            XCTAssertEqual(error, .vmStopped)
        }
    }

    func testMalformedCallStormBreaksOnlyThatChannel() throws {
        var limits = VMRPCLimits()
        limits.malformedCallBurst = 10
        limits.malformedCallsPerSecond = 1
        let harness = try ServerHarness(limits: limits)
        let hostile = harness.client(vcpu: 0)
        var header = VMRPCRequestHeader(procedure: 1, sequence: 1, argumentLength: 0)
        header.magic = 0
        var statuses: [VMRPCStatus?] = []
        for _ in 0..<12 { statuses.append(try hostile.callRaw(header: header, arguments: []).status) }
        XCTAssertEqual(statuses.prefix(10).allSatisfy { $0 == .badMagic }, true)
        XCTAssertEqual(statuses.suffix(2), [.channelBroken, .channelBroken])
        XCTAssertEqual(try hostile.null(), .channelBroken, "a broken channel serves nothing")
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.broken, true)
        XCTAssertEqual(try harness.client(vcpu: 1).null(), .ok, "other vCPUs are unaffected")
        XCTAssertThrowsError(try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: []) { _ in })
        harness.server.repairChannel(vcpu: 0)
        XCTAssertEqual(try hostile.null(), .ok)
    }

    func testDoorbellsOutsideTheLayoutAreCountedAndHarmless() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x1000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: GuestAddress(0), count: 1),
                                     dispatcher: dispatcher, procedures: [VMRPCStandardProcedures.null()])
        for vcpu in [-1, 1, 3, 4, 1000] { server.handleDoorbell(vcpu: vcpu) }
        XCTAssertEqual(server.unroutedDoorbells, 5)
        XCTAssertNil(server.statistics(vcpu: 1))
        // An all-zero slot is a bad-magic call.
        server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(try memory.read(UInt32.self, at: GuestAddress(32)), VMRPCStatus.badMagic.rawValue)
        let doorbell = server.makeDoorbell()
        XCTAssertEqual(doorbell.write(BusAccess(space: .port, base: 0x518, offset: 0, size: 1, vcpuID: 0), value: 0xFF), .handled)
        XCTAssertEqual(doorbell.read(BusAccess(space: .port, base: 0x518, offset: 0, size: 4, vcpuID: 0)), 0)
        XCTAssertEqual(server.statistics(vcpu: 0)?.doorbells, 2)
    }

    func testRegistrationRules() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x1000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let layout = VMRPCSlotLayout(base: GuestAddress(0), count: 1)
        func make(_ procedures: [VMRPCProcedure]) throws -> VMRPCServer {
            try VMRPCServer(memory: memory, slots: layout, dispatcher: dispatcher, procedures: procedures)
        }
        let noop: @Sendable (VMRPCCallContext, [UInt8]) -> VMRPCReply = { _, _ in .failed(.ok) }
        XCTAssertThrowsError(try make([VMRPCProcedure(id: 0, name: "zero", argumentLength: 0...0, handler: noop)])) {
            XCTAssertEqual($0 as? VMRPCConfigurationError, .reservedID)
        }
        XCTAssertThrowsError(try make([VMRPCStandardProcedures.null(), VMRPCStandardProcedures.null()])) {
            XCTAssertEqual($0 as? VMRPCConfigurationError, .duplicateID(1))
        }
        XCTAssertThrowsError(try make([VMRPCProcedure(id: 4, name: "poll", argumentLength: 0...0, handler: noop)])) {
            XCTAssertEqual($0 as? VMRPCConfigurationError, .builtInID(4))
        }
        XCTAssertThrowsError(try make([VMRPCProcedure(id: 9, name: "big", argumentLength: 0...1985, handler: noop)])) {
            XCTAssertEqual($0 as? VMRPCConfigurationError, .invalidArgumentLength(9))
        }
        let withoutReverse = try VMRPCServer(memory: memory, slots: layout, dispatcher: dispatcher, procedures: [], features: [])
        XCTAssertEqual(withoutReverse.procedureIDs, [])
    }
}

final class SleepCompensationTests: XCTestCase {
    /// In the 16-byte form the host learns the return latency from the reported arrivals and
    /// releases the vCPU that much before the deadline.
    func testSixteenByteSleepIsReleasedEarlyByTheLearnedReturnLatency() throws {
        let harness = try ServerHarness()
        let client = harness.client()
        func sleep(until deadline: UInt64, arrival: Int64) throws -> UInt64 {
            let arguments = VMRPCSleepUntil(deadlineGuestTSC: deadline, previousArrival: arrival).encoded
            XCTAssertEqual(arguments.count, 16)
            XCTAssertEqual(try client.call(VMRPCProcedureID.timerSleepUntil, arguments: arguments).status, .ok)
            return harness.clock.nowNanoseconds()
        }
        // A guest whose return from the host takes exactly 5 µs (1 GHz TSC: ticks are ns).
        let base = harness.clock.nowNanoseconds()
        var arrival: Int64 = 0
        var releases: [UInt64] = []
        for period in 1...20 {
            let deadline = base + UInt64(period) * 1_000_000
            let released = try sleep(until: deadline, arrival: arrival)
            releases.append(deadline - released)
            arrival = 5_000 - Int64(deadline - released)
        }
        XCTAssertEqual(releases.first, 0, "nothing learned yet: released at the deadline")
        XCTAssertEqual(releases.last, 5_000, "released one return trip early, so the guest arrives on time")
        XCTAssertEqual(arrival, 0)
        // The 8-byte form is never released early.
        XCTAssertEqual(try client.sleepUntil(guestTSC: base + 22_000_000).0, .ok)
        XCTAssertEqual(harness.clock.nowNanoseconds(), base + 22_000_000)
    }

    func testEstimatorIsBoundedAndIgnoresNonsense() {
        let estimator = ReturnLatencyEstimator(window: 4, percentile: 0.5, maximumNanoseconds: 10_000)
        for _ in 0..<4 { estimator.record(arrivalNanoseconds: 50_000) }
        XCTAssertEqual(estimator.currentEarlyReleaseNanoseconds, 10_000, "capped")
        estimator.record(arrivalNanoseconds: .nan)
        estimator.record(arrivalNanoseconds: 1e12)
        XCTAssertEqual(estimator.currentEarlyReleaseNanoseconds, 10_000, "garbage from the guest is ignored")
        for _ in 0..<4 { estimator.record(arrivalNanoseconds: -1_000_000) }
        XCTAssertEqual(estimator.currentEarlyReleaseNanoseconds, 0, "never released after the deadline")
    }
}

/// F3 and F4: the VMM's configuration mistakes are refused with typed errors; none traps.
final class ConfigurationTests: XCTestCase {
    func testSlotLayoutsAreCheckedAgainstMemoryAndDispatcher() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x4000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 2)
        func make(_ base: UInt64, _ count: Int) -> VMRPCConfigurationError? {
            do {
                _ = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: GuestAddress(base), count: count),
                                    dispatcher: dispatcher, procedures: [])
                return nil
            } catch { return error }
        }
        XCTAssertNil(make(0x1000, 2))
        XCTAssertEqual(make(0x1010, 2), .slotNotPageAligned(vcpu: 0, GuestAddress(0x1010)))
        XCTAssertEqual(make(0x3000, 2), .slotOutsideGuestMemory(vcpu: 1), "the second slot is past the end")
        XCTAssertEqual(make(0x8000, 2), .slotOutsideGuestMemory(vcpu: 0))
        XCTAssertEqual(make(UInt64.max & ~0xFFF, 2), .slotOutsideGuestMemory(vcpu: 0), "no overflow")
        XCTAssertEqual(make(0, 0), .vcpuWithoutSlot(vcpu: 0))
        XCTAssertEqual(make(0, -1), .vcpuWithoutSlot(vcpu: 0))
        XCTAssertEqual(make(0, 1), .vcpuWithoutSlot(vcpu: 1), "every vCPU of the dispatcher needs a slot")
        XCTAssertNil(VMRPCSlotLayout(base: GuestAddress(0), count: -1).address(ofVCPU: 0))
        // Slots anywhere, one per vCPU, never shared.
        func make(_ table: [Int: UInt64]) -> VMRPCConfigurationError? {
            do {
                _ = try VMRPCServer(memory: memory, slots: VMRPCSlotTable(table.mapValues { GuestAddress($0) }),
                                    dispatcher: dispatcher, procedures: [])
                return nil
            } catch { return error }
        }
        XCTAssertNil(make([0: 0x3000, 1: 0x1000]))
        XCTAssertEqual(make([0: 0x2000, 1: 0x2000]), .sharedSlot(vcpu: 1, otherVCPU: 0, GuestAddress(0x2000)))
        XCTAssertEqual(make([1: 0x2000]), .vcpuWithoutSlot(vcpu: 0))
    }

    func testLimitsAreChecked() throws {
        let harness = try ServerHarness()
        func make(_ change: (inout VMRPCLimits) -> Void) -> VMRPCConfigurationError? {
            var limits = VMRPCLimits()
            change(&limits)
            do {
                _ = try VMRPCServer(memory: harness.memory, slots: VMRPCSlotLayout(base: ServerHarness.slotBase, count: 2),
                                    dispatcher: harness.dispatcher, procedures: [], limits: limits)
                return nil
            } catch { return error }
        }
        XCTAssertEqual(make { $0.reverseCallsPerVCPU = -1 }, .invalidLimit(name: "reverseCallsPerVCPU", value: "-1"))
        XCTAssertEqual(make { $0.reverseCallsPerVCPU = 0 }, .invalidLimit(name: "reverseCallsPerVCPU", value: "0"))
        XCTAssertEqual(make { $0.reverseCallsPerVCPU = 1 << 20 }, .invalidLimit(name: "reverseCallsPerVCPU", value: "1048576"))
        XCTAssertEqual(make { $0.malformedCallBurst = -5 }, .invalidLimit(name: "malformedCallBurst", value: "-5"))
        XCTAssertEqual(make { $0.malformedCallsPerSecond = -1 }, .invalidLimit(name: "malformedCallsPerSecond", value: "-1"))
        XCTAssertEqual(make { $0.maximumWaitsPerCall = 0 }, .invalidLimit(name: "maximumWaitsPerCall", value: "0"))
        XCTAssertEqual(make { $0.maximumPollNanoseconds = 0 }, .invalidLimit(name: "maximumPollNanoseconds", value: "0"))
        XCTAssertEqual(make { $0.reverseCallTimeoutNanoseconds = 0 }, .invalidLimit(name: "reverseCallTimeoutNanoseconds", value: "0"))
        XCTAssertNil(make { _ in })
    }

    func testDispatcherCountsAreChecked() {
        XCTAssertThrowsError(try LongPollDispatcher(vcpuCount: -1)) { XCTAssertEqual($0 as? LongPollSetupError, .invalidVCPUCount(-1)) }
        XCTAssertThrowsError(try LongPollDispatcher(vcpuCount: 0)) { XCTAssertEqual($0 as? LongPollSetupError, .invalidVCPUCount(0)) }
        XCTAssertThrowsError(try LongPollDispatcher(vcpuCount: 1, queueCapacity: 0)) {
            XCTAssertEqual($0 as? LongPollSetupError, .invalidQueueCapacity(0))
        }
    }

    /// Results that cannot be written are never reported as `ok`.
    func testResultsThatCannotBeWrittenAnswerInternalError() throws {
        let memory = ResultsRefusingMemory()
        try memory.inner.addRegion(at: GuestAddress(0), size: 0x20000)
        let clock = ManualClock(start: 5_000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, clock: clock, waiter: ManualClockWaiter(clock: clock))
        let server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: ServerHarness.slotBase, count: 1),
                                     dispatcher: dispatcher, procedures: VMRPCStandardProcedures.all(clock: ManualGuestClock(clock: clock)))
        let client = VMRPCGuestClient(memory: memory, slot: ServerHarness.slotBase) { server.handleDoorbell(vcpu: 0) }
        let response = try client.call(VMRPCProcedureID.clockRead)
        XCTAssertEqual(response.status, .internalError)
        XCTAssertEqual(response.results, [])
        XCTAssertEqual(server.statistics(vcpu: 0)?.failedResponses, 1)
        XCTAssertEqual(try client.null(), .ok, "a call without results is answered")
    }
}

/// Guest memory that refuses writes to the results area of the slot at 0x10000.
final class ResultsRefusingMemory: GuestMemory {
    let inner = GuestMemoryMap()
    func read(into buffer: UnsafeMutableRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        try inner.read(into: buffer, at: address)
    }
    func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        if address.rawValue == ServerHarness.slotBase.rawValue + UInt64(VMRPCWire.resultsOffset) {
            throw .outOfBounds(address: address, length: UInt64(bytes.count))
        }
        try inner.write(bytes, at: address)
    }
    func withHostPointer<R>(at address: GuestAddress, length: UInt64, _ body: (UnsafeMutableRawPointer) throws -> R) throws -> R {
        try inner.withHostPointer(at: address, length: length, body)
    }
}

/// F5 of the spec: a `timer.sleepUntil` deadline is judged against the vCPU's TSC when the host
/// handles the call, not when the guest wrote it.
final class SleepDeadlineRuleTests: XCTestCase {
    func testDeadlinesMoreThanHalfTheTSCRangeAheadArePastWhenTheHostReadsThem() throws {
        let harness = try ServerHarness()
        let client = harness.client()
        let now = harness.clock.nowNanoseconds() // the guest TSC (1 GHz, offset 0)
        // 2^63 + 1000 ticks ahead at the host's reading: past, answered at once.
        XCTAssertEqual(try client.sleepUntil(guestTSC: now &+ (1 << 63) &+ 1_000).0, .ok)
        XCTAssertEqual(harness.clock.nowNanoseconds(), now)
        // The same deadline, read by the host 2 µs later, is 2^63 - 1000 ticks ahead: in the
        // future, beyond the park limit, so the vCPU parks to the limit and gets `timed_out`.
        let written = harness.clock.nowNanoseconds()
        harness.clock.advance(by: 2_000)
        XCTAssertEqual(try client.sleepUntil(guestTSC: written &+ (1 << 63) &+ 1_000).0, .timedOut)
        XCTAssertEqual(harness.clock.nowNanoseconds(), written + 2_000 + 10_000_000_000)
    }
}

/// Calls with the `interruptible` bit end with `interrupted` when the VMM interrupts the vCPU.
final class InterruptibleCallTests: XCTestCase {
    func testInterruptibleSleepEndsWithInterrupted() throws {
        let harness = try ServerHarness()
        let deadline = harness.clock.nowNanoseconds() + 5_000_000
        harness.dispatcher.interrupt(vcpu: 0)
        let plain = try harness.client(features: []).sleepUntil(guestTSC: deadline)
        XCTAssertEqual(plain.0, .ok, "a call without the bit sleeps to its deadline")
        harness.dispatcher.interrupt(vcpu: 0)
        let interruptible = harness.client(features: .interruptible)
        XCTAssertEqual(try interruptible.sleepUntil(guestTSC: deadline + 5_000_000).0, .interrupted)
        XCTAssertEqual(harness.clock.nowNanoseconds(), deadline, "it did not sleep")
        // A poll that is interrupted takes no reverse call.
        try harness.server.reverseCall(vcpu: 0, procedure: 9, payload: []) { _ in }
        harness.dispatcher.interrupt(vcpu: 0)
        let guest = harness.client(features: [.reverseCalls, .interruptible])
        XCTAssertEqual(try guest.poll(timeoutNanoseconds: 1_000).0, .interrupted)
        XCTAssertEqual(try guest.poll(timeoutNanoseconds: 1_000).1?.procedure, 9, "still queued for the next poll")
    }
}
