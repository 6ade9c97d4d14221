import CKVMShim
import Glibc
import RTVirtCore
import Synchronization

/// A KVM virtual machine: owns the VM file descriptor and the guest memory registered with it.
///
/// Memory regions become KVM memory slots, numbered from 0 in the order they are added.
/// vCPUs keep their VM alive; the VM's descriptor and memory are released when the last
/// reference goes.
public final class KVMVirtualMachine: VirtualMachine {
    /// The KVM system this VM was created from.
    public let system: KVMSystem
    let descriptor: OwnedDescriptor
    /// The guest's memory, with bounds-checked access. Regions are added only through
    /// `addKVMMemory`, which registers each with KVM; no other way in exists.
    public var guestMemory: any GuestMemory { memoryMap }
    public var memory: any GuestMemory { memoryMap }
    /// The regions of guest memory (each a KVM memory slot), in the order they were added.
    public var memoryRegions: [GuestMemoryRegion] { memoryMap.regions }
    private let memoryMap = GuestMemoryMap()
    public let maximumVCPUCount: Int
    /// How many memory slots this VM may use: KVM's limit (`KVM_CAP_NR_MEMSLOTS`), capped at
    /// `GuestMemoryMap.maximumRegionCount`, since every slot is also a region of `guestMemory`.
    public let memorySlotLimit: Int

    private struct Bookkeeping {
        var nextSlot: UInt32 = 0
        /// Mappings whose KVM slot could not be unregistered after a failed add: kept mapped for
        /// the VM's lifetime so that no other host memory ever appears behind that slot.
        var strandedMappings: [AnonymousMemoryMapping] = []
        var createdVCPUs: Set<Int> = []
        var hasInterruptController = false
    }
    private let bookkeeping = LockedValue(Bookkeeping())
    /// The GSI routing table this backend installed (nil: KVM's default), kept so that routes
    /// can be added one at a time (`KVM_SET_GSI_ROUTING` replaces the whole table).
    let interruptRoutes = LockedValue<[KVMInterruptRoute]?>(nil)
    /// Whether a `KVM_RUN` of this VM has returned (so KVM has started its per-VM workers).
    let hasRun = Atomic<Bool>(false)

    /// The guest-physical address KVM may use for the real-mode TSS on Intel (3 pages below 4 GiB).
    public static let tssAddress: UInt = 0xfffb_d000

    init(system: KVMSystem) throws(KVMError) {
        self.system = system
        let fd = try checkedIoctl("KVM_CREATE_VM") { rtv_kvm_create_vm(system.descriptor.rawValue, 0) }
        descriptor = OwnedDescriptor(fd)
        maximumVCPUCount = system.maximumVCPUCount
        let slots = system.capabilityValue(.memorySlots)
        memorySlotLimit = min(slots > 0 ? slots : 32, GuestMemoryMap.maximumRegionCount)
        if system.hasCapability(.setTSSAddress) {
            _ = try checkedIoctl("KVM_SET_TSS_ADDR") { rtv_kvm_set_tss_addr(fd, Self.tssAddress) }
        }
    }

    public func addMemory(at base: GuestAddress, size: UInt64) throws { try addKVMMemory(at: base, size: size) }

    /// Maps `size` bytes of anonymous memory and registers it as a KVM memory slot at `base`.
    ///
    /// On any failure nothing is left behind: no KVM slot and no mapping (a slot that KVM
    /// accepted is unregistered again before its memory is unmapped).
    /// - Throws: `KVMError.invalidMemoryRegion` for unaligned, empty, overlapping or too many
    ///   regions (past `memorySlotLimit`; nothing is mapped then); `.ioctlFailed` when the kernel
    ///   refuses the slot.
    @discardableResult
    public func addKVMMemory(at base: GuestAddress, size: UInt64) throws(KVMError) -> GuestMemoryRegion {
        try bookkeeping.withLock { (book) throws(KVMError) -> GuestMemoryRegion in
            guard Int(book.nextSlot) < memorySlotLimit else {
                throw .invalidMemoryRegion(.tooManyRegions(limit: memorySlotLimit))
            }
            let region: GuestMemoryRegion
            do throws(MemoryLayoutError) {
                try GuestMemoryMap.validate(base: base, size: size, against: memoryMap.regions)
                region = GuestMemoryRegion(base: base, mapping: try AnonymousMemoryMapping(size: size))
            } catch {
                throw .invalidMemoryRegion(error)
            }
            var slot = kvm_userspace_memory_region()
            slot.slot = book.nextSlot
            slot.flags = 0
            slot.guest_phys_addr = base.rawValue
            slot.memory_size = size
            slot.userspace_addr = UInt64(UInt(bitPattern: region.mapping.pointer))
            _ = try checkedIoctl("KVM_SET_USER_MEMORY_REGION") {
                rtv_kvm_set_user_memory_region(descriptor.rawValue, &slot)
            }
            do throws(MemoryLayoutError) {
                try memoryMap.insert(region)
            } catch {
                // KVM already points the slot at this mapping: unregister it before the mapping
                // goes, or host memory mapped there later would become guest-visible.
                slot.memory_size = 0
                do {
                    _ = try checkedIoctl("KVM_SET_USER_MEMORY_REGION (removing a slot)") {
                        rtv_kvm_set_user_memory_region(descriptor.rawValue, &slot)
                    }
                } catch {
                    // The slot stays registered: keep its memory mapped and never reuse the slot.
                    book.strandedMappings.append(region.mapping)
                    book.nextSlot += 1
                }
                throw .invalidMemoryRegion(error)
            }
            book.nextSlot += 1
            return region
        }
    }

    /// Creates the in-kernel interrupt controllers (PIC, IOAPIC, and a LAPIC per vCPU created
    /// afterwards). Call before creating vCPUs.
    public func createInterruptController() throws(KVMError) {
        guard system.hasCapability(.irqchip) else { throw .missingCapability(.irqchip) }
        _ = try checkedIoctl("KVM_CREATE_IRQCHIP") { rtv_kvm_create_irqchip(descriptor.rawValue) }
        bookkeeping.withLock { $0.hasInterruptController = true }
    }

    /// Whether `createInterruptController()` succeeded.
    public var hasInterruptController: Bool { bookkeeping.withLock { $0.hasInterruptController } }

    public func makeVCPU(id: Int) throws -> any VirtualCPU { try makeKVMVCPU(id: id) }

    /// Creates vCPU `id` and maps its `kvm_run` area.
    ///
    /// KVM cannot delete a vCPU: once `KVM_CREATE_VCPU` succeeded the id stays taken even if
    /// mapping `kvm_run` then fails, and a later call for it throws `.vcpuIDOutOfRange`.
    /// - Throws: `KVMError.vcpuIDOutOfRange` for an id outside `0 ..< maximumVCPUCount` or one
    ///   already created (also when KVM reports it exists); `.runAreaMappingFailed`;
    ///   `.ioctlFailed` when the kernel refuses otherwise.
    public func makeKVMVCPU(id: Int) throws(KVMError) -> KVMVirtualCPU {
        try bookkeeping.withLock { (book) throws(KVMError) -> KVMVirtualCPU in
            guard id >= 0, id < maximumVCPUCount, !book.createdVCPUs.contains(id) else {
                throw .vcpuIDOutOfRange(id: id, limit: maximumVCPUCount)
            }
            let fd: Int32
            do throws(KVMError) {
                fd = try checkedIoctl("KVM_CREATE_VCPU") { rtv_kvm_create_vcpu(descriptor.rawValue, UInt(id)) }
            } catch .ioctlFailed(_, .fileExists) {
                book.createdVCPUs.insert(id)
                throw .vcpuIDOutOfRange(id: id, limit: maximumVCPUCount)
            }
            // KVM has the vCPU now, whatever happens next.
            book.createdVCPUs.insert(id)
            return try KVMVirtualCPU(vm: self, id: id, descriptor: OwnedDescriptor(fd))
        }
    }
}
