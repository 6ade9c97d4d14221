import Glibc
import RTVirtCore
import RTVirtTesting
import XCTest

final class RunLoopTests: XCTestCase {
    func testRunLoopRoutesExitsAndAnswersReads() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpu = try vm.makeMockVCPU(id: 2, script: [
            .portIn(port: 0x600, size: 2),
            .mmioRead(address: GuestAddress(0x1000_0004), size: 4),
            .portIn(port: 0x700, size: 1),            // nobody there: reads all ones
            .portOut(port: 0x601, size: 1, data: 0x1FF), // truncated to one byte
            .portOut(port: 0x600, size: 4, data: 0xDEAD),
        ])
        var bus = IOBus()
        let device = CountingDevice(name: 9)
        try bus.register(device, space: .port, base: 0x600, length: 2)
        try bus.register(device, space: .mmio, base: 0x1000_0000, length: 0x100)
        let loop = VCPURunLoop(vcpu: cpu, bus: bus)
        XCTAssertEqual(loop.run(), .guestRequested(status: 0xDEAD))
        XCTAssertEqual(cpu.readReplies, [(9 << 32) & 0xFFFF, (9 << 32 | 4) & 0xFFFF_FFFF, 0xFF])
        XCTAssertEqual(loop.statistics.exits.load(ordering: .relaxed), 5)
        XCTAssertEqual(loop.statistics.unclaimedAccesses.load(ordering: .relaxed), 1)
        let (lastAccess, lastValue) = try XCTUnwrap(device.lastWrite.withLock { $0 })
        XCTAssertEqual(lastAccess.vcpuID, 2)
        XCTAssertEqual(lastValue, 0xDEAD)
    }

    func testFatalExitsEndTheLoop() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        for exit in [VCPUExit.failedEntry(hardwareReason: 7, cpu: 1), .internalError(suberror: 1),
                     .unsupported(reason: 99, detail: "x"), .systemEvent(type: 2)] {
            let cpu = try vm.makeMockVCPU(id: vm.maximumVCPUCount - 1 - Int(exitIndex(exit)), script: [exit])
            XCTAssertEqual(VCPURunLoop(vcpu: cpu, bus: IOBus()).run(), .fatalExit(exit))
        }
        let halting = try vm.makeMockVCPU(id: 0, script: [.halt])
        XCTAssertEqual(VCPURunLoop(vcpu: halting, bus: IOBus()).run(), .halted)
        let shutdown = try vm.makeMockVCPU(id: 1, script: [.shutdown])
        XCTAssertEqual(VCPURunLoop(vcpu: shutdown, bus: IOBus()).run(), .shutdown)
    }

    private func exitIndex(_ exit: VCPUExit) -> UInt8 {
        switch exit {
        case .failedEntry: return 0
        case .internalError: return 1
        case .unsupported: return 2
        default: return 3
        }
    }

    func testRunnerStopsAVCPUThatNeverExits() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let spinning = try vm.makeMockVCPU(id: 0)
        let finishing = try vm.makeMockVCPU(id: 1, script: [.halt])
        let runner = try VirtualMachineRunner(vcpus: [spinning, finishing], bus: IOBus())
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 50_000_000), [nil, .halted])
        XCTAssertEqual(runner.stopAndWait(), [.stopRequested, .halted])
        XCTAssertTrue(runner.threads.allSatisfy(\.isFinished))
    }

    func testAKickAfterAcknowledgeIsNotLost() throws {
        // The loop re-arms entry before it re-checks the stop flag; a stop requested at any
        // point must end the loop. Repeat to shake out orderings.
        for _ in 0..<200 {
            let vm = try MockHypervisor().makeMockVirtualMachine()
            let cpu = try vm.makeMockVCPU(id: 0)
            let loop = VCPURunLoop(vcpu: cpu, bus: IOBus())
            let thread = try HostThread(name: "kick") { _ = loop.run() }
            loop.requestStop()
            XCTAssertTrue(thread.waitForFinish(timeoutNanoseconds: 5_000_000_000))
        }
    }

    func testWorkQueuedBeforeTheLoopEndsRunsOnItsThreadAndLaterWorkIsRefused() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpu = try vm.makeMockVCPU(id: 0, script: [.halt])
        let loop = VCPURunLoop(vcpu: cpu, bus: IOBus())
        let ranOn = LockedValue<[pthread_t]>([])
        XCTAssertTrue(loop.performOnThread { ranOn.withLock { $0.append(pthread_self()) } })
        XCTAssertEqual(loop.run(), .halted)
        XCTAssertEqual(ranOn.withLock { $0.count }, 1, "queued before the halt: run before run() returned")
        XCTAssertTrue(ranOn.withLock { pthread_equal($0[0], pthread_self()) != 0 }, "on the loop's thread")
        XCTAssertFalse(loop.performOnThread { ranOn.withLock { $0.append(pthread_self()) } }, "the loop has ended")
        XCTAssertEqual(ranOn.withLock { $0.count }, 1, "refused work never runs")
    }

    func testWorkRacingAStopRunsExactlyWhenAccepted() throws {
        // Each round: a thread queues work as fast as it can while the loop is stopped. Every
        // item `performOnThread` accepted must run once; every refused one never.
        for _ in 0..<100 {
            let vm = try MockHypervisor().makeMockVirtualMachine()
            let loop = VCPURunLoop(vcpu: try vm.makeMockVCPU(id: 0), bus: IOBus())
            let ran = LockedValue<[Int: Int]>([:])
            let accepted = LockedValue<Set<Int>>([])
            let runner = try HostThread(name: "loop") { _ = loop.run() }
            let producer = try HostThread(name: "producer") {
                for item in 0..<10_000 {
                    if loop.performOnThread({ ran.withLock { $0[item, default: 0] += 1 } }) {
                        accepted.withLock { _ = $0.insert(item) }
                    } else {
                        return
                    }
                }
            }
            usleep(100)
            loop.requestStop()
            XCTAssertTrue(runner.waitForFinish(timeoutNanoseconds: 5_000_000_000))
            XCTAssertTrue(producer.waitForFinish(timeoutNanoseconds: 5_000_000_000))
            let (ranItems, acceptedItems) = (ran.withLock { $0 }, accepted.withLock { $0 })
            XCTAssertEqual(acceptedItems.subtracting(ranItems.keys).count, 0, "accepted work that never ran")
            XCTAssertEqual(Set(ranItems.keys).subtracting(acceptedItems).count, 0, "refused work that ran")
            XCTAssertTrue(ranItems.values.allSatisfy { $0 == 1 }, "each item ran once")
        }
    }

    func testManualClockMovesOnlyForward() {
        let clock = ManualClock(start: 100)
        clock.advance(by: 50)
        XCTAssertEqual(clock.nowNanoseconds(), 150)
        clock.set(to: 10)
        XCTAssertEqual(clock.nowNanoseconds(), 150)
        clock.set(to: 1000)
        XCTAssertEqual(clock.nowNanoseconds(), 1000)
        XCTAssertGreaterThan(SystemMonotonicClock().nowNanoseconds(), 0)
    }
}

final class StringIORunLoopTests: XCTestCase {
    func testStringExitsAreHandledPerElement() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpu = try vm.makeMockVCPU(id: 0, script: [
            .portOutString(port: 0x601, size: 1, data: [1, 2, 0x1FF]),
            .portInString(port: 0x600, size: 2, count: 3),
            .portOutString(port: 0x600, size: 4, data: [0xDEAD, 7]), // stops at the first element
        ])
        var bus = IOBus()
        let device = CountingDevice(name: 9)
        try bus.register(device, space: .port, base: 0x600, length: 2)
        let loop = VCPURunLoop(vcpu: cpu, bus: bus)
        XCTAssertEqual(loop.run(), .guestRequested(status: 0xDEAD))
        XCTAssertEqual(cpu.readReplies, [(9 << 32) & 0xFFFF, (9 << 32) & 0xFFFF, (9 << 32) & 0xFFFF])
    }
}
