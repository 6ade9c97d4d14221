import RTVirtCore
import RTVirtTesting
import VMRPC
import VMRPCFuzzHarness
import VMRPCSockets
import LongPoll

/// A VMRPC server with the `net.*` procedures over an in-memory socket backend, guest memory,
/// a manual clock (nothing really blocks) and handle generations counting up from 1.
struct SocketHarness {
    static let slotBase = GuestAddress(0x10000)
    /// A guest buffer for payloads and batches.
    static let bufferBase: UInt64 = 0x20000
    static let memorySize: UInt64 = 0x60000
    let memory = GuestMemoryMap()
    let clock = ManualClock(start: 1_000_000)
    let waiter: ManualClockWaiter
    let dispatcher: LongPollDispatcher
    let backend = InMemorySocketBackend()
    let service: VMRPCSocketService
    let server: VMRPCServer

    /// The default test policy: binds 7000...7099, sends to 198.18.0.0/24 and fd00:18::/64 ports 1...9999.
    static var testPolicy: SocketPolicy {
        var policy = SocketPolicy()
        policy.bindPorts = [7000...7099]
        policy.remotes = [SocketRemoteRule(prefix: IPPrefix("198.18.0.0/24")!, ports: 1...9999),
                          SocketRemoteRule(prefix: IPPrefix("fd00:18::/64")!, ports: 1...9999)]
        return policy
    }

    init(policy: SocketPolicy = SocketHarness.testPolicy) throws {
        try memory.addRegion(at: GuestAddress(0), size: Self.memorySize)
        waiter = ManualClockWaiter(clock: clock)
        dispatcher = try LongPollDispatcher(vcpuCount: 2, clock: clock, waiter: waiter)
        let counter = LockedValue<UInt32>(0)
        service = try VMRPCSocketService(backend: backend, policy: policy, memory: memory, dispatcher: dispatcher,
                                         handleGenerations: { counter.withLock { $0 += 1; return $0 } })
        server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: Self.slotBase, count: 2), dispatcher: dispatcher,
                                 procedures: service.procedures, completionContext: .endingThread)
    }

    /// The socket client of `vcpu`.
    func client(vcpu: Int = 0) -> SocketGuestClient {
        let server = self.server
        return SocketGuestClient(VMRPCGuestClient(memory: memory, slot: server.slots.address(ofVCPU: vcpu)!) {
            server.handleDoorbell(vcpu: vcpu)
        })
    }
}

extension SocketEndpoint {
    /// Parses "198.18.0.2" with a port.
    static func at(_ address: String, _ port: UInt16) -> SocketEndpoint { SocketEndpoint(IPAddress(address)!, port: port) }
}
