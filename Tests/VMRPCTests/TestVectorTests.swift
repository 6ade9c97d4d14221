import CVMRPCGuest
import Foundation
import RTVirtCore
import RTVirtTesting
import VMRPC
import XCTest

/// One vector of Docs/VMRPC.md.
struct VMRPCVector {
    var name: String
    var request: [UInt8]
    var arguments: [UInt8]
    var response: [UInt8]
    var results: [UInt8]
    /// Exitless vectors: how the call travels, and the control area (12 bytes) after the guest
    /// posted, after the poller handed the call back, and after the call.
    var path: String?
    var controlBefore: [UInt8]?
    var controlHandoff: [UInt8]?
    var control: [UInt8]?

    /// The vectors in the specification, parsed from its ```vmrpc-vector blocks.
    static func fromSpecification() throws -> [VMRPCVector] {
        let specification = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Docs/VMRPC.md")
        let text = try String(contentsOf: specification, encoding: .utf8)
        var vectors: [VMRPCVector] = []
        for block in text.components(separatedBy: "```vmrpc-vector").dropFirst() {
            var fields: [String: Substring] = [:]
            for line in block.split(separator: "\n") {
                if line.hasPrefix("```") { break }
                guard let colon = line.firstIndex(of: ":") else { continue }
                fields[String(line[..<colon])] = line[line.index(after: colon)...]
            }
            vectors.append(VMRPCVector(name: String(fields["name"] ?? "").trimmingCharacters(in: .whitespaces),
                                       request: hexBytes(fields["request"] ?? ""), arguments: hexBytes(fields["arguments"] ?? ""),
                                       response: hexBytes(fields["response"] ?? ""), results: hexBytes(fields["results"] ?? ""),
                                       path: fields["path"].map { $0.trimmingCharacters(in: .whitespaces) },
                                       controlBefore: fields["control-before"].map(hexBytes),
                                       controlHandoff: fields["control-handoff"].map(hexBytes),
                                       control: fields["control"].map(hexBytes)))
        }
        return vectors
    }
}

final class TestVectorTests: XCTestCase {
    func testSpecificationHasTheVectors() throws {
        let names = try VMRPCVector.fromSpecification().map(\.name)
        XCTAssertEqual(names, ["null", "sleep-until", "bad-magic", "poll", "reply", "unknown-procedure",
                               "exitless-null", "exitless-late-doorbell", "exitless-asleep", "exitless-sleep-until",
                               "exitless-without-the-bit"])
    }

    /// The Swift host, given each request, writes exactly the response of the vector.
    func testSwiftHostProducesTheVectorResponses() throws {
        for vector in try VMRPCVector.fromSpecification() {
            let harness = try ServerHarness(lateness: 368, clock: ManualClock(start: 0x12_0000_0000))
            // Call ids have random generations: the vectors show 0x100000001; the test puts
            // the id the host really issued where the vector has it.
            var arguments = vector.arguments, results = vector.results
            var issued: UInt64?
            if vector.name == "poll" {
                issued = try harness.server.reverseCall(vcpu: 0, procedure: 0x77, payload: [0xDE, 0xAD, 0xBE, 0xEF]) { _ in }.callID
                results.replaceSubrange(0..<8, with: withUnsafeBytes(of: issued!.littleEndian, Array.init))
            }
            if vector.name == "reply" {
                try harness.server.reverseCall(vcpu: 0, procedure: 0x77, payload: []) { _ in }
                issued = try XCTUnwrap(try harness.client(features: .reverseCalls).poll(timeoutNanoseconds: 0).1?.callID)
                arguments.replaceSubrange(0..<8, with: withUnsafeBytes(of: issued!.littleEndian, Array.init))
            }
            let slot = ServerHarness.slotBase
            try harness.memory.write(bytes: vector.request, at: slot)
            try harness.memory.write(bytes: arguments, at: GuestAddress(slot.rawValue + 64))
            let poller = VMRPCPoller.manual()
            if let before = vector.controlBefore {
                try poller.attach(harness.server)
                if vector.path == "asleep" { XCTAssertTrue(poller.prepareToSleep(), vector.name) }
                // The guest's part: `completed` as the previous call left it, then the post.
                try harness.memory.atomicStore(word(before, 1), at: GuestAddress(slot.rawValue + 56), ordering: .relaxed)
                try harness.memory.atomicStore(word(before, 0), at: GuestAddress(slot.rawValue + 52), ordering: .releasing)
                XCTAssertEqual(try control(harness), before, "\(vector.name): the control area the guest sees")
            }
            switch vector.path {
            case nil, "asleep":
                harness.server.handleDoorbell(vcpu: 0)
            case "poller":
                XCTAssertEqual(poller.scanOnce(), 1, vector.name)
            case "poller+doorbell":
                XCTAssertEqual(poller.scanOnce(), 1, vector.name)
                let answered = try harness.memory.readBytes(count: 20, at: GuestAddress(slot.rawValue + 32))
                harness.server.handleDoorbell(vcpu: 0)
                XCTAssertEqual(try harness.memory.readBytes(count: 20, at: GuestAddress(slot.rawValue + 32)), answered,
                               "\(vector.name): a late doorbell writes nothing")
                XCTAssertEqual(harness.server.statistics(vcpu: 0)?.lateDoorbells, 1, vector.name)
            case "handoff":
                XCTAssertEqual(poller.scanOnce(), 1, vector.name)
                XCTAssertEqual(try control(harness), vector.controlHandoff, "\(vector.name): handed back")
                XCTAssertEqual(try harness.memory.readBytes(count: 20, at: GuestAddress(slot.rawValue + 32)), [UInt8](repeating: 0, count: 20),
                               "\(vector.name): the poller answers a blocking call with needs_doorbell only")
                harness.server.handleDoorbell(vcpu: 0)
            default:
                XCTFail("unknown path \(vector.path ?? "")")
            }
            XCTAssertEqual(try harness.memory.readBytes(count: 20, at: GuestAddress(slot.rawValue + 32)), vector.response, vector.name)
            XCTAssertEqual(try harness.memory.readBytes(count: results.count, at: GuestAddress(slot.rawValue + 2048)),
                           results, vector.name)
            if let expected = vector.control { XCTAssertEqual(try control(harness), expected, vector.name) }
        }
    }

    /// The control area of vCPU 0's slot, word by word with acquire loads.
    private func control(_ harness: ServerHarness) throws -> [UInt8] {
        var bytes: [UInt8] = []
        for offset in [52, 56, 60] {
            let value = try harness.memory.atomicLoad(UInt32.self, at: GuestAddress(ServerHarness.slotBase.rawValue + UInt64(offset)),
                                                      ordering: .acquiring)
            bytes += withUnsafeBytes(of: value.littleEndian, Array.init)
        }
        return bytes
    }

    /// The Swift types encode each vector's request, and decode its response, byte for byte.
    func testSwiftEncodingMatchesTheVectors() throws {
        for vector in try VMRPCVector.fromSpecification() {
            let header = vector.request.withUnsafeBytes { VMRPCRequestHeader(decoding: $0) }
            XCTAssertEqual(header.bytes, vector.request, vector.name)
            let response = vector.response.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
            XCTAssertEqual(response.bytes, vector.response, vector.name)
            XCTAssertEqual(Int(response.resultLength), vector.results.count, vector.name)
            XCTAssertEqual(response.sequence, header.sequence, vector.name)
        }
        let poll = try VMRPCVector.fromSpecification().first { $0.name == "poll" }!
        XCTAssertEqual(try VMRPCReverseCallDelivery.decode(poll.results),
                       VMRPCReverseCallDelivery(callID: 1 << 32 | 1, procedure: 0x77, payload: [0xDE, 0xAD, 0xBE, 0xEF]))
    }

    /// The C header encodes each vector's request and decodes its response.
    func testCHeaderMatchesTheVectors() throws {
        for vector in try VMRPCVector.fromSpecification() {
            let header = vector.request.withUnsafeBytes { VMRPCRequestHeader(decoding: $0) }
            var slot = [UInt8](repeating: 0xAA, count: 4096)
            let result = slot.withUnsafeMutableBufferPointer { buffer in
                vector.arguments.withUnsafeBytes { arguments in
                    rtv_test_encode_request(buffer.baseAddress, header.procedure, header.sequence, header.features,
                                            arguments.baseAddress, UInt32(vector.arguments.count))
                }
            }
            XCTAssertEqual(result, 0, vector.name)
            if header.magic == VMRPCWire.magic {
                XCTAssertEqual(Array(slot[0..<32]), vector.request, vector.name)
                XCTAssertEqual(Array(slot[64..<64 + vector.arguments.count]), vector.arguments, vector.name)
            }
            if let before = vector.controlBefore {
                // The C guest posts: posted goes from 0 to 1 (and nothing else changes).
                slot.replaceSubrange(52..<64, with: [0, 0, 0, 0] + before[4..<12])
                slot.withUnsafeMutableBufferPointer { rtv_test_post($0.baseAddress) }
                XCTAssertEqual(Array(slot[52..<64]), before, "\(vector.name): the C header's post")
                XCTAssertEqual(slot.withUnsafeMutableBufferPointer { rtv_test_exitless_state($0.baseAddress, header.sequence) },
                               word(before, 2) != 0 ? Int32(RTV_VMRPC_EXITLESS_RING) : Int32(RTV_VMRPC_EXITLESS_WAIT),
                               "\(vector.name): spin while the poller is awake, ring when it asks")
                if let handoff = vector.controlHandoff {
                    slot.replaceSubrange(52..<64, with: handoff)
                    XCTAssertEqual(slot.withUnsafeMutableBufferPointer { rtv_test_exitless_state($0.baseAddress, header.sequence) },
                                   Int32(RTV_VMRPC_EXITLESS_RING), "\(vector.name): a handed-back call is rung for")
                }
            }
            if let after = vector.control {
                slot.replaceSubrange(52..<64, with: after)
                XCTAssertEqual(slot.withUnsafeMutableBufferPointer { rtv_test_exitless_state($0.baseAddress, header.sequence) },
                               Int32(RTV_VMRPC_EXITLESS_DONE), "\(vector.name): completed = the sequence")
                XCTAssertEqual(slot.withUnsafeMutableBufferPointer { rtv_test_exitless_state($0.baseAddress, header.sequence &+ 1) },
                               word(after, 2) != 0 ? Int32(RTV_VMRPC_EXITLESS_RING) : Int32(RTV_VMRPC_EXITLESS_WAIT),
                               "\(vector.name): another call is not done")
                XCTAssertEqual(slot.withUnsafeMutableBufferPointer { rtv_test_control_word($0.baseAddress, UInt32(RTV_VMRPC_COMPLETED_OFFSET)) },
                               header.sequence, vector.name)
            }
            slot.replaceSubrange(32..<52, with: vector.response)
            slot.replaceSubrange(2048..<2048 + vector.results.count, with: vector.results)
            let status = slot.withUnsafeBufferPointer { rtv_test_response_status($0.baseAddress, header.sequence) }
            XCTAssertEqual(status, vector.response.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }.status, vector.name)
            XCTAssertEqual(slot.withUnsafeBufferPointer { rtv_test_response_status($0.baseAddress, header.sequence &+ 1) },
                           UInt32(RTV_VMRPC_INTERNAL_ERROR), "a response for another sequence is not trusted")
            var results = [UInt8](repeating: 0, count: 2048)
            let length = slot.withUnsafeBufferPointer { slotBuffer in
                results.withUnsafeMutableBytes { rtv_test_read_results(slotBuffer.baseAddress, $0.baseAddress, 2048) }
            }
            XCTAssertEqual(Array(results.prefix(Int(length))), vector.results, vector.name)
        }
        var slot = [UInt8](repeating: 0, count: 4096)
        XCTAssertEqual(slot.withUnsafeMutableBufferPointer { rtv_test_encode_request($0.baseAddress, 1, 1, 0, nil, 1985) }, -1)
    }

    func testCConstantsMatchSwift() {
        XCTAssertEqual(RTV_VMRPC_MAGIC, VMRPCWire.magic)
        XCTAssertEqual(Int(RTV_VMRPC_ARGS_MAX), VMRPCWire.maximumArgumentLength)
        XCTAssertEqual(Int(RTV_VMRPC_RESULTS_OFFSET), VMRPCWire.resultsOffset)
        XCTAssertEqual(UInt32(RTV_VMRPC_PROC_SLEEP_UNTIL), VMRPCProcedureID.timerSleepUntil)
        XCTAssertEqual(UInt32(RTV_VMRPC_FEATURE_REVERSE_CALLS), VMRPCFeatures.reverseCalls.rawValue)
        XCTAssertEqual(UInt32(RTV_VMRPC_CHANNEL_BROKEN), VMRPCStatus.channelBroken.rawValue)
        XCTAssertEqual(MemoryLayout<rtv_vmrpc_header>.size, VMRPCWire.headerSize)
        XCTAssertEqual(UInt32(RTV_VMRPC_FEATURE_EXITLESS), VMRPCFeatures.exitless.rawValue)
        XCTAssertEqual(Int(RTV_VMRPC_POSTED_OFFSET), VMRPCWire.postedOffset)
        XCTAssertEqual(Int(RTV_VMRPC_COMPLETED_OFFSET), VMRPCWire.completedOffset)
        XCTAssertEqual(Int(RTV_VMRPC_NEEDS_DOORBELL_OFFSET), VMRPCWire.needsDoorbellOffset)
        XCTAssertEqual(MemoryLayout<rtv_vmrpc_header>.offset(of: \.posted), VMRPCWire.postedOffset)
        XCTAssertEqual(MemoryLayout<rtv_vmrpc_header>.offset(of: \.needs_doorbell), VMRPCWire.needsDoorbellOffset)
    }
}

/// The little-endian 32-bit word `index` of `bytes`.
private func word(_ bytes: [UInt8], _ index: Int) -> UInt32 {
    bytes[index * 4..<index * 4 + 4].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
}

final class HeaderDecodingTests: XCTestCase {
    /// The public decoders never read past what they are given: missing bytes read as zero.
    func testShortBuffersDecodeAsZeroPadded() {
        let request = [UInt8]([0x52, 0x54, 0x56]).withUnsafeBytes { VMRPCRequestHeader(decoding: $0) }
        XCTAssertEqual(request.magic, 0x56_5452)
        XCTAssertEqual(request.validate(hostFeatures: .all), .badMagic)
        let empty = VMRPCRequestHeader(decoding: UnsafeRawBufferPointer(start: nil, count: 0))
        XCTAssertEqual(empty.procedure, 0)
        let response = [UInt8]([9, 0, 0, 0, 4]).withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
        XCTAssertEqual(response.status, 9)
        XCTAssertEqual(response.resultLength, 4)
        XCTAssertEqual(response.hostVersion, 0)
    }
}
