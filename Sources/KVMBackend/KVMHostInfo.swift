import RTVirtCore

/// Which kernel module backs `/dev/kvm`.
public enum KVMModule: String, Codable, Sendable {
    /// Intel VT-x.
    case intel = "kvm_intel"
    /// AMD SVM.
    case amd = "kvm_amd"
    /// Pagetable-based Virtual Machine: KVM without hardware virtualization, used when the
    /// host is itself a guest. Guest CPL 3 code runs natively; CPL 0 code is emulated.
    case pvm = "kvm_pvm"
    /// No known backend module found.
    case unknown = "unknown"

    /// What the module means for measurements, in one sentence. The figures in it are typical
    /// for the module, not measured on this host (`rtvirt rpc-bench` measures the exit cost here).
    public var implication: String {
        switch self {
        case .intel, .amd:
            return "hardware virtualization: exits typically cost on the order of 1 µs with this module "
                + "(a typical figure, not measured here; rtvirt rpc-bench measures it)"
        case .pvm:
            return "nested (kvm_pvm): guest CPL 3 runs natively, CPL 0 is emulated; typical for this module, "
                + "not measured here: ~0.7 µs per emulated instruction and ~7-20 µs per exit (rtvirt rpc-bench "
                + "measures the exit cost); absolute numbers are higher than on bare-metal KVM"
        case .unknown:
            return "the KVM backend module could not be identified"
        }
    }
}

/// The state of KVM on this host: whether `/dev/kvm` opens, which module backs it, the
/// capabilities RTVirt uses, and the module parameters that affect latency.
public struct KVMHostInfo: Codable, Equatable, Sendable {
    /// Whether `/dev/kvm` opened and passed the API and capability checks.
    public var available: Bool
    /// Why not, when it did not.
    public var error: String?
    /// The backend module.
    public var module: KVMModule
    /// Whether guests run nested (the backend is `kvm_pvm`).
    public var nested: Bool
    /// `KVM_GET_API_VERSION`.
    public var apiVersion: Int?
    /// Capability name → `KVM_CHECK_EXTENSION` value (0 absent).
    public var capabilities: [String: Int]
    /// Selected `kvm` module parameters: `halt_poll_ns`, `lapic_timer_advance`, `min_timer_period_us`,
    /// and `nx_huge_pages` / `nx_huge_pages_recovery_ratio`, which govern the per-VM
    /// `kvm-nx-lpage-recovery` worker that KVM starts at a VM's first `KVM_RUN`.
    public var parameters: [String: String]
    /// Highest vCPU count per VM.
    public var maximumVCPUs: Int?
    /// How RTVirt reads a vCPU's guest TSC offset here: exactly from the kernel
    /// (`KVM_VCPU_TSC_OFFSET`), or sampled with an error bound (probed on a scratch vCPU).
    public var tscOffsetMethod: TSCOffsetMethod?

    /// The `kvm` module parameters `inspect` reports.
    public static let parameterNames = [
        "halt_poll_ns", "lapic_timer_advance", "min_timer_period_us", "nx_huge_pages", "nx_huge_pages_recovery_ratio",
    ]

    /// The module backing KVM, from `/sys/module`.
    public static func detectModule(files: HostFiles = HostFiles()) -> KVMModule {
        for module in [KVMModule.intel, .amd, .pvm] where files.exists("/sys/module/\(module.rawValue)") {
            return module
        }
        return .unknown
    }

    /// Inspects the host, opening `/dev/kvm` (at `path`) for the capability checks.
    public static func inspect(path: String = KVMSystem.defaultPath, files: HostFiles = HostFiles()) -> KVMHostInfo {
        let module = detectModule(files: files)
        var parameters: [String: String] = [:]
        for name in parameterNames {
            if let value = files.readLine("/sys/module/kvm/parameters/\(name)") { parameters[name] = value }
        }
        var info = KVMHostInfo(available: false, error: nil, module: module, nested: module == .pvm,
                               apiVersion: nil, capabilities: [:], parameters: parameters, maximumVCPUs: nil, tscOffsetMethod: nil)
        do {
            let system = try KVMSystem(path: path)
            info.available = true
            info.apiVersion = 12
            for capability in KVMCapability.allCases {
                info.capabilities[capability.description] = system.capabilityValue(capability)
            }
            info.maximumVCPUs = system.maximumVCPUCount
            if let vcpu = try? system.makeKVMVirtualMachine().makeKVMVCPU(id: 0) {
                info.tscOffsetMethod = (try? vcpu.readTSCOffset(method: .kernelAttribute)) != nil ? .kernelAttribute : .msrSampling
            }
        } catch {
            info.error = "\(error)"
        }
        return info
    }
}
