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

final class MockGuestProgramTests: XCTestCase {
    /// A guest program's exits reach `run()` in order, each waits for the VMM, and reads get
    /// the VMM's answers; memory writes are visible to the host.
    func testProgramExitsWaitForTheVMMAndReadsGetItsAnswers() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine(memorySize: 0x10000)
        let cpu = try vm.makeMockVCPU(id: 0) { guest in
            try guest.memory.write(UInt32(0xFEED), at: GuestAddress(0x100))
            guest.portOut(0x510, value: 1)
            let answer = guest.portIn(0x512)
            guest.portOut(0x510, value: answer + 1)
            throw MockError.noPendingRead // a failing program is a guest that shut down
        }
        XCTAssertEqual(try cpu.run(), .portOut(port: 0x510, size: 4, data: 1))
        XCTAssertEqual(try vm.guestMemory.read(UInt32.self, at: GuestAddress(0x100)), 0xFEED, "written before the exit")
        XCTAssertEqual(try cpu.run(), .portIn(port: 0x512, size: 4))
        try cpu.completePortIn(41)
        XCTAssertEqual(try cpu.run(), .portOut(port: 0x510, size: 4, data: 42))
        XCTAssertEqual(try cpu.run(), .shutdown)
        XCTAssertTrue(cpu.guestProgramFailed)
        cpu.kick()
        XCTAssertEqual(try cpu.run(), .interrupted)
    }
}
