import CKVMShim

/// KVM capabilities this backend uses (`KVM_CHECK_EXTENSION`).
public enum KVMCapability: Int, CaseIterable, Sendable, CustomStringConvertible {
    case userMemory
    case immediateExit
    case irqchip
    case pit2
    case setTSSAddress
    case extendedCPUID
    case ioeventfd
    case irqfd
    case tscDeadlineTimer
    case getTSCKHz
    case recommendedVCPUs
    case maximumVCPUs
    case memorySlots
    case multiprocessingState
    case signalMSI
    case vcpuAttributes
    case irqRouting

    /// The kernel's number for it.
    var number: Int {
        let value: rtv_kvm_capability
        switch self {
        case .userMemory: value = RTV_CAP_USER_MEMORY
        case .immediateExit: value = RTV_CAP_IMMEDIATE_EXIT
        case .irqchip: value = RTV_CAP_IRQCHIP
        case .pit2: value = RTV_CAP_PIT2
        case .setTSSAddress: value = RTV_CAP_SET_TSS_ADDR
        case .extendedCPUID: value = RTV_CAP_EXT_CPUID
        case .ioeventfd: value = RTV_CAP_IOEVENTFD
        case .irqfd: value = RTV_CAP_IRQFD
        case .tscDeadlineTimer: value = RTV_CAP_TSC_DEADLINE_TIMER
        case .getTSCKHz: value = RTV_CAP_GET_TSC_KHZ
        case .recommendedVCPUs: value = RTV_CAP_NR_VCPUS
        case .maximumVCPUs: value = RTV_CAP_MAX_VCPUS
        case .memorySlots: value = RTV_CAP_NR_MEMSLOTS
        case .multiprocessingState: value = RTV_CAP_MP_STATE
        case .signalMSI: value = RTV_CAP_SIGNAL_MSI
        case .vcpuAttributes: value = RTV_CAP_VCPU_ATTRIBUTES
        case .irqRouting: value = RTV_CAP_IRQ_ROUTING
        }
        return Int(value.rawValue)
    }

    /// The kernel's name, for example `KVM_CAP_IMMEDIATE_EXIT`.
    public var description: String {
        switch self {
        case .userMemory: return "KVM_CAP_USER_MEMORY"
        case .immediateExit: return "KVM_CAP_IMMEDIATE_EXIT"
        case .irqchip: return "KVM_CAP_IRQCHIP"
        case .pit2: return "KVM_CAP_PIT2"
        case .setTSSAddress: return "KVM_CAP_SET_TSS_ADDR"
        case .extendedCPUID: return "KVM_CAP_EXT_CPUID"
        case .ioeventfd: return "KVM_CAP_IOEVENTFD"
        case .irqfd: return "KVM_CAP_IRQFD"
        case .tscDeadlineTimer: return "KVM_CAP_TSC_DEADLINE_TIMER"
        case .getTSCKHz: return "KVM_CAP_GET_TSC_KHZ"
        case .recommendedVCPUs: return "KVM_CAP_NR_VCPUS"
        case .maximumVCPUs: return "KVM_CAP_MAX_VCPUS"
        case .memorySlots: return "KVM_CAP_NR_MEMSLOTS"
        case .multiprocessingState: return "KVM_CAP_MP_STATE"
        case .signalMSI: return "KVM_CAP_SIGNAL_MSI"
        case .vcpuAttributes: return "KVM_CAP_VCPU_ATTRIBUTES"
        case .irqRouting: return "KVM_CAP_IRQ_ROUTING"
        }
    }

    /// Capabilities without which `KVMSystem` refuses to start.
    public static let required: [KVMCapability] = [.userMemory, .immediateExit, .extendedCPUID]
}
