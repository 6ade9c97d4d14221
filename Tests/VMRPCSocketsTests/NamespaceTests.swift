#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RTVirtCore
import VMRPC
import VMRPCSockets
import XCTest
import LongPoll
import RTVirtXCTestSupport

/// Real namespaces, veths and sockets (root and iproute2; run under flock /tmp/rtvirt-hw.lock).
final class NamespaceTests: XCTestCase {
    func testAVMNetworkIsCreatedAndRemovedWithItsVeth() throws {
        try requireNamespaces()
        let network = try VMNetwork(VMNetworkConfiguration(hostAddresses: [IPPrefix("198.18.6.1/24")!],
                                                           guestAddresses: [IPPrefix("198.18.6.2/24")!]))
        let name = try XCTUnwrap(network.namespace.name)
        XCTAssertTrue(name.hasPrefix("rtvirt-vm-\(getpid())-"), name)
        XCTAssertTrue(FileManager.default.fileExists(atPath: "/run/netns/\(name)"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: "/sys/class/net/\(network.hostInterface)"))
        XCTAssertTrue(try runCapturing(["/usr/sbin/ip", "-n", name, "-4", "address", "show", "eth0"]).contains("198.18.6.2/24"))
        network.remove()
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/run/netns/\(name)"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/sys/class/net/\(network.hostInterface)"))
    }

    /// A VMM that crashed left its namespace and veth: the next one to create a namespace deletes them.
    func testLeftoversOfADeadVMMAreReclaimed() throws {
        try requireNamespaces()
        let exited = Process()
        exited.executableURL = URL(fileURLWithPath: "/bin/true")
        try exited.run()
        exited.waitUntilExit()
        let dead = exited.processIdentifier // gone, and pids are not reused this quickly
        let name = "rtvirt-crashed-\(dead)-1", interface = "rtv\(dead)h1"
        _ = try runCapturing(["/usr/sbin/ip", "netns", "add", name])
        _ = try runCapturing(["/usr/sbin/ip", "link", "add", interface, "type", "veth", "peer", "name", "eth0", "netns", name])
        XCTAssertTrue(NetworkNamespace.leftovers().contains(name))
        XCTAssertTrue(VMNetwork.leftoverInterfaces().contains(interface))
        XCTAssertFalse(NetworkNamespace.leftovers().contains { $0.contains("-\(getpid())-") }, "our own are not leftovers")
        let namespace = try NetworkNamespace.create(label: "reclaimer")
        defer { namespace.remove() }
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/run/netns/\(name)"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/sys/class/net/\(interface)"))
    }

    func testSocketsAreCreatedInTheNamespaceNotTheVMMs() throws {
        try requireNamespaces()
        let topology = try ClientTopology(label: "where")
        defer { topology.remove() }
        let backend = try HostSocketBackend(namespace: topology.network.namespace)
        let sockets = BlockingSockets(backend: backend)
        // The guest address exists only in the VM namespace: binding it works there ...
        let inside = try sockets.udp(.ipv4, bind: SocketEndpoint(ClientTopology.guestV4, port: 7000))
        backend.close(inside)
        // ... and not in the VMM's own namespace.
        let unconfined = BlockingSockets(backend: HostSocketBackend.unconfinedInVMMsOwnNetworkNamespace())
        XCTAssertThrowsError(try unconfined.udp(.ipv4, bind: SocketEndpoint(ClientTopology.guestV4, port: 7000))) { error in
            XCTAssertEqual((error as? SocketErrno)?.status, .addressNotAvailable)
        }
    }

    /// 1,000 open/close cycles and a VM torn down with sockets open leave the process's
    /// descriptor count as it was.
    func testNoDescriptorLeaks() throws {
        try requireNamespaces()
        let topology = try ClientTopology(label: "leak")
        defer { topology.remove() }
        let before = openDescriptorCount()
        do {
            let rig = try ServiceRig(namespace: topology.network.namespace)
            let client = rig.client()
            for cycle in 0..<1000 {
                let (status, opened) = try client.open(cycle % 2 == 0 ? .ipv4 : .ipv6, cycle % 3 == 0 ? .stream : .datagram)
                XCTAssertEqual(status, .ok)
                guard let handle = opened?.handle, opened?.status == 0 else { return XCTFail("open \(cycle): \(String(describing: opened))") }
                XCTAssertEqual(try client.close(handle).1, SocketResult(.ok))
            }
            XCTAssertEqual(rig.service.statistics.socketsOpened, 1000)
            // A VM torn down with 30 sockets open, some bound, one listening.
            for index in 0..<30 {
                let handle = try XCTUnwrap(client.open(.ipv4, index == 0 ? .stream : .datagram).1?.handle)
                if index < 10 { XCTAssertEqual(try client.bind(handle, SocketEndpoint(.any(.ipv4), port: UInt16(7000 + index))).1, SocketResult(.ok)) }
                if index == 0 { XCTAssertEqual(try client.listen(handle).1, SocketResult(.ok)) }
            }
            XCTAssertEqual(rig.service.openSocketCount, 30)
            XCTAssertEqual(openDescriptorCount(), before + 30 + rig.fixedDescriptors)
            rig.dispatcher.closeAll() // what VirtualMachineRunner.stop() does
            XCTAssertEqual(rig.service.openSocketCount, 0)
        }
        XCTAssertEqual(openDescriptorCount(), before, "every socket, eventfd and namespace descriptor is closed")
    }

    /// The service with real sockets and a real dispatcher; a thread plays the guest's vCPU and
    /// echoes; the client is in another namespace.
    func testUDPEchoWithLongPollReceiveAndAPolicyRefusalThatSendsNothing() throws {
        try requireNamespaces()
        let topology = try ClientTopology(label: "udp")
        defer { topology.remove() }
        let rig = try ServiceRig(namespace: topology.network.namespace, remotes: [
            SocketRemoteRule(prefix: IPPrefix("198.18.5.1/32")!, ports: 9000...9000),
            SocketRemoteRule(prefix: IPPrefix("fd00:5::1/128")!, ports: 9000...9000),
        ])
        let client = rig.client()
        let clientSockets = BlockingSockets(backend: topology.clientSockets)
        for family in SocketFamily.allCases {
            let guestAddress = family == .ipv4 ? ClientTopology.guestV4 : ClientTopology.guestV6
            let clientAddress = family == .ipv4 ? ClientTopology.clientV4 : ClientTopology.clientV6
            let handle = try XCTUnwrap(client.open(family, .datagram).1?.handle)
            XCTAssertEqual(try client.bind(handle, SocketEndpoint(.any(family), port: 7000)).1, SocketResult(.ok))
            let peer = try clientSockets.udp(family, bind: SocketEndpoint(clientAddress, port: 9000))
            defer { topology.clientSockets.close(peer) }
            // The guest parks in a receive before anything is sent.
            let echoed = LockedValue<[SocketReceiveResult]>([])
            let guest = try HostThread(name: "vcpu0") {
                let client = rig.client(vcpu: 0)
                for _ in 0..<3 {
                    guard let (status, received) = try? client.receive(
                        SocketReceiveArguments(handle: handle, timeoutNanoseconds: 5_000_000_000, capacity: 1920)),
                          status == .ok, let received else { return }
                    echoed.withLock { $0.append(received) }
                    _ = try? client.send(SocketSendArguments(handle: handle, destination: received.source, payload: received.payload))
                }
            }
            let deadline = monotonicNanoseconds() + 5_000_000_000
            while !rig.dispatcher.isWaiting(vcpu: 0), monotonicNanoseconds() < deadline { usleep(200) }
            XCTAssertTrue(rig.dispatcher.isWaiting(vcpu: 0), "the receive is a long poll")
            for size in [1, 100, 1920] {
                let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ size) }
                XCTAssertEqual(try clientSockets.send(peer, payload, to: SocketEndpoint(guestAddress, port: 7000)), size)
                let reply = try clientSockets.receive(peer, milliseconds: 5000)
                XCTAssertEqual(reply?.bytes, payload, "\(family) \(size) bytes echoed intact")
                XCTAssertEqual(reply?.source, SocketEndpoint(guestAddress, port: 7000))
            }
            guest.join()
            XCTAssertEqual(echoed.withLock { $0.map(\.source.address) }, [clientAddress, clientAddress, clientAddress])
            let client = rig.client(vcpu: 1)
            // Refused: the client's address on a port outside the policy (reachable, listening).
            let other = try clientSockets.udp(family, bind: SocketEndpoint(clientAddress, port: 9001))
            defer { topology.clientSockets.close(other) }
            let sent = try topology.guestUDPDatagramsSent()
            XCTAssertGreaterThanOrEqual(sent, 3, "the counter counts the echoes")
            let denied = rig.service.statistics.deniedCalls
            XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: SocketEndpoint(clientAddress, port: 9001),
                                                               payload: [1, 2, 3])).1, SocketResult(.denied))
            XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: SocketEndpoint(guestAddress == ClientTopology.guestV4 ? IPAddress("198.18.7.1")! : IPAddress("fd00:7::1")!, port: 9000),
                                                               payload: [1, 2, 3])).1, SocketResult(.denied))
            XCTAssertNil(try clientSockets.receive(other, milliseconds: 200), "nothing arrived")
            XCTAssertEqual(try topology.guestUDPDatagramsSent(), sent, "no datagram left the guest's namespace")
            XCTAssertEqual(rig.service.statistics.deniedCalls, denied + 2)
            XCTAssertEqual(try client.close(handle).1, SocketResult(.ok))
        }
    }

    func testTCPConnectAcceptSendAndReceive() throws {
        try requireNamespaces()
        let topology = try ClientTopology(label: "tcp")
        defer { topology.remove() }
        let rig = try ServiceRig(namespace: topology.network.namespace,
                                 remotes: [SocketRemoteRule(prefix: IPPrefix("198.18.5.1/32")!, ports: 9100...9100)])
        let client = rig.client()
        let clientSockets = BlockingSockets(backend: topology.clientSockets)
        let listener = try XCTUnwrap(client.open(.ipv4, .stream).1?.handle)
        XCTAssertEqual(try client.bind(listener, SocketEndpoint(.any(.ipv4), port: 7000)).1, SocketResult(.ok))
        XCTAssertEqual(try client.listen(listener).1, SocketResult(.ok))
        XCTAssertEqual(try client.accept(listener).1, SocketOpenResult(.wouldBlock, peer: SocketEndpoint.none), "non-blocking accept")
        let connection = try XCTUnwrap(clientSockets.connect(.ipv4, to: SocketEndpoint(ClientTopology.guestV4, port: 7000), milliseconds: 5000))
        defer { topology.clientSockets.close(connection) }
        let (status, accepted) = try client.accept(listener, timeoutNanoseconds: 5_000_000_000)
        XCTAssertEqual(status, .ok)
        let stream = try XCTUnwrap(accepted?.handle)
        XCTAssertEqual(accepted?.peer?.address, ClientTopology.clientV4)
        XCTAssertEqual(try client.setOption(stream, .tcpNoDelay, 1).1, SocketResult(.ok))
        XCTAssertEqual(try client.getOption(stream, .tcpNoDelay).1, SocketResult(.ok, value: 1))
        XCTAssertEqual(try client.name(stream, peer: true).1?.endpoint.address, ClientTopology.clientV4)
        let message = (0..<5000).map { UInt8(truncatingIfNeeded: $0 * 13) }
        try clientSockets.sendAll(connection, message, milliseconds: 1000)
        // Receive into a guest buffer (larger than the slot), then send it back from there.
        var got: [UInt8] = []
        for _ in 0..<100 where got.count < message.count {
            let (receiveStatus, received) = try client.receive(SocketReceiveArguments(
                handle: stream, timeoutNanoseconds: 5_000_000_000, capacity: 8192, bufferAddress: ServiceRig.bufferBase), withSource: false)
            guard receiveStatus == .ok, let received, received.status == 0, received.length > 0 else { break }
            got += try rig.memory.readBytes(count: Int(received.length), at: GuestAddress(ServiceRig.bufferBase))
        }
        XCTAssertEqual(got, message)
        try rig.memory.write(bytes: got, at: GuestAddress(ServiceRig.bufferBase))
        XCTAssertEqual(try client.send(SocketSendArguments(handle: stream, timeoutNanoseconds: 5_000_000_000,
                                                           bufferAddress: ServiceRig.bufferBase, length: UInt32(got.count))).1,
                       SocketResult(.ok, value: UInt32(got.count)))
        XCTAssertEqual(try clientSockets.receiveExactly(connection, count: message.count, milliseconds: 5000), message)
        // The guest connects out: allowed port, then a refused one.
        let server = try topology.clientSockets.open(.ipv4, .stream)
        defer { topology.clientSockets.close(server) }
        try topology.clientSockets.bind(server, SocketEndpoint(ClientTopology.clientV4, port: 9100))
        try topology.clientSockets.listen(server, backlog: 4)
        let outgoing = try XCTUnwrap(client.open(.ipv4, .stream).1?.handle)
        XCTAssertEqual(try client.connect(outgoing, SocketEndpoint(ClientTopology.clientV4, port: 9100), timeoutNanoseconds: 5_000_000_000).1,
                       SocketResult(.ok))
        XCTAssertEqual(try client.connect(outgoing, SocketEndpoint(ClientTopology.clientV4, port: 9101), timeoutNanoseconds: 5_000_000_000).1,
                       SocketResult(.denied))
        let nonBlocking = try XCTUnwrap(client.open(.ipv4, .stream).1?.handle)
        XCTAssertEqual(try client.connect(nonBlocking, SocketEndpoint(ClientTopology.clientV4, port: 9100), timeoutNanoseconds: 0).1?.status,
                       SocketStatus.inProgress.rawValue, "non-blocking connect")
        XCTAssertEqual(try client.shutdown(stream, how: 1).1, SocketResult(.ok))
        XCTAssertEqual(try clientSockets.receive(connection, milliseconds: 5000)?.bytes, [], "the peer sees end of stream")
    }
}

/// A socket service over real sockets in `namespace`, a VMRPC server over fresh guest memory,
/// and a real dispatcher (real time, real polling).
struct ServiceRig {
    static let slotBase = GuestAddress(0x10000)
    static let bufferBase: UInt64 = 0x20000
    let memory = GuestMemoryMap()
    let dispatcher: LongPollDispatcher
    let service: VMRPCSocketService
    let server: VMRPCServer
    /// Descriptors the rig itself holds (eventfds, the namespace helper's namespace descriptor is the caller's).
    let fixedDescriptors: Int

    init(namespace: NetworkNamespace, remotes: [SocketRemoteRule] = []) throws {
        let before = openDescriptorCount()
        try memory.addRegion(at: GuestAddress(0), size: 0x40000)
        dispatcher = try LongPollDispatcher(vcpuCount: 2)
        var policy = SocketPolicy()
        policy.bindPorts = [7000...7099]
        policy.remotes = remotes
        service = try VMRPCSocketService(backend: try HostSocketBackend(namespace: namespace), policy: policy, memory: memory,
                                         dispatcher: dispatcher)
        server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: Self.slotBase, count: 2), dispatcher: dispatcher,
                                 procedures: service.procedures)
        fixedDescriptors = openDescriptorCount() - before
    }

    func client(vcpu: Int = 0) -> SocketGuestClient {
        let server = self.server
        return SocketGuestClient(VMRPCGuestClient(memory: memory, slot: server.slots.address(ofVCPU: vcpu)!) {
            server.handleDoorbell(vcpu: vcpu)
        })
    }
}
