#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import VMRPC
import VMRPCSockets

/// Why a packet ring could not be set up or used.
public enum PacketRingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The layout is not usable (the reason says which rule it breaks).
    case invalidLayout(String)
    /// A ring word or slot is outside guest memory.
    case memory(GuestMemoryError)

    /// A readable form.
    public var description: String {
        switch self {
        case .invalidLayout(let reason): return "packet ring layout: \(reason)"
        case .memory(let error): return "packet ring: \(error)"
        }
    }
}

/// Where a pair of datagram rings lives in guest memory.
///
/// Indices are free-running `u32` counters; slot `i` is `i mod entries`. The host owns
/// `receiveProduced` and `transmitConsumed`, the guest `receiveConsumed` and `transmitProduced`
/// (each in a cache line of its own). A receive slot holds a record: a 32-byte header (`u32`
/// length, `u32` flags, the 24-byte address of `Docs/Sockets.md`) and the payload. A transmit
/// descriptor is the `u64` guest-physical address of such a record, anywhere in guest memory:
/// the guest may send a received record back in place.
public struct PacketRingLayout: Equatable, Sendable {
    /// The record header's size: length, flags, address.
    public static let recordHeaderSize = 32
    /// The flag a receive record carries when its datagram was longer than the slot.
    public static let truncatedFlag: UInt32 = 1

    /// Host-written: receive records published (u32).
    public var receiveProduced: GuestAddress
    /// Guest-written: receive records the guest is done with (u32).
    public var receiveConsumed: GuestAddress
    /// Guest-written: transmit descriptors published (u32).
    public var transmitProduced: GuestAddress
    /// Host-written: transmit descriptors taken (u32).
    public var transmitConsumed: GuestAddress
    /// `entries` u64 record addresses.
    public var transmitDescriptors: GuestAddress
    /// `entries` slots of `slotSize` bytes.
    public var receiveSlots: GuestAddress
    /// Slots per ring: a power of two, 1 ... 4096.
    public var entries: UInt32
    /// Bytes per receive slot (header and payload): 64 ... 65,568.
    public var slotSize: Int

    /// A layout with every part given.
    public init(receiveProduced: GuestAddress, receiveConsumed: GuestAddress, transmitProduced: GuestAddress,
                transmitConsumed: GuestAddress, transmitDescriptors: GuestAddress, receiveSlots: GuestAddress,
                entries: UInt32, slotSize: Int) {
        self.receiveProduced = receiveProduced; self.receiveConsumed = receiveConsumed
        self.transmitProduced = transmitProduced; self.transmitConsumed = transmitConsumed
        self.transmitDescriptors = transmitDescriptors; self.receiveSlots = receiveSlots
        self.entries = entries; self.slotSize = slotSize
    }

    /// The compact layout from `base`: the four indices at +0x00, +0x40, +0x80, +0xC0, the
    /// transmit descriptors at +0x1000, the receive slots at +0x2000 (the bundled guest's, `Guest/layout.h`).
    public init(base: GuestAddress, entries: UInt32 = 64, slotSize: Int = 2048) {
        self.init(receiveProduced: base, receiveConsumed: base.advanced(by: 0x40), transmitProduced: base.advanced(by: 0x80),
                  transmitConsumed: base.advanced(by: 0xC0), transmitDescriptors: base.advanced(by: 0x1000),
                  receiveSlots: base.advanced(by: 0x2000), entries: entries, slotSize: slotSize)
    }

    /// The largest payload a receive slot holds.
    public var maximumPayload: Int { slotSize - Self.recordHeaderSize }

    /// The guest address of receive slot `index mod entries`.
    public func receiveSlot(_ index: UInt32) -> GuestAddress {
        receiveSlots.advanced(by: UInt64(index & (entries - 1)) * UInt64(slotSize))
    }

    /// The guest address of transmit descriptor `index mod entries`.
    public func transmitDescriptor(_ index: UInt32) -> GuestAddress {
        transmitDescriptors.advanced(by: UInt64(index & (entries - 1)) * 8)
    }

    /// Throws `invalidLayout` unless the entry count is a power of two in 1 ... 4096, the slot
    /// size is 64 ... 65,568 and 8-byte aligned, and the indices are 4-byte aligned.
    public func validate() throws(PacketRingError) {
        guard entries >= 1, entries <= 4096, entries & (entries - 1) == 0 else {
            throw .invalidLayout("entries must be a power of two in 1...4096, not \(entries)")
        }
        guard (64...65_568).contains(slotSize), slotSize % 8 == 0 else {
            throw .invalidLayout("slot size must be 64...65568 and a multiple of 8, not \(slotSize)")
        }
        for (name, address) in [("receiveProduced", receiveProduced), ("receiveConsumed", receiveConsumed),
                                ("transmitProduced", transmitProduced), ("transmitConsumed", transmitConsumed)]
        where address.rawValue % 4 != 0 {
            throw .invalidLayout("\(name) at \(address) is not 4-byte aligned")
        }
        guard transmitDescriptors.rawValue % 8 == 0 else { throw .invalidLayout("transmit descriptors are not 8-byte aligned") }
    }
}

/// Counters of one packet ring pair.
public struct PacketRingStatistics: Equatable, Sendable {
    /// Datagrams written into the receive ring.
    public var delivered: UInt64 = 0
    /// Datagrams dropped because the receive ring was full (the guest is behind).
    public var droppedRingFull: UInt64 = 0
    /// Datagrams longer than a slot (delivered cut, flagged).
    public var truncated: UInt64 = 0
    /// Interrupts raised by the receiver.
    public var interrupts: UInt64 = 0
    /// Transmit descriptors sent.
    public var transmitted: UInt64 = 0
    /// Transmit descriptors whose destination the policy refused (nothing sent).
    public var transmitDenied: UInt64 = 0
    /// Transmit descriptors whose send failed on the host.
    public var transmitFailed: UInt64 = 0
    /// Transmit descriptors that named memory outside the guest, a length past the slot size or
    /// a malformed address (nothing sent).
    public var invalidDescriptors: UInt64 = 0
    /// Guest-written indices that were impossible (more outstanding than the ring holds).
    public var invalidIndices: UInt64 = 0
    /// Zeroed counters.
    public init() {}
}

/// One datagram the guest asked to send, validated: the destination and where the payload is.
public struct PacketRingTransmit: Sendable {
    /// The destination from the record's header.
    public var destination: SocketEndpoint
    /// The guest-physical address of the payload.
    public var payload: GuestAddress
    /// Payload bytes (at most the layout's `maximumPayload`).
    public var length: Int
}

/// The host side of a pair of datagram rings in guest memory: the receive ring the VMM fills
/// (`deliver`), the transmit ring the guest fills (`takeTransmits`).
///
/// Guest input is untrusted, as `Docs/VMRPC.md`'s rules ask: the host keeps its own cursors;
/// a guest-written index is loaded once (acquire) and checked with wrap-safe arithmetic
/// against the ring size; a descriptor and the record header it names are copied once, then
/// validated (address inside guest memory, length at most a slot's payload, a well-formed
/// address); work per doorbell is bounded by the ring size. Nothing the guest writes can make
/// the host write outside the receive slots or the two host-owned indices.
public final class PacketRing: Sendable {
    /// Guest memory.
    public let memory: any GuestMemory
    /// Where the rings are.
    public let layout: PacketRingLayout
    /// The host's cursor of each ring, each under its own lock: sending a burst of transmits
    /// (up to `entries` datagrams under `transmitConsumed`) never holds up a receiver.
    private let receiveProduced = LockedValue<UInt32>(0)
    private let transmitConsumed = LockedValue<UInt32>(0)
    private let counters = LockedValue(PacketRingStatistics())

    /// A ring pair over `memory`.
    /// - Throws: `PacketRingError.invalidLayout`, or `.memory` when a part is outside guest memory.
    public init(memory: any GuestMemory, layout: PacketRingLayout) throws(PacketRingError) {
        try layout.validate()
        self.memory = memory
        self.layout = layout
        let slotsLength = UInt64(layout.entries) * UInt64(layout.slotSize)
        for (address, length) in [(layout.receiveProduced, UInt64(4)), (layout.receiveConsumed, 4), (layout.transmitProduced, 4),
                                  (layout.transmitConsumed, 4), (layout.transmitDescriptors, UInt64(layout.entries) * 8),
                                  (layout.receiveSlots, slotsLength)] {
            do { try memory.withHostPointer(at: address, length: length) { _ in } } catch {
                throw .memory(.outOfBounds(address: address, length: length))
            }
        }
    }

    /// Zeroes the four indices and the host's cursors (a guest entering afresh). Call only
    /// while neither the guest nor a receiver uses the rings.
    public func reset() throws(PacketRingError) {
        do {
            for address in [layout.receiveProduced, layout.receiveConsumed, layout.transmitProduced, layout.transmitConsumed] {
                try memory.atomicStore(UInt32(0), at: address, ordering: .sequentiallyConsistent)
            }
        } catch { throw .memory(error) }
        receiveProduced.withLock { $0 = 0 }
        transmitConsumed.withLock { $0 = 0 }
    }

    /// The counters so far.
    public var statistics: PacketRingStatistics { counters.withLock { $0 } }

    /// Free receive slots now (0 when the guest's consumed index is impossible).
    public func freeReceiveSlots() -> Int {
        let produced = receiveProduced.withLock { $0 }
        guard let consumed = try? memory.atomicLoad(UInt32.self, at: layout.receiveConsumed, ordering: .acquiring) else { return 0 }
        let outstanding = produced &- consumed
        guard outstanding <= layout.entries else {
            counters.withLock { $0.invalidIndices += 1 }
            return 0
        }
        return Int(layout.entries - outstanding)
    }

    /// What `deliver` did.
    public enum Delivery: Equatable, Sendable {
        /// The datagram is in the ring (not yet published: call `publish()`).
        case delivered(length: Int, truncated: Bool)
        /// The ring was full; `receive` was called with a scratch buffer and the datagram dropped.
        case droppedRingFull
        /// `receive` found nothing (or failed): nothing written.
        case nothing
    }

    /// Writes the next datagram into the next free receive slot: `receive` is called with the
    /// slot's payload area and returns the datagram's length, truncation and source (nil:
    /// nothing to receive). When the ring is full, `receive` gets `scratch` instead and the
    /// datagram is dropped and counted. The slot becomes the guest's only at `publish()`, so a
    /// receiver may write several and publish them together (one interrupt for a burst).
    public func deliver(scratch: UnsafeMutableRawBufferPointer,
                        _ receive: (UnsafeMutableRawBufferPointer) -> (length: Int, truncated: Bool, source: SocketEndpoint)?) -> Delivery {
        let pending = receiveProduced.withLock { $0 }
        let published = (try? memory.atomicLoad(UInt32.self, at: layout.receiveProduced, ordering: .relaxed)) ?? pending
        let consumed = (try? memory.atomicLoad(UInt32.self, at: layout.receiveConsumed, ordering: .acquiring)) ?? pending
        // Slots written but not published count as taken too.
        let outstanding = pending &- consumed
        guard outstanding <= layout.entries, published &- consumed <= layout.entries else {
            counters.withLock { $0.invalidIndices += 1 }
            return receive(scratch) == nil ? .nothing : dropped()
        }
        guard outstanding < layout.entries else { return receive(scratch) == nil ? .nothing : dropped() }
        let slot = layout.receiveSlot(pending)
        let headerSize = PacketRingLayout.recordHeaderSize
        let capacity = layout.maximumPayload
        let result: (length: Int, truncated: Bool, source: SocketEndpoint)?
        do {
            result = try memory.withHostPointer(at: slot, length: UInt64(layout.slotSize)) { pointer in
                // Sound: the slot's `slotSize` bytes were checked to be in guest memory; the payload
                // area is the `capacity` bytes after the header, inside them.
                guard let received = receive(UnsafeMutableRawBufferPointer(start: pointer + headerSize, count: capacity)) else { return nil }
                let length = min(received.length, capacity)
                var header = VMRPCByteWriter()
                header.append(UInt32(length))
                header.append(received.truncated ? PacketRingLayout.truncatedFlag : 0)
                received.source.encode(into: &header)
                // Sound: the header is 32 bytes, the slot at least 64.
                header.bytes.withUnsafeBytes { pointer.copyMemory(from: $0.baseAddress!, byteCount: headerSize) }
                return (length, received.truncated, received.source)
            }
        } catch {
            return .nothing
        }
        guard let result else { return .nothing }
        receiveProduced.withLock { $0 = pending &+ 1 }
        counters.withLock {
            $0.delivered += 1
            if result.truncated { $0.truncated += 1 }
        }
        return .delivered(length: result.length, truncated: result.truncated)
    }

    private func dropped() -> Delivery {
        counters.withLock { $0.droppedRingFull += 1 }
        return .droppedRingFull
    }

    /// Publishes the slots `deliver` wrote (a release store of the produced index). Returns
    /// whether there was anything new, that is whether the guest needs an interrupt.
    @discardableResult
    public func publish() -> Bool {
        let pending = receiveProduced.withLock { $0 }
        let published = (try? memory.atomicLoad(UInt32.self, at: layout.receiveProduced, ordering: .relaxed)) ?? pending
        guard published != pending else { return false }
        try? memory.atomicStore(pending, at: layout.receiveProduced, ordering: .releasing)
        return true
    }

    /// Counts an interrupt raised for the receive ring (for the statistics).
    public func countInterrupt() { counters.withLock { $0.interrupts += 1 } }

    /// Takes the transmit descriptors the guest published since the last call (at most `entries`):
    /// each valid one is handed to `send`, which returns whether it was sent (false: refused or
    /// failed; counted by the caller's choice of `outcome`). Then the consumed index is published.
    /// Returns how many descriptors were taken. Call from one thread at a time (the vCPU's, in a doorbell).
    @discardableResult
    public func takeTransmits(_ send: (PacketRingTransmit) -> TransmitOutcome) -> Int {
        transmitConsumed.withLock { transmitConsumed -> Int in
            let consumed = transmitConsumed
            guard let produced = try? memory.atomicLoad(UInt32.self, at: layout.transmitProduced, ordering: .acquiring) else { return 0 }
            let available = produced &- consumed
            guard available <= layout.entries else {
                // Impossible: the guest claims more than the ring holds. Take nothing, skip to its index.
                counters.withLock { $0.invalidIndices += 1 }
                transmitConsumed = produced
                try? memory.atomicStore(produced, at: layout.transmitConsumed, ordering: .releasing)
                return 0
            }
            var statistics = PacketRingStatistics()
            for offset in 0..<available {
                guard let transmit = validatedDescriptor(consumed &+ offset) else {
                    statistics.invalidDescriptors += 1
                    continue
                }
                switch send(transmit) {
                case .sent: statistics.transmitted += 1
                case .denied: statistics.transmitDenied += 1
                case .failed: statistics.transmitFailed += 1
                }
            }
            transmitConsumed = produced
            try? memory.atomicStore(produced, at: layout.transmitConsumed, ordering: .releasing)
            counters.withLock {
                $0.transmitted += statistics.transmitted
                $0.transmitDenied += statistics.transmitDenied
                $0.transmitFailed += statistics.transmitFailed
                $0.invalidDescriptors += statistics.invalidDescriptors
            }
            return Int(available)
        }
    }

    /// What happened to one transmit descriptor.
    public enum TransmitOutcome: Equatable, Sendable {
        /// Sent; refused by the policy; failed on the host.
        case sent, denied, failed
    }

    /// Descriptor `index`: its record address and header, each copied once, then checked.
    private func validatedDescriptor(_ index: UInt32) -> PacketRingTransmit? {
        guard let address = try? memory.read(UInt64.self, at: layout.transmitDescriptor(index)) else { return nil }
        let headerSize = UInt64(PacketRingLayout.recordHeaderSize)
        let (payloadAddress, overflow) = address.addingReportingOverflow(headerSize)
        guard !overflow, let header = try? memory.readBytes(count: Int(headerSize), at: GuestAddress(address)) else { return nil }
        var failure = false
        // Sound: the reader reads only inside the 32-byte copy, bounds-checked per read.
        let decoded: (length: UInt32, flags: UInt32, endpoint: SocketEndpoint)? = header.withUnsafeBytes { bytes in
            var reader = VMRPCByteReader(bytes)
            do throws(VMRPCStatus) {
                return (try reader.read(), try reader.read(), try SocketEndpoint(decoding: &reader))
            } catch {
                failure = true
                return nil
            }
        }
        guard !failure, let decoded, decoded.flags & ~PacketRingLayout.truncatedFlag == 0, decoded.endpoint.address != nil,
              Int(decoded.length) <= layout.maximumPayload else { return nil }
        // The payload must lie in guest memory too.
        guard (try? memory.withHostPointer(at: GuestAddress(payloadAddress), length: UInt64(max(decoded.length, 1))) { _ in }) != nil else {
            return nil
        }
        return PacketRingTransmit(destination: decoded.endpoint, payload: GuestAddress(payloadAddress), length: Int(decoded.length))
    }
}

extension GuestAddress {
    /// The address `offset` bytes further.
    func advanced(by offset: UInt64) -> GuestAddress { GuestAddress(rawValue &+ offset) }
}
