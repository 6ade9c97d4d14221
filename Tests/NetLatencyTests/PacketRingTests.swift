import Dispatch
import PacketRing
import RTVirtCore
import VMRPC
import VMRPCSockets
import XCTest

/// The host side of the datagram rings over plain guest memory, with a guest played by the test:
/// delivery and publication, the transmit ring, and guest-written values that must not hurt the host.
final class PacketRingTests: XCTestCase {
    let base = GuestAddress(0x10000)
    let source = SocketEndpoint(IPAddress("198.18.20.1")!, port: 40000)

    func makeRing(entries: UInt32 = 4) throws -> (GuestMemoryMap, PacketRing) {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x40000)
        let ring = try PacketRing(memory: memory, layout: PacketRingLayout(base: base, entries: entries, slotSize: 2048))
        try ring.reset()
        return (memory, ring)
    }

    /// Delivers `bytes` from `source` as the next datagram.
    func deliver(_ ring: PacketRing, _ bytes: [UInt8], truncated: Bool = false) -> PacketRing.Delivery {
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { scratch.deallocate() }
        return ring.deliver(scratch: scratch) { buffer in
            let count = min(bytes.count, buffer.count)
            buffer.copyBytes(from: bytes.prefix(count))
            return (count, truncated, source)
        }
    }

    func testLayoutValidation() {
        XCTAssertNoThrow(try PacketRingLayout(base: base).validate())
        XCTAssertThrowsError(try PacketRingLayout(base: base, entries: 3).validate(), "not a power of two")
        XCTAssertThrowsError(try PacketRingLayout(base: base, entries: 8192).validate(), "too many entries")
        XCTAssertThrowsError(try PacketRingLayout(base: base, slotSize: 40).validate(), "slot smaller than a header and a payload")
        XCTAssertThrowsError(try PacketRingLayout(base: GuestAddress(0x10002)).validate(), "misaligned indices")
        let memory = GuestMemoryMap()
        XCTAssertThrowsError(try PacketRing(memory: memory, layout: PacketRingLayout(base: base)), "no guest memory there")
    }

    func testDeliveredDatagramsBecomeTheGuestsOnlyWhenPublished() throws {
        let (memory, ring) = try makeRing()
        XCTAssertEqual(deliver(ring, [1, 2, 3]), .delivered(length: 3, truncated: false))
        XCTAssertEqual(deliver(ring, [4, 5]), .delivered(length: 2, truncated: false))
        XCTAssertEqual(try memory.read(UInt32.self, at: ring.layout.receiveProduced), 0, "not yet published")
        XCTAssertTrue(ring.publish(), "two new records")
        XCTAssertFalse(ring.publish(), "nothing new")
        XCTAssertEqual(try memory.read(UInt32.self, at: ring.layout.receiveProduced), 2)
        // Record 0: length 3, flags 0, the source address, the payload.
        let slot = ring.layout.receiveSlot(0)
        XCTAssertEqual(try memory.read(UInt32.self, at: slot), 3)
        XCTAssertEqual(try memory.read(UInt32.self, at: GuestAddress(slot.rawValue + 4)), 0)
        XCTAssertEqual(try memory.readBytes(count: 24, at: GuestAddress(slot.rawValue + 8)), source.encoded)
        XCTAssertEqual(try memory.readBytes(count: 3, at: GuestAddress(slot.rawValue + 32)), [1, 2, 3])
        XCTAssertEqual(try memory.readBytes(count: 2, at: GuestAddress(ring.layout.receiveSlot(1).rawValue + 32)), [4, 5])
        XCTAssertEqual(ring.statistics.delivered, 2)
    }

    func testAFullRingDropsAndCountsUntilTheGuestConsumes() throws {
        let (memory, ring) = try makeRing(entries: 4)
        for value in 0..<4 { XCTAssertEqual(deliver(ring, [UInt8(value)]), .delivered(length: 1, truncated: false)) }
        XCTAssertEqual(deliver(ring, [9]), .droppedRingFull, "written but unpublished slots count as taken")
        ring.publish()
        XCTAssertEqual(deliver(ring, [9]), .droppedRingFull)
        XCTAssertEqual(ring.freeReceiveSlots(), 0)
        try memory.write(UInt32(3), at: ring.layout.receiveConsumed) // the guest took three
        XCTAssertEqual(ring.freeReceiveSlots(), 3)
        XCTAssertEqual(deliver(ring, [7]), .delivered(length: 1, truncated: false))
        XCTAssertEqual(try memory.read(UInt8.self, at: GuestAddress(ring.layout.receiveSlot(4).rawValue + 32)), 7, "slot 4 is slot 0 again")
        XCTAssertEqual(ring.statistics.droppedRingFull, 2)
    }

    func testAnImpossibleConsumedIndexStopsDeliveryWithoutWritingAnything() throws {
        let (memory, ring) = try makeRing(entries: 4)
        try memory.write(UInt32(100), at: ring.layout.receiveConsumed) // ahead of what the host produced
        let before = try memory.readBytes(count: 4 * 2048, at: ring.layout.receiveSlots)
        XCTAssertEqual(deliver(ring, [1]), .droppedRingFull)
        XCTAssertEqual(try memory.readBytes(count: 4 * 2048, at: ring.layout.receiveSlots), before)
        XCTAssertGreaterThan(ring.statistics.invalidIndices, 0)
    }

    func testTruncatedDatagramsAreFlagged() throws {
        let (memory, ring) = try makeRing()
        XCTAssertEqual(deliver(ring, [UInt8](repeating: 1, count: 3000), truncated: true),
                       .delivered(length: ring.layout.maximumPayload, truncated: true))
        XCTAssertEqual(try memory.read(UInt32.self, at: GuestAddress(ring.layout.receiveSlot(0).rawValue + 4)), PacketRingLayout.truncatedFlag)
        XCTAssertEqual(ring.statistics.truncated, 1)
    }

    /// Writes transmit descriptor `index` pointing at `record` and publishes `produced`.
    func guestTransmit(_ memory: GuestMemoryMap, _ ring: PacketRing, descriptors: [UInt64], from start: UInt32 = 0) throws {
        for (offset, address) in descriptors.enumerated() {
            try memory.write(address, at: ring.layout.transmitDescriptor(start + UInt32(offset)))
        }
        try memory.write(start + UInt32(descriptors.count), at: ring.layout.transmitProduced)
    }

    func testTransmitsTakeEachValidRecordOnceAndPublishConsumed() throws {
        let (memory, ring) = try makeRing()
        _ = deliver(ring, [10, 11, 12])
        _ = deliver(ring, [20])
        ring.publish()
        // The guest echoes both records in place.
        try guestTransmit(memory, ring, descriptors: [ring.layout.receiveSlot(0).rawValue, ring.layout.receiveSlot(1).rawValue])
        var sent: [(SocketEndpoint, [UInt8])] = []
        XCTAssertEqual(ring.takeTransmits { transmit in
            sent.append((transmit.destination, (try? memory.readBytes(count: transmit.length, at: transmit.payload)) ?? []))
            return .sent
        }, 2)
        XCTAssertEqual(sent.map(\.0), [source, source])
        XCTAssertEqual(sent.map(\.1), [[10, 11, 12], [20]])
        XCTAssertEqual(try memory.read(UInt32.self, at: ring.layout.transmitConsumed), 2)
        XCTAssertEqual(ring.takeTransmits { _ in XCTFail("nothing new"); return .sent }, 0)
        XCTAssertEqual(ring.statistics.transmitted, 2)
    }

    /// A burst of transmits being sent (here: a send that does not return until released)
    /// does not hold up the receiver: `deliver` and `publish` go on meanwhile.
    func testSendingTransmitsDoesNotBlockDelivery() throws {
        let (memory, ring) = try makeRing()
        _ = deliver(ring, [1])
        ring.publish()
        try guestTransmit(memory, ring, descriptors: [ring.layout.receiveSlot(0).rawValue])
        let sending = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let sender = try HostThread(name: "test-tx") {
            ring.takeTransmits { _ in
                sending.signal()
                release.wait()
                return .sent
            }
        }
        sending.wait()
        let delivered = LockedValue<PacketRing.Delivery?>(nil)
        let source = self.source
        let receiver = try HostThread(name: "test-rx") {
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            defer { scratch.deallocate() }
            let delivery = ring.deliver(scratch: scratch) { buffer in
                buffer[0] = 2
                return (1, false, source)
            }
            delivered.withLock { $0 = delivery }
            ring.publish()
        }
        // Hang detector (not a timing assertion): the receiver finishes while the send is held.
        let finished = receiver.waitForFinish(timeoutNanoseconds: 30_000_000_000)
        release.signal()
        sender.join()
        receiver.join()
        XCTAssertTrue(finished, "delivery waited for the transmit burst")
        XCTAssertEqual(delivered.withLock { $0 }, .delivered(length: 1, truncated: false))
        XCTAssertEqual(ring.statistics.transmitted, 1)
    }

    func testHostileDescriptorsSendNothing() throws {
        let (memory, ring) = try makeRing(entries: 8)
        let good = ring.layout.receiveSlot(0)
        _ = deliver(ring, [1, 2, 3])
        ring.publish()
        // A record with a length past the slot, one with a bad family, one with reserved flags.
        let long = ring.layout.receiveSlot(1), family = ring.layout.receiveSlot(2), flags = ring.layout.receiveSlot(3)
        try memory.write(bytes: try memory.readBytes(count: 64, at: good), at: long)
        try memory.write(UInt32(5000), at: long)
        try memory.write(bytes: try memory.readBytes(count: 64, at: good), at: family)
        try memory.write(UInt16(9), at: GuestAddress(family.rawValue + 8))
        try memory.write(bytes: try memory.readBytes(count: 64, at: good), at: flags)
        try memory.write(UInt32(0x80), at: GuestAddress(flags.rawValue + 4))
        let descriptors: [UInt64] = [
            0x3_FFF0, // the header runs past guest memory
            UInt64.max - 8, // wraps around
            long.rawValue, family.rawValue, flags.rawValue,
            good.rawValue, // the one valid record
        ]
        try guestTransmit(memory, ring, descriptors: descriptors)
        var sent = 0
        XCTAssertEqual(ring.takeTransmits { _ in sent += 1; return .sent }, descriptors.count)
        XCTAssertEqual(sent, 1)
        XCTAssertEqual(ring.statistics.invalidDescriptors, 5)
    }

    func testAnImpossibleProducedIndexIsSkippedWithBoundedWork() throws {
        let (memory, ring) = try makeRing(entries: 4)
        try memory.write(UInt32(1_000_000), at: ring.layout.transmitProduced)
        XCTAssertEqual(ring.takeTransmits { _ in XCTFail("nothing is sent"); return .sent }, 0)
        XCTAssertEqual(ring.statistics.invalidIndices, 1)
        XCTAssertEqual(try memory.read(UInt32.self, at: ring.layout.transmitConsumed), 1_000_000, "the host resynchronizes")
    }

    func testDeniedAndFailedSendsAreCounted() throws {
        let (memory, ring) = try makeRing()
        _ = deliver(ring, [1])
        _ = deliver(ring, [2])
        ring.publish()
        try guestTransmit(memory, ring, descriptors: [ring.layout.receiveSlot(0).rawValue, ring.layout.receiveSlot(1).rawValue])
        var outcomes: [PacketRing.TransmitOutcome] = [.denied, .failed]
        ring.takeTransmits { _ in outcomes.removeFirst() }
        XCTAssertEqual(ring.statistics.transmitDenied, 1)
        XCTAssertEqual(ring.statistics.transmitFailed, 1)
        XCTAssertEqual(ring.statistics.transmitted, 0)
    }
}

/// A guest that writes random values into everything it owns (indices, descriptors, the records
/// descriptors point at) between host operations, replayed from a fixed seed: the host must
/// never write outside the receive slots and its two indices, and every transmit it hands out
/// must lie in guest memory with a payload no longer than a slot's.
final class PacketRingHostileGuestTests: XCTestCase {
    struct Generator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ bound: UInt64) -> UInt64 { next() % bound }
    }

    func testRandomGuestWritesNeverMakeTheHostWriteOutsideItsPartsOrSendOutOfRange() throws {
        let size: UInt64 = 0x14000
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: size)
        let layout = PacketRingLayout(base: GuestAddress(0x10000), entries: 8, slotSize: 256)
        let ring = try PacketRing(memory: memory, layout: layout)
        try ring.reset()
        var shadow = try memory.readBytes(count: Int(size), at: GuestAddress(0))
        // What the host may write: the receive slots and its two indices.
        let slots = Int(layout.receiveSlots.rawValue)..<Int(layout.receiveSlots.rawValue) + 8 * 256
        let hostIndices = [Int(layout.receiveProduced.rawValue), Int(layout.transmitConsumed.rawValue)].map { $0..<$0 + 4 }
        func hostMayWrite(_ offset: Int) -> Bool { slots.contains(offset) || hostIndices.contains { $0.contains(offset) } }
        func guestWrite(_ bytes: [UInt8], at offset: Int) throws {
            try memory.write(bytes: bytes, at: GuestAddress(UInt64(offset)))
            shadow.replaceSubrange(offset..<offset + bytes.count, with: bytes)
        }
        var random = Generator(state: 0x5EED)
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { scratch.deallocate() }
        var transmits = 0
        for _ in 0..<5_000 {
            switch random.below(6) {
            case 0: // an index of the guest's: a step forward mostly, any value sometimes
                let target = random.below(2) == 0 ? layout.receiveConsumed : layout.transmitProduced
                let current = try memory.read(UInt32.self, at: target)
                let value = random.below(8) == 0 ? UInt32(truncatingIfNeeded: random.next()) : current &+ UInt32(random.below(4))
                try guestWrite(withUnsafeBytes(of: value.littleEndian, Array.init), at: Int(target.rawValue))
            case 1: // a descriptor: a slot, anywhere, or past the end
                let choices: [UInt64] = [layout.receiveSlot(UInt32(random.below(8))).rawValue, random.below(size), size - 8, UInt64.max - random.below(64)]
                let value = choices[Int(random.below(4))]
                try guestWrite(withUnsafeBytes(of: value.littleEndian, Array.init), at: Int(layout.transmitDescriptor(UInt32(random.below(8))).rawValue))
            case 2: // scribble on a record header (the guest owns the slots it has not given back)
                let slot = Int(layout.receiveSlot(UInt32(random.below(8))).rawValue) + Int(random.below(32))
                try guestWrite([UInt8(truncatingIfNeeded: random.next())], at: slot)
            case 3:
                let length = Int(random.below(400))
                _ = ring.deliver(scratch: scratch) { buffer in
                    (min(length, buffer.count), length > buffer.count, SocketEndpoint(IPAddress("198.18.20.1")!, port: 9))
                }
            case 4:
                ring.publish()
            default:
                ring.takeTransmits { transmit in
                    transmits += 1
                    XCTAssertLessThanOrEqual(transmit.length, layout.maximumPayload)
                    XCTAssertLessThanOrEqual(transmit.payload.rawValue + UInt64(transmit.length), size)
                    XCTAssertNotNil(transmit.destination.address)
                    return .sent
                }
            }
            // Re-read what the host may have written into the shadow; everything else must match.
            let now = try memory.readBytes(count: Int(size), at: GuestAddress(0))
            for range in [slots] + hostIndices { shadow.replaceSubrange(range, with: now[range]) }
            if now != shadow {
                let offset = zip(now, shadow).enumerated().first { $0.element.0 != $0.element.1 }!.offset
                XCTFail("the host wrote at \(offset), outside its parts (host may: \(hostMayWrite(offset)))")
                return
            }
        }
        XCTAssertGreaterThan(transmits, 0, "some descriptors were valid")
        XCTAssertGreaterThan(ring.statistics.invalidDescriptors + ring.statistics.invalidIndices, 0, "and many were not")
    }
}
