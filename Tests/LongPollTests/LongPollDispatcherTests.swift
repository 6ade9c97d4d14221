import RTVirtCore
import RTVirtTesting
import XCTest
import LongPoll

typealias InstantWaiter = ManualClockWaiter

final class LongPollDispatcherTests: XCTestCase {
    func testDeadlineIsReachedOnTheManualClock() throws {
        let clock = ManualClock(start: 1_000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 2, clock: clock, waiter: InstantWaiter(clock: clock, lateness: 7))
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 5_000)), .deadlineReached(lateNanoseconds: 7))
        XCTAssertEqual(clock.nowNanoseconds(), 5_007)
        XCTAssertEqual(dispatcher.wait(vcpu: 1, for: LongPollRequest(deadline: 10)), .deadlineReached(lateNanoseconds: 4_997),
                       "a deadline in the past returns at once")
    }

    func testMessagesPostedWhileNobodyWaitsAreKeptInOrder() throws {
        let clock = ManualClock()
        let dispatcher = try LongPollDispatcher(vcpuCount: 2, clock: clock, waiter: InstantWaiter(clock: clock), queueCapacity: 2)
        let first = HostMessage(id: 1, procedure: 9, payload: [1]), second = HostMessage(id: 2, procedure: 9, payload: [2])
        try dispatcher.post(first, to: 1)
        try dispatcher.post(second, to: 1)
        XCTAssertThrowsError(try dispatcher.post(first, to: 1)) { XCTAssertEqual($0 as? LongPollError, .queueFull(vcpu: 1, capacity: 2)) }
        XCTAssertThrowsError(try dispatcher.post(first, to: 5)) { XCTAssertEqual($0 as? LongPollError, .noSuchVCPU(5)) }
        // A wait that does not accept messages leaves them queued.
        XCTAssertEqual(dispatcher.wait(vcpu: 1, for: LongPollRequest(deadline: 100)), .deadlineReached(lateNanoseconds: 0))
        XCTAssertEqual(dispatcher.queuedMessageCount(vcpu: 1), 2)
        XCTAssertEqual(dispatcher.wait(vcpu: 1, for: LongPollRequest(deadline: 200, acceptsHostMessages: true)), .hostMessage(first))
        XCTAssertEqual(dispatcher.wait(vcpu: 1, for: LongPollRequest(acceptsHostMessages: true)), .hostMessage(second))
        XCTAssertEqual(dispatcher.queuedMessageCount(vcpu: 0), 0, "vCPU 0's queue is its own")
    }

    func testCancellationLastsUntilResumeAndCloseReturnsQueuedMessages() throws {
        let clock = ManualClock()
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, clock: clock, waiter: InstantWaiter(clock: clock))
        dispatcher.cancel(vcpu: 0)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 100)), .cancelled)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 100)), .cancelled)
        dispatcher.resume(vcpu: 0)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 100)), .deadlineReached(lateNanoseconds: 0))
        let message = HostMessage(id: 3, procedure: 1, payload: [])
        try dispatcher.post(message, to: 0)
        XCTAssertEqual(dispatcher.close(vcpu: 0), [message])
        XCTAssertThrowsError(try dispatcher.post(message, to: 0)) { XCTAssertEqual($0 as? LongPollError, .closed(vcpu: 0)) }
    }

    func testParkLimitAndDescriptors() throws {
        let clock = ManualClock()
        let waiter = InstantWaiter(clock: clock)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, clock: clock, waiter: waiter, maximumParkNanoseconds: 1_000)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest()), .parkLimitReached)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: clock.nowNanoseconds() + 5_000)), .parkLimitReached)
        waiter.readyDescriptors.withLock { $0 = [42] }
        let result = dispatcher.wait(vcpu: 0, for: LongPollRequest(descriptors: [PollDescriptor(fd: 42, events: 1)]))
        XCTAssertEqual(result, .descriptorsReady([PollDescriptor(fd: 42, events: 1, returnedEvents: 1)]))
    }

    func testTimerStrategyLearnsTheWakeErrorAndSpinsTheRest() throws {
        // Each read of the clock moves it 10 ns, so spinning advances time; each timed block
        // wakes 30 µs late. After a few waits the margin covers that and the spin lands on time.
        let clock = ManualClock(stepPerRead: 10)
        let strategy = DeadlineTimerStrategy(initialMargin: 10_000, minimumMargin: 1_000, maximumMargin: 100_000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, clock: clock, waiter: InstantWaiter(clock: clock, lateness: 30_000),
                                                timerStrategy: strategy)
        var results: [LongPollResult] = []
        for period in 1...20 {
            results.append(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: UInt64(period) * 1_000_000)))
        }
        XCTAssertEqual(results.first, .deadlineReached(lateNanoseconds: 20_010), "first wait: 10 µs margin, 30 µs late")
        XCTAssertGreaterThanOrEqual(strategy.margin, 31_000)
        XCTAssertLessThan(strategy.margin, 31_100, "p95 of ~30 µs errors plus the 1 µs guard")
        guard case .deadlineReached(let late)? = results.last else { return XCTFail("\(results)") }
        XCTAssertLessThan(late, 100, "woke about 1 µs early, then spun to the deadline")
        let statistics = strategy.statistics
        XCTAssertEqual(statistics.timedWakes, 20)
        XCTAssertGreaterThan(statistics.spinNanoseconds, 0)
        XCTAssertLessThan(statistics.spinFraction, 0.1)
    }

    func testTimerStrategyNeverSpinsMoreThanItsShareOfTheInterval() {
        let strategy = DeadlineTimerStrategy(initialMargin: 200_000, maximumMargin: 200_000, maximumSpinFraction: 0.1)
        XCTAssertEqual(strategy.wakeTime(forDeadline: 1_100_000, waitStartedAt: 100_000), 1_000_000, "10% of 1 ms")
        XCTAssertEqual(strategy.wakeTime(forDeadline: 10_100_000, waitStartedAt: 100_000), 9_900_000, "the margin")
        strategy.recordTimedWake(requested: 0, actual: 10_000_000)
        XCTAssertEqual(strategy.margin, 200_000, "clamped to the maximum")
    }

    func testRealWaitsAreIndependentAndCancellationIsPrompt() throws {
        let dispatcher = try LongPollDispatcher(vcpuCount: 2)
        let results = LockedValue<[Int: LongPollResult]>([:])
        let parked = try HostThread(name: "parked") {
            let result = dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: monotonicNanoseconds() + 2_000_000_000))
            results.withLock { $0[0] = result }
        }
        // vCPU 1 keeps waiting on short deadlines while vCPU 0 is parked.
        var shortWaits = 0
        let start = monotonicNanoseconds()
        while monotonicNanoseconds() - start < 200_000_000 {
            if case .deadlineReached = dispatcher.wait(vcpu: 1, for: LongPollRequest(deadline: monotonicNanoseconds() + 1_000_000)) {
                shortWaits += 1
            }
        }
        XCTAssertGreaterThan(shortWaits, 50)
        XCTAssertTrue(dispatcher.isWaiting(vcpu: 0))
        let cancelStart = monotonicNanoseconds()
        dispatcher.cancel(vcpu: 0)
        XCTAssertTrue(parked.waitForFinish(timeoutNanoseconds: 1_000_000_000))
        let cancelMilliseconds = Double(monotonicNanoseconds() - cancelStart) / 1e6
        print("long-poll cancellation took \(cancelMilliseconds) ms")
        XCTAssertEqual(results.withLock { $0[0] }, .cancelled)
        XCTAssertLessThan(cancelMilliseconds, 500, "generous bound; the tool reports the real number")
    }

    func testRealMessageWakesAParkedWait() throws {
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let result = LockedValue<LongPollResult?>(nil)
        let thread = try HostThread(name: "poller") {
            let value = dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: monotonicNanoseconds() + 5_000_000_000, acceptsHostMessages: true))
            result.withLock { $0 = value }
        }
        while !dispatcher.isWaiting(vcpu: 0) { usleep(100) }
        try dispatcher.post(HostMessage(id: 7, procedure: 1, payload: [9]), to: 0)
        XCTAssertTrue(thread.waitForFinish(timeoutNanoseconds: 2_000_000_000))
        XCTAssertEqual(result.withLock { $0 }, .hostMessage(HostMessage(id: 7, procedure: 1, payload: [9])))
    }
}

final class InterruptibleWaitTests: XCTestCase {
    /// `interrupt(vcpu:)` ends an interruptible wait, even one that starts after it; other waits
    /// ignore it; entering the guest (`interruptDelivered`) drops it.
    func testInterruptEndsOnlyInterruptibleWaitsUntilDelivered() throws {
        let clock = ManualClock(start: 1_000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 2, clock: clock, waiter: InstantWaiter(clock: clock))
        dispatcher.interrupt(vcpu: 0)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 2_000)), .deadlineReached(lateNanoseconds: 0),
                       "a wait that is not interruptible ignores it")
        XCTAssertEqual(dispatcher.wait(vcpu: 1, for: LongPollRequest(deadline: 3_000, interruptible: true)),
                       .deadlineReached(lateNanoseconds: 0), "another vCPU's wait ignores it")
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 4_000, interruptible: true)), .interrupted)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 5_000, interruptible: true)),
                       .deadlineReached(lateNanoseconds: 0), "taken once")
        dispatcher.interrupt(vcpu: 0)
        dispatcher.interruptDelivered(vcpu: 0)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 6_000, interruptible: true)),
                       .deadlineReached(lateNanoseconds: 0), "entering the guest delivered it")
        dispatcher.interrupt(vcpu: 0)
        dispatcher.cancel(vcpu: 0)
        XCTAssertEqual(dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: 7_000, interruptible: true)), .cancelled,
                       "a stop wins over an interrupt")
    }

    /// On real threads: an interruptible wait parked for 10 s ends when interrupted.
    func testInterruptWakesAParkedWait() throws {
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let result = LockedValue<LongPollResult?>(nil)
        let thread = try HostThread(name: "parked") {
            let outcome = dispatcher.wait(vcpu: 0, for: LongPollRequest(deadline: monotonicNanoseconds() + 10_000_000_000,
                                                                       interruptible: true))
            result.withLock { $0 = outcome }
        }
        while !dispatcher.isWaiting(vcpu: 0) { usleep(100) }
        dispatcher.interrupt(vcpu: 0)
        XCTAssertTrue(thread.waitForFinish(timeoutNanoseconds: 5_000_000_000), "hang detector")
        XCTAssertEqual(result.withLock { $0 }, .interrupted)
    }
}
