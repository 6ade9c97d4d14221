import RTVirtCore
import RTVirtTesting
import VMRPC

/// Runs the VMRPC server on guest-controlled bytes: the input's first 4096 bytes become vCPU 0's
/// call slot, the rest a program of at most 64 operations (doorbells on either of two vCPUs,
/// byte rewrites of the slot, reverse calls queued by the host, clock jumps). No real time
/// passes and nothing really blocks. Checks after every doorbell that the host wrote a
/// well-formed response; a violation traps, which is what the fuzzer looks for.
public enum VMRPCFuzzHarness {
    static let slotBase = GuestAddress(0x1000)

    /// Runs one input. Returns the number of doorbells handled.
    @discardableResult
    public static func run(_ input: [UInt8]) -> Int {
        let memory = GuestMemoryMap()
        guard (try? memory.addRegion(at: GuestAddress(0), size: 0x4000)) != nil else { return 0 }
        let clock = ManualClock(start: 1_000_000_000)
        guard let dispatcher = try? LongPollDispatcher(vcpuCount: 2, clock: clock, waiter: ManualClockWaiter(clock: clock, lateness: 100)),
              let server = try? VMRPCServer(
                memory: memory, slots: VMRPCSlotLayout(base: slotBase, count: 2), dispatcher: dispatcher,
                procedures: VMRPCStandardProcedures.all(clock: FuzzClock(clock: clock)))
        else { return 0 }
        let page = Array(input.prefix(VMRPCWire.slotSize))
        try? memory.write(bytes: page, at: slotBase)
        var program = input.dropFirst(VMRPCWire.slotSize).makeIterator()
        var doorbells = 0
        for _ in 0..<64 {
            guard let opcode = program.next(), let argument = program.next() else { break }
            switch opcode % 4 {
            case 0:
                let vcpu = Int(argument % 2)
                server.handleDoorbell(vcpu: vcpu)
                doorbells += 1
                checkResponse(memory: memory, vcpu: vcpu)
            case 1:
                let offset = UInt64(argument) * 16 + UInt64(program.next() ?? 0) % 16
                try? memory.write(program.next() ?? 0, at: GuestAddress(slotBase.rawValue + offset))
            case 2:
                try? server.reverseCall(vcpu: Int(argument % 2), procedure: UInt32(argument), payload: Array(page.prefix(Int(argument)))) { _ in }
            default:
                clock.advance(by: UInt64(argument) << 20)
            }
        }
        server.shutdown()
        return doorbells
    }

    static func checkResponse(memory: GuestMemoryMap, vcpu: Int) {
        let slot = GuestAddress(slotBase.rawValue + UInt64(vcpu) * UInt64(VMRPCWire.slotSize))
        guard let bytes = try? memory.readBytes(count: 32, at: GuestAddress(slot.rawValue + 32)) else { return }
        let response = bytes.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
        precondition(VMRPCStatus(rawValue: response.status) != nil, "the host wrote an unknown status \(response.status)")
        precondition(response.resultLength <= UInt32(VMRPCWire.maximumResultLength), "result length \(response.resultLength)")
        precondition(response.hostFeatures == VMRPCFeatures.all.rawValue, "host features \(response.hostFeatures)")
    }
}

/// A 1 GHz guest clock on the manual clock.
struct FuzzClock: GuestClockSource {
    let clock: ManualClock
    func mapping(forVCPU vcpu: Int) -> GuestTSCMapping? { GuestTSCMapping(frequencyHz: 1_000_000_000, guestOffset: 12_345) }
    func sampleHost() -> HostClockSample {
        let now = clock.nowNanoseconds()
        return HostClockSample(hostTSC: now, monotonicNanoseconds: now)
    }
}
