import CKVMShim
import Glibc
import RTVirtCore
import SystemPackage

/// A vCPU's multiprocessing state (`KVM_GET_MP_STATE` / `KVM_SET_MP_STATE`).
///
/// With the in-kernel LAPIC, KVM keeps every vCPU but the first in `.uninitialized` (waiting
/// for INIT and SIPI, as a real application processor does), so such a vCPU never enters the
/// guest. A VMM that starts its vCPUs directly in long mode sets them `.runnable`.
public enum KVMMultiprocessingState: Equatable, Sendable {
    /// Runs.
    case runnable
    /// Waits for INIT (an application processor at reset).
    case uninitialized
    /// Got INIT, waits for SIPI.
    case initReceived
    /// Halted, waiting for an interrupt.
    case halted
    /// Got SIPI.
    case sipiReceived
    /// A state this backend does not name (the kernel's number).
    case other(UInt32)

    init(kernelValue: UInt32) {
        switch kernelValue {
        case UInt32(RTV_MP_STATE_RUNNABLE.rawValue): self = .runnable
        case UInt32(RTV_MP_STATE_UNINITIALIZED.rawValue): self = .uninitialized
        case UInt32(RTV_MP_STATE_INIT_RECEIVED.rawValue): self = .initReceived
        case UInt32(RTV_MP_STATE_HALTED.rawValue): self = .halted
        case UInt32(RTV_MP_STATE_SIPI_RECEIVED.rawValue): self = .sipiReceived
        default: self = .other(kernelValue)
        }
    }

    var kernelValue: UInt32 {
        switch self {
        case .runnable: return UInt32(RTV_MP_STATE_RUNNABLE.rawValue)
        case .uninitialized: return UInt32(RTV_MP_STATE_UNINITIALIZED.rawValue)
        case .initReceived: return UInt32(RTV_MP_STATE_INIT_RECEIVED.rawValue)
        case .halted: return UInt32(RTV_MP_STATE_HALTED.rawValue)
        case .sipiReceived: return UInt32(RTV_MP_STATE_SIPI_RECEIVED.rawValue)
        case .other(let value): return value
        }
    }
}

extension KVMVirtualCPU {
    /// The vCPU's multiprocessing state. Like every vCPU ioctl it waits while the vCPU is in
    /// `KVM_RUN` on another thread.
    public func multiprocessingState() throws(KVMError) -> KVMMultiprocessingState {
        var state = kvm_mp_state()
        _ = try checkedIoctl("KVM_GET_MP_STATE") { rtv_kvm_get_mp_state(descriptor.rawValue, &state) }
        return KVMMultiprocessingState(kernelValue: state.mp_state)
    }

    /// Sets the multiprocessing state; `.runnable` lets an application processor of a VM with
    /// the in-kernel LAPIC run without INIT/SIPI. Call before the vCPU runs.
    public func setMultiprocessingState(_ newState: KVMMultiprocessingState) throws(KVMError) {
        guard vm.system.hasCapability(.multiprocessingState) else { throw .missingCapability(.multiprocessingState) }
        var state = kvm_mp_state(mp_state: newState.kernelValue)
        _ = try checkedIoctl("KVM_SET_MP_STATE") { rtv_kvm_set_mp_state(descriptor.rawValue, &state) }
    }

    /// Queues external interrupt `vector` for the vCPU (`KVM_INTERRUPT`). Only for VMs without
    /// the in-kernel interrupt controller (with it, use `KVMVirtualMachine.signalMSI` or an
    /// interrupt line). Call from the vCPU's own thread between runs.
    public func injectExternalInterrupt(vector: UInt8) throws(KVMError) {
        guard !vm.hasInterruptController else {
            throw .ioctlFailed(operation: "KVM_INTERRUPT (the VM has an in-kernel LAPIC)", errno: .invalidArgument)
        }
        _ = try checkedIoctl("KVM_INTERRUPT") { rtv_kvm_interrupt(descriptor.rawValue, UInt32(vector)) }
    }
}

extension KVMVirtualMachine {
    /// Sends a message-signalled interrupt (`KVM_SIGNAL_MSI`), for example to a LAPIC:
    /// `x86LocalAPICMessage(apicID:vector:)`. Needs the in-kernel interrupt controller.
    /// Returns whether a vCPU took it (false: the guest masked it or no LAPIC matched).
    @discardableResult
    public func signalMSI(address: UInt64, data: UInt32) throws(KVMError) -> Bool {
        guard hasInterruptController else { throw .missingCapability(.irqchip) }
        guard system.hasCapability(.signalMSI) else { throw .missingCapability(.signalMSI) }
        return try checkedIoctl("KVM_SIGNAL_MSI") { rtv_kvm_signal_msi(descriptor.rawValue, address, data) } > 0
    }

    /// Sends fixed-delivery, edge-triggered interrupt `vector` to the LAPIC with `apicID` (the
    /// vCPU id, as KVM numbers LAPICs), through an MSI.
    @discardableResult
    public func signalLocalAPICInterrupt(apicID: UInt8, vector: UInt8) throws(KVMError) -> Bool {
        let message = X86MSIMessage.localAPIC(apicID: apicID, vector: vector)
        return try signalMSI(address: message.address, data: message.data)
    }

    /// Raises (`active`) or lowers an interrupt line of the in-kernel PIC/IOAPIC (`KVM_IRQ_LINE`).
    public func setInterruptLine(_ gsi: UInt32, active: Bool) throws(KVMError) {
        guard hasInterruptController else { throw .missingCapability(.irqchip) }
        _ = try checkedIoctl("KVM_IRQ_LINE") { rtv_kvm_irq_line(descriptor.rawValue, gsi, active ? 1 : 0) }
    }

    /// Connects a new eventfd to interrupt line `gsi` (`KVM_IRQFD`): each `signal()` of the
    /// returned notifier injects the interrupt without a system call into the VMM's vCPU
    /// threads. The connection ends when the returned value goes away.
    public func connectInterruptLine(_ gsi: UInt32) throws(KVMError) -> KVMInterruptEventFD {
        guard hasInterruptController else { throw .missingCapability(.irqchip) }
        guard system.hasCapability(.irqfd) else { throw .missingCapability(.irqfd) }
        let notifier: EventNotifier
        do { notifier = try EventNotifier() } catch { throw .ioctlFailed(operation: "eventfd", errno: error) }
        _ = try checkedIoctl("KVM_IRQFD") { rtv_kvm_irqfd_assign(descriptor.rawValue, notifier.fd, gsi, 0) }
        return KVMInterruptEventFD(vm: self, gsi: gsi, notifier: notifier)
    }
}

/// An x86 MSI: the address and data a device writes to interrupt a LAPIC.
public struct X86MSIMessage: Equatable, Sendable {
    /// The MSI address (0xFEE0_0000 with the destination).
    public var address: UInt64
    /// The MSI data (vector, delivery mode, trigger).
    public var data: UInt32

    /// A fixed, edge-triggered interrupt `vector` for physical destination `apicID`.
    public static func localAPIC(apicID: UInt8, vector: UInt8) -> X86MSIMessage {
        X86MSIMessage(address: 0xFEE0_0000 | UInt64(apicID) << 12, data: UInt32(vector))
    }
}

/// An eventfd connected to a VM interrupt line with `KVM_IRQFD`; disconnects on deinit.
public final class KVMInterruptEventFD: Sendable {
    /// The VM.
    public let vm: KVMVirtualMachine
    /// The interrupt line.
    public let gsi: UInt32
    private let notifier: EventNotifier

    init(vm: KVMVirtualMachine, gsi: UInt32, notifier: EventNotifier) {
        self.vm = vm; self.gsi = gsi; self.notifier = notifier
    }

    deinit { _ = rtv_kvm_irqfd_assign(vm.descriptor.rawValue, notifier.fd, gsi, 1) }

    /// Injects the interrupt (edge: one per signal).
    public func signal() { notifier.signal() }
}

/// One entry of a VM's GSI routing table (`KVM_SET_GSI_ROUTING`): what raising global system
/// interrupt `gsi` (with `KVM_IRQ_LINE` or an irqfd) does.
public enum KVMInterruptRoute: Equatable, Sendable {
    /// A pin of an in-kernel interrupt controller: `chip` 0 (master PIC), 1 (slave PIC) or 2 (IOAPIC).
    case interruptController(gsi: UInt32, chip: UInt32, pin: UInt32)
    /// A message-signalled interrupt, straight to a LAPIC (the way virtio-pci's MSI-X vectors
    /// reach a guest with vhost: an irqfd whose GSI routes to an MSI).
    case msi(gsi: UInt32, message: X86MSIMessage)

    /// The GSI.
    public var gsi: UInt32 {
        switch self {
        case .interruptController(let gsi, _, _), .msi(let gsi, _): return gsi
        }
    }

    /// KVM's default x86 table after `KVM_CREATE_IRQCHIP`: GSIs 0-15 to the PICs (pin gsi mod
    /// 8) and 0-23 to the IOAPIC pins of the same number. A table that adds routes keeps these,
    /// so that the legacy lines keep working.
    public static let defaultX86: [KVMInterruptRoute] = (UInt32(0)..<24).flatMap { gsi -> [KVMInterruptRoute] in
        let ioapic = KVMInterruptRoute.interruptController(gsi: gsi, chip: 2, pin: gsi)
        guard gsi < 16 else { return [ioapic] }
        return [ioapic, .interruptController(gsi: gsi, chip: gsi < 8 ? 0 : 1, pin: gsi % 8)]
    }

    /// The first GSI past the default table's, where `connectMSI` allocates.
    public static let firstFreeGSI: UInt32 = 24
}

extension KVMVirtualMachine {
    /// Replaces the VM's GSI routing table (`KVM_SET_GSI_ROUTING`). Include
    /// `KVMInterruptRoute.defaultX86` to keep the legacy lines. Needs the in-kernel interrupt
    /// controller.
    public func setInterruptRoutes(_ routes: [KVMInterruptRoute]) throws(KVMError) {
        guard hasInterruptController else { throw .missingCapability(.irqchip) }
        guard system.hasCapability(.irqRouting) else { throw .missingCapability(.irqRouting) }
        try interruptRoutes.withLock { (installed) throws(KVMError) in
            try Self.install(routes, on: descriptor.rawValue)
            installed = routes
        }
    }

    private static func install(_ routes: [KVMInterruptRoute], on fd: Int32) throws(KVMError) {
        let raw = routes.map { route -> rtv_kvm_route in
            switch route {
            case let .interruptController(gsi, chip, pin):
                return rtv_kvm_route(gsi: gsi, is_msi: 0, chip: chip, pin: pin, msi_address: 0, msi_data: 0, reserved: 0)
            case let .msi(gsi, message):
                return rtv_kvm_route(gsi: gsi, is_msi: 1, chip: 0, pin: 0, msi_address: message.address, msi_data: message.data, reserved: 0)
            }
        }
        // Sound: the C function reads `count` entries of the array during the call only.
        _ = try checkedIoctl("KVM_SET_GSI_ROUTING") { raw.withUnsafeBufferPointer { rtv_kvm_set_gsi_routing(fd, $0.baseAddress, UInt32($0.count)) } }
    }

    /// Routes a new GSI (from `KVMInterruptRoute.firstFreeGSI` on) to `message` and connects an
    /// eventfd to it (`KVM_SET_GSI_ROUTING` then `KVM_IRQFD`): each `signal()` of the result
    /// delivers the MSI to its LAPIC from the kernel's eventfd wake-up, with no ioctl and no exit
    /// on the VMM's side — virtio-pci's MSI-X vector with vhost, in miniature. The route stays
    /// installed after the eventfd is disconnected. If the eventfd cannot be created or
    /// connected, the previous routing table is put back. Needs the in-kernel interrupt controller.
    public func connectMSI(_ message: X86MSIMessage) throws(KVMError) -> KVMInterruptEventFD {
        guard hasInterruptController else { throw .missingCapability(.irqchip) }
        guard system.hasCapability(.irqRouting) else { throw .missingCapability(.irqRouting) }
        guard system.hasCapability(.irqfd) else { throw .missingCapability(.irqfd) }
        // Under the routes lock throughout, so that a rollback cannot drop another caller's route.
        return try interruptRoutes.withLock { (installed) throws(KVMError) -> KVMInterruptEventFD in
            let table = installed ?? KVMInterruptRoute.defaultX86
            let gsi = max(KVMInterruptRoute.firstFreeGSI, (table.map(\.gsi).max() ?? 0) + 1)
            let updated = table + [.msi(gsi: gsi, message: message)]
            try Self.install(updated, on: descriptor.rawValue)
            do throws(KVMError) {
                let connection = try connectInterruptLine(gsi)
                installed = updated
                return connection
            } catch let connectFailure {
                do throws(KVMError) {
                    try Self.install(table, on: descriptor.rawValue)
                } catch {
                    installed = updated // the kernel still has the new route
                }
                throw connectFailure
            }
        }
    }

    /// The routing table this backend installed, or nil while KVM's default is in force.
    public var installedInterruptRoutes: [KVMInterruptRoute]? { interruptRoutes.withLock { $0 } }
}
