import VMRPC

// The arguments and results of the `net.*` procedures (Docs/Sockets.md). Arguments decode from
// one copy of the slot and are checked while decoding: reserved fields zero, flags known,
// lengths within the documented maximums and consistent with the argument length. A violation
// answers the VMRPC status `badArguments`.

/// Arguments of `net.open`: family and type (wire values), 8 bytes.
public struct SocketOpenArguments: VMRPCMessage, Equatable {
    /// 4 or 6 (others are answered `invalidArgument`).
    public var family: UInt16
    /// 1 stream, 2 datagram (others are answered `invalidArgument`).
    public var type: UInt16

    /// Open a socket of `family` and `type`.
    public init(family: SocketFamily, type: SocketType) { self.family = family.rawValue; self.type = type.rawValue }
    /// Raw wire values.
    public init(family: UInt16, type: UInt16) { self.family = family; self.type = type }

    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        family = try reader.read(); type = try reader.read()
        guard try reader.read(UInt32.self) == 0 else { throw .badArguments }
    }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(family); writer.append(type); writer.append(UInt32(0)) }
}

/// Arguments that are only a handle (`net.close`, `net.getsockname`, `net.getpeername`), 8 bytes.
public struct SocketHandleArguments: VMRPCMessage, Equatable {
    public var handle: UInt64
    /// A handle.
    public init(handle: UInt64) { self.handle = handle }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) { handle = try reader.read() }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(handle) }
}

/// Arguments of `net.bind`: handle and local endpoint, 32 bytes.
public struct SocketBindArguments: VMRPCMessage, Equatable {
    public var handle: UInt64
    public var endpoint: SocketEndpoint
    /// Bind `handle` to `endpoint`.
    public init(handle: UInt64, endpoint: SocketEndpoint) { self.handle = handle; self.endpoint = endpoint }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        handle = try reader.read(); endpoint = try SocketEndpoint(decoding: &reader)
    }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(handle); endpoint.encode(into: &writer) }
}

/// Arguments of `net.connect`: handle, timeout (0: do not wait) and remote endpoint, 40 bytes.
public struct SocketConnectArguments: VMRPCMessage, Equatable {
    public var handle: UInt64
    public var timeoutNanoseconds: UInt64
    public var endpoint: SocketEndpoint
    /// Connect `handle` to `endpoint`.
    public init(handle: UInt64, timeoutNanoseconds: UInt64, endpoint: SocketEndpoint) {
        self.handle = handle; self.timeoutNanoseconds = timeoutNanoseconds; self.endpoint = endpoint
    }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        handle = try reader.read(); timeoutNanoseconds = try reader.read(); endpoint = try SocketEndpoint(decoding: &reader)
    }
    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(handle); writer.append(timeoutNanoseconds); endpoint.encode(into: &writer)
    }
}

/// Arguments of `net.listen`, `net.shutdown`, `net.setOption` and `net.getOption`: a handle and
/// two u32 (backlog and 0; how and 0; option and value; option and 0), 16 bytes.
public struct SocketControlArguments: VMRPCMessage, Equatable {
    public var handle: UInt64
    public var first: UInt32
    public var second: UInt32
    /// The handle and two values.
    public init(handle: UInt64, _ first: UInt32, _ second: UInt32 = 0) { self.handle = handle; self.first = first; self.second = second }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        handle = try reader.read(); first = try reader.read(); second = try reader.read()
    }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(handle); writer.append(first); writer.append(second) }
}

/// Arguments of `net.accept`: handle and timeout (0: do not wait), 16 bytes.
public struct SocketAcceptArguments: VMRPCMessage, Equatable {
    public var handle: UInt64
    public var timeoutNanoseconds: UInt64
    /// Accept on `handle`.
    public init(handle: UInt64, timeoutNanoseconds: UInt64) { self.handle = handle; self.timeoutNanoseconds = timeoutNanoseconds }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) { handle = try reader.read(); timeoutNanoseconds = try reader.read() }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(handle); writer.append(timeoutNanoseconds) }
}

/// Arguments of `net.send` (no destination) and `net.sendTo` (a destination): handle, timeout,
/// flags, length, buffer address, [destination,] then the payload when it travels in the slot.
/// 32 bytes (`send`) or 56 bytes (`sendTo`) plus an inline payload.
public struct SocketSendArguments: Equatable, Sendable {
    public var handle: UInt64
    public var timeoutNanoseconds: UInt64
    public var flags: SocketCallFlags
    /// Bytes to send.
    public var length: UInt32
    /// Guest-physical address of the payload when `flags` has `guestBuffer`; else 0.
    public var bufferAddress: UInt64
    /// `net.sendTo`'s destination; nil for `net.send`.
    public var destination: SocketEndpoint?
    /// The inline payload (`length` bytes), empty with `guestBuffer`.
    public var payload: [UInt8]

    /// Inline payload.
    public init(handle: UInt64, timeoutNanoseconds: UInt64 = 0, destination: SocketEndpoint? = nil, payload: [UInt8]) {
        self.handle = handle; self.timeoutNanoseconds = timeoutNanoseconds; flags = []
        length = UInt32(payload.count); bufferAddress = 0; self.destination = destination; self.payload = payload
    }

    /// Payload in a guest buffer.
    public init(handle: UInt64, timeoutNanoseconds: UInt64 = 0, destination: SocketEndpoint? = nil,
                bufferAddress: UInt64, length: UInt32) {
        self.handle = handle; self.timeoutNanoseconds = timeoutNanoseconds; flags = .guestBuffer
        self.length = length; self.bufferAddress = bufferAddress; self.destination = destination; payload = []
    }

    /// Decodes `bytes` (with a destination for `net.sendTo`).
    public static func decode(_ bytes: [UInt8], withDestination: Bool) throws(VMRPCStatus) -> SocketSendArguments {
        var failure: VMRPCStatus = .badArguments
        let decoded: SocketSendArguments? = bytes.withUnsafeBytes { buffer in
            var reader = VMRPCByteReader(buffer)
            do throws(VMRPCStatus) {
                let handle: UInt64 = try reader.read()
                let timeout: UInt64 = try reader.read()
                let flags = SocketCallFlags(rawValue: try reader.read())
                let length: UInt32 = try reader.read()
                let address: UInt64 = try reader.read()
                let destination = withDestination ? try SocketEndpoint(decoding: &reader) : nil
                guard SocketCallFlags.known.isSuperset(of: flags) else { throw .badArguments }
                var arguments: SocketSendArguments
                if flags.contains(.guestBuffer) {
                    guard reader.remaining == 0, length <= UInt32(SocketWire.maximumBufferPayload) else { throw .badArguments }
                    arguments = SocketSendArguments(handle: handle, timeoutNanoseconds: timeout, destination: destination,
                                                    bufferAddress: address, length: length)
                } else {
                    guard address == 0, length <= UInt32(SocketWire.maximumInlinePayload),
                          reader.remaining == Int(length) else { throw .badArguments }
                    arguments = SocketSendArguments(handle: handle, timeoutNanoseconds: timeout, destination: destination,
                                                    payload: try reader.readBytes(count: Int(length)))
                }
                return arguments
            } catch {
                failure = error
                return nil
            }
        }
        guard let decoded else { throw failure }
        return decoded
    }

    /// The bytes on the wire.
    public var encoded: [UInt8] {
        var writer = VMRPCByteWriter()
        writer.append(handle); writer.append(timeoutNanoseconds); writer.append(flags.rawValue)
        writer.append(length); writer.append(bufferAddress)
        destination?.encode(into: &writer)
        writer.append(bytes: payload)
        return writer.bytes
    }
}

/// Arguments of `net.receive` and `net.receiveFrom`: handle, timeout (0: do not wait), flags,
/// capacity and buffer address (0 unless `guestBuffer`), 32 bytes.
public struct SocketReceiveArguments: VMRPCMessage, Equatable {
    public var handle: UInt64
    public var timeoutNanoseconds: UInt64
    public var flags: SocketCallFlags
    /// Most bytes to receive: at most `maximumInlinePayload` in the slot, `maximumBufferPayload` in a buffer.
    public var capacity: UInt32
    public var bufferAddress: UInt64

    /// A receive into the slot (`bufferAddress` nil) or into a guest buffer.
    public init(handle: UInt64, timeoutNanoseconds: UInt64, capacity: UInt32, bufferAddress: UInt64? = nil) {
        self.handle = handle; self.timeoutNanoseconds = timeoutNanoseconds; self.capacity = capacity
        self.bufferAddress = bufferAddress ?? 0; flags = bufferAddress == nil ? [] : .guestBuffer
    }

    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        handle = try reader.read(); timeoutNanoseconds = try reader.read()
        flags = SocketCallFlags(rawValue: try reader.read()); capacity = try reader.read(); bufferAddress = try reader.read()
        guard SocketCallFlags.known.isSuperset(of: flags) else { throw .badArguments }
        if flags.contains(.guestBuffer) {
            guard capacity <= UInt32(SocketWire.maximumBufferPayload) else { throw .badArguments }
        } else {
            guard bufferAddress == 0, capacity <= UInt32(SocketWire.maximumInlinePayload) else { throw .badArguments }
        }
    }

    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(handle); writer.append(timeoutNanoseconds); writer.append(flags.rawValue)
        writer.append(capacity); writer.append(bufferAddress)
    }
}

/// One entry of `net.wait`: a handle and the events wanted, 16 bytes.
public struct SocketWaitEntry: Equatable, Sendable {
    public var handle: UInt64
    public var events: SocketEvents
    /// An entry.
    public init(handle: UInt64, events: SocketEvents) { self.handle = handle; self.events = events }
}

/// Arguments of `net.wait`: timeout (0: look once), count, 0, then `count` entries; 16 + 16·count bytes.
public struct SocketWaitArguments: VMRPCMessage, Equatable {
    public var timeoutNanoseconds: UInt64
    public var entries: [SocketWaitEntry]
    /// A wait.
    public init(timeoutNanoseconds: UInt64, entries: [SocketWaitEntry]) {
        self.timeoutNanoseconds = timeoutNanoseconds; self.entries = entries
    }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        timeoutNanoseconds = try reader.read()
        let count: UInt32 = try reader.read()
        guard try reader.read(UInt32.self) == 0, (1...UInt32(SocketWire.maximumWaitEntries)).contains(count) else {
            throw .badArguments
        }
        entries = []
        for _ in 0..<count {
            let handle: UInt64 = try reader.read()
            let events = SocketEvents(rawValue: try reader.read())
            guard try reader.read(UInt32.self) == 0, SocketEvents.requestable.isSuperset(of: events) else { throw .badArguments }
            entries.append(SocketWaitEntry(handle: handle, events: events))
        }
    }
    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(timeoutNanoseconds); writer.append(UInt32(entries.count)); writer.append(UInt32(0))
        for entry in entries { writer.append(entry.handle); writer.append(entry.events.rawValue); writer.append(UInt32(0)) }
    }
}

/// Arguments of `net.receiveBatch` and `net.sendBatch`: handle, timeout, flags (0), count,
/// buffer address, buffer length and record stride, 40 bytes. The guest buffer holds `count`
/// records, record `i` at `buffer + i·stride`: length u32, flags u32 (bit 0: truncated, set by
/// the host on receive), address (24 bytes), then the payload (up to `stride − 32` bytes).
public struct SocketBatchArguments: VMRPCMessage, Equatable {
    public var handle: UInt64
    public var timeoutNanoseconds: UInt64
    /// Records to receive at most, or to send.
    public var count: UInt32
    public var bufferAddress: UInt64
    public var bufferLength: UInt32
    public var stride: UInt32

    /// A batch.
    public init(handle: UInt64, timeoutNanoseconds: UInt64, count: UInt32, bufferAddress: UInt64,
                bufferLength: UInt32, stride: UInt32) {
        self.handle = handle; self.timeoutNanoseconds = timeoutNanoseconds; self.count = count
        self.bufferAddress = bufferAddress; self.bufferLength = bufferLength; self.stride = stride
    }

    /// `badArguments` unless flags are 0, 1 ≤ count ≤ 64, stride is a multiple of 8 in
    /// 40 ... 65544, and count·stride ≤ buffer length.
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        handle = try reader.read(); timeoutNanoseconds = try reader.read()
        let flags: UInt32 = try reader.read()
        count = try reader.read(); bufferAddress = try reader.read(); bufferLength = try reader.read(); stride = try reader.read()
        guard flags == 0, (1...UInt32(SocketWire.maximumBatchCount)).contains(count),
              stride % 8 == 0, (UInt32(SocketWire.batchRecordHeaderSize + 8)...UInt32(SocketWire.maximumBatchStride)).contains(stride),
              UInt64(count) * UInt64(stride) <= UInt64(bufferLength) else { throw .badArguments }
    }

    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(handle); writer.append(timeoutNanoseconds); writer.append(UInt32(0)); writer.append(count)
        writer.append(bufferAddress); writer.append(bufferLength); writer.append(stride)
    }

    /// The bytes of guest memory the batch covers: count·stride.
    public var coveredLength: Int { Int(count) * Int(stride) }
}

// MARK: Results

/// Results of most calls: the socket status and one value (bytes sent, datagrams, an option's
/// value, or 0), 8 bytes.
public struct SocketResult: VMRPCMessage, Equatable {
    public var status: UInt32
    public var value: UInt32
    /// A result.
    public init(_ status: SocketStatus, value: UInt32 = 0) { self.status = status.rawValue; self.value = value }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) { status = try reader.read(); value = try reader.read() }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(status); writer.append(value) }
}

/// Results of `net.open` (16 bytes) and `net.accept` (40 bytes: the peer too): status, 0, handle (0
/// on failure)[, peer endpoint].
public struct SocketOpenResult: VMRPCMessage, Equatable {
    public var status: UInt32
    public var handle: UInt64
    /// The peer, for `net.accept` only.
    public var peer: SocketEndpoint?
    /// A result.
    public init(_ status: SocketStatus, handle: UInt64 = 0, peer: SocketEndpoint? = nil) {
        self.status = status.rawValue; self.handle = handle; self.peer = peer
    }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        status = try reader.read()
        _ = try reader.read(UInt32.self)
        handle = try reader.read()
        peer = reader.remaining > 0 ? try SocketEndpoint(decoding: &reader) : nil
    }
    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(status); writer.append(UInt32(0)); writer.append(handle)
        peer?.encode(into: &writer)
    }
}

/// Results of `net.getsockname` and `net.getpeername`: status, 0, endpoint; 32 bytes.
public struct SocketNameResult: VMRPCMessage, Equatable {
    public var status: UInt32
    public var endpoint: SocketEndpoint
    /// A result.
    public init(_ status: SocketStatus, endpoint: SocketEndpoint = .none) { self.status = status.rawValue; self.endpoint = endpoint }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        status = try reader.read(); _ = try reader.read(UInt32.self); endpoint = try SocketEndpoint(decoding: &reader)
    }
    public func encode(into writer: inout VMRPCByteWriter) { writer.append(status); writer.append(UInt32(0)); endpoint.encode(into: &writer) }
}

/// Results of `net.receive` and `net.receiveFrom`: status, length, flags (bit 0: the datagram
/// was truncated to the capacity), 0, source endpoint (none for `net.receive`), then the payload
/// when it travels in the slot; 40 bytes plus the payload. With `guestBuffer` the payload is in
/// guest memory and `length` says how much was written there. Length 0 with `ok` on a stream
/// socket: the peer closed.
public struct SocketReceiveResult: VMRPCMessage, Equatable {
    public var status: UInt32
    public var length: UInt32
    public var truncated: Bool
    public var source: SocketEndpoint
    /// The inline payload.
    public var payload: [UInt8]
    /// A result.
    public init(_ status: SocketStatus, length: UInt32 = 0, truncated: Bool = false, source: SocketEndpoint = .none,
                payload: [UInt8] = []) {
        self.status = status.rawValue; self.length = length; self.truncated = truncated; self.source = source; self.payload = payload
    }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        status = try reader.read(); length = try reader.read()
        truncated = try reader.read(UInt32.self) & 1 != 0
        _ = try reader.read(UInt32.self)
        source = try SocketEndpoint(decoding: &reader)
        payload = try reader.readBytes(count: reader.remaining)
    }
    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(status); writer.append(length); writer.append(UInt32(truncated ? 1 : 0)); writer.append(UInt32(0))
        source.encode(into: &writer); writer.append(bytes: payload)
    }
}

/// Results of `net.wait`: status, how many entries are ready, then one u32 of returned events per
/// entry (`SocketEvents`); 8 + 4·count bytes.
public struct SocketWaitResult: VMRPCMessage, Equatable {
    public var status: UInt32
    public var events: [SocketEvents]
    /// A result.
    public init(_ status: SocketStatus, events: [SocketEvents]) { self.status = status.rawValue; self.events = events }
    /// Entries with any returned event.
    public var readyCount: Int { events.filter { !$0.isEmpty }.count }
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        status = try reader.read()
        _ = try reader.read(UInt32.self)
        events = []
        while reader.remaining > 0 { events.append(SocketEvents(rawValue: try reader.read())) }
    }
    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(status); writer.append(UInt32(readyCount))
        for event in events { writer.append(event.rawValue) }
    }
}
