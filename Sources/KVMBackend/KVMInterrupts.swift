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
