/// Why `VirtualCPU.run()` returned.
///
/// Port-in and MMIO-read exits need a reply (`VirtualCPU.completePortIn(_:)` /
/// `completeMMIORead(_:)`) before the next `run()`; without one the guest reads zero.
public enum VCPUExit: Equatable, Sendable {
    /// The guest executed `in` from `port`, reading `size` bytes (1, 2 or 4).
    case portIn(port: UInt16, size: Int)
    /// The guest executed `out` to `port`, writing the low `size` bytes of `data`.
    case portOut(port: UInt16, size: Int, data: UInt64)
    /// The guest executed `rep ins` from `port`: `count` elements of `size` bytes. Answer with
    /// `VirtualCPU.completePortInString(_:)`.
    case portInString(port: UInt16, size: Int, count: Int)
    /// The guest executed `rep outs` to `port`: one value per element, each `size` bytes.
    case portOutString(port: UInt16, size: Int, data: [UInt64])
    /// The guest read `size` bytes (1...8) at an address with no memory behind it.
    case mmioRead(address: GuestAddress, size: Int)
    /// The guest wrote the low `size` bytes of `data` at an address with no memory behind it.
    case mmioWrite(address: GuestAddress, size: Int, data: UInt64)
    /// The guest executed `hlt` (and no in-kernel irqchip handled it).
    case halt
    /// The guest triple-faulted or otherwise shut down.
    case shutdown
    /// `KVM_RUN` returned because of a kick or a signal (EINTR). Nothing ran in the guest.
    case interrupted
    /// The hardware refused to enter the guest (`hardware_entry_failure_reason`, host CPU).
    case failedEntry(hardwareReason: UInt64, cpu: UInt32)
    /// The hypervisor failed internally (for KVM: `KVM_EXIT_INTERNAL_ERROR` and its suberror).
    case internalError(suberror: UInt32)
    /// A system event from the guest (reset, shutdown, crash) with its type number.
    case systemEvent(type: UInt32)
    /// An exit this backend does not handle, with the hypervisor's reason number and a note.
    case unsupported(reason: UInt32, detail: String)
}
