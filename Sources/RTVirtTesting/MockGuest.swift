import RTVirtCore

/// What a mock vCPU's guest program sees: the VM's memory, and exits to the VMM.
///
/// Each exit hands a `VCPUExit` to the VMM's `run()` and blocks until the VMM runs the vCPU
/// again, as a real guest's `out` or MMIO access does; reads return the VMM's answer. Once the
/// vCPU is torn down every exit returns at once (reads return all ones) and `isStopped` is
/// true: a program must then end.
public final class MockGuest: Sendable {
    /// The VM's memory, as the guest sees it.
    public let memory: any GuestMemory
    private let state: ConditionLock<MockVirtualCPU.State>

    init(memory: any GuestMemory, state: ConditionLock<MockVirtualCPU.State>) {
        self.memory = memory
        self.state = state
    }

    /// Whether the vCPU was torn down.
    public var isStopped: Bool { state.withLock { $0.tornDown } }

    /// Makes `exit` and waits until the VMM runs the vCPU again. Returns the VMM's answer to a
    /// read exit (all ones once stopped), else 0.
    @discardableResult
    public func exit(_ exit: VCPUExit) -> UInt64 {
        let number = state.withLockAndBroadcast { state -> Int in
            state.script.append(exit)
            return state.script.count
        }
        return state.wait(until: { $0.exitsResumed >= number || $0.tornDown }) { state, _ in
            guard !state.tornDown else { return UInt64.max }
            switch exit {
            case .portIn, .portInString, .mmioRead: return state.lastReply
            default: return 0
            }
        }
    }

    /// `out`: writes `value` (its low `size` bytes) to `port`.
    public func portOut(_ port: UInt16, size: Int = 4, value: UInt64) {
        exit(.portOut(port: port, size: size, data: value))
    }

    /// `in`: reads `size` bytes from `port`.
    public func portIn(_ port: UInt16, size: Int = 4) -> UInt64 { exit(.portIn(port: port, size: size)) }

    /// An MMIO write to an address without memory.
    public func mmioWrite(_ address: GuestAddress, size: Int = 4, value: UInt64) {
        exit(.mmioWrite(address: address, size: size, data: value))
    }

    /// An MMIO read from an address without memory.
    public func mmioRead(_ address: GuestAddress, size: Int = 4) -> UInt64 { exit(.mmioRead(address: address, size: size)) }
}
