import CKVMShim
import Glibc
@testable import KVMBackend
import RTVirtCore
import XCTest
import RTVirtXCTestSupport

/// Failures part-way through a KVM call sequence must leave nothing registered with KVM.
final class CleanupOnFailureTests: XCTestCase {
    /// Registers (or, with `size` 0, removes) KVM memory slot `slot` directly, bypassing the
    /// backend's bookkeeping. Returns 0 or the errno.
    private func setSlot(_ vm: KVMVirtualMachine, slot: UInt32, base: UInt64, size: UInt64, host: UnsafeMutableRawPointer) -> Int32 {
        var region = kvm_userspace_memory_region(
            slot: slot, flags: 0, guest_phys_addr: base, memory_size: size, userspace_addr: UInt64(UInt(bitPattern: host)))
        // Sound: the kernel reads the structure during the call only.
        return rtv_kvm_set_user_memory_region(vm.descriptor.rawValue, &region) == 0 ? 0 : errno
    }

    func testMemoryPastTheRegionLimitIsRejectedAndLeavesNoSlotBehind() throws {
        let kvm = try openKVMOrSkip()
        let vm = try kvm.makeKVMVirtualMachine()
        let kvmSlots = kvm.capabilityValue(.memorySlots)
        let limit = min(kvmSlots > 0 ? kvmSlots : 32, GuestMemoryMap.maximumRegionCount)
        let page = hostPageSize
        for index in 0..<limit { try vm.addKVMMemory(at: GuestAddress(UInt64(index) * page), size: page) }
        let past = UInt64(limit) * page
        XCTAssertThrowsError(try vm.addKVMMemory(at: GuestAddress(past), size: page)) { error in
            XCTAssertEqual(error as? KVMError, .invalidMemoryRegion(.tooManyRegions(limit: limit)))
        }
        XCTAssertEqual(vm.memoryRegions.count, limit)

        // The memory that was added still works.
        try vm.guestMemory.write(UInt64(0x1122_3344_5566_7788), at: GuestAddress(8))
        try vm.guestMemory.write(UInt64(0x8877_6655_4433_2211), at: GuestAddress(past - 8))
        XCTAssertEqual(try vm.guestMemory.read(UInt64.self, at: GuestAddress(8)), 0x1122_3344_5566_7788)
        XCTAssertEqual(try vm.guestMemory.read(UInt64.self, at: GuestAddress(past - 8)), 0x8877_6655_4433_2211)

        // KVM refuses a slot that overlaps another one (EEXIST). So a slot of our own at the
        // rejected range registers only if the rejected add left no KVM slot there (one that
        // would point at host memory the backend has unmapped). Needs a slot number KVM
        // accepts beyond the backend's limit; without one, the backend never reaches KVM's limit.
        guard kvmSlots > limit + 1 else { return }
        let probe = try AnonymousMemoryMapping(size: page)
        let probeSlot = UInt32(kvmSlots - 1)
        let result = setSlot(vm, slot: probeSlot, base: past, size: page, host: probe.pointer)
        XCTAssertEqual(result, 0, "a KVM slot still covers the rejected range: errno \(result)")
        if result == 0 { XCTAssertEqual(setSlot(vm, slot: probeSlot, base: past, size: 0, host: probe.pointer), 0) }
        withExtendedLifetime(probe) {}
    }
}

extension CleanupOnFailureTests {
    /// A vCPU that KVM has but the backend did not record (as after `KVM_CREATE_VCPU`
    /// succeeded and mapping its `kvm_run` area failed) is reported as already created.
    func testAVCPUThatKVMAlreadyHasIsReportedAsAlreadyCreated() throws {
        let vm = try openKVMOrSkip().makeKVMVirtualMachine()
        let fd = rtv_kvm_create_vcpu(vm.descriptor.rawValue, 1)
        XCTAssertGreaterThanOrEqual(fd, 0, "KVM_CREATE_VCPU: errno \(errno)")
        if fd >= 0 { close(fd) } // KVM keeps the vCPU until the VM goes
        XCTAssertThrowsError(try vm.makeKVMVCPU(id: 1)) { error in
            XCTAssertEqual(error as? KVMError, .vcpuIDOutOfRange(id: 1, limit: vm.maximumVCPUCount))
        }
        XCTAssertThrowsError(try vm.makeKVMVCPU(id: 1)) { error in
            XCTAssertEqual(error as? KVMError, .vcpuIDOutOfRange(id: 1, limit: vm.maximumVCPUCount))
        }
        XCTAssertNoThrow(try vm.makeKVMVCPU(id: 0), "other ids are unaffected")
    }
}

private struct DescriptorLimitSetupFailed: Error {
    var call: String
    var errno: Int32
}

extension CleanupOnFailureTests {
    /// Runs `body` while this process can open no further descriptor: the soft
    /// `RLIMIT_NOFILE` is lowered to the lowest free descriptor number (XCTest runs one test at
    /// a time, and the window is one call long), and restored afterwards.
    private func withoutFreeDescriptors<R>(_ body: () throws -> R) throws -> R {
        var saved = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved) == 0 else { throw DescriptorLimitSetupFailed(call: "getrlimit", errno: errno) }
        let lowestFree = open("/dev/null", O_RDONLY)
        guard lowestFree >= 0 else { throw DescriptorLimitSetupFailed(call: "open /dev/null", errno: errno) }
        close(lowestFree)
        var lowered = saved
        lowered.rlim_cur = rlim_t(lowestFree)
        guard setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &lowered) == 0 else { throw DescriptorLimitSetupFailed(call: "setrlimit", errno: errno) }
        defer { _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &saved) }
        return try body()
    }

    func testAFailedMSIConnectionLeavesTheRoutingTableAsItWas() throws {
        let kvm = try openKVMOrSkip()
        for capability in [KVMCapability.irqchip, .irqRouting, .irqfd] where !kvm.hasCapability(capability) {
            throw unavailable("this kernel's KVM lacks \(capability)")
        }
        let vm = try kvm.makeKVMVirtualMachine()
        try vm.createInterruptController()
        let message = X86MSIMessage.localAPIC(apicID: 0, vector: 0x40)
        // eventfd cannot be created: KVM_SET_GSI_ROUTING has run, connecting the line fails.
        let failure = try withoutFreeDescriptors { () -> (any Error)? in
            do { _ = try vm.connectMSI(message); return nil } catch { return error }
        }
        XCTAssertEqual(failure as? KVMError, .ioctlFailed(operation: "eventfd", errno: .tooManyOpenFiles))
        XCTAssertNil(vm.installedInterruptRoutes, "the failed route must be rolled back")
        let connection = try vm.connectMSI(message)
        XCTAssertEqual(connection.gsi, KVMInterruptRoute.firstFreeGSI, "the failed GSI is free again")
        XCTAssertEqual(vm.installedInterruptRoutes, KVMInterruptRoute.defaultX86 + [.msi(gsi: connection.gsi, message: message)])
    }
}
