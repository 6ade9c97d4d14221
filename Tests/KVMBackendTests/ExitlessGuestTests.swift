import KVMBackend
import LongPoll
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import XCTest
import RTVirtXCTestSupport

/// A real guest on KVM making exitless VMRPC calls through the C header, with a poller thread.
final class ExitlessGuestTests: XCTestCase {
    /// The vCPU's CPU and the poller's: apart when this process may use two CPUs or more.
    static func placement() -> (vcpu: Int?, poller: CPUSet) {
        let allowed = (try? ThreadScheduling.affinity()) ?? [0]
        guard allowed.cpus.count >= 2, let last = allowed.cpus.last else { return (nil, allowed) }
        return (last, CPUSet(allowed.cpus.dropLast()))
    }

    /// Runs the machine's vCPUs, pinned as `placement()` says.
    static func start(_ machine: BundledGuestMachine, server: VMRPCServer, dispatcher: LongPollDispatcher) throws -> VirtualMachineRunner {
        let cpu = placement().vcpu
        return try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(server: server), dispatcher: dispatcher,
                                        onThreadStart: { _ in if let cpu { _ = try? ThreadScheduling.setAffinity(CPUSet([cpu])) } })
    }

    /// The guest switches at random between the exitless and the doorbell paths (long and very
    /// short spins, post-and-ring, ordinary calls, blocking calls handed back, idle gaps that put
    /// the poller to sleep) and checks every count: none is lost or repeated.
    func testGuestSwitchingPathsLosesAndRepeatsNothing() throws {
        let kvm = try openKVMOrSkip()
        let calls: UInt64 = 20_000
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .rpcSwitch, arguments: (calls, 0x5EED))])
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let counter = BundledGuestCallCounter()
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher, extra: [counter.procedure])
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: Self.placement().poller))
        try poller.attach(server)
        let runner = try Self.start(machine, server: server, dispatcher: dispatcher)
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 300_000_000_000), [.guestRequested(status: 0)],
                       "guest reports \(machine.ports.results(ofVCPU: 0))")
        server.shutdown()
        poller.stop()
        XCTAssertEqual(counter.count(vcpu: 0), calls, "the host ran each call once")
        let reported = machine.ports.results(ofVCPU: 0)
        XCTAssertEqual(reported.count, 7)
        guard reported.count == 7 else { return }
        let statistics = try XCTUnwrap(server.statistics(vcpu: 0))
        XCTAssertEqual(statistics.rejectedCalls, 0)
        XCTAssertGreaterThan(statistics.exitlessCalls, 0, "the poller answered calls")
        XCTAssertGreaterThan(reported[5], 0, "blocking calls")
        print("KVM guest, \(calls) switching calls: exitless \(reported[0]), rang after spinning \(reported[1]), short spins \(reported[2]), "
              + "posted and rung \(reported[3]), ordinary \(reported[4]), blocking \(reported[5]), idle gaps \(reported[6]); "
              + "host: \(statistics); poller: \(poller.statistics)")
    }

    /// The rpc-bench mode runs its four paths and reports the host's features.
    func testBenchModeRunsTheFourPaths() throws {
        let kvm = try openKVMOrSkip()
        let samples = 200
        let machine = try BundledGuestMachine(system: kvm, vcpus: [
            BundledGuestVCPU(mode: .rpcBenchExitless, arguments: (UInt64(samples), 50)),
        ])
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher)
        let poller = try VMRPCPoller(configuration: VMRPCPollerConfiguration(cpus: Self.placement().poller))
        try poller.attach(server)
        let runner = try Self.start(machine, server: server, dispatcher: dispatcher)
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 300_000_000_000), [.guestRequested(status: 0)])
        server.shutdown()
        poller.stop()
        let reported = machine.ports.results(ofVCPU: 0)
        XCTAssertEqual(reported.count, 4)
        XCTAssertEqual(reported.first.map { VMRPCFeatures(rawValue: UInt32($0)) }, .all)
        let cycles = try machine.readData(ofVCPU: 0, count: 4 * samples)
        XCTAssertFalse(cycles.contains(0), "every sample was measured")
        let statistics = try XCTUnwrap(server.statistics(vcpu: 0))
        XCTAssertGreaterThanOrEqual(statistics.exitlessCalls + statistics.postedDoorbellCalls, UInt64(2 * samples))
        print("KVM rpc-bench mode: guest reports \(reported), host \(statistics), poller \(poller.statistics)")
    }

    /// Without a poller the host offers `exitless` with `needs_doorbell` set: the guest's exitless
    /// calls all go through the doorbell, and are answered.
    func testWithoutAPollerExitlessCallsUseTheDoorbell() throws {
        let kvm = try openKVMOrSkip()
        let calls: UInt64 = 2_000
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .rpcSwitch, arguments: (calls, 7))])
        let dispatcher = try LongPollDispatcher(vcpuCount: 1)
        let counter = BundledGuestCallCounter()
        let server = try machine.makeVMRPCServer(dispatcher: dispatcher, extra: [counter.procedure])
        let runner = try Self.start(machine, server: server, dispatcher: dispatcher)
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 300_000_000_000), [.guestRequested(status: 0)])
        server.shutdown()
        XCTAssertEqual(counter.count(vcpu: 0), calls)
        XCTAssertEqual(server.statistics(vcpu: 0)?.exitlessCalls, 0)
        XCTAssertEqual(machine.ports.results(ofVCPU: 0).first, 0, "no call was answered without an exit")
    }
}
