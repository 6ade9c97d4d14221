import Foundation
import RTVirtCore
import RTVirtTesting
import VMRPC
import XCTest
import LongPoll

/// Collects the outcomes of reverse calls, to check that each call has exactly one.
final class OutcomeLog: Sendable {
    typealias Outcome = Result<VMRPCReverseCallReply, VMRPCReverseCallError>
    private let outcomes = ConditionLock<[Int: [Outcome]]>([:])

    /// A completion that records under `key`.
    func completion(_ key: Int) -> @Sendable (Outcome) -> Void {
        { outcome in self.outcomes.withLockAndBroadcast { $0[key, default: []].append(outcome) } }
    }

    /// The outcomes of `key`.
    func outcomes(_ key: Int) -> [Outcome] { outcomes.withLock { $0[key] ?? [] } }

    /// Keys with more than one outcome.
    var keysWithSeveralOutcomes: [Int] { outcomes.withLock { $0.filter { $0.value.count > 1 }.map(\.key) } }

    /// Number of keys with an outcome.
    var count: Int { outcomes.withLock { $0.count } }

    /// Waits until `keys` outcomes exist or `seconds` pass (a hang detector, not a timing check).
    @discardableResult
    func wait(forKeys keys: Int, seconds: Double = 30) -> Bool {
        outcomes.wait(until: { $0.count >= keys },
                      deadlineNanoseconds: monotonicNanoseconds() + UInt64(seconds * 1e9)) { state, _ in state.count >= keys }
    }
}

final class ReverseCallTests: XCTestCase {
    /// F2: a guest that never polled cannot answer a call, even knowing its id.
    func testReplyToAnUndeliveredCallIsRefused() throws {
        let harness = try ServerHarness()
        let log = OutcomeLog()
        let handle = try harness.server.reverseCall(vcpu: 0, procedure: 7, payload: [1], completion: log.completion(0))
        let guest = harness.client(features: .reverseCalls)
        XCTAssertEqual(try guest.reply(callID: handle.callID, status: 99, payload: []), .noSuchCall,
                       "the guest was never given the call")
        XCTAssertEqual(log.outcomes(0), [])
        XCTAssertEqual(harness.server.outstandingReverseCalls(vcpu: 0), 1)
        XCTAssertEqual(harness.dispatcher.queuedMessageCount(vcpu: 0), 1, "still queued for the guest")
        let delivery = try XCTUnwrap(try guest.poll(timeoutNanoseconds: 0).1)
        XCTAssertEqual(delivery.callID, handle.callID)
        XCTAssertEqual(try guest.reply(callID: handle.callID, status: 3, payload: [4]), .ok)
        XCTAssertEqual(log.outcomes(0), [.success(VMRPCReverseCallReply(status: 3, payload: [4]))])
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.rejectedCalls, 1, "the early reply counted as malformed")
    }

    /// Replies with forged ids spend the malformed-call budget, so guessing breaks the channel.
    func testGuessingIDsBreaksTheChannel() throws {
        var limits = VMRPCLimits()
        limits.malformedCallBurst = 20
        limits.malformedCallsPerSecond = 0
        let harness = try ServerHarness(limits: limits)
        let guest = harness.client(features: .reverseCalls)
        var statuses: [VMRPCStatus?] = []
        for guess in 1...25 as ClosedRange<UInt64> { statuses.append(try guest.reply(callID: guess << 32 | 1, status: 0, payload: [])) }
        XCTAssertEqual(statuses.prefix(20).allSatisfy { $0 == .noSuchCall }, true)
        XCTAssertEqual(statuses.suffix(5).allSatisfy { $0 == .channelBroken }, true)
    }

    /// Generations are random: the next id of an entry is not the last one plus one.
    func testCallIDsAreNotPredictable() throws {
        var limits = VMRPCLimits()
        limits.reverseCallsPerVCPU = 1 // every call reuses entry 1
        let harness = try ServerHarness(limits: limits)
        var ids: [UInt64] = []
        for _ in 0..<1_000 {
            let handle = try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: []) { _ in }
            ids.append(handle.callID)
            XCTAssertTrue(harness.server.cancelReverseCall(handle))
        }
        XCTAssertEqual(Set(ids.map { $0 & 0xFFFF_FFFF }), [1])
        let generations = ids.map { $0 >> 32 }
        XCTAssertFalse(generations.contains(0))
        let sequential = zip(generations, generations.dropFirst()).filter { $1 == $0 &+ 1 }.count
        XCTAssertLessThan(sequential, 5, "generations are drawn at random, not counted")
        XCTAssertGreaterThan(Set(generations).count, 990)
    }

    func testCancelEndsACallOnceAndDropsItsMessage() throws {
        let harness = try ServerHarness()
        let log = OutcomeLog()
        let handle = try harness.server.reverseCall(vcpu: 1, procedure: 7, payload: [], completion: log.completion(0))
        XCTAssertTrue(harness.server.cancelReverseCall(handle))
        XCTAssertFalse(harness.server.cancelReverseCall(handle), "already ended")
        XCTAssertEqual(log.outcomes(0), [.failure(.cancelled)])
        XCTAssertEqual(harness.dispatcher.queuedMessageCount(vcpu: 1), 0, "its message is withdrawn")
        XCTAssertEqual(try harness.client(vcpu: 1, features: .reverseCalls).poll(timeoutNanoseconds: 1_000).0, .timedOut)
        // A delivered call can be cancelled too; the guest's late reply is then refused.
        let second = try harness.server.reverseCall(vcpu: 1, procedure: 8, payload: [], completion: log.completion(1))
        let guest = harness.client(vcpu: 1, features: .reverseCalls)
        XCTAssertEqual(try guest.poll(timeoutNanoseconds: 0).1?.callID, second.callID)
        XCTAssertTrue(harness.server.cancelReverseCall(second))
        XCTAssertEqual(try guest.reply(callID: second.callID, status: 0, payload: []), .noSuchCall)
        XCTAssertEqual(log.outcomes(1), [.failure(.cancelled)])
    }

    /// A guest that never polls: its calls time out one by one, with `.timedOut` to the host,
    /// and the queue is drained, so later calls are accepted.
    func testCallsToAGuestThatNeverPollsTimeOutAndFreeTheQueue() throws {
        var limits = VMRPCLimits()
        limits.reverseCallsPerVCPU = 4
        let harness = try ServerHarness(limits: limits)
        let log = OutcomeLog()
        for key in 0..<4 {
            try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: [], timeoutNanoseconds: 1_000_000,
                                           completion: log.completion(key))
        }
        XCTAssertTrue(log.wait(forKeys: 4), "hang detector: the timeouts fire")
        XCTAssertEqual((0..<4).map { log.outcomes($0) }, Array(repeating: [.failure(.timedOut)], count: 4))
        XCTAssertEqual(harness.server.outstandingReverseCalls(vcpu: 0), 0)
        XCTAssertEqual(harness.dispatcher.queuedMessageCount(vcpu: 0), 0)
        XCTAssertNoThrow(try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: []) { _ in })
        XCTAssertThrowsError(try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: [], timeoutNanoseconds: 0) { _ in }) {
            XCTAssertEqual($0 as? VMRPCReverseCallError, .invalidTimeout(nanoseconds: 0))
        }
    }

    /// By default completions run on the server's queue, never on the vCPU's thread.
    func testCompletionsRunOffTheVCPUThreadByDefault() throws {
        let harness = try ServerHarness(completionContext: .queue(DispatchQueue(label: "test.completions")))
        let ranOn = LockedValue<pthread_t?>(nil)
        let done = OutcomeLog()
        let complete = done.completion(0)
        try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: []) { outcome in
            ranOn.withLock { $0 = pthread_self() }
            complete(outcome)
        }
        let guest = harness.client(features: .reverseCalls)
        let id = try XCTUnwrap(try guest.poll(timeoutNanoseconds: 0).1?.callID)
        XCTAssertEqual(try guest.reply(callID: id, status: 0, payload: []), .ok)
        XCTAssertTrue(done.wait(forKeys: 1))
        XCTAssertEqual(ranOn.withLock { $0 }.map { pthread_equal($0, pthread_self()) }, 0, "not the replying (vCPU) thread")
    }

    func testAsyncCallHonoursTaskCancellation() async throws {
        let harness = try ServerHarness()
        let task = Task { () async throws(VMRPCReverseCallError) -> VMRPCReverseCallReply in
            try await harness.server.reverseCall(vcpu: 0, procedure: 1, payload: [])
        }
        while harness.server.outstandingReverseCalls(vcpu: 0) == 0 { await Task.yield() }
        task.cancel()
        let result = await outcome(of: task)
        XCTAssertEqual(result, .failure(.cancelled))
        XCTAssertEqual(harness.server.outstandingReverseCalls(vcpu: 0), 0)
        // A task cancelled before it starts the call never leaves one outstanding.
        let early = Task { () async throws(VMRPCReverseCallError) -> VMRPCReverseCallReply in
            withUnsafeCurrentTask { $0?.cancel() }
            return try await harness.server.reverseCall(vcpu: 0, procedure: 1, payload: [])
        }
        let earlyResult = await outcome(of: early)
        XCTAssertEqual(earlyResult, .failure(.cancelled))
        XCTAssertEqual(harness.server.outstandingReverseCalls(vcpu: 0), 0)
    }

    /// F5: closing a vCPU on the dispatcher (what `VirtualMachineRunner.stop()` does) ends its
    /// calls with `vmStopped`, without `shutdown()`; a restart takes calls again.
    func testClosingTheDispatcherEndsTheCalls() throws {
        let harness = try ServerHarness()
        let log = OutcomeLog()
        try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: [], completion: log.completion(0))
        try harness.server.reverseCall(vcpu: 1, procedure: 1, payload: [], completion: log.completion(1))
        harness.dispatcher.close(vcpu: 0)
        XCTAssertEqual(log.outcomes(0), [.failure(.vmStopped)])
        XCTAssertEqual(log.outcomes(1), [], "vCPU 1 still runs")
        XCTAssertThrowsError(try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: []) { _ in }) {
            XCTAssertEqual($0 as? VMRPCReverseCallError, .vmStopped)
        }
        harness.dispatcher.resume(vcpu: 0)
        XCTAssertNoThrow(try harness.server.reverseCall(vcpu: 0, procedure: 1, payload: [], completion: log.completion(2)))
        harness.server.shutdown()
        XCTAssertEqual(log.outcomes(1), [.failure(.vmStopped)])
        XCTAssertEqual(log.outcomes(2), [.failure(.vmStopped)])
    }

    /// F5: a run loop's runner that is stopped (or dropped) ends the reverse calls of its VM.
    func testStoppingTheRunnerEndsTheCalls() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine(memorySize: 0x20000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let server = try VMRPCServer(memory: vm.guestMemory, slots: VMRPCSlotLayout(base: GuestAddress(0x10000), count: 1),
                                     dispatcher: dispatcher, procedures: [], completionContext: .endingThread)
        var bus = IOBus()
        try bus.register(server.makeDoorbell(), space: .port, base: 0x518, length: 1)
        let log = OutcomeLog()
        var runner: VirtualMachineRunner? = try VirtualMachineRunner(vcpus: [try vm.makeMockVCPU(id: 0)], bus: bus, dispatcher: dispatcher)
        try server.reverseCall(vcpu: 0, procedure: 1, payload: [], completion: log.completion(0))
        XCTAssertNotNil(runner)
        runner = nil // dropping the VM's runner stops it
        XCTAssertEqual(log.outcomes(0), [.failure(.vmStopped)])
    }

    /// F5: a server dropped without `shutdown()` ends its calls with `vmStopped`, in the sync and
    /// the async form, and holds no memory or descriptor afterwards.
    func testDroppedServerEndsItsCallsAndReleasesEverything() async throws {
        let descriptorsBefore = try openDescriptorCount()
        let log = OutcomeLog()
        weak var weakServer: VMRPCServer?
        weak var weakDispatcher: LongPollDispatcher?
        weak var weakMemory: GuestMemoryMap?
        do {
            let memory = GuestMemoryMap()
            try memory.addRegion(at: GuestAddress(0), size: 16 << 20)
            let dispatcher = try LongPollDispatcher(vcpuCount: 2)
            let server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: GuestAddress(0x10000), count: 2),
                                         dispatcher: dispatcher, procedures: [])
            weakServer = server; weakDispatcher = dispatcher; weakMemory = memory
            try server.reverseCall(vcpu: 0, procedure: 1, payload: [], completion: log.completion(0))
            try server.reverseCall(vcpu: 1, procedure: 1, payload: [], completion: log.completion(1))
            let guest = VMRPCGuestClient(memory: memory, slot: GuestAddress(0x10000), features: .reverseCalls) {
                server.handleDoorbell(vcpu: 0)
            }
            XCTAssertEqual(try guest.poll(timeoutNanoseconds: 0).0, .ok, "one delivered, one still queued")
        }
        XCTAssertTrue(log.wait(forKeys: 2), "hang detector")
        XCTAssertEqual(log.outcomes(0), [.failure(.vmStopped)])
        XCTAssertEqual(log.outcomes(1), [.failure(.vmStopped)])
        XCTAssertNil(weakServer)
        XCTAssertNil(weakDispatcher)
        XCTAssertNil(weakMemory, "the guest memory is unmapped")

        // The async form: the awaiting task holds its server; the call ends at its timeout,
        // and then everything goes away.
        let asyncOutcome: Result<VMRPCReverseCallReply, VMRPCReverseCallError>?
        do {
            let memory = GuestMemoryMap()
            try memory.addRegion(at: GuestAddress(0), size: 16 << 20)
            let dispatcher = try LongPollDispatcher(vcpuCount: 1)
            let server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: GuestAddress(0x10000), count: 1),
                                         dispatcher: dispatcher, procedures: [])
            weakServer = server; weakMemory = memory
            let task = Task { () async throws(VMRPCReverseCallError) -> VMRPCReverseCallReply in
                try await server.reverseCall(vcpu: 0, procedure: 1, payload: [], timeoutNanoseconds: 20_000_000)
            }
            asyncOutcome = await outcome(of: task)
        }
        XCTAssertEqual(asyncOutcome, .failure(.timedOut))
        // The finished task and the timer's handler let go of the server just after the outcome.
        let giveUp = monotonicNanoseconds() + 10_000_000_000
        while weakServer != nil || weakMemory != nil, monotonicNanoseconds() < giveUp { usleep(1_000) }
        XCTAssertNil(weakServer)
        XCTAssertNil(weakMemory)
        XCTAssertEqual(try openDescriptorCount(), descriptorsBefore, "every eventfd is closed")
    }

    /// The async form ends with `vmStopped` when the VM stops while it waits.
    func testAsyncCallEndsWhenTheVMStops() async throws {
        let harness = try ServerHarness(completionContext: .queue(DispatchQueue(label: "test.completions")))
        let server = harness.server
        let task = Task { () async throws(VMRPCReverseCallError) -> VMRPCReverseCallReply in
            try await server.reverseCall(vcpu: 1, procedure: 1, payload: [])
        }
        while server.outstandingReverseCalls(vcpu: 1) == 0 { await Task.yield() }
        harness.dispatcher.closeAll()
        let result = await outcome(of: task)
        XCTAssertEqual(result, .failure(.vmStopped))
    }
}

/// The outcome of a task that made an async reverse call; nil for an error of another type.
func outcome(of task: Task<VMRPCReverseCallReply, any Error>) async -> Result<VMRPCReverseCallReply, VMRPCReverseCallError>? {
    do { return .success(try await task.value) } catch let error as VMRPCReverseCallError { return .failure(error) } catch { return nil }
}

/// Open file descriptors of this process.
func openDescriptorCount() throws -> Int {
    try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count
}
