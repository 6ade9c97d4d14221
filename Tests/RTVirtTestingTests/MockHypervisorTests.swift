import RTVirtCore
import RTVirtTesting
import XCTest

final class MockHypervisorTests: XCTestCase {
    func testScriptIsReplayedInOrderAndReadsNeedAPendingExit() throws {
        let hypervisor = MockHypervisor()
        XCTAssertEqual(hypervisor.name, "mock")
        let vm = try hypervisor.makeMockVirtualMachine(memorySize: 0x10000)
        XCTAssertEqual(vm.guestMemory.totalSize, 0x10000)
        let cpu = try vm.makeMockVCPU(id: 0, script: [.portIn(port: 1, size: 1), .halt])
        XCTAssertThrowsError(try cpu.completePortIn(1)) { XCTAssertEqual($0 as? MockError, .noPendingRead) }
        XCTAssertEqual(try cpu.run(), .portIn(port: 1, size: 1))
        try cpu.completePortIn(5)
        XCTAssertThrowsError(try cpu.completePortIn(6), "only one reply per read")
        XCTAssertEqual(try cpu.run(), .halt)
        XCTAssertEqual(cpu.readReplies, [5])
        cpu.kick()
        XCTAssertEqual(try cpu.run(), .interrupted)
        cpu.acknowledgeKick()
        cpu.append([.shutdown])
        XCTAssertEqual(try cpu.run(), .shutdown)
        XCTAssertEqual(cpu.runCount, 4)
    }

    func testVCPUIDsAreChecked() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        _ = try vm.makeMockVCPU(id: 0)
        XCTAssertThrowsError(try vm.makeMockVCPU(id: 0)) { XCTAssertEqual($0 as? MockError, .invalidVCPUID(0)) }
        XCTAssertThrowsError(try vm.makeVCPU(id: -1))
        XCTAssertThrowsError(try vm.makeVCPU(id: vm.maximumVCPUCount))
    }

    func testRegisterStateRoundTrips() throws {
        let cpu = try MockHypervisor().makeMockVirtualMachine().makeMockVCPU(id: 0)
        var registers = X86Registers()
        registers.rax = 1; registers.rip = 0x10000
        try cpu.setRegisters(registers)
        XCTAssertEqual(try cpu.registers(), registers)
        try cpu.writeMSRs([X86MSR(index: 0x10, value: 99)])
        XCTAssertEqual(try cpu.readMSRs([0x10, 0x11]), [X86MSR(index: 0x10, value: 99), X86MSR(index: 0x11, value: 0)])
    }
}
