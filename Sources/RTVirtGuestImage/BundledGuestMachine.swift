import KVMBackend
import RTVirtCore

/// How one vCPU of the bundled guest starts.
public struct BundledGuestVCPU: Sendable {
    /// What the guest does.
    public var mode: BundledGuestMode
    /// RSI and RDX at entry.
    public var arguments: (UInt64, UInt64)
    /// CPL 3 (native speed on nested hosts) or CPL 0 (needed for `hlt`).
    public var privilege: X86StartPrivilege

    /// A vCPU in `mode`; the privilege defaults to CPL 3 except for `.halt`.
    public init(mode: BundledGuestMode, arguments: (UInt64, UInt64) = (0, 0), privilege: X86StartPrivilege? = nil) {
        self.mode = mode
        self.arguments = arguments
        self.privilege = privilege ?? (mode == .halt ? .kernel : .userWithIOPrivilege)
    }
}

/// A KVM VM running the bundled guest: memory, long-mode tables, the image, one vCPU per
/// entry of `vcpus` set up to enter the image, and a bus with the guest's ports.
public final class BundledGuestMachine: Sendable {
    /// The default guest RAM: 16 MiB at guest address 0.
    public static let defaultMemorySize: UInt64 = 16 << 20

    /// The VM.
    public let vm: KVMVirtualMachine
    /// The vCPUs, in the order given.
    public let vcpus: [KVMVirtualCPU]
    /// The guest's ports (results, exit, input).
    public let ports: BundledGuestPorts
    /// The long-mode tables' layout.
    public let layout: X86LongModeLayout

    /// Builds the VM. `vcpus[i]` becomes vCPU id `i`.
    public init(system: KVMSystem, vcpus configurations: [BundledGuestVCPU],
                memorySize: UInt64 = BundledGuestMachine.defaultMemorySize) throws {
        let vm = try system.makeKVMVirtualMachine()
        try vm.addKVMMemory(at: GuestAddress(0), size: memorySize)
        let layout = X86LongModeLayout(
            gdt: GuestLayout.gdtAddress, tss: GuestLayout.tssAddress, idt: GuestLayout.idtAddress,
            pageTables: GuestLayout.pageTableAddress, kernelStackTop: GuestLayout.kernelStackTop)
        try X86LongMode.writeSystemTables(layout, into: vm.guestMemory)
        try FlatImage.load(BundledGuest.image, into: vm.guestMemory, at: GuestLayout.imageAddress)
        let cpuid = try system.supportedCPUID()
        var vcpus: [KVMVirtualCPU] = []
        for (id, configuration) in configurations.enumerated() {
            let vcpu = try vm.makeKVMVCPU(id: id)
            try vcpu.setCPUID(cpuid)
            try vcpu.setSystemRegisters(X86LongMode.systemRegisters(
                layout, privilege: configuration.privilege, startingFrom: vcpu.systemRegisters()))
            try vcpu.setRegisters(X86LongMode.entryRegisters(
                entry: GuestLayout.imageAddress, stack: GuestLayout.stackPointer(forVCPU: id),
                privilege: configuration.privilege,
                arguments: [configuration.mode.rawValue, configuration.arguments.0, configuration.arguments.1]))
            vcpus.append(vcpu)
        }
        self.vm = vm
        self.vcpus = vcpus
        self.layout = layout
        self.ports = BundledGuestPorts()
    }

    /// A bus with the guest's ports on it, to which callers may add devices.
    public func makeBus() throws -> IOBus {
        var bus = IOBus()
        try bus.register(ports, space: .port, base: UInt64(GuestLayout.resultPort), length: 3)
        return bus
    }

    /// Starts every vCPU on its own thread over `bus` (default: `makeBus()`).
    public func start(bus: IOBus? = nil) throws -> VirtualMachineRunner {
        try VirtualMachineRunner(vcpus: vcpus, bus: bus ?? makeBus())
    }
}
