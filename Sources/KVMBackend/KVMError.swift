import RTVirtCore
import SystemPackage

/// Errors from the KVM backend. Each names what failed and carries the kernel's `Errno`.
public enum KVMError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The KVM device node does not exist (no KVM module loaded, or not passed into a container).
    case deviceMissing(path: String)
    /// The device exists but this process may not open it.
    case permissionDenied(path: String)
    /// Opening the device failed for another reason.
    case openFailed(path: String, errno: Errno)
    /// `KVM_GET_API_VERSION` returned something other than 12.
    case unsupportedAPIVersion(Int32)
    /// The kernel lacks a capability this backend relies on.
    case missingCapability(KVMCapability)
    /// An ioctl failed.
    case ioctlFailed(operation: String, errno: Errno)
    /// A vCPU id outside `0 ..< limit`, or one the VM already created.
    case vcpuIDOutOfRange(id: Int, limit: Int)
    /// A memory region was rejected before it reached the kernel.
    case invalidMemoryRegion(MemoryLayoutError)
    /// A reply was given for an exit that does not take one.
    case noPendingRead(String)
    /// Mapping the vCPU's shared `kvm_run` area failed.
    case runAreaMappingFailed(errno: Errno)
    /// The kick signal already has a handler that RTVirt did not install (see `KVMKickSignal`).
    case kickSignalInUse(signal: Int32)
    /// The guest TSC offset could not be sampled within the error bound asked for: no host-TSC
    /// window around `KVM_GET_MSRS(IA32_TSC)` was narrow enough (the narrowest one seen is given).
    case tscOffsetUnbounded(narrowestWindowNanoseconds: UInt64, limitNanoseconds: UInt64, attempts: Int)
    /// The samples of the guest TSC offset contradict each other: the offset changed while it
    /// was sampled (the guest or another thread wrote the TSC), or the host TSCs are not synchronized.
    case tscOffsetInconsistent
    /// Sampling limits that cannot work (no samples, no attempts, or a zero window).
    case invalidTSCSamplingLimits

    public var description: String {
        switch self {
        case let .deviceMissing(path):
            return "\(path) does not exist: load kvm_intel, kvm_amd (or kvm_pvm), or pass the device into this container"
        case let .permissionDenied(path):
            return "permission denied opening \(path): run as root or join the group that owns it (often 'kvm')"
        case let .openFailed(path, errno):
            return "cannot open \(path): \(errno)"
        case let .unsupportedAPIVersion(version):
            return "KVM API version \(version) is not supported (expected 12)"
        case let .missingCapability(capability):
            return "this kernel's KVM lacks \(capability)"
        case let .ioctlFailed(operation, errno):
            return "\(operation) failed: \(errno)"
        case let .vcpuIDOutOfRange(id, limit):
            return "vCPU id \(id) is out of range 0..<\(limit)"
        case let .invalidMemoryRegion(error):
            return "invalid memory region: \(error)"
        case let .noPendingRead(what):
            return "no pending \(what) exit to complete"
        case let .runAreaMappingFailed(errno):
            return "mapping the vCPU's kvm_run area failed: \(errno)"
        case let .kickSignalInUse(signal):
            return "signal \(signal) already has a handler: choose another kick signal, or chain it (KVMKickSignal.foreignHandler)"
        case let .tscOffsetUnbounded(narrowest, limit, attempts):
            return "the guest TSC offset could not be bounded: the narrowest of \(attempts) host-TSC windows around KVM_GET_MSRS was "
                + "\(narrowest) ns, over the \(limit) ns allowed (a busy or preempted thread?)"
        case .tscOffsetInconsistent:
            return "the guest TSC offset changed while it was sampled (or the host TSCs are not synchronized)"
        case .invalidTSCSamplingLimits:
            return "TSC sampling limits need at least one sample, one attempt and a non-zero window"
        }
    }
}
