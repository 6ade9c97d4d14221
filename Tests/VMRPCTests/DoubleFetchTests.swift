import RTVirtCore
import RTVirtTesting
import Synchronization
import VMRPC
import XCTest

final class DoubleFetchTests: XCTestCase {
    /// Another "vCPU" rewrites the slot while the host handles calls. The host must only ever
    /// act on one consistent copy: the procedure sees exactly the validated argument length,
    /// and every response status is one the copy could produce.
    func testSlotRewrittenDuringCallsNeverReachesAProcedureInconsistently() throws {
        let violations = Atomic<Int>(0)
        let calls = Atomic<Int>(0)
        let checked = VMRPCProcedure(id: 0x200, name: "checked", argumentLength: 8...8) { _, arguments in
            calls.wrappingAdd(1, ordering: .relaxed)
            if arguments.count != 8 { violations.wrappingAdd(1, ordering: .relaxed) }
            return .done(status: .ok, results: arguments)
        }
        var limits = VMRPCLimits()
        limits.malformedCallBurst = Int.max / 2 // keep the channel open for the whole storm
        let harness = try ServerHarness(extra: [checked], limits: limits)
        let slot = ServerHarness.slotBase
        let memory = harness.memory
        let stop = Atomic<Bool>(false)
        let mutator = try HostThread(name: "mutator") {
            var generator = SystemRandomNumberGenerator()
            var header = VMRPCRequestHeader(procedure: 0x200, sequence: 1, argumentLength: 8)
            while !stop.load(ordering: .relaxed) {
                header.argumentLength = [8, 8, 9, 1984, 4000, UInt32.max].randomElement(using: &generator)!
                header.procedure = [0x200, 0x200, 1, 0].randomElement(using: &generator)!
                header.magic = Bool.random(using: &generator) ? VMRPCWire.magic : 0
                header.sequence &+= 1
                try? memory.write(bytes: header.bytes, at: slot)
                try? memory.write(UInt64.random(in: 0...UInt64.max, using: &generator), at: GuestAddress(slot.rawValue + 64))
            }
        }
        let allowed: Set<UInt32> = [VMRPCStatus.ok, .badMagic, .badArgumentLength, .unknownProcedure].map(\.rawValue).reduce(into: []) { $0.insert($1) }
        var unexpected: [UInt32] = []
        for _ in 0..<20_000 {
            harness.server.handleDoorbell(vcpu: 0)
            let status = try memory.read(UInt32.self, at: GuestAddress(slot.rawValue + 32))
            if !allowed.contains(status) { unexpected.append(status) }
        }
        stop.store(true, ordering: .relaxed)
        mutator.join()
        XCTAssertEqual(violations.load(ordering: .relaxed), 0, "a procedure saw arguments that were not the validated copy")
        XCTAssertGreaterThan(calls.load(ordering: .relaxed), 0, "some calls must have been well-formed")
        XCTAssertEqual(unexpected, [])
        XCTAssertEqual(harness.server.statistics(vcpu: 0)?.doorbells, 20_000)
    }
}
