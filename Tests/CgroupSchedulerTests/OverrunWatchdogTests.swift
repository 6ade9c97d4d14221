@testable import CgroupScheduler
import Foundation
@testable import RTVirtCore
import XCTest
import RTVirtXCTestSupport

final class OverrunWatchdogTests: XCTestCase {
    /// CPU times and a clock the test advances by hand.
    final class Script: @unchecked Sendable {
        // @unchecked: only touched under `lock`.
        private let lock = NSLock()
        private var times: [pid_t: UInt64] = [:]
        private var now: UInt64 = 1_000_000_000
        func advance(_ tid: pid_t, used: UInt64, wall: UInt64 = 100_000_000) {
            lock.withLock {
                times[tid, default: 0] += used
                now += wall
            }
        }
        func cpuTime(_ tid: pid_t) -> UInt64? { lock.withLock { times[tid] } }
        func clock() -> UInt64 { lock.withLock { now } }
    }

    func testAVCPUThatUsesItsWholeBudgetNPeriodsInARowIsReportedOnce() {
        let script = Script()
        let seen = LockedValue<[OverrunEvent]>([])
        let budget = RTBudget(parsing: "50ms/100ms")!
        let watchdog = OverrunWatchdog(configuration: .init(budget: budget, consecutivePeriods: 3, threshold: 0.9,
                                                            onOverrun: { event in seen.withLock { $0.append(event) } }),
                                       cpuTime: { script.cpuTime($0) }, clock: { script.clock() })
        script.advance(10, used: 0, wall: 0)
        script.advance(11, used: 0, wall: 0)
        watchdog.watch(vcpu: 0, threadID: 10)
        watchdog.watch(vcpu: 1, threadID: 11)
        // vCPU 0 spins at its budget; vCPU 1 at 40 % of it (a guest that works, then sleeps).
        for period in 1...5 {
            script.advance(10, used: 50_000_000)
            script.advance(11, used: 20_000_000, wall: 0)
            let reports = watchdog.samplePeriod()
            XCTAssertEqual(reports.map(\.vcpu), period == 3 ? [0] : [], "period \(period)")
        }
        XCTAssertEqual(watchdog.overrunCount(vcpu: 0), 1, "one report per streak")
        XCTAssertEqual(watchdog.overrunCount(vcpu: 1), 0)
        let event = seen.withLock { $0 }.first
        XCTAssertEqual(event?.consecutivePeriods, 3)
        XCTAssertEqual(event?.lastPeriodNanoseconds, 50_000_000)
        XCTAssertEqual(event?.detectedAfterNanoseconds, 300_000_000, "three periods after it was first watched")
        XCTAssertEqual(event?.action, .report)
        // A period below the threshold ends the streak; a new streak is a new report.
        script.advance(10, used: 10_000_000)
        watchdog.samplePeriod()
        for _ in 1...3 {
            script.advance(10, used: 60_000_000)
            watchdog.samplePeriod()
        }
        XCTAssertEqual(watchdog.overrunCount(vcpu: 0), 2)
        XCTAssertEqual(watchdog.overrunCount, 2)
        watchdog.unwatch(vcpu: 0)
        script.advance(10, used: 60_000_000)
        XCTAssertEqual(watchdog.samplePeriod(), [])
    }

    func testPauseCallsTheVMMsCallback() {
        let script = Script()
        let paused = LockedValue<[Int]>([])
        let watchdog = OverrunWatchdog(configuration: .init(budget: RTBudget(parsing: "5ms/10ms")!, consecutivePeriods: 2, action: .pause,
                                                            pause: { vcpu in paused.withLock { $0.append(vcpu) } }),
                                       cpuTime: { script.cpuTime($0) }, clock: { script.clock() })
        script.advance(7, used: 0, wall: 0)
        watchdog.watch(vcpu: 3, threadID: 7)
        for _ in 0..<2 {
            script.advance(7, used: 9_000_000, wall: 10_000_000)
            watchdog.samplePeriod()
        }
        XCTAssertEqual(paused.withLock { $0 }, [3])
        XCTAssertEqual(watchdog.events.first?.actionSucceeded, true)
    }

    /// The real thing: a real-time thread spinning on a CPU is found from its schedstat CPU
    /// time and demoted to SCHED_OTHER by the watchdog thread. (SCHED_FIFO under the global
    /// sched_rt_runtime_us, which keeps 5 % of the CPU for others; at most a few hundred ms.)
    func testTheWatchdogThreadDemotesASpinningRealtimeThread() throws {
        guard geteuid() == 0 else { throw unavailable("watchdog demotion test skipped: SCHED_FIFO needs root") }
        let online = try twoCPUsOrSkip()
        let spinning = ManagedAtomicFlag()
        let spinner = try HostThread(name: "runaway") {
            try? ThreadScheduling.setAffinity([online.cpus.last!])
            while spinning.isSet {}
        }
        defer { spinning.clear(); spinner.join() }
        let tid = spinner.kernelThreadID
        try ThreadScheduling.setSchedulingClass(.fifo(priority: 5), of: tid)
        let watchdog = OverrunWatchdog(configuration: .init(budget: RTBudget(parsing: "20ms/50ms")!, consecutivePeriods: 3, action: .demote,
                                                            cpus: [online.cpus.first!]))
        watchdog.watch(vcpu: 0, threadID: tid)
        try watchdog.start()
        defer { watchdog.stop() }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while watchdog.overrunCount == 0 && monotonicNanoseconds() < deadline { usleep(10_000) }
        XCTAssertEqual(watchdog.overrunCount, 1, "hang detector: no report within 10 s")
        let event = try XCTUnwrap(watchdog.events.first)
        print("watchdog: \(event)")
        XCTAssertEqual(event.action, .demote)
        XCTAssertTrue(event.actionSucceeded)
        XCTAssertGreaterThanOrEqual(event.lastPeriodNanoseconds, 18_000_000)
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tid), .other(nice: 0), "demoted")
    }

    /// A watchdog nobody references any more stops its thread: the thread does not keep it.
    func testADroppedWatchdogStopsItsThread() throws {
        let started = LockedValue<[HostThread]>([])
        var watchdog: OverrunWatchdog? = OverrunWatchdog(
            configuration: .init(budget: RTBudget(parsing: "1ms/10ms")!), cpuTime: { _ in 0 }, clock: monotonicNanoseconds,
            startThread: { name, body throws(HostThreadError) in
                let thread = try HostThread(name: name, body)
                started.withLock { $0.append(thread) }
                return thread
            })
        try watchdog?.start()
        let thread = try XCTUnwrap(started.withLock { $0.first })
        XCTAssertFalse(thread.isFinished, "it runs")
        watchdog = nil
        XCTAssertTrue(thread.waitForFinish(timeoutNanoseconds: 10_000_000_000), "hang detector: the thread still runs 10 s after the watchdog was dropped")
    }

    /// A start whose thread could not be created leaves the watchdog stopped: the next start
    /// starts it.
    func testAStartThatCouldNotCreateTheThreadCanBeRetried() throws {
        let attempts = LockedValue(0)
        let started = LockedValue<[HostThread]>([])
        let watchdog = OverrunWatchdog(
            configuration: .init(budget: RTBudget(parsing: "1ms/10ms")!), cpuTime: { _ in 0 }, clock: monotonicNanoseconds,
            startThread: { name, body throws(HostThreadError) in
                let attempt = attempts.withLock { count -> Int in
                    count += 1
                    return count
                }
                if attempt == 1 { throw HostThreadError(name: name, code: EAGAIN) } // pthread_create's answer at a thread limit
                let thread = try HostThread(name: name, body)
                started.withLock { $0.append(thread) }
                return thread
            })
        XCTAssertThrowsError(try watchdog.start()) { XCTAssertEqual($0 as? HostThreadError, HostThreadError(name: "rtvirt-watchdog", code: EAGAIN)) }
        XCTAssertNoThrow(try watchdog.start())
        XCTAssertEqual(attempts.withLock { $0 }, 2, "the second start tried again")
        let thread = try XCTUnwrap(started.withLock { $0.first }, "the watchdog thread runs")
        XCTAssertFalse(thread.isFinished)
        watchdog.stop()
        XCTAssertTrue(thread.isFinished, "stop waits for the thread")
    }
}

/// A flag a spinning test thread polls.
final class ManagedAtomicFlag: @unchecked Sendable {
    // @unchecked: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value = true
    var isSet: Bool { lock.withLock { value } }
    func clear() { lock.withLock { value = false } }
}
