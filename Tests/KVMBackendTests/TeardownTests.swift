@testable import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import XCTest
import RTVirtXCTestSupport

/// This process's memory mappings.
private func mappings() -> [Substring] {
    (HostFiles().read("/proc/self/maps") ?? "").split(separator: "\n")
}

/// Whether any mapping contains `address`.
private func isMapped(_ address: UnsafeMutableRawPointer) -> Bool {
    let target = UInt(bitPattern: address)
    return mappings().contains { line in
        let bounds = line.prefix { $0 != " " }.split(separator: "-").compactMap { UInt($0, radix: 16) }
        return bounds.count == 2 && bounds[0] <= target && target < bounds[1]
    }
}

final class TeardownTests: XCTestCase {
    func testDroppingAVMReleasesEveryDescriptorAndMapping() throws {
        let kvm = try openKVMOrSkip()
        // Warm up once so lazily created process state does not count as a leak.
        do { _ = try BundledGuestMachine(system: kvm, vcpus: [BundledGuestVCPU(mode: .compute)]) }
        let descriptorsBefore = openDescriptorCount()
        let guestRAM: UnsafeMutableRawPointer
        let runAreas: [UnsafeMutableRawPointer]
        do {
            let machine = try BundledGuestMachine(system: kvm, vcpus: [
                BundledGuestVCPU(mode: .compute, arguments: (10, 1)), BundledGuestVCPU(mode: .compute, arguments: (10, 2)),
            ])
            guestRAM = machine.vm.memoryRegions[0].mapping.pointer
            XCTAssertEqual(openDescriptorCount(), descriptorsBefore + 3, "one VM and two vCPU descriptors")
            runAreas = machine.vcpus.map { UnsafeMutableRawPointer($0.runArea) }
            XCTAssertTrue(isMapped(guestRAM))
            for area in runAreas { XCTAssertTrue(isMapped(area)) }
            let runner = try machine.start()
            XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 10_000_000_000), [.guestRequested(status: 0), .guestRequested(status: 0)])
        }
        XCTAssertEqual(openDescriptorCount(), descriptorsBefore)
        for area in runAreas { XCTAssertFalse(isMapped(area), "kvm_run areas must be unmapped") }
        XCTAssertFalse(isMapped(guestRAM), "guest RAM must be unmapped")
    }

    func testDroppingKVMSystemClosesItsDescriptor() throws {
        _ = try openKVMOrSkip()
        let before = openDescriptorCount()
        do {
            let kvm = try KVMSystem()
            XCTAssertEqual(openDescriptorCount(), before + 1)
            _ = kvm
        }
        XCTAssertEqual(openDescriptorCount(), before)
    }

    func testVCPUKeepsItsVMAlive() throws {
        let kvm = try openKVMOrSkip()
        var vm: KVMVirtualMachine? = try kvm.makeKVMVirtualMachine()
        let vcpu = try vm!.makeKVMVCPU(id: 0)
        weak let weakVM = vm
        vm = nil
        XCTAssertNotNil(weakVM, "the vCPU holds its VM")
        _ = vcpu
    }
}
