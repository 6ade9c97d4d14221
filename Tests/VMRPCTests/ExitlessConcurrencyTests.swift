import LongPoll
import RTVirtCore
import RTVirtTesting
import Synchronization
import VMRPC
import XCTest

/// The exitless path with a real poller thread: guests on their own threads switching at random
/// between the exitless and the doorbell paths, the poller falling asleep and waking, the whole
/// path through mock vCPUs. Hang detectors only; no timed assertions.
final class ExitlessConcurrencyTests: XCTestCase {
    /// The CPUs this process may use (the poller's housekeeping set in tests).
    static var allowedCPUs: CPUSet { (try? ThreadScheduling.affinity()) ?? [0] }

    /// Guests on two vCPUs make calls that switch at random between: exitless with a long
    /// spin, exitless with a spin of a few iterations (so the doorbell often crosses the
    /// poller's serve), post-and-ring-at-once, ordinary doorbell calls, blocking calls (handed
    /// back), and pauses long enough for the poller to fall asleep. Every counting call must
    /// return exactly one more than the last: a lost call would hang or repeat a count, one
    /// answered twice would skip one.
    func testRandomSwitchingLosesAndRepeatsNothing() throws {
        let calls = 20_000
        let counter = CountingProcedure()
        let harness = try ServerHarness(extra: [counter.procedure])
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: Self.allowedCPUs))
        try poller.attach(harness.server)
        let failures = LockedValue<[String]>([])
        let paths = LockedValue<[VMRPCExitlessPath: Int]>([:])
        let guestCounts = LockedValue<[Int: UInt64]>([:])
        let guests = try (0..<2).map { vcpu in
            try HostThread(name: "guest\(vcpu)") {
                let client = harness.client(vcpu: vcpu)
                var generator = SystemRandomNumberGenerator()
                var expected: UInt64 = 0
                var seen: [VMRPCExitlessPath: Int] = [:]
                do {
                    guard try client.null() == .ok, client.hostFeatures.contains(.exitless) else {
                        return failures.withLock { $0.append("vCPU \(vcpu): no exitless feature") }
                    }
                    for index in 0..<calls {
                        let choice = Int.random(in: 0..<100, using: &generator)
                        if choice < 2 { // idle long enough for the poller to fall asleep
                            let until = monotonicNanoseconds() + UInt64.random(in: 20_000...400_000, using: &generator)
                            while monotonicNanoseconds() < until { spinLoopHint() }
                        }
                        if choice >= 95 { // blocking: handed back by the poller, parked on the doorbell
                            let (response, path) = try client.callExitless(
                                VMRPCProcedureID.timerSleepUntil, arguments: VMRPCSleepUntil(deadlineGuestTSC: 0).encoded)
                            seen[path, default: 0] += 1
                            guard response.status == .ok else {
                                return failures.withLock { $0.append("vCPU \(vcpu) call \(index): sleep answered \(response.rawStatus)") }
                            }
                            continue
                        }
                        let response: VMRPCGuestClient.Response
                        switch choice % 4 {
                        case 0:
                            response = try client.call(CountingProcedure.id)
                        case 1:
                            let (answer, path) = try client.callExitless(CountingProcedure.id, spinLimit: Int.random(in: 1...8, using: &generator))
                            seen[path, default: 0] += 1
                            response = answer
                        case 2:
                            let (answer, path) = try client.callExitless(CountingProcedure.id, ringAtOnce: true)
                            seen[path, default: 0] += 1
                            response = answer
                        default:
                            let (answer, path) = try client.callExitless(CountingProcedure.id, spinLimit: 100_000_000)
                            seen[path, default: 0] += 1
                            response = answer
                        }
                        expected += 1
                        let count = response.results.count == 8
                            ? response.results.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } : 0
                        guard response.status == .ok, count == expected else {
                            return failures.withLock {
                                $0.append("vCPU \(vcpu) call \(index): status \(response.rawStatus), count \(count), expected \(expected)")
                            }
                        }
                    }
                } catch {
                    failures.withLock { $0.append("vCPU \(vcpu): \(error)") }
                }
                paths.withLock { total in for (path, count) in seen { total[path, default: 0] += count } }
                guestCounts.withLock { $0[vcpu] = expected }
            }
        }
        for guest in guests {
            XCTAssertTrue(guest.waitForFinish(timeoutNanoseconds: 600_000_000_000), "hang detector")
            guest.join()
        }
        let pollerStatistics = poller.statistics
        poller.stop()
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual((0..<2).map(counter.count), (0..<2).map { guestCounts.withLock { $0 }[$0] ?? 0 },
                       "the host ran each counting call once")
        XCTAssertGreaterThan(counter.count(0), UInt64(calls / 2))
        let server = harness.server
        let statistics = (0..<2).compactMap { server.statistics(vcpu: $0) }
        XCTAssertEqual(statistics.map(\.rejectedCalls).reduce(0, +), 0)
        // Which crossings a run hits depends on scheduling (on a loaded machine the poller may
        // seldom run while a guest spins): ExitlessCrossingTests covers each one
        // deterministically; this test checks that no interleaving loses or repeats a call.
        print("random switching, \(2 * calls) calls: paths \(paths.withLock { $0 }), poller \(pollerStatistics), "
              + "late doorbells \(statistics.map(\.lateDoorbells).reduce(0, +))")
    }

    /// Another "vCPU" rewrites the slot and posts again and again while the poller thread serves
    /// it: the poller acts only on the copy it took, so the procedure sees exactly the validated
    /// argument length, and every status is one that copy could produce.
    func testSlotRewrittenWhilePostedIsFetchedOnce() throws {
        let violations = Atomic<Int>(0), calls = Atomic<Int>(0)
        let checked = VMRPCProcedure(id: 0x200, name: "checked", argumentLength: 8...8) { _, arguments in
            calls.wrappingAdd(1, ordering: .relaxed)
            if arguments.count != 8 { violations.wrappingAdd(1, ordering: .relaxed) }
            return .done(status: .ok, results: arguments)
        }
        var limits = VMRPCLimits()
        limits.malformedCallBurst = Int.max / 2 // keep the channel open for the whole storm
        let harness = try ServerHarness(extra: [checked], limits: limits)
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: Self.allowedCPUs, idleNanoseconds: 1_000_000))
        try poller.attach(harness.server)
        let slot = ServerHarness.slotBase, memory = harness.memory
        let posted = GuestAddress(slot.rawValue + UInt64(VMRPCWire.postedOffset))
        let needsDoorbell = GuestAddress(slot.rawValue + UInt64(VMRPCWire.needsDoorbellOffset))
        let stop = Atomic<Bool>(false)
        let mutator = try HostThread(name: "mutator") {
            var generator = SystemRandomNumberGenerator()
            var header = VMRPCRequestHeader(procedure: 0x200, sequence: 1, argumentLength: 8, features: .exitless)
            while !stop.load(ordering: .relaxed) {
                header.argumentLength = [8, 8, 9, 1984, 4000, UInt32.max].randomElement(using: &generator)!
                header.procedure = [0x200, 0x200, 1, 0].randomElement(using: &generator)!
                header.magic = Bool.random(using: &generator) ? VMRPCWire.magic : 0
                header.sequence &+= 1
                try? memory.write(bytes: header.bytes, at: slot)
                try? memory.write(UInt64.random(in: 0...UInt64.max, using: &generator), at: GuestAddress(slot.rawValue + 64))
                try? memory.atomicStore(UInt32(1), at: posted, ordering: .releasing)
                guestMemoryFullFence()
                // Hostile, but it rings when the host asks (else a sleeping poller never sees it).
                if (try? memory.atomicLoad(UInt32.self, at: needsDoorbell, ordering: .acquiring)) != 0 {
                    harness.server.handleDoorbell(vcpu: 0)
                }
            }
        }
        let taken = { () -> UInt64 in
            let statistics = harness.server.statistics(vcpu: 0)!
            return statistics.exitlessCalls + statistics.postedDoorbellCalls
        }
        let deadline = monotonicNanoseconds() + 120_000_000_000
        while taken() < 20_000 && monotonicNanoseconds() < deadline { usleep(1_000) }
        stop.store(true, ordering: .relaxed)
        mutator.join()
        poller.stop()
        XCTAssertGreaterThanOrEqual(taken(), 20_000, "hang detector")
        XCTAssertEqual(violations.load(ordering: .relaxed), 0, "a procedure saw arguments that were not the validated copy")
        XCTAssertGreaterThan(calls.load(ordering: .relaxed), 0, "some calls were well formed")
        let allowed: Set<UInt32> = Set([VMRPCStatus.ok, .badMagic, .badArgumentLength, .unknownProcedure].map(\.rawValue))
        let status = try memory.read(UInt32.self, at: GuestAddress(slot.rawValue + 32))
        XCTAssertTrue(allowed.contains(status), "status \(status)")
    }

    /// An idle poller falls asleep and stays asleep: an idle VM costs it no CPU.
    func testIdlePollerSleeps() throws {
        let harness = try ServerHarness()
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: Self.allowedCPUs))
        try poller.attach(harness.server)
        var deadline = monotonicNanoseconds() + 30_000_000_000
        while !poller.statistics.isAsleep && monotonicNanoseconds() < deadline { usleep(1_000) }
        // The poller may have fallen asleep before it saw the attach (whose wake-up then wakes
        // it once more): let that settle before watching it.
        usleep(100_000)
        deadline = monotonicNanoseconds() + 30_000_000_000
        while !poller.statistics.isAsleep && monotonicNanoseconds() < deadline { usleep(1_000) }
        let before = poller.statistics
        XCTAssertTrue(before.isAsleep, "hang detector: the poller falls asleep")
        XCTAssertFalse(harness.server.isPollerAwake)
        XCTAssertEqual(ExitlessGuestSteps(memory: harness.memory, slot: ServerHarness.slotBase).needsDoorbell, 1)
        usleep(200_000)
        let after = poller.statistics
        XCTAssertTrue(after.isAsleep)
        XCTAssertEqual(after.wakeUps, before.wakeUps, "nothing woke it")
        print("idle poller: CPU fraction \(after.cpuFraction(since: before)) over \(Double(after.wallNanoseconds - before.wallNanoseconds) / 1e6) ms")
        // A new VM wakes it.
        let second = try ServerHarness()
        try poller.attach(second.server)
        deadline = monotonicNanoseconds() + 30_000_000_000
        while poller.statistics.wakeUps == after.wakeUps && monotonicNanoseconds() < deadline { usleep(1_000) }
        XCTAssertGreaterThan(poller.statistics.wakeUps, after.wakeUps, "hang detector: attaching a server wakes the poller")
        poller.stop()
        XCTAssertEqual(poller.statistics.isAsleep, false)
    }

    /// A doorbell that carries a posted call wakes a sleeping poller; its next calls are exitless.
    func testDoorbellWakesASleepingPoller() throws {
        let harness = try ServerHarness()
        // A long idle period, so that once woken the poller stays awake while the guest thread
        // (which may share its CPU) gets to post.
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: Self.allowedCPUs, idleNanoseconds: 200_000_000))
        try poller.attach(harness.server)
        var deadline = monotonicNanoseconds() + 30_000_000_000
        while !poller.statistics.isAsleep && monotonicNanoseconds() < deadline { usleep(1_000) }
        let client = harness.client()
        XCTAssertEqual(try client.null(), .ok)
        let (_, path) = try client.callExitless(VMRPCProcedureID.null)
        XCTAssertEqual(path, .doorbellNeeded, "asleep: the guest rings")
        deadline = monotonicNanoseconds() + 30_000_000_000
        while poller.statistics.wakeUps == 0 && monotonicNanoseconds() < deadline { usleep(100) }
        XCTAssertEqual(poller.statistics.wakeUps, 1, "hang detector: the doorbell woke the poller")
        // Awake again, it answers calls without a doorbell (a call that comes after it fell
        // asleep again rings, which wakes it again).
        var exitless = 0
        for _ in 0..<10_000 where exitless == 0 {
            if try client.callExitless(VMRPCProcedureID.null, spinLimit: 100_000_000).1 == .exitless { exitless += 1 }
        }
        XCTAssertEqual(exitless, 1, "hang detector")
        poller.stop()
    }

    /// The poller's thread runs only on the CPUs it was given.
    func testPollerThreadIsPinned() throws {
        let cpu = try XCTUnwrap(Self.allowedCPUs.cpus.last)
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: [cpu]))
        let tid = try XCTUnwrap(poller.kernelThreadID)
        XCTAssertEqual(try ThreadScheduling.affinity(of: tid), [cpu])
        poller.stop()
        XCTAssertGreaterThan(poller.statistics.wallNanoseconds, 0)
    }

    /// The whole path without KVM: mock vCPUs whose guest programs post calls, the poller thread
    /// answering them, the run loop, the bus and the doorbell for the rest (a sleep, ordinary calls).
    func testExitlessCallsTravelTheWholeMockPath() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine(memorySize: 0x20000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let counter = CountingProcedure()
        let slots = VMRPCSlotLayout(base: GuestAddress(0x10000), count: 1)
        let server = try VMRPCServer(memory: vm.guestMemory, slots: slots, dispatcher: dispatcher,
                                     procedures: VMRPCStandardProcedures.all(clock: MonotonicGuestClock()) + [counter.procedure])
        var bus = IOBus()
        try bus.register(server.makeDoorbell(), space: .port, base: UInt64(MockGuestPathTests.doorbellPort), length: 1)
        try bus.register(GuestExitDevice(), space: .port, base: UInt64(MockGuestPathTests.exitPort), length: 1)
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: Self.allowedCPUs))
        try poller.attach(server)
        let cpu = try vm.makeMockVCPU(id: 0) { guest in
            let client = VMRPCGuestClient(memory: guest.memory, slot: slots.address(ofVCPU: 0)!) {
                guest.portOut(MockGuestPathTests.doorbellPort, size: 1, value: 0)
            }
            guard (try? client.null()) == .ok else { return guest.portOut(MockGuestPathTests.exitPort, value: 1) }
            for index in 0..<500 {
                let response: VMRPCGuestClient.Response?
                if index % 50 == 49 {
                    let deadline = monotonicNanoseconds() + 200_000
                    guard let (sleep, _) = try? client.callExitless(VMRPCProcedureID.timerSleepUntil,
                                                                   arguments: VMRPCSleepUntil(deadlineGuestTSC: deadline).encoded),
                          sleep.status == .ok, monotonicNanoseconds() >= deadline else {
                        return guest.portOut(MockGuestPathTests.exitPort, value: 2)
                    }
                }
                response = index % 7 == 0 ? try? client.call(CountingProcedure.id) : try? client.callExitless(CountingProcedure.id).0
                let count = response.map { $0.results.reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
                guard response?.status == .ok, count == UInt64(index + 1) else { return guest.portOut(MockGuestPathTests.exitPort, value: 3) }
            }
            guest.portOut(MockGuestPathTests.exitPort, value: 0)
        }
        let runner = try VirtualMachineRunner(vcpus: [cpu], bus: bus, dispatcher: dispatcher)
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 120_000_000_000), [.guestRequested(status: 0)])
        let statistics = try XCTUnwrap(server.statistics(vcpu: 0))
        XCTAssertEqual(counter.count(0), 500)
        XCTAssertEqual(statistics.handoffs + statistics.postedDoorbellCalls >= 10, true, "the sleeps went through the doorbell")
        XCTAssertEqual(statistics.parkedCalls, 10)
        server.shutdown()
        poller.stop()
    }
}
