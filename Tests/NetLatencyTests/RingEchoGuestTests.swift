#if canImport(Glibc)
import Glibc
#endif
import KVMBackend
import PacketRing
import RTVirtCore
import RTVirtGuestImage
import VMRPCSockets
import XCTest
import RTVirtXCTestSupport

/// The conventional path on real KVM: the ring echo guest (mode 31) halted with interrupts
/// enabled at CPL 0 is woken by a real interrupt through the in-kernel irqchip — an irqfd whose
/// GSI routes to an MSI, or `KVM_SIGNAL_MSI` — and echoes the datagram in the receive ring
/// through the transmit ring and its doorbell.
final class RingEchoGuestTests: XCTestCase {
    /// A doorbell that records what the guest transmits instead of sending it.
    final class CapturingDoorbell: BusDevice {
        let ring: PacketRing
        let sent = LockedValue<[(SocketEndpoint, [UInt8])]>([])
        init(ring: PacketRing) { self.ring = ring }
        func read(_ access: BusAccess) -> UInt64 { 0 }
        func write(_ access: BusAccess, value: UInt64) -> BusWriteResult {
            let memory = ring.memory
            ring.takeTransmits { transmit in
                let payload = (try? memory.readBytes(count: transmit.length, at: transmit.payload)) ?? []
                sent.withLock { $0.append((transmit.destination, payload)) }
                return .sent
            }
            return .handled
        }
    }

    struct Rig {
        let machine: BundledGuestMachine
        let ring: PacketRing
        let doorbell: CapturingDoorbell
        let runner: VirtualMachineRunner
    }

    func startGuest() throws -> Rig {
        let kvm = try openKVMOrSkip()
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .ringEcho)], interruptController: true)
        let ring = try PacketRing(memory: machine.vm.guestMemory, layout: GuestLayout.packetRingLayout(forVCPU: 0))
        try ring.reset()
        let doorbell = CapturingDoorbell(ring: ring)
        var bus = try machine.makeBus()
        try bus.register(doorbell, space: .port, base: UInt64(GuestLayout.ringDoorbellPort), length: 1)
        let runner = try machine.start(bus: bus)
        XCTAssertTrue(eventually { machine.ports.results(ofVCPU: 0).contains(GuestLayout.netReady) || runner.stopReasons[0] != nil },
                      "hang detector: the guest reports ready")
        XCTAssertNil(runner.stopReasons[0], "the guest halts and waits; it does not stop")
        XCTAssertEqual(machine.ports.results(ofVCPU: 0), [GuestLayout.netReady])
        return Rig(machine: machine, ring: ring, doorbell: doorbell, runner: runner)
    }

    func deliver(_ ring: PacketRing, _ payload: [UInt8], from source: SocketEndpoint) {
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { scratch.deallocate() }
        let delivery = ring.deliver(scratch: scratch) { buffer in
            buffer.copyBytes(from: payload)
            return (payload.count, false, source)
        }
        XCTAssertEqual(delivery, .delivered(length: payload.count, truncated: false))
        XCTAssertTrue(ring.publish())
    }

    func testAnIrqfdRoutedToAnMSIWakesTheHaltedGuest() throws {
        let rig = try startGuest()
        defer { rig.runner.stopAndWait() }
        let irq = try rig.machine.vm.connectMSI(.localAPIC(apicID: 0, vector: GuestLayout.ringVector))
        XCTAssertGreaterThanOrEqual(irq.gsi, KVMInterruptRoute.firstFreeGSI)
        XCTAssertEqual(rig.machine.vm.installedInterruptRoutes?.last, .msi(gsi: irq.gsi, message: .localAPIC(apicID: 0, vector: GuestLayout.ringVector)))
        XCTAssertTrue(rig.machine.vm.installedInterruptRoutes?.contains(.interruptController(gsi: 4, chip: 2, pin: 4)) == true,
                      "the legacy lines stay routed")
        let source = SocketEndpoint(IPAddress("198.18.20.1")!, port: 41000)
        // Three datagrams, one interrupt each: the handler's EOI lets the next one in.
        for round in 0..<3 {
            let payload = (0..<64).map { UInt8(truncatingIfNeeded: $0 * 7 + round) }
            // The guest halts again after each echo: give it a moment, so the interrupt finds it halted.
            usleep(20_000)
            deliver(rig.ring, payload, from: source)
            irq.signal()
            XCTAssertTrue(eventually { rig.doorbell.sent.withLock { $0.count } == round + 1 }, "hang detector: echo \(round) arrives")
            let last = try XCTUnwrap(rig.doorbell.sent.withLock { $0.last })
            XCTAssertEqual(last.0, source, "sent back to its source")
            XCTAssertEqual(last.1, payload, "with its payload")
        }
        XCTAssertNil(rig.runner.stopReasons[0])
        // The ring counts a transmit after its send, and the guest frees its slots after the doorbell returns.
        XCTAssertTrue(eventually { rig.ring.statistics.transmitted == 3 }, "hang detector: three transmits counted")
        XCTAssertEqual(rig.ring.statistics.invalidDescriptors, 0)
        let memory = rig.machine.vm.guestMemory, consumed = rig.ring.layout.receiveConsumed
        XCTAssertTrue(eventually { (try? memory.read(UInt32.self, at: consumed)) == 3 }, "hang detector: the guest freed its slots")
    }

    func testSignalMSIWakesTheHaltedGuestAndABurstTakesOneInterrupt() throws {
        let rig = try startGuest()
        defer { rig.runner.stopAndWait() }
        let source = SocketEndpoint(IPAddress("198.18.20.1")!, port: 41001)
        usleep(20_000)
        for index in 0..<5 { deliver(rig.ring, [UInt8(index), 1, 2, 3], from: source) }
        XCTAssertTrue(try rig.machine.vm.signalLocalAPICInterrupt(apicID: 0, vector: GuestLayout.ringVector), "a LAPIC took the MSI")
        XCTAssertTrue(eventually { rig.doorbell.sent.withLock { $0.count } == 5 }, "hang detector: all five echoed")
        XCTAssertEqual(rig.doorbell.sent.withLock { $0.map { $0.1[0] } }, [0, 1, 2, 3, 4], "in order")
    }

    /// The full conventional path with real sockets: a socket in a namespace, the receiver
    /// thread filling the ring and raising the irqfd, the doorbell sending on the socket.
    func testTheReceiverAndDoorbellEchoThroughARealSocket() throws {
        try requireNamespaces()
        let kvm = try openKVMOrSkip()
        let client = try NetworkNamespace.create(label: "ring-c")
        defer { client.remove() }
        let network = try VMNetwork(VMNetworkConfiguration(label: "ring", hostAddresses: [IPPrefix("198.18.21.1/24")!],
                                                           guestAddresses: [IPPrefix("198.18.21.2/24")!], peerNamespace: client))
        defer { network.remove() }
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .ringEcho)], interruptController: true)
        let ring = try PacketRing(memory: machine.vm.guestMemory, layout: GuestLayout.packetRingLayout(forVCPU: 0))
        try ring.reset()
        let sockets = try HostSocketBackend(namespace: network.namespace)
        let descriptor = try sockets.open(.ipv4, .datagram)
        defer { sockets.close(descriptor) }
        try sockets.bind(descriptor, SocketEndpoint(IPAddress("198.18.21.2")!, port: 7100))
        var policy = SocketPolicy()
        policy.remotes = [SocketRemoteRule(prefix: IPPrefix("198.18.21.0/24")!)]
        var bus = try machine.makeBus()
        try bus.register(PacketRingTransmitDoorbell(ring: ring, backend: sockets, descriptor: descriptor, policy: policy),
                         space: .port, base: UInt64(GuestLayout.ringDoorbellPort), length: 1)
        let irq = try machine.vm.connectMSI(.localAPIC(apicID: 0, vector: GuestLayout.ringVector))
        let runner = try machine.start(bus: bus)
        defer { runner.stopAndWait() }
        XCTAssertTrue(eventually { machine.ports.results(ofVCPU: 0).contains(GuestLayout.netReady) })
        let receiver = try PacketRingReceiver(ring: ring, backend: sockets, descriptor: descriptor) { irq.signal() }
        defer { receiver.stop() }

        let clientSockets = try HostSocketBackend(namespace: client)
        let clientDescriptor = try clientSockets.open(.ipv4, .datagram)
        defer { clientSockets.close(clientDescriptor) }
        try clientSockets.bind(clientDescriptor, SocketEndpoint(IPAddress("198.18.21.1")!, port: 0))
        for index in 0..<10 {
            let payload = [UInt8](repeating: UInt8(index), count: 64)
            _ = try payload.withUnsafeBytes { try clientSockets.send(clientDescriptor, $0, to: SocketEndpoint(IPAddress("198.18.21.2")!, port: 7100)) }
            var entry = pollfd(fd: clientDescriptor, events: Int16(POLLIN), revents: 0)
            XCTAssertGreaterThan(poll(&entry, 1, 10_000), 0, "hang detector: echo \(index) arrives")
            var buffer = [UInt8](repeating: 0, count: 256)
            let received = try buffer.withUnsafeMutableBytes { try clientSockets.receive(clientDescriptor, into: $0) }
            XCTAssertEqual(Array(buffer.prefix(received.length)), payload)
            XCTAssertEqual(received.source, SocketEndpoint(IPAddress("198.18.21.2")!, port: 7100))
        }
        XCTAssertEqual(ring.statistics.delivered, 10)
        XCTAssertTrue(eventually { ring.statistics.transmitted == 10 }, "hang detector: counted after each send")
        XCTAssertGreaterThanOrEqual(ring.statistics.interrupts, 1)
    }
}
