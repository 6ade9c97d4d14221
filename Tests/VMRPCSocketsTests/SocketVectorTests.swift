import CVMRPCGuest
import Foundation
import RTVirtCore
import VMRPC
import VMRPCSockets
import XCTest

/// One vector of Docs/Sockets.md.
struct SocketVector {
    var name: String
    var procedure: UInt32
    var arguments: [UInt8]
    var status: UInt32
    var results: [UInt8]

    static func fromSpecification() throws -> [SocketVector] {
        let specification = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Docs/Sockets.md")
        let text = try String(contentsOf: specification, encoding: .utf8)
        return text.components(separatedBy: "```net-vector").dropFirst().map { block in
            var fields: [String: String] = [:]
            for line in block.split(separator: "\n") {
                if line.hasPrefix("```") { break }
                guard let colon = line.firstIndex(of: ":") else { continue }
                fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            return SocketVector(name: fields["name"] ?? "", procedure: UInt32(fields["procedure"]?.dropFirst(2) ?? "", radix: 16) ?? 0,
                                arguments: hex(fields["arguments"] ?? ""), status: UInt32(fields["status"] ?? "") ?? 99,
                                results: hex(fields["results"] ?? ""))
        }
    }

    static func hex(_ text: String) -> [UInt8] {
        let digits = Array(text.filter { !$0.isWhitespace })
        return stride(from: 0, to: digits.count - 1, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
    }
}

final class SocketVectorTests: XCTestCase {
    let handle: UInt64 = 1 << 32 | 1

    func testSpecificationHasTheVectors() throws {
        XCTAssertEqual(try SocketVector.fromSpecification().map(\.name),
                       ["open", "bind", "send-to", "receive-from", "send-to-denied", "receive-batch", "wait", "close",
                        "close-again", "wait-closed", "bad-arguments"])
    }

    /// The Swift host, given each vector's arguments in order, answers exactly its status and results.
    func testSwiftHostProducesTheVectorResults() throws {
        let harness = try SocketHarness()
        let client = harness.client().client
        for vector in try SocketVector.fromSpecification() {
            if vector.name == "receive-from" {
                XCTAssertTrue(harness.backend.deliver(Array("pong".utf8), toPort: 7000, from: .at("198.18.0.1", 5555)))
            }
            let response = try client.call(vector.procedure, arguments: vector.arguments)
            XCTAssertEqual(response.rawStatus, vector.status, vector.name)
            XCTAssertEqual(response.results, vector.results, vector.name)
        }
        XCTAssertEqual(harness.backend.sent.map(\.bytes), [Array("hi".utf8)], "the denied send sent nothing")
    }

    /// The Swift types encode what the vectors say.
    func testSwiftEncodingMatchesTheVectors() throws {
        let vectors = Dictionary(uniqueKeysWithValues: try SocketVector.fromSpecification().map { ($0.name, $0) })
        XCTAssertEqual(SocketOpenArguments(family: .ipv4, type: .datagram).encoded, vectors["open"]?.arguments)
        XCTAssertEqual(SocketBindArguments(handle: handle, endpoint: .at("0.0.0.0", 7000)).encoded, vectors["bind"]?.arguments)
        XCTAssertEqual(SocketSendArguments(handle: handle, destination: .at("198.18.0.2", 9), payload: Array("hi".utf8)).encoded,
                       vectors["send-to"]?.arguments)
        XCTAssertEqual(SocketReceiveArguments(handle: handle, timeoutNanoseconds: 1_000_000, capacity: 64).encoded,
                       vectors["receive-from"]?.arguments)
        XCTAssertEqual(SocketBatchArguments(handle: handle, timeoutNanoseconds: 0, count: 4, bufferAddress: 0x20000, bufferLength: 256,
                                            stride: 64).encoded, vectors["receive-batch"]?.arguments)
        XCTAssertEqual(SocketWaitArguments(timeoutNanoseconds: 0, entries: [SocketWaitEntry(handle: handle, events: .readable)]).encoded,
                       vectors["wait"]?.arguments)
        XCTAssertEqual(try SocketOpenResult.decode(vectors["open"]!.results), SocketOpenResult(.ok, handle: handle))
        XCTAssertEqual(try SocketReceiveResult.decode(vectors["receive-from"]!.results),
                       SocketReceiveResult(.ok, length: 4, source: .at("198.18.0.1", 5555), payload: Array("pong".utf8)))
        XCTAssertEqual(try SocketWaitResult.decode(vectors["wait-closed"]!.results), SocketWaitResult(.ok, events: [.invalid]))
        XCTAssertEqual(try SocketResult.decode(vectors["send-to-denied"]!.results), SocketResult(.denied))
    }

    /// rtvirt_sockets.h's structs, filled the way a guest fills them, give the vectors' bytes, and
    /// its result structs read the vectors' results.
    func testCHeaderMatchesTheVectors() throws {
        let vectors = Dictionary(uniqueKeysWithValues: try SocketVector.fromSpecification().map { ($0.name, $0) })
        var out = [UInt8](repeating: 0xAA, count: 256)
        func encoded(_ body: (UnsafeMutablePointer<UInt8>) -> UInt32) -> [UInt8] {
            let length = out.withUnsafeMutableBufferPointer { body($0.baseAddress!) }
            return Array(out.prefix(Int(length)))
        }
        XCTAssertEqual(encoded { rtv_test_net_open($0, UInt16(RTV_NET_FAMILY_IPV4), UInt16(RTV_NET_TYPE_DATAGRAM)) }, vectors["open"]?.arguments)
        XCTAssertEqual(encoded { rtv_test_net_bind_ipv4($0, handle, [0, 0, 0, 0], 7000) }, vectors["bind"]?.arguments)
        XCTAssertEqual(encoded { rtv_test_net_send_to_ipv4($0, handle, 0, [198, 18, 0, 2], 9, Array("hi".utf8), 2) }, vectors["send-to"]?.arguments)
        XCTAssertEqual(encoded { rtv_test_net_receive($0, handle, 1_000_000, 64, 0) }, vectors["receive-from"]?.arguments)
        XCTAssertEqual(encoded { rtv_test_net_batch($0, handle, 0, 4, 0x20000, 256, 64) }, vectors["receive-batch"]?.arguments)
        XCTAssertEqual(encoded { rtv_test_net_wait_one($0, 0, handle, RTV_NET_EVENT_READABLE) }, vectors["wait"]?.arguments)
        var status: UInt32 = 99, length: UInt32 = 0, family: UInt16 = 0, port: UInt16 = 0, opened: UInt64 = 0
        let offset = rtv_test_net_read_receive(vectors["receive-from"]!.results, &status, &length, &family, &port)
        XCTAssertEqual([status, length, UInt32(family), UInt32(port)], [0, 4, 4, 5555])
        XCTAssertEqual(Array(vectors["receive-from"]!.results[Int(offset)...]), Array("pong".utf8))
        rtv_test_net_read_open(vectors["open"]!.results, &status, &opened)
        XCTAssertEqual(status, 0)
        XCTAssertEqual(opened, handle)
    }

    func testCConstantsMatchSwift() {
        XCTAssertEqual(UInt32(RTV_NET_PROC_OPEN), SocketProcedureID.open)
        XCTAssertEqual(UInt32(RTV_NET_PROC_SEND_BATCH), SocketProcedureID.sendBatch)
        XCTAssertEqual(UInt32(RTV_NET_PROC_WAIT), SocketProcedureID.wait)
        XCTAssertEqual(UInt32(RTV_NET_PROC_GETPEERNAME), SocketProcedureID.getPeerName)
        XCTAssertEqual(UInt32(RTV_NET_HOST_ERROR), SocketStatus.hostError.rawValue)
        XCTAssertEqual(UInt32(RTV_NET_BUFFER_OUT_OF_RANGE), SocketStatus.bufferOutOfRange.rawValue)
        XCTAssertEqual(Int(RTV_NET_INLINE_MAX), SocketWire.maximumInlinePayload)
        XCTAssertEqual(Int(RTV_NET_BUFFER_MAX), SocketWire.maximumBufferPayload)
        XCTAssertEqual(Int(RTV_NET_BATCH_MAX), SocketWire.maximumBatchCount)
        XCTAssertEqual(Int(RTV_NET_BATCH_STRIDE_MAX), SocketWire.maximumBatchStride)
        XCTAssertEqual(Int(RTV_NET_WAIT_MAX), SocketWire.maximumWaitEntries)
        XCTAssertEqual(UInt32(RTV_NET_OPTION_PRIORITY), SocketOption.priority.rawValue)
        XCTAssertEqual(UInt32(RTV_NET_EVENT_INVALID), SocketEvents.invalid.rawValue)
        XCTAssertEqual(MemoryLayout<rtv_net_batch_record>.size, SocketWire.batchRecordHeaderSize)
        XCTAssertEqual(MemoryLayout<rtv_net_address>.size, SocketWire.addressSize)
        XCTAssertEqual(SocketProcedureID.all.map(\.id), Array(0x100...0x111).map(UInt32.init), "contiguous in the net.* range")
        // The slot has room for the largest inline payloads.
        XCTAssertLessThanOrEqual(56 + SocketWire.maximumInlinePayload, VMRPCWire.maximumArgumentLength)
        XCTAssertLessThanOrEqual(40 + SocketWire.maximumInlinePayload, VMRPCWire.maximumResultLength)
        XCTAssertLessThanOrEqual(16 + 16 * SocketWire.maximumWaitEntries, VMRPCWire.maximumArgumentLength)
    }
}
