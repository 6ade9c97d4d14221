import RTVirtCore
import VMRPC

/// The guest side of the `net.*` procedures in Swift, over a `VMRPCGuestClient` (a guest's slot
/// in any `GuestMemory`). For tests and tools; bare guests use `rtvirt_sockets.h`.
///
/// Each method returns the VMRPC status (non-`ok` when the procedure did not run, or a blocking
/// call timed out or was cancelled) and, when it ran, the decoded results.
public struct SocketGuestClient {
    /// The VMRPC client.
    public let client: VMRPCGuestClient

    /// A socket client over `client`.
    public init(_ client: VMRPCGuestClient) { self.client = client }

    /// Calls `procedure` and decodes `Result` when the VMRPC status is `ok`.
    public func call<Result: VMRPCMessage>(_ procedure: UInt32, _ arguments: [UInt8], as _: Result.Type = Result.self)
        throws(VMRPCGuestClientError) -> (VMRPCStatus?, Result?) {
        let response = try client.call(procedure, arguments: arguments)
        guard response.status == .ok else { return (response.status, nil) }
        return (.ok, try? Result.decode(response.results))
    }

    /// `net.open`.
    public func open(_ family: SocketFamily, _ type: SocketType) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketOpenResult?) {
        try call(SocketProcedureID.open, SocketOpenArguments(family: family, type: type).encoded)
    }

    /// `net.close`.
    public func close(_ handle: UInt64) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.close, SocketHandleArguments(handle: handle).encoded)
    }

    /// `net.bind`.
    public func bind(_ handle: UInt64, _ endpoint: SocketEndpoint) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.bind, SocketBindArguments(handle: handle, endpoint: endpoint).encoded)
    }

    /// `net.connect`.
    public func connect(_ handle: UInt64, _ endpoint: SocketEndpoint, timeoutNanoseconds: UInt64 = 0)
        throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.connect, SocketConnectArguments(handle: handle, timeoutNanoseconds: timeoutNanoseconds, endpoint: endpoint).encoded)
    }

    /// `net.listen`.
    public func listen(_ handle: UInt64, backlog: UInt32 = 8) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.listen, SocketControlArguments(handle: handle, backlog).encoded)
    }

    /// `net.accept`.
    public func accept(_ handle: UInt64, timeoutNanoseconds: UInt64 = 0) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketOpenResult?) {
        try call(SocketProcedureID.accept, SocketAcceptArguments(handle: handle, timeoutNanoseconds: timeoutNanoseconds).encoded)
    }

    /// `net.send` (no destination) or `net.sendTo`.
    public func send(_ arguments: SocketSendArguments) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(arguments.destination == nil ? SocketProcedureID.send : SocketProcedureID.sendTo, arguments.encoded)
    }

    /// `net.receive` or `net.receiveFrom`.
    public func receive(_ arguments: SocketReceiveArguments, withSource: Bool = true)
        throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketReceiveResult?) {
        try call(withSource ? SocketProcedureID.receiveFrom : SocketProcedureID.receive, arguments.encoded)
    }

    /// `net.shutdown`.
    public func shutdown(_ handle: UInt64, how: UInt32) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.shutdown, SocketControlArguments(handle: handle, how).encoded)
    }

    /// `net.getsockname` (`peer` false) or `net.getpeername`.
    public func name(_ handle: UInt64, peer: Bool = false) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketNameResult?) {
        try call(peer ? SocketProcedureID.getPeerName : SocketProcedureID.getSocketName, SocketHandleArguments(handle: handle).encoded)
    }

    /// `net.setOption`.
    public func setOption(_ handle: UInt64, _ option: SocketOption, _ value: UInt32) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.setOption, SocketControlArguments(handle: handle, option.rawValue, value).encoded)
    }

    /// `net.getOption`.
    public func getOption(_ handle: UInt64, _ option: SocketOption) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.getOption, SocketControlArguments(handle: handle, option.rawValue).encoded)
    }

    /// `net.wait`.
    public func wait(_ entries: [SocketWaitEntry], timeoutNanoseconds: UInt64) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketWaitResult?) {
        try call(SocketProcedureID.wait, SocketWaitArguments(timeoutNanoseconds: timeoutNanoseconds, entries: entries).encoded)
    }

    /// `net.receiveBatch`.
    public func receiveBatch(_ arguments: SocketBatchArguments) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.receiveBatch, arguments.encoded)
    }

    /// `net.sendBatch`.
    public func sendBatch(_ arguments: SocketBatchArguments) throws(VMRPCGuestClientError) -> (VMRPCStatus?, SocketResult?) {
        try call(SocketProcedureID.sendBatch, arguments.encoded)
    }
}

/// A record of a batch buffer: length, flags, address, payload (Docs/Sockets.md).
public struct SocketBatchRecord: Equatable, Sendable {
    /// The address: source on receive, destination on send (none: the connected peer).
    public var endpoint: SocketEndpoint
    /// The payload.
    public var payload: [UInt8]
    /// Set by the host on receive when the datagram did not fit.
    public var truncated: Bool

    /// A record.
    public init(endpoint: SocketEndpoint, payload: [UInt8], truncated: Bool = false) {
        self.endpoint = endpoint; self.payload = payload; self.truncated = truncated
    }

    /// Encodes records at `stride` bytes each (payloads must fit `stride − 32`).
    public static func encode(_ records: [SocketBatchRecord], stride: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        for record in records {
            var writer = VMRPCByteWriter()
            writer.append(UInt32(record.payload.count)); writer.append(UInt32(record.truncated ? 1 : 0))
            record.endpoint.encode(into: &writer)
            writer.append(bytes: record.payload.prefix(stride - SocketWire.batchRecordHeaderSize))
            bytes += writer.bytes + [UInt8](repeating: 0, count: stride - writer.bytes.count)
        }
        return bytes
    }

    /// Decodes `count` records of `stride` bytes; nil when one is malformed.
    public static func decode(_ bytes: [UInt8], count: Int, stride: Int) -> [SocketBatchRecord]? {
        var records: [SocketBatchRecord] = []
        for index in 0..<count {
            let start = index * stride
            guard start + stride <= bytes.count else { return nil }
            let record: SocketBatchRecord? = bytes[start..<start + stride].withUnsafeBytes { buffer in
                var reader = VMRPCByteReader(buffer)
                guard let length: UInt32 = try? reader.read(), let flags: UInt32 = try? reader.read(),
                      let endpoint = try? SocketEndpoint(decoding: &reader),
                      Int(length) <= stride - SocketWire.batchRecordHeaderSize,
                      let payload = try? reader.readBytes(count: Int(length)) else { return nil }
                return SocketBatchRecord(endpoint: endpoint, payload: payload, truncated: flags & 1 != 0)
            }
            guard let record else { return nil }
            records.append(record)
        }
        return records
    }
}
