import RTVirtCore
import VMRPC
import VMRPCFuzzHarness
import VMRPCSockets
import XCTest

/// The `net.*` procedures over the in-memory backend: handles, policy, blocking, guest buffers,
/// batches, wait and teardown. No real socket is opened.
final class SocketServiceTests: XCTestCase {
    func openUDP(_ client: SocketGuestClient, port: UInt16? = 7000, family: SocketFamily = .ipv4) throws -> UInt64 {
        let (status, opened) = try client.open(family, .datagram)
        XCTAssertEqual(status, .ok)
        XCTAssertEqual(opened?.status, SocketStatus.ok.rawValue)
        let handle = try XCTUnwrap(opened?.handle)
        if let port {
            XCTAssertEqual(try client.bind(handle, SocketEndpoint(.any(family), port: port)).1, SocketResult(.ok))
        }
        return handle
    }

    func testHandlesAreIndexAndGenerationAndStaleOrForgedOnesAreRefused() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let first = try openUDP(client, port: nil)
        XCTAssertEqual(first, 1 << 32 | 1, "generation 1 (the harness counts), index 1")
        XCTAssertEqual(try client.close(first).1, SocketResult(.ok))
        XCTAssertEqual(try client.close(first).1, SocketResult(.badHandle), "closed")
        let second = try openUDP(client, port: nil)
        XCTAssertEqual(second & 0xFFFF_FFFF, 1, "the index is reused ...")
        XCTAssertNotEqual(second >> 32, first >> 32, "... with a new generation")
        XCTAssertEqual(try client.bind(first, .at("0.0.0.0", 7001)).1, SocketResult(.badHandle), "stale")
        XCTAssertEqual(try client.bind(second ^ (1 << 40), .at("0.0.0.0", 7001)).1, SocketResult(.badHandle), "forged generation")
        for forged: UInt64 in [0, 0xFFFF_FFFF, 1 << 32 | 4095, 1 << 32 | 4096, UInt64.max] {
            XCTAssertEqual(try client.close(forged).1, SocketResult(.badHandle), "\(forged)")
        }
        XCTAssertEqual(harness.service.openSocketCount, 1)
        XCTAssertEqual(harness.backend.openDescriptors.count, 1)
    }

    func testPolicyRefusesFamiliesTypesPortsAndDestinationsAndSendsNothing() throws {
        var policy = SocketHarness.testPolicy
        policy.types = [.datagram]
        policy.families = [.ipv4]
        let harness = try SocketHarness(policy: policy)
        let client = harness.client()
        XCTAssertEqual(try client.open(.ipv4, .stream).1, SocketOpenResult(.denied))
        XCTAssertEqual(try client.open(.ipv6, .datagram).1, SocketOpenResult(.denied))
        XCTAssertEqual(try client.call(SocketProcedureID.open, SocketOpenArguments(family: 5, type: 2).encoded, as: SocketOpenResult.self).1,
                       SocketOpenResult(.invalidArgument), "an unknown family")
        let handle = try openUDP(client, port: nil)
        XCTAssertEqual(try client.bind(handle, .at("0.0.0.0", 80)).1, SocketResult(.denied), "port outside the allowed set")
        XCTAssertEqual(try client.bind(handle, .at("0.0.0.0", 7100)).1, SocketResult(.denied))
        XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: .at("198.18.1.1", 9), payload: [1])).1,
                       SocketResult(.denied), "prefix outside the allowed set")
        XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: .at("198.18.0.9", 10000), payload: [1])).1,
                       SocketResult(.denied), "port outside the allowed set")
        XCTAssertEqual(try client.connect(handle, .at("10.0.0.1", 9)).1, SocketResult(.denied))
        XCTAssertEqual(harness.backend.sent, [], "nothing was sent")
        XCTAssertEqual(harness.service.statistics.deniedCalls, 7)
        XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: .at("198.18.0.9", 9), payload: [1, 2, 3])).1,
                       SocketResult(.ok, value: 3))
        XCTAssertEqual(harness.backend.sent, [.init(descriptor: 1000, destination: .at("198.18.0.9", 9), bytes: [1, 2, 3])])
    }

    func testOpenSocketsAreLimited() throws {
        var policy = SocketHarness.testPolicy
        policy.maximumOpenSockets = 3
        let harness = try SocketHarness(policy: policy)
        let client = harness.client()
        let handles = try (0..<3).map { _ in try openUDP(client, port: nil) }
        XCTAssertEqual(try client.open(.ipv4, .datagram).1, SocketOpenResult(.tooManySockets))
        XCTAssertEqual(try client.close(handles[1]).1, SocketResult(.ok))
        XCTAssertEqual(try client.open(.ipv4, .datagram).1?.status, SocketStatus.ok.rawValue)
        harness.backend.failNextOpen(errno: EMFILE)
        XCTAssertEqual(try client.close(handles[0]).1, SocketResult(.ok))
        XCTAssertEqual(try client.open(.ipv4, .datagram).1, SocketOpenResult(.noResources), "the host's errno, mapped")
    }

    func testReceiveIsNonBlockingWithTimeoutZeroAndALongPollOtherwise() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let handle = try openUDP(client)
        XCTAssertEqual(try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 0, capacity: 100)).1,
                       SocketReceiveResult(.wouldBlock))
        // Nothing arrives: the vCPU parks until the deadline (the manual clock jumps there).
        let before = harness.clock.nowNanoseconds()
        XCTAssertEqual(try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 5_000_000, capacity: 100)).0, .timedOut)
        XCTAssertGreaterThanOrEqual(harness.clock.nowNanoseconds() - before, 5_000_000)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.parkedCalls, 1)
        // A cancelled vCPU (pause, stop) leaves the wait with `cancelled`.
        harness.dispatcher.cancel(vcpu: 0)
        XCTAssertEqual(try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 5_000_000, capacity: 100)).0, .cancelled)
        harness.dispatcher.resume(vcpu: 0)
        // The time limit is the policy's at most.
        let capped = harness.clock.nowNanoseconds()
        XCTAssertEqual(try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: .max, capacity: 100)).0, .timedOut)
        XCTAssertEqual(harness.clock.nowNanoseconds() - capped, harness.service.policy.maximumBlockNanoseconds)
        // Data: returned at once, with the source, truncated to the capacity.
        harness.backend.deliver(Array(0..<50), toPort: 7000, from: .at("198.18.0.1", 5555))
        let (status, received) = try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 1_000_000, capacity: 20))
        XCTAssertEqual(status, .ok)
        XCTAssertEqual(received, SocketReceiveResult(.ok, length: 20, truncated: true, source: .at("198.18.0.1", 5555), payload: Array(0..<20)))
    }

    func testAParkedReceiveWakesOnReadinessAndRetries() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let handle = try openUDP(client)
        // The descriptor reports ready but holds nothing (another vCPU took the datagram): the
        // call parks again, up to the server's limit of waits per call.
        harness.waiter.readyDescriptors.withLock { $0 = [1000] }
        XCTAssertEqual(try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 1_000_000, capacity: 8)).0, .internalError)
        XCTAssertEqual(harness.waiter.blockCount.load(ordering: .relaxed), 8)
        harness.backend.deliver([7], toPort: 7000, from: .at("198.18.0.1", 1))
        XCTAssertEqual(try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 1_000_000, capacity: 8)).1?.payload, [7])
    }

    func testGuestBuffersAreBoundsCheckedReadOnceAndWrittenOnlyInRange() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let handle = try openUDP(client)
        let payload = (0..<3000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try harness.memory.write(bytes: payload, at: GuestAddress(SocketHarness.bufferBase))
        XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: .at("198.18.0.2", 9),
                                                           bufferAddress: SocketHarness.bufferBase, length: 3000)).1,
                       SocketResult(.ok, value: 3000))
        XCTAssertEqual(harness.backend.sent.last?.bytes, payload, "larger than the slot, taken from guest memory")
        XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: .at("198.18.0.2", 9),
                                                           bufferAddress: SocketHarness.memorySize - 10, length: 11)).1,
                       SocketResult(.bufferOutOfRange))
        XCTAssertEqual(try client.send(SocketSendArguments(handle: handle, destination: .at("198.18.0.2", 9),
                                                           bufferAddress: UInt64.max - 4, length: 11)).1,
                       SocketResult(.bufferOutOfRange), "no wrap-around")
        // Receive into a buffer: 100 bytes arrive, capacity 200; bytes 100 ..< 200 and beyond stay as they were.
        let target = SocketHarness.bufferBase + 0x10000
        try harness.memory.write(bytes: [UInt8](repeating: 0xEE, count: 400), at: GuestAddress(target))
        harness.backend.deliver([UInt8](repeating: 0x11, count: 100), toPort: 7000, from: .at("198.18.0.1", 1))
        let (_, received) = try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 0, capacity: 200, bufferAddress: target))
        XCTAssertEqual(received, SocketReceiveResult(.ok, length: 100, source: .at("198.18.0.1", 1)))
        let after = try harness.memory.readBytes(count: 400, at: GuestAddress(target))
        XCTAssertEqual(Array(after[0..<100]), [UInt8](repeating: 0x11, count: 100))
        XCTAssertEqual(Array(after[100...]), [UInt8](repeating: 0xEE, count: 300))
        // A datagram longer than the capacity is cut at the capacity: nothing beyond it is written.
        harness.backend.deliver([UInt8](repeating: 0x22, count: 300), toPort: 7000, from: .at("198.18.0.1", 1))
        let (_, cut) = try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 0, capacity: 50, bufferAddress: target + 200))
        XCTAssertEqual(cut?.length, 50)
        XCTAssertEqual(cut?.truncated, true)
        XCTAssertEqual(try harness.memory.readBytes(count: 1, at: GuestAddress(target + 250)), [0xEE])
        XCTAssertEqual(try client.receive(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 0, capacity: 50,
                                                                 bufferAddress: SocketHarness.memorySize - 49)).1,
                       SocketReceiveResult(.bufferOutOfRange))
        var policy = SocketHarness.testPolicy
        policy.maximumBytesPerCall = 1000
        let limited = try SocketHarness(policy: policy)
        let limitedHandle = try openUDP(limited.client())
        XCTAssertEqual(try limited.client().send(SocketSendArguments(handle: limitedHandle, destination: .at("198.18.0.2", 9),
                                                                     bufferAddress: SocketHarness.bufferBase, length: 1001)).1,
                       SocketResult(.denied), "more bytes per call than the policy allows")
    }

    func testMalformedArgumentsAreBadArguments() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let handle = try openUDP(client)
        var open = SocketOpenArguments(family: .ipv4, type: .datagram).encoded
        open[4] = 1
        XCTAssertEqual(try client.client.call(SocketProcedureID.open, arguments: open).status, .badArguments, "reserved not zero")
        var send = SocketSendArguments(handle: handle, destination: .at("198.18.0.2", 9), payload: [1, 2]).encoded
        send[16] = 0x80
        XCTAssertEqual(try client.client.call(SocketProcedureID.sendTo, arguments: send).status, .badArguments, "unknown flag")
        var length = SocketSendArguments(handle: handle, destination: .at("198.18.0.2", 9), payload: [1, 2]).encoded
        length[20] = 3
        XCTAssertEqual(try client.client.call(SocketProcedureID.sendTo, arguments: length).status, .badArguments, "length disagrees")
        var v4 = SocketBindArguments(handle: handle, endpoint: .at("0.0.0.0", 7001)).encoded
        v4[8 + 8 + 5] = 1
        XCTAssertEqual(try client.client.call(SocketProcedureID.bind, arguments: v4).status, .badArguments, "IPv4 with bytes past 4")
        XCTAssertEqual(try client.client.call(SocketProcedureID.receive, arguments: [UInt8](repeating: 0, count: 31)).status,
                       .badArgumentLength)
        let batch = SocketBatchArguments(handle: handle, timeoutNanoseconds: 0, count: 2, bufferAddress: 0, bufferLength: 100, stride: 64)
        XCTAssertEqual(try client.client.call(SocketProcedureID.receiveBatch, arguments: batch.encoded).status, .badArguments,
                       "count·stride beyond the buffer length")
        XCTAssertEqual(harness.backend.sent, [])
    }

    func testBatchesReceiveAndSendManyDatagramsPerCall() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let handle = try openUDP(client)
        for index in 0..<5 {
            harness.backend.deliver([UInt8](repeating: UInt8(index), count: 10 + index), toPort: 7000, from: .at("198.18.0.1", UInt16(100 + index)))
        }
        let stride: UInt32 = 64
        let receive = SocketBatchArguments(handle: handle, timeoutNanoseconds: 1_000, count: 4,
                                           bufferAddress: SocketHarness.bufferBase, bufferLength: 4 * stride, stride: stride)
        XCTAssertEqual(try client.receiveBatch(receive).1, SocketResult(.ok, value: 4), "at most count")
        let bytes = try harness.memory.readBytes(count: 4 * Int(stride), at: GuestAddress(SocketHarness.bufferBase))
        let records = try XCTUnwrap(SocketBatchRecord.decode(bytes, count: 4, stride: Int(stride)))
        XCTAssertEqual(records.map(\.payload), (0..<4).map { [UInt8](repeating: UInt8($0), count: 10 + $0) })
        XCTAssertEqual(records.map(\.endpoint.port), [100, 101, 102, 103])
        // Echo them from the same buffer: each goes back to its source.
        XCTAssertEqual(try client.sendBatch(receive).1, SocketResult(.ok, value: 4))
        XCTAssertEqual(harness.backend.sent.map(\.destination?.port), [100, 101, 102, 103])
        XCTAssertEqual(harness.backend.sent.map(\.bytes), records.map(\.payload))
        // One destination outside the policy refuses the whole batch.
        var refused = records
        refused[2].endpoint = .at("203.0.113.1", 100)
        try harness.memory.write(bytes: SocketBatchRecord.encode(refused, stride: Int(stride)), at: GuestAddress(SocketHarness.bufferBase))
        XCTAssertEqual(try client.sendBatch(receive).1, SocketResult(.denied))
        XCTAssertEqual(harness.backend.sent.count, 4, "nothing more was sent")
        // A record longer than its stride is malformed.
        var long = SocketBatchRecord.encode(records, stride: Int(stride))
        long[0] = 200
        try harness.memory.write(bytes: long, at: GuestAddress(SocketHarness.bufferBase))
        XCTAssertEqual(try client.sendBatch(receive).0, .badArguments)
        XCTAssertEqual(harness.backend.sent.count, 4)
    }

    func testWaitReportsTheReadySocketsAndMarksInvalidHandles() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let quiet = try openUDP(client, port: 7000)
        let busy = try openUDP(client, port: 7001)
        harness.backend.deliver([1], toPort: 7001, from: .at("198.18.0.1", 1))
        let (status, result) = try client.wait([SocketWaitEntry(handle: quiet, events: .readable),
                                                SocketWaitEntry(handle: busy, events: .readable),
                                                SocketWaitEntry(handle: 12345, events: .readable)], timeoutNanoseconds: 1_000_000)
        XCTAssertEqual(status, .ok)
        XCTAssertEqual(result?.events, [[], .readable, .invalid])
        XCTAssertEqual(try client.wait([SocketWaitEntry(handle: quiet, events: .readable)], timeoutNanoseconds: 0).1?.events, [[]])
        XCTAssertEqual(try client.wait([SocketWaitEntry(handle: quiet, events: .readable)], timeoutNanoseconds: 1_000_000).0, .timedOut)
        XCTAssertEqual(try client.wait([SocketWaitEntry(handle: quiet, events: [.readable, .writable])], timeoutNanoseconds: 0).1?.events,
                       [.writable])
    }

    func testWaitReportsEachSocketsOwnEventsWhenAnotherIsClosedDuringThePark() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let closing = try openUDP(client, port: 7000)
        let quiet = try openUDP(client, port: 7001)
        let ready = try openUDP(client, port: 7002)
        // While vCPU 0 is parked: vCPU 1 closes the first socket, and a datagram reaches the third.
        let server = harness.server, memory = harness.memory, backend = harness.backend, waiter = harness.waiter
        harness.waiter.whileBlocked.withLock {
            $0 = {
                waiter.whileBlocked.withLock { $0 = nil }
                let other = SocketGuestClient(VMRPCGuestClient(memory: memory, slot: server.slots.address(ofVCPU: 1)!) {
                    server.handleDoorbell(vcpu: 1)
                })
                XCTAssertEqual(try? other.close(closing).1, SocketResult(.ok))
                backend.deliver([1], toPort: 7002, from: .at("198.18.0.1", 1))
                waiter.readyDescriptors.withLock { $0 = [1002] }
            }
        }
        let (status, result) = try client.wait([SocketWaitEntry(handle: closing, events: .readable),
                                                SocketWaitEntry(handle: quiet, events: .readable),
                                                SocketWaitEntry(handle: ready, events: .readable)], timeoutNanoseconds: 1_000_000)
        XCTAssertEqual(status, .ok)
        XCTAssertEqual(result?.events, [.invalid, [], .readable], "each entry its own socket's events")
    }

    /// Posted exitlessly, a receive is never run by the poller (it waits for the network): the
    /// poller hands it to the doorbell unrun, and the vCPU's own thread receives. A send is
    /// answered by the poller without an exit.
    func testThePollerHandsReceivesToTheDoorbellAndAnswersSends() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let handle = try openUDP(client)
        harness.backend.deliver([9, 8, 7], toPort: 7000, from: .at("198.18.0.1", 1))
        let poller = VMRPCPoller.manual()
        try poller.attach(harness.server)
        let slot = SocketHarness.slotBase, memory = harness.memory
        func word(_ offset: Int) -> GuestAddress { GuestAddress(slot.rawValue + UInt64(offset)) }
        func post(_ procedure: UInt32, _ sequence: UInt32, _ arguments: [UInt8]) throws {
            let header = VMRPCRequestHeader(procedure: procedure, sequence: sequence, argumentLength: UInt32(arguments.count),
                                            features: .exitless)
            try memory.write(bytes: header.bytes, at: slot)
            try memory.write(bytes: arguments, at: word(VMRPCWire.argumentsOffset))
            try memory.atomicStore(UInt32(1), at: word(VMRPCWire.postedOffset), ordering: .releasing)
        }
        func completed() throws -> UInt32 { try memory.atomicLoad(UInt32.self, at: word(VMRPCWire.completedOffset), ordering: .acquiring) }

        for procedure in [SocketProcedureID.receive, SocketProcedureID.receiveFrom] {
            let sequence = procedure
            try post(procedure, sequence, SocketReceiveArguments(handle: handle, timeoutNanoseconds: 0, capacity: 8).encoded)
            XCTAssertEqual(poller.scanOnce(), 1)
            XCTAssertNotEqual(try completed(), sequence, "not answered by the poller")
            XCTAssertEqual(harness.service.statistics.receives, procedure == SocketProcedureID.receive ? 0 : 1, "not run by the poller")
            XCTAssertEqual(try memory.atomicLoad(UInt32.self, at: word(VMRPCWire.needsDoorbellOffset), ordering: .acquiring), 1)
            harness.server.handleDoorbell(vcpu: 0)
            XCTAssertEqual(try completed(), sequence, "answered on the doorbell")
        }
        XCTAssertEqual(harness.service.statistics.receives, 1, "the datagram was received once, on the vCPU's thread")
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.handoffs, 2)

        let send = SocketSendArguments(handle: handle, destination: .at("198.18.0.1", 9), payload: [1, 2])
        try post(SocketProcedureID.sendTo, 99, send.encoded)
        XCTAssertEqual(poller.scanOnce(), 1)
        XCTAssertEqual(try completed(), 99, "a send is answered by the poller, without an exit")
        XCTAssertEqual(harness.backend.sent.count, 1)
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.exitlessCalls, 1)
    }

    func testOptionsNamesAndShutdown() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        let handle = try openUDP(client)
        XCTAssertEqual(try client.setOption(handle, .receiveBuffer, 65536).1, SocketResult(.ok))
        XCTAssertEqual(try client.getOption(handle, .receiveBuffer).1, SocketResult(.ok, value: 65536))
        XCTAssertEqual(try client.setOption(handle, .priority, 6).1, SocketResult(.ok))
        XCTAssertEqual(try client.setOption(handle, .priority, 7).1, SocketResult(.notPermitted), "needs CAP_NET_ADMIN")
        XCTAssertEqual(try client.setOption(handle, .tcpNoDelay, 1).1, SocketResult(.invalidArgument), "EOPNOTSUPP on UDP")
        XCTAssertEqual(try client.setOption(handle, .error, 0).1, SocketResult(.invalidArgument), "read only")
        XCTAssertEqual(try client.name(handle).1, SocketNameResult(.ok, endpoint: .at("0.0.0.0", 7000)))
        XCTAssertEqual(try client.name(handle, peer: true).1, SocketNameResult(.notConnected))
        XCTAssertEqual(try client.shutdown(handle, how: 3).1, SocketResult(.invalidArgument))
    }

    func testStoppingTheVMClosesEverySocket() throws {
        let harness = try SocketHarness()
        let client = harness.client()
        for port in 7000..<7010 { _ = try openUDP(client, port: UInt16(port)) }
        XCTAssertEqual(harness.backend.openDescriptors.count, 10)
        harness.dispatcher.close(vcpu: 1) // what VirtualMachineRunner.stop() does
        XCTAssertEqual(harness.service.openSocketCount, 0)
        XCTAssertEqual(harness.backend.openDescriptors, [])
        XCTAssertEqual(harness.service.statistics.socketsClosed, 10)
    }

    func testEveryErrnoMapsToADefinedStatus() {
        for errno in Int32(0)...Int32(200) {
            XCTAssertNotNil(SocketStatus(rawValue: SocketStatus(hostErrno: errno).rawValue), "\(errno)")
        }
        for errno in SocketStatus.mappedErrnos { XCTAssertNotEqual(SocketStatus(hostErrno: errno), .hostError, "\(errno)") }
        XCTAssertEqual(SocketStatus(hostErrno: EAGAIN), .wouldBlock)
        XCTAssertEqual(SocketStatus(hostErrno: ECONNREFUSED), .connectionRefused)
        XCTAssertEqual(SocketStatus(hostErrno: EPIPE), .connectionReset)
        XCTAssertEqual(SocketStatus(hostErrno: EACCES), .notPermitted)
        XCTAssertEqual(SocketStatus(hostErrno: EIO), .hostError)
    }

    func testPolicyLimitsAreValidated() {
        var policy = SocketPolicy()
        policy.maximumOpenSockets = 0
        XCTAssertThrowsError(try policy.validate())
        policy.maximumOpenSockets = 4096
        XCTAssertThrowsError(try policy.validate())
        policy.maximumOpenSockets = 64
        policy.maximumBytesPerCall = 0
        XCTAssertThrowsError(try policy.validate())
        XCTAssertEqual(SocketPolicy().maximumOpenSockets, 64, "the default")
    }

    func testPrefixesAndAddresses() {
        XCTAssertTrue(IPPrefix("198.18.0.0/15")!.contains(IPAddress("198.19.255.1")!))
        XCTAssertFalse(IPPrefix("198.18.0.0/15")!.contains(IPAddress("198.20.0.1")!))
        XCTAssertFalse(IPPrefix("198.18.0.0/15")!.contains(IPAddress("fd00::1")!))
        XCTAssertTrue(IPPrefix("fd00::/8")!.contains(IPAddress("fd12:3456::1")!))
        XCTAssertTrue(IPPrefix("0.0.0.0/0")!.contains(IPAddress("8.8.8.8")!))
        XCTAssertNil(IPPrefix("198.18.0.0/33"))
        XCTAssertNil(IPAddress("198.18.0"))
        XCTAssertEqual(IPAddress("fd00:0::1")!.description, "fd00::1")
        XCTAssertEqual(SocketEndpoint.at("fd00::1", 80).description, "[fd00::1]:80")
    }
}
