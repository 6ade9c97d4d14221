import KVMBackend
import RTVirtCore
import VMRPC
import LongPoll
import X86GuestSetup

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
        self.privilege = privilege ?? ([.halt, .cyclicInterrupt, .interruptibleSleep, .ringEcho].contains(mode) ? .kernel : .userWithIOPrivilege)
    }
}

/// Errors of the bundled guest's setup.
public enum BundledGuestError: Error, Equatable, Sendable {
    /// The layout has room for `maximum` vCPUs (and at least one is needed).
    case tooManyVCPUs(requested: Int, maximum: Int)
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
    /// - Throws: `BundledGuestError.tooManyVCPUs` beyond `GuestLayout.maximumVCPUs`, or the
    ///   KVM and memory errors of the steps.
    /// - Parameters:
    ///   - system: the open `/dev/kvm`.
    ///   - configurations: how each vCPU starts.
    ///   - memorySize: guest RAM at address 0.
    ///   - interruptController: create the in-kernel PIC, IOAPIC and LAPICs (needed by
    ///     `.cyclicInterrupt`; then `hlt` no longer exits to the VMM); the vCPUs are set runnable.
    public init(system: KVMSystem, vcpus configurations: [BundledGuestVCPU],
                memorySize: UInt64 = BundledGuestMachine.defaultMemorySize, interruptController: Bool = false) throws {
        guard (1...GuestLayout.maximumVCPUs).contains(configurations.count) else {
            throw BundledGuestError.tooManyVCPUs(requested: configurations.count, maximum: GuestLayout.maximumVCPUs)
        }
        let vm = try system.makeKVMVirtualMachine()
        try vm.addKVMMemory(at: GuestAddress(0), size: memorySize)
        if interruptController { try vm.createInterruptController() }
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
            try Self.enter(vcpu, id: id, vcpuCount: configurations.count, configuration, layout: layout)
            // With the in-kernel LAPIC, KVM holds every vCPU but the first until INIT/SIPI;
            // these vCPUs start directly in long mode.
            if interruptController { try vcpu.setMultiprocessingState(.runnable) }
            vcpus.append(vcpu)
        }
        let frequency = vcpus.first?.tscFrequencyKHz().map { $0 * 1000 } ?? GuestTSCMapping.measureHostTSCFrequency()
        tscMappings = try vcpus.map { try $0.tscMapping(frequencyHz: frequency) }
        self.vm = vm
        self.vcpus = vcpus
        self.layout = layout
        self.ports = BundledGuestPorts()
    }

    /// Sets vCPU `id` up to enter the image afresh in `configuration`'s mode, with its arguments.
    /// Call it only while the vCPU is stopped (no thread is in `KVM_RUN`), for example to run a
    /// mode again in the same VM after the guest exited: memory, TSC mapping and the in-kernel
    /// irqchip stay as they are. With the in-kernel irqchip the vCPU is made runnable again (a
    /// vCPU stopped while halted would otherwise stay halted until an interrupt came).
    public func reenter(vcpu id: Int, _ configuration: BundledGuestVCPU) throws {
        try Self.enter(vcpus[id], id: id, vcpuCount: vcpus.count, configuration, layout: layout)
        if vm.hasInterruptController { try vcpus[id].setMultiprocessingState(.runnable) }
    }

    private static func enter(_ vcpu: KVMVirtualCPU, id: Int, vcpuCount: Int, _ configuration: BundledGuestVCPU,
                              layout: X86LongModeLayout) throws {
        try vcpu.setSystemRegisters(X86LongMode.systemRegisters(
            layout, privilege: configuration.privilege, startingFrom: vcpu.systemRegisters()))
        try vcpu.setRegisters(X86LongMode.entryRegisters(
            entry: GuestLayout.imageAddress, stack: GuestLayout.stackPointer(forVCPU: id),
            privilege: configuration.privilege,
            arguments: [configuration.mode.rawValue, configuration.arguments.0, configuration.arguments.1,
                        slotLayout(vcpuCount: vcpuCount).address(ofVCPU: id)!.rawValue,
                        GuestLayout.dataBuffer(forVCPU: id).rawValue]))
    }

    /// Where the bundled guest's VMRPC slots are.
    public static func slotLayout(vcpuCount: Int) -> VMRPCSlotLayout {
        VMRPCSlotLayout(base: GuestLayout.rpcSlotsAddress, count: vcpuCount)
    }

    /// Each vCPU's TSC mapping from `KVMVirtualCPU.tscMapping`: the offset exactly from
    /// `KVM_VCPU_TSC_OFFSET` where the kernel has it, else sampled with its error bound, and
    /// the frequency from `KVM_GET_TSC_KHZ` (measured against CLOCK_MONOTONIC when KVM does
    /// not say). Read once before any vCPU runs: a vCPU ioctl waits while that vCPU is in `KVM_RUN`.
    public let tscMappings: [GuestTSCMapping]

    /// A VMRPC server for this guest's slots with the standard procedures (and `extra`);
    /// `earlyReleasePercentile` goes to `timer.sleepUntil`.
    public func makeVMRPCServer(dispatcher: LongPollDispatcher, extra: [VMRPCProcedure] = [],
                                limits: VMRPCLimits = VMRPCLimits(), earlyReleasePercentile: Double = 0.9) throws -> VMRPCServer {
        let clock = HostGuestClockSource(mappings: tscMappings)
        return try VMRPCServer(memory: vm.guestMemory, slots: Self.slotLayout(vcpuCount: vcpus.count), dispatcher: dispatcher,
                               procedures: VMRPCStandardProcedures.all(clock: clock, earlyReleasePercentile: earlyReleasePercentile) + extra,
                               limits: limits)
    }

    /// A bus with the guest's ports, the VMRPC doorbell (port and MMIO) and a bare-exit port
    /// that does nothing (the baseline of `rpc-bench`).
    public func makeBus(server: VMRPCServer) throws -> IOBus {
        var bus = try makeBus()
        try server.registerDoorbell(on: &bus, port: GuestLayout.doorbellPort, mmio: GuestLayout.mmioDoorbellAddress)
        try bus.register(IgnoredPort(), space: .port, base: UInt64(GuestLayout.bareExitPort), length: 1)
        return bus
    }

    /// Copies `count` signed values out of vCPU `id`'s data buffer.
    public func readSignedData(ofVCPU id: Int, count: Int) throws -> [Int64] {
        try readData(ofVCPU: id, count: count).map { Int64(bitPattern: $0) }
    }

    /// Copies `count` u64 values out of vCPU `id`'s data buffer.
    public func readData(ofVCPU id: Int, count: Int) throws -> [UInt64] {
        let bytes = try vm.guestMemory.readBytes(count: count * 8, at: GuestLayout.dataBuffer(forVCPU: id))
        return stride(from: 0, to: bytes.count, by: 8).map { offset in
            bytes[offset..<offset + 8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        }
    }

    /// A bus with the guest's ports on it, to which callers may add devices.
    public func makeBus() throws -> IOBus {
        var bus = IOBus()
        try bus.register(ports, space: .port, base: UInt64(GuestLayout.resultPort), length: 3)
        return bus
    }

    /// Starts every vCPU on its own thread over `bus` (default: `makeBus()`).
    public func start(bus: IOBus? = nil, dispatcher: LongPollDispatcher? = nil) throws -> VirtualMachineRunner {
        try VirtualMachineRunner(vcpus: vcpus, bus: bus ?? makeBus(), dispatcher: dispatcher)
    }
}

/// A port whose writes are ignored and whose reads return 0.
public final class IgnoredPort: BusDevice {
    /// An ignored port.
    public init() {}
    public func read(_ access: BusAccess) -> UInt64 { 0 }
    public func write(_ access: BusAccess, value: UInt64) -> BusWriteResult { .handled }
}

/// The host side of the bundled guest's `rpcSwitch` mode: `GuestLayout.countProcedure`, which
/// counts its calls per vCPU and answers the new count (u64). A call the host answered twice
/// would skip a count in the guest, one it lost would never be answered.
public final class BundledGuestCallCounter: Sendable {
    private let counts = LockedValue<[Int: UInt64]>([:])

    /// A counter at zero for every vCPU.
    public init() {}

    /// The procedure to give the VMRPC server (`makeVMRPCServer(extra:)`).
    public var procedure: VMRPCProcedure {
        VMRPCProcedure(id: GuestLayout.countProcedure, name: "bench.count", argumentLength: 0...0) { [counts] context, _ in
            let value = counts.withLock { counts -> UInt64 in
                counts[context.vcpuID, default: 0] += 1
                return counts[context.vcpuID]!
            }
            return .done(status: .ok, results: withUnsafeBytes(of: value.littleEndian, Array.init))
        }
    }

    /// The calls counted for `vcpu`.
    public func count(vcpu: Int) -> UInt64 { counts.withLock { $0[vcpu] ?? 0 } }
}
