import Glibc
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import Synchronization
import XCTest
import RTVirtXCTestSupport

/// Deliveries seen by the test's own handler (a C function pointer cannot capture).
let foreignHandlerDeliveries = Atomic<Int>(0)

final class KickSignalTests: XCTestCase {
    /// A signal the embedding process already handles is refused by default, and chained on
    /// request: kicks still stop the vCPU, and the process's own handler still runs.
    func testForeignHandlerIsRefusedOrChained() throws {
        _ = try openKVMOrSkip() // skips without /dev/kvm
        let number = KVMKickSignal.default.number + 2 // SIGRTMIN+5, which nothing else here uses
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in foreignHandlerDeliveries.wrappingAdd(1, ordering: .relaxed) }
        sigemptyset(&action.sa_mask)
        XCTAssertEqual(sigaction(number, &action, nil), 0)

        XCTAssertThrowsError(try KVMSystem(kickSignal: KVMKickSignal(number: number))) {
            XCTAssertEqual($0 as? KVMError, .kickSignalInUse(signal: number))
        }
        let kvm = try KVMSystem(kickSignal: KVMKickSignal(number: number, foreignHandler: .chain))
        XCTAssertEqual(kvm.kickSignal.number, number)
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .spin)])
        let runner = try machine.start()
        usleep(20_000) // let the vCPU enter the guest, so the stop needs the signal
        XCTAssertEqual(runner.stopAndWait(), [.stopRequested], "the chained kick stops a spinning vCPU")
        XCTAssertGreaterThan(foreignHandlerDeliveries.load(ordering: .relaxed), 0, "the process's handler ran too")
        XCTAssertNoThrow(try KVMSystem(kickSignal: KVMKickSignal(number: number)), "now the handler is RTVirt's own")
    }

    func testTheDefaultIsSIGRTMINPlus3() throws {
        let kvm = try openKVMOrSkip()
        XCTAssertEqual(kvm.kickSignal, .default)
        XCTAssertEqual(KVMKickSignal.default.description, "SIGRTMIN+3 (\(KVMKickSignal.default.number))")
    }
}
