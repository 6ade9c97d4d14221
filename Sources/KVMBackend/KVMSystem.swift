import CKVMShim
import Glibc
import RTVirtCore
import SystemPackage

/// An open `/dev/kvm`: the entry point of the KVM backend.
///
/// Opening checks the API version (12) and the capabilities in `KVMCapability.required`, and
/// installs the process-wide handler for the kick signal (`KVMKickSignal`).
public final class KVMSystem: Hypervisor {
    /// The usual path of the KVM device.
    public static let defaultPath = "/dev/kvm"

    public var name: String { "kvm" }
    /// The device path that was opened.
    public let path: String
    let descriptor: OwnedDescriptor
    /// Size of each vCPU's shared `kvm_run` area.
    public let vcpuRunAreaSize: Int
    /// The signal that kicks this system's vCPUs out of `KVM_RUN`.
    public let kickSignal: KVMKickSignal

    /// Opens the KVM device at `path`.
    /// - Throws: `KVMError.deviceMissing`, `.permissionDenied`, `.unsupportedAPIVersion`,
    ///   `.missingCapability`, `.kickSignalInUse`, or another `KVMError`.
    public init(path: String = KVMSystem.defaultPath, kickSignal: KVMKickSignal = .default) throws(KVMError) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            switch code {
            case ENOENT, ENODEV, ENXIO: throw .deviceMissing(path: path)
            case EACCES, EPERM: throw .permissionDenied(path: path)
            default: throw .openFailed(path: path, errno: Errno(rawValue: code))
            }
        }
        descriptor = OwnedDescriptor(fd)
        self.path = path
        let version = try checkedIoctl("KVM_GET_API_VERSION") { rtv_kvm_get_api_version(fd) }
        guard version == KVM_API_VERSION else { throw .unsupportedAPIVersion(version) }
        for capability in KVMCapability.required where try Self.checkExtension(fd, capability) <= 0 {
            throw .missingCapability(capability)
        }
        vcpuRunAreaSize = Int(try checkedIoctl("KVM_GET_VCPU_MMAP_SIZE") { rtv_kvm_get_vcpu_mmap_size(fd) })
        try kickSignal.install()
        self.kickSignal = kickSignal
    }

    private static func checkExtension(_ fd: Int32, _ capability: KVMCapability) throws(KVMError) -> Int32 {
        try checkedIoctl("KVM_CHECK_EXTENSION(\(capability))") { rtv_kvm_check_extension(fd, capability.number) }
    }

    /// `KVM_CHECK_EXTENSION`: 0 when absent, otherwise positive (some capabilities return a count).
    public func capabilityValue(_ capability: KVMCapability) -> Int {
        (try? Int(Self.checkExtension(descriptor.rawValue, capability))) ?? 0
    }

    /// Whether the capability is present.
    public func hasCapability(_ capability: KVMCapability) -> Bool { capabilityValue(capability) > 0 }

    /// The highest number of vCPUs a VM may have.
    public var maximumVCPUCount: Int {
        let maximum = capabilityValue(.maximumVCPUs)
        return maximum > 0 ? maximum : max(capabilityValue(.recommendedVCPUs), 4)
    }

    /// The CPUID leaves KVM can expose to a guest (`KVM_GET_SUPPORTED_CPUID`).
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        var capacity = 128
        while true {
            let entries: [CPUIDEntry]? = try withFlexibleArray(header: kvm_cpuid2.self, entry: kvm_cpuid_entry2.self, count: capacity) {
                (header, slots) throws(KVMError) in
                header.pointee.nent = UInt32(capacity)
                if rtv_kvm_get_supported_cpuid(descriptor.rawValue, header) == 0 {
                    return slots.prefix(Int(header.pointee.nent)).map(CPUIDEntry.init)
                }
                let code = errno
                guard code == E2BIG, capacity < 4096 else {
                    throw .ioctlFailed(operation: "KVM_GET_SUPPORTED_CPUID", errno: Errno(rawValue: code))
                }
                return nil
            }
            if let entries { return entries }
            capacity *= 2
        }
    }

    public func makeVirtualMachine() throws -> any VirtualMachine { try makeKVMVirtualMachine() }

    /// Creates a VM (`KVM_CREATE_VM`) with no memory and no vCPUs.
    public func makeKVMVirtualMachine() throws(KVMError) -> KVMVirtualMachine {
        try KVMVirtualMachine(system: self)
    }
}

/// One CPUID leaf as KVM describes it.
public struct CPUIDEntry: Equatable, Sendable {
    public var function: UInt32
    public var index: UInt32
    /// `KVM_CPUID_FLAG_*` bits (for example significant index).
    public var flags: UInt32
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

    /// An entry with every field given.
    public init(function: UInt32, index: UInt32, flags: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    init(_ entry: kvm_cpuid_entry2) {
        self.init(function: entry.function, index: entry.index, flags: entry.flags,
                  eax: entry.eax, ebx: entry.ebx, ecx: entry.ecx, edx: entry.edx)
    }

    var kernelEntry: kvm_cpuid_entry2 {
        var entry = kvm_cpuid_entry2()
        entry.function = function; entry.index = index; entry.flags = flags
        entry.eax = eax; entry.ebx = ebx; entry.ecx = ecx; entry.edx = edx
        return entry
    }
}
