import Dispatch
import LongPoll
import RTVirtCore
import RTVirtTesting
import Synchronization
import VMRPC
import XCTest

/// The guest's side of an exitless call, step by step, over a slot (what the C header does).
struct ExitlessGuestSteps {
    let memory: any GuestMemory
    let slot: GuestAddress

    func word(_ offset: Int) -> GuestAddress { GuestAddress(slot.rawValue + UInt64(offset)) }

    /// Writes a request with the `exitless` bit (unless `features` says otherwise).
    func write(_ procedure: UInt32, sequence: UInt32, arguments: [UInt8] = [], features: VMRPCFeatures = .exitless) throws {
        let header = VMRPCRequestHeader(procedure: procedure, sequence: sequence, argumentLength: UInt32(arguments.count),
                                        features: features)
        try memory.write(bytes: header.bytes, at: slot)
        try memory.write(bytes: arguments, at: word(VMRPCWire.argumentsOffset))
    }

    /// Posts: `posted` = 1 with release, then a full fence.
    func post() throws {
        try memory.atomicStore(UInt32(1), at: word(VMRPCWire.postedOffset), ordering: .releasing)
        guestMemoryFullFence()
    }

    var posted: UInt32 { (try? memory.atomicLoad(UInt32.self, at: word(VMRPCWire.postedOffset), ordering: .acquiring)) ?? 0xDEAD }
    var completed: UInt32 { (try? memory.atomicLoad(UInt32.self, at: word(VMRPCWire.completedOffset), ordering: .acquiring)) ?? 0xDEAD }
    var needsDoorbell: UInt32 {
        (try? memory.atomicLoad(UInt32.self, at: word(VMRPCWire.needsDoorbellOffset), ordering: .acquiring)) ?? 0xDEAD
    }

    var response: VMRPCResponseHeader? {
        (try? memory.readBytes(count: VMRPCWire.responseLength, at: word(VMRPCWire.responseOffset)))
            .map { $0.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) } }
    }

    var results: [UInt8] {
        guard let length = response?.resultLength, length <= 2048 else { return [] }
        return (try? memory.readBytes(count: Int(length), at: word(VMRPCWire.resultsOffset))) ?? []
    }
}

/// A procedure that counts its runs per vCPU and answers the new count (u64).
final class CountingProcedure: Sendable {
    static let id: UInt32 = 0x300
    let counts = LockedValue<[Int: UInt64]>([:])
    var procedure: VMRPCProcedure {
        VMRPCProcedure(id: Self.id, name: "count", argumentLength: 0...0) { [counts] context, _ in
            let value = counts.withLock { counts -> UInt64 in
                counts[context.vcpuID, default: 0] += 1
                return counts[context.vcpuID]!
            }
            return .done(status: .ok, results: withUnsafeBytes(of: value.littleEndian, Array.init))
        }
    }
    func count(_ vcpu: Int) -> UInt64 { counts.withLock { $0[vcpu] ?? 0 } }
}

/// Each crossing of the exitless path and the doorbell path, one test each, driven step by step
/// with a manual poller so that the interleaving is the one named.
final class ExitlessCrossingTests: XCTestCase {
    let counter = CountingProcedure()

    func makeHarness(extra: [VMRPCProcedure] = [], limits: VMRPCLimits = VMRPCLimits()) throws -> (ServerHarness, VMRPCPoller, ExitlessGuestSteps) {
        let harness = try ServerHarness(extra: [counter.procedure] + extra, limits: limits)
        let poller = VMRPCPoller.manual()
        try poller.attach(harness.server)
        return (harness, poller, ExitlessGuestSteps(memory: harness.memory, slot: ServerHarness.slotBase))
    }

    /// The poller answers a posted call: `completed` shows it, no doorbell, no exit.
    func testPollerAnswersAPostedCallWithoutAnExit() throws {
        let (harness, poller, guest) = try makeHarness()
        XCTAssertEqual(guest.needsDoorbell, 0, "an awake poller serves the slot")
        try guest.write(CountingProcedure.id, sequence: 41)
        try guest.post()
        XCTAssertEqual(guest.completed, 0, "nothing answered before the poller looks")
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(guest.completed, 41)
        XCTAssertEqual(guest.posted, 0, "the poller took the call")
        XCTAssertEqual(guest.response?.status, VMRPCStatus.ok.rawValue)
        XCTAssertEqual(guest.response?.sequence, 41)
        XCTAssertEqual(guest.results, [1, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(poller.scanOnce(), 0, "nothing posted any more")
        let statistics = try XCTUnwrap(harness.server.statistics(vcpu: 0))
        XCTAssertEqual(statistics.doorbells, 0)
        XCTAssertEqual(statistics.exitlessCalls, 1)
        XCTAssertEqual(poller.statistics.answeredCalls, 1)
    }

    /// The guest's spin bound passes just as the poller answers, so it rings anyway: the
    /// doorbell finds the call answered and writes nothing; the procedure ran once.
    func testLateDoorbellAfterThePollerAnsweredWritesNothing() throws {
        let (harness, poller, guest) = try makeHarness()
        try guest.write(CountingProcedure.id, sequence: 7)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        let answered = try harness.memory.readBytes(count: 4096, at: ServerHarness.slotBase)
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(try harness.memory.readBytes(count: 4096, at: ServerHarness.slotBase), answered, "the slot is untouched")
        XCTAssertEqual(counter.count(0), 1, "answered once")
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.lateDoorbells, 1)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.rejectedCalls, 0, "a late doorbell is not malformed")
    }

    /// The guest rings while the poller is in the middle of serving its call: the doorbell
    /// waits for the poller, then finds the call answered. The procedure ran once.
    func testDoorbellDuringThePollersServeWaitsAndDoesNotAnswerAgain() throws {
        let entered = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let runs = Atomic<Int>(0)
        let slow = VMRPCProcedure(id: 0x310, name: "slow", argumentLength: 0...0) { _, _ in
            runs.wrappingAdd(1, ordering: .relaxed)
            entered.signal()
            release.wait()
            return .done(status: .ok, results: [0x51])
        }
        let (harness, poller, guest) = try makeHarness(extra: [slow])
        try guest.write(0x310, sequence: 9)
        try guest.post()
        let pollerThread = try HostThread(name: "test-poller") { poller.scanOnce() }
        entered.wait() // the poller took the call and runs the procedure
        let doorbellReturned = Atomic<Bool>(false)
        let vcpuThread = try HostThread(name: "test-vcpu") {
            harness.server.handleDoorbell(vcpu: 0)
            doorbellReturned.store(true, ordering: .relaxed)
        }
        usleep(20_000) // let the doorbell reach the slot's lock (the assertions hold either way)
        XCTAssertFalse(doorbellReturned.load(ordering: .relaxed), "the doorbell waits for the poller's answer")
        release.signal()
        pollerThread.join()
        vcpuThread.join()
        XCTAssertEqual(runs.load(ordering: .relaxed), 1)
        XCTAssertEqual(guest.completed, 9)
        XCTAssertEqual(guest.results, [0x51])
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.lateDoorbells, 1)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.exitlessCalls, 1)
    }

    /// The guest rings before the poller looks (it posted and rang at once): the doorbell takes
    /// the call, and the poller then finds nothing.
    func testDoorbellTakesACallThePollerHasNotSeen() throws {
        let (harness, poller, guest) = try makeHarness()
        try guest.write(CountingProcedure.id, sequence: 3)
        try guest.post()
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.completed, 3, "a posted call answered by the doorbell gets completed too")
        XCTAssertEqual(guest.response?.sequence, 3)
        XCTAssertEqual(poller.scanOnce(), 0)
        XCTAssertEqual(counter.count(0), 1)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.postedDoorbellCalls, 1)
    }

    /// The guest posts just before the poller's last look on its way to sleep: the poller sees
    /// the post, stays awake and answers it.
    func testPostBeforeThePollersLastLookKeepsItAwake() throws {
        let (harness, poller, guest) = try makeHarness()
        try guest.write(CountingProcedure.id, sequence: 5)
        try guest.post()
        XCTAssertFalse(poller.prepareToSleep(), "a posted call keeps the poller awake")
        XCTAssertTrue(harness.server.isPollerAwake)
        XCTAssertEqual(guest.needsDoorbell, 0)
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(guest.completed, 5)
    }

    /// The guest posts after the poller set `needs_doorbell` on its way to sleep: the guest
    /// sees the flag after its fence and rings; the doorbell takes the call.
    func testPostAfterThePollerFellAsleepIsRung() throws {
        let (harness, poller, guest) = try makeHarness()
        XCTAssertTrue(poller.prepareToSleep())
        XCTAssertEqual(guest.needsDoorbell, 1)
        try guest.write(CountingProcedure.id, sequence: 6)
        try guest.post()
        XCTAssertEqual(guest.needsDoorbell, 1, "so the guest rings")
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.completed, 6)
        XCTAssertEqual(counter.count(0), 1)
        poller.awaken()
        XCTAssertEqual(guest.needsDoorbell, 0)
        XCTAssertEqual(poller.scanOnce(), 0, "nothing left for the poller")
    }

    /// A blocking procedure posted: the poller does not run it, hands it back with
    /// `needs_doorbell`, the guest rings and the doorbell parks the vCPU and answers.
    func testBlockingCallIsHandedBackAndParksOnTheDoorbell() throws {
        let runs = Atomic<Int>(0)
        let blocking = VMRPCProcedure(id: 0x311, name: "sleepy", argumentLength: 0...0, blocking: true) { context, _ in
            runs.wrappingAdd(1, ordering: .relaxed)
            XCTAssertFalse(context.onPoller, "a blocking procedure never runs on the poller")
            return .wait(LongPollRequest(deadline: 5_000_000)) { _ in .done(status: .ok, results: [0x77]) }
        }
        let (harness, poller, guest) = try makeHarness(extra: [blocking])
        try guest.write(0x311, sequence: 21)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(runs.load(ordering: .relaxed), 0, "not run by the poller")
        XCTAssertEqual(guest.needsDoorbell, 1, "use the doorbell")
        XCTAssertEqual(guest.completed, 0, "and no answer yet")
        XCTAssertEqual(guest.posted, 0, "the call was taken, so nobody else takes it")
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.awaitingDoorbell, true)
        XCTAssertEqual(poller.scanOnce(), 0, "the poller leaves the slot alone meanwhile")
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(runs.load(ordering: .relaxed), 1)
        XCTAssertEqual(guest.completed, 21)
        XCTAssertEqual(guest.results, [0x77])
        XCTAssertEqual(guest.needsDoorbell, 0, "the exitless path is open again")
        let statistics = try XCTUnwrap(harness.server.statistics(vcpu: 0))
        XCTAssertEqual(statistics.parkedCalls, 1, "the vCPU parked on its own thread")
        XCTAssertEqual(statistics.handoffs, 1)
        XCTAssertFalse(statistics.awaitingDoorbell)
        XCTAssertEqual(harness.waiter.blockCount.load(ordering: .relaxed), 1)
    }

    /// `timer.sleepUntil` and `poll` are blocking: both are handed back unrun.
    func testStandardBlockingProceduresAreHandedBack() throws {
        let (harness, poller, guest) = try makeHarness()
        try guest.write(VMRPCProcedureID.timerSleepUntil, sequence: 1, arguments: VMRPCSleepUntil(deadlineGuestTSC: 2_000_000).encoded)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(guest.needsDoorbell, 1)
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.completed, 1)
        XCTAssertEqual(guest.response?.status, VMRPCStatus.ok.rawValue)
        try harness.server.reverseCall(vcpu: 0, procedure: 0x77, payload: [1]) { _ in }
        try guest.write(VMRPCProcedureID.poll, sequence: 2, arguments: VMRPCPoll(timeoutNanoseconds: 1_000).encoded,
                        features: [.exitless, .reverseCalls])
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(guest.needsDoorbell, 1)
        XCTAssertEqual(harness.server.outstandingReverseCalls(vcpu: 0), 1)
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.completed, 2)
        XCTAssertEqual(try VMRPCReverseCallDelivery.decode(guest.results).payload, [1], "the poll delivered on the doorbell")
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.handoffs, 2)
    }

    /// A procedure not marked blocking that answers "wait" anyway: the poller ran it once and
    /// hands its wait back; the doorbell waits and continues without running it again.
    func testUnannouncedWaitIsHandedBackWithoutRunningTwice() throws {
        let runs = Atomic<Int>(0), continuations = Atomic<Int>(0)
        let sneaky = VMRPCProcedure(id: 0x312, name: "sneaky", argumentLength: 0...0) { context, _ in
            runs.wrappingAdd(1, ordering: .relaxed)
            XCTAssertTrue(context.onPoller)
            return .wait(LongPollRequest(deadline: 3_000_000)) { _ in
                continuations.wrappingAdd(1, ordering: .relaxed)
                return .done(status: .ok, results: [2])
            }
        }
        let (harness, poller, guest) = try makeHarness(extra: [sneaky])
        try guest.write(0x312, sequence: 4)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(runs.load(ordering: .relaxed), 1)
        XCTAssertEqual(continuations.load(ordering: .relaxed), 0, "the poller does not wait")
        XCTAssertEqual(guest.needsDoorbell, 1)
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(runs.load(ordering: .relaxed), 1)
        XCTAssertEqual(continuations.load(ordering: .relaxed), 1)
        XCTAssertEqual(guest.completed, 4)
        XCTAssertEqual(guest.results, [2])
    }

    /// While a vCPU sits in a doorbell call (parked in it, here: inside its procedure), another
    /// vCPU of the guest writes 1 into the first one's `posted` word. The poller neither spins on
    /// the locked slot nor stays awake for it: it may sleep, and the slot is served once the
    /// doorbell call is over.
    func testPostIntoASlotWhoseVCPUIsInADoorbellCallDoesNotKeepThePollerAwake() throws {
        let entered = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let parked = VMRPCProcedure(id: 0x313, name: "parked", argumentLength: 0...0) { _, _ in
            entered.signal()
            release.wait()
            return .done(status: .ok, results: [0x33])
        }
        let (harness, poller, guest) = try makeHarness(extra: [parked])
        try guest.write(0x313, sequence: 7, features: []) // an ordinary call, rung
        let vcpuThread = try HostThread(name: "test-vcpu") { harness.server.handleDoorbell(vcpu: 0) }
        entered.wait()
        try guest.post() // the hostile store from another vCPU
        XCTAssertEqual(poller.scanOnce(), 0, "the slot is in a doorbell call: left alone")
        XCTAssertTrue(poller.prepareToSleep(), "a post into a slot in a doorbell call does not keep the poller awake")
        XCTAssertEqual(guest.needsDoorbell, 1)
        release.signal()
        vcpuThread.join()
        XCTAssertEqual(guest.response?.sequence, 7)
        XCTAssertEqual(guest.results, [0x33])
        poller.awaken()
        XCTAssertEqual(poller.scanOnce(), 1, "after the call, the posted word is served (here: its stale header)")
    }

    /// The poller hands a blocking call back while the guest, which posted and rang at once,
    /// is already at the doorbell. Whichever comes first, once the doorbell answered the call
    /// no hand-off is left pending, so the slot's exitless path stays open. Repeated to shake
    /// out the interleavings.
    func testHandoffRacingItsDoorbellLeavesNothingPending() throws {
        let blocking = VMRPCProcedure(id: 0x314, name: "blocks", argumentLength: 0...0, blocking: true) { _, _ in
            .wait(LongPollRequest(deadline: 0)) { _ in .done(status: .ok, results: [1]) }
        }
        let (harness, poller, guest) = try makeHarness(extra: [blocking])
        var stuck = 0
        for round in 1...20_000 {
            try guest.write(0x314, sequence: UInt32(round))
            try guest.post()
            let doorbell = try HostThread(name: "test-vcpu") { harness.server.handleDoorbell(vcpu: 0) }
            poller.scanOnce()
            doorbell.join()
            if guest.completed != UInt32(round) { harness.server.handleDoorbell(vcpu: 0) } // the doorbell came first: ring again
            XCTAssertEqual(guest.completed, UInt32(round))
            if harness.server.statistics(vcpu: 0)?.awaitingDoorbell == true { stuck += 1; break }
        }
        XCTAssertEqual(stuck, 0, "a hand-off marked pending after its doorbell answered it")
    }

    /// A guest that posts a new call instead of ringing for the handed-back one abandons it:
    /// the poller leaves the slot alone, the doorbell takes the new call and counts the old
    /// one as malformed.
    func testPostingInsteadOfRingingAbandonsTheHandedBackCall() throws {
        let (harness, poller, guest) = try makeHarness()
        try guest.write(VMRPCProcedureID.timerSleepUntil, sequence: 1, arguments: VMRPCSleepUntil(deadlineGuestTSC: 2_000_000).encoded)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        try guest.write(CountingProcedure.id, sequence: 2)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 0, "not while a handed-back call waits for its doorbell")
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.completed, 2)
        XCTAssertEqual(guest.response?.sequence, 2)
        XCTAssertEqual(counter.count(0), 1)
        let statistics = try XCTUnwrap(harness.server.statistics(vcpu: 0))
        XCTAssertEqual(statistics.abandonedHandoffs, 1)
        XCTAssertEqual(statistics.rejectedCalls, 1)
        XCTAssertEqual(statistics.parkedCalls, 0, "the abandoned sleep never parked")
        XCTAssertEqual(guest.needsDoorbell, 0)
    }

    /// Ordinary calls (no bit, no post) mix freely with exitless ones, including right after a
    /// call the poller answered that the guest never rang for.
    func testOrdinaryCallsMixWithExitlessOnes() throws {
        let (harness, poller, guest) = try makeHarness()
        try guest.write(CountingProcedure.id, sequence: 1)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        try guest.write(CountingProcedure.id, sequence: 2, features: [])
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.response?.sequence, 2)
        XCTAssertEqual(guest.results, [2, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(guest.completed, 1, "an ordinary call does not touch completed")
        let statistics = try XCTUnwrap(harness.server.statistics(vcpu: 0))
        XCTAssertEqual(statistics.lateDoorbells, 0)
        XCTAssertEqual(statistics.rejectedCalls, 0)
    }

    /// A posted call without the `exitless` bit is malformed (`unsupported_feature`), on either path.
    func testPostedCallsRequireTheExitlessBit() throws {
        let (harness, poller, guest) = try makeHarness()
        try guest.write(CountingProcedure.id, sequence: 1, features: [])
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(guest.response?.status, VMRPCStatus.unsupportedFeature.rawValue)
        XCTAssertEqual(guest.completed, 1)
        try guest.write(CountingProcedure.id, sequence: 2, features: [])
        try guest.post()
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.response?.status, VMRPCStatus.unsupportedFeature.rawValue)
        XCTAssertEqual(counter.count(0), 0)
    }

    /// A host that does not offer `exitless` treats a posted call as an ordinary one that asks
    /// for a feature it lacks, and never writes the control area.
    func testHostWithoutExitlessNeverTouchesTheControlArea() throws {
        let harness = try ServerHarness(extra: [counter.procedure])
        let server = try VMRPCServer(memory: harness.memory, slots: VMRPCSlotLayout(base: GuestAddress(0x14000), count: 2),
                                     dispatcher: harness.dispatcher, procedures: [counter.procedure],
                                     features: [.reverseCalls])
        let guest = ExitlessGuestSteps(memory: harness.memory, slot: GuestAddress(0x14000))
        XCTAssertEqual(guest.needsDoorbell, 0)
        XCTAssertThrowsError(try VMRPCPoller.manual().attach(server)) { XCTAssertEqual($0 as? VMRPCPollerError, .serverWithoutExitless) }
        try guest.write(CountingProcedure.id, sequence: 1)
        try guest.post()
        XCTAssertEqual(server.serveExitless(vcpu: 0), .idle)
        server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.response?.status, VMRPCStatus.unsupportedFeature.rawValue)
        XCTAssertEqual(guest.posted, 1)
        XCTAssertEqual(guest.completed, 0)
        XCTAssertEqual(guest.needsDoorbell, 0)
    }

    /// A storm of garbage posts costs the poller one validation each until the malformed-call
    /// budget is spent; then the channel is doorbell-only (the poller no longer reads it,
    /// `needs_doorbell` stays 1) until the VMM repairs it.
    func testGarbagePostsCostNoMoreThanTheBudgetThenDoorbellOnly() throws {
        var limits = VMRPCLimits()
        limits.malformedCallBurst = 10
        limits.malformedCallsPerSecond = 0
        let (harness, poller, guest) = try makeHarness(limits: limits)
        try harness.memory.write(bytes: [UInt8](repeating: 0xA5, count: 32), at: ServerHarness.slotBase)
        var taken = 0
        for _ in 0..<1000 {
            try guest.post()
            taken += poller.scanOnce()
        }
        XCTAssertEqual(taken, 11, "the burst of 10, and the call that broke the channel")
        XCTAssertEqual(guest.response?.status, VMRPCStatus.channelBroken.rawValue)
        XCTAssertEqual(guest.needsDoorbell, 1, "doorbell-only")
        XCTAssertEqual(guest.posted, 1, "the poller no longer takes posted calls")
        let statistics = try XCTUnwrap(harness.server.statistics(vcpu: 0))
        XCTAssertTrue(statistics.broken)
        XCTAssertEqual(statistics.rejectedCalls, 11)
        XCTAssertEqual(harness.server.statistics(vcpu: 1)?.broken, false, "only that channel")
        try guest.write(CountingProcedure.id, sequence: 8)
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.response?.status, VMRPCStatus.channelBroken.rawValue)
        harness.server.repairChannel(vcpu: 0)
        XCTAssertEqual(guest.needsDoorbell, 0, "repaired: exitless again")
        try guest.write(CountingProcedure.id, sequence: 9)
        try guest.post()
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(guest.response?.status, VMRPCStatus.ok.rawValue)
        XCTAssertEqual(guest.completed, 9)
    }

    /// `needs_doorbell` follows the poller: 1 without one, 0 while one is attached and awake,
    /// 1 again after a detach, a sleep, or the server's shutdown.
    func testNeedsDoorbellFollowsThePoller() throws {
        let harness = try ServerHarness(extra: [counter.procedure])
        let guest = ExitlessGuestSteps(memory: harness.memory, slot: ServerHarness.slotBase)
        XCTAssertEqual(guest.needsDoorbell, 1, "no poller yet")
        let poller = VMRPCPoller.manual()
        try poller.attach(harness.server)
        XCTAssertEqual(guest.needsDoorbell, 0)
        XCTAssertThrowsError(try poller.attach(harness.server)) { XCTAssertEqual($0 as? VMRPCPollerError, .alreadyAttached) }
        XCTAssertThrowsError(try VMRPCPoller.manual().attach(harness.server)) { XCTAssertEqual($0 as? VMRPCPollerError, .alreadyAttached) }
        poller.detach(harness.server)
        XCTAssertEqual(guest.needsDoorbell, 1)
        XCTAssertTrue(poller.servers.isEmpty)
        try poller.attach(harness.server)
        XCTAssertEqual(guest.needsDoorbell, 0)
        // A guest that zeroes its slot learns the flag again at its next doorbell.
        try harness.memory.write(bytes: [UInt8](repeating: 0, count: 64), at: ServerHarness.slotBase)
        XCTAssertTrue(poller.prepareToSleep())
        try harness.memory.atomicStore(UInt32(0), at: guest.word(VMRPCWire.needsDoorbellOffset), ordering: .relaxed)
        try guest.write(CountingProcedure.id, sequence: 1, features: [])
        harness.server.handleDoorbell(vcpu: 0)
        XCTAssertEqual(guest.needsDoorbell, 1)
        poller.awaken()
        harness.server.shutdown()
        XCTAssertEqual(guest.needsDoorbell, 1)
        XCTAssertTrue(poller.servers.isEmpty, "shutdown detaches the server")
    }

    /// One poller serves the slots of several VMs' servers; detaching one leaves the other served.
    func testOnePollerServesSeveralVMs() throws {
        let first = try ServerHarness(extra: [counter.procedure]), second = try ServerHarness(extra: [counter.procedure])
        let poller = VMRPCPoller.manual()
        try poller.attach(first.server)
        try poller.attach(second.server)
        let guests = [first, second].map { ExitlessGuestSteps(memory: $0.memory, slot: ServerHarness.slotBase) }
        for (index, guest) in guests.enumerated() {
            try guest.write(CountingProcedure.id, sequence: UInt32(10 + index))
            try guest.post()
        }
        XCTAssertEqual(poller.scanOnce(), 2)
        XCTAssertEqual(guests.map(\.completed), [10, 11])
        poller.detach(first.server)
        XCTAssertEqual(guests.map(\.needsDoorbell), [1, 0])
        for guest in guests { try guest.post() }
        XCTAssertEqual(poller.scanOnce(), 1, "only the attached VM")
        XCTAssertEqual(guests[0].posted, 1)
    }

    /// The poller's configuration is checked: CPUs given, none of them real-time, the idle
    /// period and back-off in range.
    func testPollerConfigurationIsChecked() {
        XCTAssertThrowsError(try VMRPCPollerConfiguration(cpus: []).validate()) { XCTAssertEqual($0 as? VMRPCPollerError, .noCPUs) }
        XCTAssertThrowsError(try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: [0, 1], realtimeCPUs: [1]))) {
            XCTAssertEqual($0 as? VMRPCPollerError, .overlapsRealtimeCPUs([1]))
        }
        XCTAssertThrowsError(try VMRPCPollerConfiguration(cpus: [0], idleNanoseconds: 10).validate()) {
            XCTAssertEqual($0 as? VMRPCPollerError, .invalidIdlePeriod(nanoseconds: 10))
        }
        XCTAssertThrowsError(try VMRPCPollerConfiguration(cpus: [0], maximumBackoffPauses: 0).validate()) {
            XCTAssertEqual($0 as? VMRPCPollerError, .invalidBackoff(0))
        }
        XCTAssertNoThrow(try VMRPCPollerConfiguration(cpus: [0], realtimeCPUs: [1]).validate())
    }
}
