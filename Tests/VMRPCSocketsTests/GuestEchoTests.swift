#if canImport(Glibc)
import Glibc
#endif
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import VMRPCSockets
import XCTest
import LongPoll
import RTVirtXCTestSupport

/// The bundled guest's echo modes on real KVM, with their sockets in a VM namespace and the
/// client in another namespace (root, /dev/kvm, iproute2; run under flock /tmp/rtvirt-hw.lock).
final class GuestEchoTests: XCTestCase {
    /// A running echo guest.
    struct EchoVM {
        let machine: BundledGuestMachine
        let dispatcher: LongPollDispatcher
        let service: VMRPCSocketService
        let server: VMRPCServer
        let runner: VirtualMachineRunner

        init(vcpus: [BundledGuestVCPU], namespace: NetworkNamespace) throws {
            machine = try BundledGuestMachine(system: try openKVMOrSkip(), vcpus: vcpus)
            dispatcher = try LongPollDispatcher(vcpuCount: vcpus.count)
            var policy = SocketPolicy()
            policy.bindPorts = [7000...7000]
            policy.remotes = [SocketRemoteRule(prefix: IPPrefix("198.18.5.1/32")!), SocketRemoteRule(prefix: IPPrefix("fd00:5::1/128")!)]
            service = try VMRPCSocketService(backend: try HostSocketBackend(namespace: namespace), policy: policy,
                                             memory: machine.vm.guestMemory, dispatcher: dispatcher)
            server = try machine.makeVMRPCServer(dispatcher: dispatcher, extra: service.procedures)
            runner = try machine.start(bus: machine.makeBus(server: server), dispatcher: dispatcher)
        }

        /// Waits (up to 20 s, a hang detector) until vCPU `vcpu` reported `value`.
        func waitForReport(_ value: UInt64, vcpu: Int = 0) -> Bool {
            let deadline = monotonicNanoseconds() + 20_000_000_000
            while monotonicNanoseconds() < deadline {
                if machine.ports.results(ofVCPU: vcpu).contains(value) { return true }
                if runner.stopReasons[vcpu] != nil { return false }
                usleep(1000)
            }
            return false
        }
    }

    func udpEcho(batch: UInt64, family: SocketFamily) throws {
        try requireNamespaces()
        let kvm = try openKVMOrSkip()
        _ = kvm
        let descriptorsBefore = openDescriptorCount()
        do {
            let topology = try ClientTopology(label: "kvm-udp")
            defer { topology.remove() }
            // vCPU 0 echoes; vCPU 1 computes meanwhile (10^8 LCG steps at CPL 3).
            let echoArgument = UInt64(7000) | (family == .ipv6 ? 1 << 16 : 0)
            let vm = try EchoVM(vcpus: [BundledGuestVCPU(mode: .udpEcho, arguments: (echoArgument, batch)),
                                        BundledGuestVCPU(mode: .compute, arguments: (100_000_000, 7))],
                                namespace: topology.network.namespace)
            XCTAssertTrue(vm.waitForReport(GuestLayout.netReady), "the guest bound its socket: \(vm.machine.ports.results(ofVCPU: 0)) \(vm.runner.stopReasons)")
            // One vCPU parked in a receive while the other runs to its end.
            let deadline = monotonicNanoseconds() + 60_000_000_000
            while vm.runner.stopReasons[1] == nil, monotonicNanoseconds() < deadline { usleep(1000) }
            XCTAssertEqual(vm.runner.stopReasons[1], .guestRequested(status: 0))
            XCTAssertEqual(vm.machine.ports.results(ofVCPU: 1).count, 2, "vCPU 1 computed and reported")
            XCTAssertTrue(vm.dispatcher.isWaiting(vcpu: 0), "vCPU 0 is parked in its receive meanwhile")
            XCTAssertNil(vm.runner.stopReasons[0])

            let client = BlockingSockets(backend: topology.clientSockets)
            let peer = try client.udp(family)
            defer { topology.clientSockets.close(peer) }
            let guest = SocketEndpoint(family == .ipv4 ? ClientTopology.guestV4 : ClientTopology.guestV6, port: 7000)
            for index in 0..<50 {
                let payload = (0..<(1 + index * 37)).map { UInt8(truncatingIfNeeded: $0 ^ index) }
                XCTAssertEqual(try client.send(peer, payload, to: guest), payload.count)
                let echo = try client.receive(peer, milliseconds: 5000)
                XCTAssertEqual(echo?.bytes, payload, "datagram \(index) echoed intact")
                XCTAssertEqual(echo?.source, guest)
                if echo?.bytes != payload { break }
            }
            // A burst: the batching guest takes several per call.
            let burst = (0..<32).map { index in [UInt8(index), 0xAB, UInt8(index)] }
            for payload in burst { _ = try client.send(peer, payload, to: guest) }
            var echoed: [[UInt8]] = []
            for _ in 0..<burst.count {
                guard let echo = try client.receive(peer, milliseconds: 5000) else { break }
                echoed.append(echo.bytes)
            }
            XCTAssertEqual(Set(echoed), Set(burst), "the burst came back intact")
            XCTAssertEqual(vm.server.statistics(vcpu: 0)?.rejectedCalls, 0)

            // Stopping the VM releases the parked vCPU at once and closes its socket.
            let deadlineParked = monotonicNanoseconds() + 10_000_000_000
            while !vm.dispatcher.isWaiting(vcpu: 0), monotonicNanoseconds() < deadlineParked { usleep(100) }
            let start = monotonicNanoseconds()
            vm.runner.stop()
            let reasons = vm.runner.waitForAll(timeoutNanoseconds: 10_000_000_000)
            let stopMilliseconds = Double(monotonicNanoseconds() - start) / 1e6
            print("udp-echo (batch \(batch), \(family)): stop of a vCPU parked in a receive took \(stopMilliseconds) ms")
            XCTAssertEqual(reasons[0], .stopRequested, "released (hang detector: 10 s)")
            XCTAssertEqual(vm.service.openSocketCount, 0, "the VM's sockets are closed when it stops")
            vm.server.shutdown()
        }
        XCTAssertEqual(openDescriptorCount(), descriptorsBefore, "nothing leaked: KVM, eventfds, sockets, namespaces")
        XCTAssertFalse(NetworkNamespace.leftovers(isAlive: { _ in false }).contains { $0.contains("kvm-udp-\(getpid())") },
                       "the namespaces are gone")
    }

    func testGuestUDPEchoWithBatches() throws { try udpEcho(batch: 16, family: .ipv4) }
    func testGuestUDPEchoOneDatagramPerCallOverIPv6() throws { try udpEcho(batch: 1, family: .ipv6) }

    func testGuestTCPEcho() throws {
        try requireNamespaces()
        _ = try openKVMOrSkip()
        let topology = try ClientTopology(label: "kvm-tcp")
        defer { topology.remove() }
        let vm = try EchoVM(vcpus: [BundledGuestVCPU(mode: .tcpEcho, arguments: (7000, 0))], namespace: topology.network.namespace)
        XCTAssertTrue(vm.waitForReport(GuestLayout.netReady), "\(vm.machine.ports.results(ofVCPU: 0)) \(vm.runner.stopReasons)")
        let client = BlockingSockets(backend: topology.clientSockets)
        for connectionIndex in 0..<2 {
            let connection = try XCTUnwrap(client.connect(.ipv4, to: SocketEndpoint(ClientTopology.guestV4, port: 7000), milliseconds: 5000))
            let message = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 * 7 + connectionIndex) }
            try client.sendAll(connection, message, milliseconds: 5000)
            XCTAssertEqual(try client.receiveExactly(connection, count: message.count, milliseconds: 5000), message,
                           "connection \(connectionIndex) echoed intact")
            topology.clientSockets.close(connection)
        }
        XCTAssertEqual(vm.machine.ports.results(ofVCPU: 0).filter { $0 == GuestLayout.netAccepted }.count, 2)
        vm.runner.stop()
        XCTAssertEqual(vm.runner.waitForAll(timeoutNanoseconds: 10_000_000_000)[0], .stopRequested)
        XCTAssertEqual(vm.service.openSocketCount, 0)
        vm.server.shutdown()
    }
}
