import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import XCTest
import X86GuestSetup
import RTVirtXCTestSupport

final class InvalidInputTests: XCTestCase {
    func testMissingDeviceIsATypedError() {
        XCTAssertThrowsError(try KVMSystem(path: "/nonexistent/kvm")) { error in
            XCTAssertEqual(error as? KVMError, .deviceMissing(path: "/nonexistent/kvm"))
        }
    }

    func testAFileThatIsNotKVMIsRejected() {
        XCTAssertThrowsError(try KVMSystem(path: "/dev/null")) { error in
            guard case .ioctlFailed(let operation, _)? = error as? KVMError else {
                return XCTFail("expected ioctlFailed, got \(error)")
            }
            XCTAssertEqual(operation, "KVM_GET_API_VERSION")
        }
    }

    func testUnalignedMemorySlotIsRejected() throws {
        let vm = try openKVMOrSkip().makeKVMVirtualMachine()
        XCTAssertThrowsError(try vm.addKVMMemory(at: GuestAddress(0x800), size: 0x1000)) { error in
            XCTAssertEqual(error as? KVMError,
                           .invalidMemoryRegion(.unaligned(what: "guest address", value: 0x800, pageSize: hostPageSize)))
        }
        XCTAssertThrowsError(try vm.addKVMMemory(at: GuestAddress(0), size: 0x1234)) { error in
            XCTAssertEqual(error as? KVMError,
                           .invalidMemoryRegion(.unaligned(what: "size", value: 0x1234, pageSize: hostPageSize)))
        }
        XCTAssertThrowsError(try vm.addKVMMemory(at: GuestAddress(0), size: 0)) { error in
            XCTAssertEqual(error as? KVMError, .invalidMemoryRegion(.emptyRegion))
        }
        XCTAssertTrue(vm.memoryRegions.isEmpty, "a rejected region must leave nothing behind")
    }

    func testOverlappingMemorySlotIsRejected() throws {
        let vm = try openKVMOrSkip().makeKVMVirtualMachine()
        try vm.addKVMMemory(at: GuestAddress(0x10_0000), size: 0x10_0000)
        XCTAssertThrowsError(try vm.addKVMMemory(at: GuestAddress(0x1F_F000), size: 0x2000)) { error in
            XCTAssertEqual(error as? KVMError, .invalidMemoryRegion(.overlapping(
                base: GuestAddress(0x1F_F000), size: 0x2000,
                existingBase: GuestAddress(0x10_0000), existingSize: 0x10_0000)))
        }
        // Adjacent is fine.
        XCTAssertNoThrow(try vm.addKVMMemory(at: GuestAddress(0x20_0000), size: 0x1000))
        XCTAssertEqual(vm.memoryRegions.count, 2)
    }

    func testVCPUIDOutOfRangeOrDuplicatedIsRejected() throws {
        let vm = try openKVMOrSkip().makeKVMVirtualMachine()
        for id in [-1, vm.maximumVCPUCount] {
            XCTAssertThrowsError(try vm.makeKVMVCPU(id: id)) { error in
                XCTAssertEqual(error as? KVMError, .vcpuIDOutOfRange(id: id, limit: vm.maximumVCPUCount))
            }
        }
        _ = try vm.makeKVMVCPU(id: 0)
        XCTAssertThrowsError(try vm.makeKVMVCPU(id: 0))
    }

    func testGuestAddressOutOfBoundsIsRejected() throws {
        let vm = try openKVMOrSkip().makeKVMVirtualMachine()
        try vm.addKVMMemory(at: GuestAddress(0), size: 0x10000)
        XCTAssertThrowsError(try vm.guestMemory.read(UInt64.self, at: GuestAddress(0xFFFC))) { error in
            XCTAssertEqual(error as? GuestMemoryError, .outOfBounds(address: GuestAddress(0xFFFC), length: 8))
        }
        XCTAssertThrowsError(try vm.guestMemory.write(UInt8(1), at: GuestAddress(UInt64.max))) { error in
            XCTAssertEqual(error as? GuestMemoryError, .outOfBounds(address: GuestAddress(UInt64.max), length: 1))
        }
        try vm.guestMemory.write(UInt32(0xAABB_CCDD), at: GuestAddress(0xFFFC))
        XCTAssertEqual(try vm.guestMemory.read(UInt32.self, at: GuestAddress(0xFFFC)), 0xAABB_CCDD)
    }

    func testImageLargerThanMemoryIsRejected() throws {
        let vm = try openKVMOrSkip().makeKVMVirtualMachine()
        try vm.addKVMMemory(at: GuestAddress(0), size: 0x2000)
        let image = [UInt8](repeating: 0x90, count: 0x1001)
        XCTAssertThrowsError(try FlatImage.load(image, into: vm.guestMemory, at: GuestAddress(0x1000))) { error in
            XCTAssertEqual(error as? FlatImageError, .doesNotFit(imageSize: 0x1001, address: GuestAddress(0x1000)))
        }
        XCTAssertThrowsError(try FlatImage.load([], into: vm.guestMemory, at: GuestAddress(0))) { error in
            XCTAssertEqual(error as? FlatImageError, .empty)
        }
        XCTAssertEqual(try FlatImage.load(Array(image.dropLast()), into: vm.guestMemory, at: GuestAddress(0x1000)), 0x1000...0x1FFF)
    }

    func testCompletingAReadWithoutAPendingReadIsATypedError() throws {
        let kvm = try openKVMOrSkip()
        let machine = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .compute, arguments: (1, 1))])
        XCTAssertThrowsError(try machine.vcpus[0].completePortIn(1)) { error in
            XCTAssertEqual(error as? KVMError, .noPendingRead("port-in"))
        }
        XCTAssertThrowsError(try machine.vcpus[0].completeMMIORead(1))
    }
}

final class KVMHostInfoTests: XCTestCase {
    func testModuleDetectionFromSysfs() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-kvm-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        XCTAssertEqual(KVMHostInfo.detectModule(files: HostFiles(root: root)), .unknown)
        try FileManager.default.createDirectory(atPath: root + "/sys/module/kvm_pvm", withIntermediateDirectories: true)
        XCTAssertEqual(KVMHostInfo.detectModule(files: HostFiles(root: root)), .pvm)
        XCTAssertTrue(KVMModule.pvm.implication.contains("nested"))
        for module in [KVMModule.pvm, .intel, .amd] {
            XCTAssertTrue(module.implication.contains("not measured here"), "fixed figures are labelled typical: \(module)")
        }
    }

    func testInspectReadsTheNXHugePageParameters() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-kvm-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        let parameters = root + "/sys/module/kvm/parameters"
        try FileManager.default.createDirectory(atPath: parameters, withIntermediateDirectories: true)
        try "N\n".write(toFile: parameters + "/nx_huge_pages", atomically: true, encoding: .utf8)
        try "60\n".write(toFile: parameters + "/nx_huge_pages_recovery_ratio", atomically: true, encoding: .utf8)
        let info = KVMHostInfo.inspect(path: "/nonexistent/kvm", files: HostFiles(root: root))
        XCTAssertEqual(info.parameters["nx_huge_pages"], "N")
        XCTAssertEqual(info.parameters["nx_huge_pages_recovery_ratio"], "60")
        XCTAssertNil(info.parameters["halt_poll_ns"], "absent parameters are left out")
    }

    func testInspectReportsAMissingDevice() {
        let info = KVMHostInfo.inspect(path: "/nonexistent/kvm")
        XCTAssertFalse(info.available)
        XCTAssertEqual(info.error, KVMError.deviceMissing(path: "/nonexistent/kvm").description)
    }

    func testInspectThisHost() throws {
        _ = try openKVMOrSkip()
        let info = KVMHostInfo.inspect()
        XCTAssertTrue(info.available)
        XCTAssertEqual(info.capabilities["KVM_CAP_IMMEDIATE_EXIT"].map { $0 > 0 }, true)
    }
}
