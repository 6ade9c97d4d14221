import RTVirtCore
import RTVirtTesting
import VMRPC
import LongPoll

/// A guest clock on a manual clock: 1 GHz, offset 0, so guest TSC = monotonic nanoseconds.
struct ManualGuestClock: GuestClockSource {
    let clock: ManualClock
    func mapping(forVCPU vcpu: Int) -> GuestTSCMapping? {
        vcpu < 8 ? GuestTSCMapping(frequencyHz: 1_000_000_000, guestOffset: 0) : nil
    }
    func sampleHost() -> HostClockSample {
        let now = clock.nowNanoseconds()
        return HostClockSample(hostTSC: now, monotonicNanoseconds: now)
    }
}

/// A server over fresh guest memory, a manual clock and the standard procedures. Reverse-call
/// completions run on the thread that ends the call, so a test sees them at once.
struct ServerHarness {
    static let slotBase = GuestAddress(0x10000)
    let memory = GuestMemoryMap()
    let clock: ManualClock
    let waiter: ManualClockWaiter
    let dispatcher: LongPollDispatcher
    let server: VMRPCServer

    init(vcpus: Int = 2, lateness: UInt64 = 0, extra: [VMRPCProcedure] = [], limits: VMRPCLimits = VMRPCLimits(),
         clock: ManualClock = ManualClock(start: 1_000_000),
         completionContext: VMRPCCompletionContext = .endingThread) throws {
        try memory.addRegion(at: GuestAddress(0), size: 0x20000)
        self.clock = clock
        waiter = ManualClockWaiter(clock: clock, lateness: lateness)
        dispatcher = try LongPollDispatcher(vcpuCount: vcpus, clock: clock, waiter: waiter)
        server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: Self.slotBase, count: vcpus),
                                 dispatcher: dispatcher,
                                 procedures: VMRPCStandardProcedures.all(clock: ManualGuestClock(clock: clock)) + extra,
                                 limits: limits, completionContext: completionContext)
    }

    /// A guest client for `vcpu` whose doorbell calls the server synchronously.
    func client(vcpu: Int = 0, features: VMRPCFeatures = []) -> VMRPCGuestClient {
        let server = self.server
        return VMRPCGuestClient(memory: memory, slot: server.slots.address(ofVCPU: vcpu)!, features: features) {
            server.handleDoorbell(vcpu: vcpu)
        }
    }
}

/// Parses "0011 2233" into bytes.
func hexBytes(_ text: Substring) -> [UInt8] {
    let digits = Array(text.filter { !$0.isWhitespace })
    return stride(from: 0, to: digits.count - 1, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
}
