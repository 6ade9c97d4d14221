import KVMBackend
import PacketRing
import RTVirtCore
import RTVirtGuestImage
import XCTest
import X86GuestSetup

final class X86LongModeTests: XCTestCase {
    private func word(_ bytes: [UInt8], _ index: Int) -> UInt64 {
        bytes[index * 8..<index * 8 + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    func testGDTBytesMatchTheArchitecturalEncodings() {
        let gdt = X86LongMode.globalDescriptorTable(tssBase: 0x1_2345_A000)
        XCTAssertEqual(gdt.count, 7 * 8)
        XCTAssertEqual(word(gdt, 0), 0)
        XCTAssertEqual(word(gdt, 1), 0x00AF_9B00_0000_FFFF) // 64-bit code, DPL 0
        XCTAssertEqual(word(gdt, 2), 0x00CF_9300_0000_FFFF) // data, DPL 0
        XCTAssertEqual(word(gdt, 3), 0x00AF_FB00_0000_FFFF) // 64-bit code, DPL 3
        XCTAssertEqual(word(gdt, 4), 0x00CF_F300_0000_FFFF) // data, DPL 3
        // Busy 64-bit TSS, limit 104 + 8192 + 1 - 1 = 0x2068, base 0x1_2345_A000.
        XCTAssertEqual(word(gdt, 5), 0x2300_8B45_A000_2068)
        XCTAssertEqual(word(gdt, 6), 0x1)
    }

    func testTSSHasStackAndAnOpenIOBitmap() {
        let tss = X86LongMode.taskStateSegment(kernelStackTop: 0xF000)
        XCTAssertEqual(tss.count, X86LongMode.taskStateSegmentSize)
        XCTAssertEqual(Array(tss[4..<12]), [0x00, 0xF0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(Array(tss[102..<104]), [104, 0])
        XCTAssertTrue(tss[104..<(104 + 8192)].allSatisfy { $0 == 0 }, "every port open")
        XCTAssertEqual(tss.last, 0xFF)
    }

    func testIdentityPageTables() {
        let tables = X86LongMode.identityPageTables(base: 0x3000, mappedBytes: 4 << 30, userAccessible: true)
        XCTAssertEqual(tables.count, 6 * 4096)
        XCTAssertEqual(word(tables, 0), 0x4007)               // PML4[0] -> PDPT, P|W|U
        XCTAssertEqual(word(tables, 1), 0)
        XCTAssertEqual(word(tables, 512), 0x5007)             // PDPT[0] -> PD0
        XCTAssertEqual(word(tables, 512 + 3), 0x8007)         // PDPT[3] -> PD3
        XCTAssertEqual(word(tables, 512 + 4), 0)
        XCTAssertEqual(word(tables, 1024), 0x87)              // 0 -> 0, 2 MiB, P|W|U|PS
        XCTAssertEqual(word(tables, 1024 + 1), 0x20_0087)
        XCTAssertEqual(word(tables, 1024 + 4 * 512 - 1), 0xFFE0_0087) // last 2 MiB below 4 GiB
        let kernelOnly = X86LongMode.identityPageTables(base: 0, mappedBytes: 1 << 30, userAccessible: false)
        XCTAssertEqual(word(kernelOnly, 1024 + 5), 0xA0_0083)
    }

    func testSystemRegistersForEachPrivilege() {
        let layout = X86LongModeLayout(gdt: GuestAddress(0x1000), tss: GuestAddress(0xA000), idt: GuestAddress(0x2000),
                                       pageTables: GuestAddress(0x3000), kernelStackTop: 0xF000)
        let user = X86LongMode.systemRegisters(layout, privilege: .userWithIOPrivilege)
        XCTAssertEqual(user.cs.selector, 0x1B)
        XCTAssertEqual(user.cs.dpl, 3)
        XCTAssertTrue(user.cs.longMode)
        XCTAssertEqual(user.ss.selector, 0x23)
        XCTAssertEqual(user.ss.dpl, 3)
        XCTAssertEqual(user.tr.base, 0xA000)
        XCTAssertEqual(user.cr3, 0x3000)
        XCTAssertEqual(user.cr0 & 0x8000_0001, 0x8000_0001, "paging and protection on")
        XCTAssertEqual(user.efer, 0x500)
        XCTAssertEqual(user.gdt, X86DescriptorTable(base: 0x1000, limit: 55))
        XCTAssertEqual(user.idt, X86DescriptorTable(base: 0x2000, limit: 4095))
        let kernel = X86LongMode.systemRegisters(layout, privilege: .kernel)
        XCTAssertEqual(kernel.cs.selector, 0x08)
        XCTAssertEqual(kernel.cs.dpl, 0)
        XCTAssertEqual(X86LongMode.entryRegisters(entry: GuestAddress(0x10000), stack: 0x20_0000, privilege: .userWithIOPrivilege,
                                                  arguments: [1, 2, 3]).rflags, 0x3002)
        let kernelEntry = X86LongMode.entryRegisters(entry: GuestAddress(0x10000), stack: 8, privilege: .kernel, arguments: [1, 2, 3])
        XCTAssertEqual([kernelEntry.rdi, kernelEntry.rsi, kernelEntry.rdx, kernelEntry.rip, kernelEntry.rsp, kernelEntry.rflags],
                       [1, 2, 3, 0x10000, 8, 2])
    }

    func testTablesAreWrittenIntoGuestMemory() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x10000)
        let layout = X86LongModeLayout(gdt: GuestAddress(0x1000), tss: GuestAddress(0xA000), idt: GuestAddress(0x2000),
                                       pageTables: GuestAddress(0x3000), kernelStackTop: 0xF000)
        try X86LongMode.writeSystemTables(layout, into: memory)
        XCTAssertEqual(try memory.read(UInt64.self, at: GuestAddress(0x3000)), 0x4007)
        XCTAssertEqual(try memory.read(UInt64.self, at: GuestAddress(0x1008)), 0x00AF_9B00_0000_FFFF)
        XCTAssertEqual(try memory.read(UInt16.self, at: GuestAddress(0xA000 + 102)), 104)
        let tooSmall = GuestMemoryMap()
        try tooSmall.addRegion(at: GuestAddress(0), size: 0x4000)
        XCTAssertThrowsError(try X86LongMode.writeSystemTables(layout, into: tooSmall))
    }

    /// Guest/layout.h and GuestLayout must describe the same ABI.
    func testGuestLayoutHeaderMatchesSwift() throws {
        let header = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Guest/layout.h")
        let text = try String(contentsOf: header, encoding: .utf8)
        var defines: [String: UInt64] = [:]
        for line in text.split(separator: "\n") where line.hasPrefix("#define ") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 3 else { continue }
            let literal = parts[2].lowercased()
            defines[String(parts[1])] = literal.hasPrefix("0x") ? UInt64(literal.dropFirst(2), radix: 16) : UInt64(literal)
        }
        let ring = GuestLayout.packetRingLayout(forVCPU: 0)
        let base = GuestLayout.dataBuffer(forVCPU: 0).rawValue
        let expected: [String: UInt64] = [
            "GUEST_GDT_ADDRESS": GuestLayout.gdtAddress.rawValue, "GUEST_TSS_ADDRESS": GuestLayout.tssAddress.rawValue,
            "GUEST_IDT_ADDRESS": GuestLayout.idtAddress.rawValue, "GUEST_PAGE_TABLE_ADDRESS": GuestLayout.pageTableAddress.rawValue,
            "GUEST_KERNEL_STACK_TOP": GuestLayout.kernelStackTop, "GUEST_IMAGE_ADDRESS": GuestLayout.imageAddress.rawValue,
            "GUEST_STACK_TOP": GuestLayout.stackTop, "GUEST_STACK_SIZE": GuestLayout.stackSize,
            "GUEST_DATA_ADDRESS": GuestLayout.dataAddress.rawValue, "GUEST_MMIO_TEST_ADDRESS": GuestLayout.mmioTestAddress.rawValue,
            "GUEST_DATA_SIZE": GuestLayout.dataSize, "GUEST_RPC_SLOTS_ADDRESS": GuestLayout.rpcSlotsAddress.rawValue,
            "GUEST_MAX_VCPUS": UInt64(GuestLayout.maximumVCPUs), "GUEST_MMIO_DOORBELL": GuestLayout.mmioDoorbellAddress.rawValue,
            "GUEST_PORT_DOORBELL": UInt64(GuestLayout.doorbellPort), "GUEST_PORT_BARE": UInt64(GuestLayout.bareExitPort),
            "GUEST_REVERSE_ADD": UInt64(GuestLayout.reverseAdd), "GUEST_REVERSE_STOP": UInt64(GuestLayout.reverseStop),
            "GUEST_PORT_RESULT": UInt64(GuestLayout.resultPort), "GUEST_PORT_EXIT": UInt64(GuestLayout.exitPort),
            "GUEST_PORT_INPUT": UInt64(GuestLayout.inputPort), "GUEST_STATUS_BAD_MODE": GuestLayout.badModeStatus,
            "GUEST_PROC_COUNT": UInt64(GuestLayout.countProcedure), "GUEST_STATUS_COUNT_MISMATCH": GuestLayout.countMismatchStatus,
            "GUEST_STATUS_NO_EXITLESS": GuestLayout.noExitlessStatus,
            "GUEST_PORT_RING_DOORBELL": UInt64(GuestLayout.ringDoorbellPort), "GUEST_RING_VECTOR": UInt64(GuestLayout.ringVector),
            "GUEST_RING_ENTRIES": UInt64(GuestLayout.ringEntries), "GUEST_RING_SLOT_SIZE": UInt64(GuestLayout.ringSlotSize),
            "GUEST_RING_SLOT_SHIFT": UInt64(GuestLayout.ringSlotSize.trailingZeroBitCount),
            "GUEST_RING_RX_PRODUCED": ring.receiveProduced.rawValue - base, "GUEST_RING_RX_CONSUMED": ring.receiveConsumed.rawValue - base,
            "GUEST_RING_TX_PRODUCED": ring.transmitProduced.rawValue - base, "GUEST_RING_TX_CONSUMED": ring.transmitConsumed.rawValue - base,
            "GUEST_RING_TX_DESCRIPTORS": ring.transmitDescriptors.rawValue - base, "GUEST_RING_RX_SLOTS": ring.receiveSlots.rawValue - base,
        ]
        for (name, value) in expected { XCTAssertEqual(defines[name], value, name) }
        for mode in BundledGuestMode.allCases {
            // camelCase to SNAKE_CASE, keeping acronyms together (stringIO -> STRING_IO).
            var snake = ""
            var previous: Character?
            for character in String(describing: mode) {
                if character.isUppercase, previous?.isLowercase == true { snake += "_" }
                snake += character.uppercased()
                previous = character
            }
            let name = "GUEST_MODE_" + snake
            XCTAssertEqual(defines[name], mode.rawValue, name)
        }
        // Everything fits: stacks above the image, slots and data buffers inside 16 MiB.
        XCTAssertGreaterThan(GuestLayout.stackPointer(forVCPU: GuestLayout.maximumVCPUs) , GuestLayout.imageAddress.rawValue + 0x10000)
        XCTAssertLessThanOrEqual(GuestLayout.rpcSlotsAddress.rawValue + UInt64(GuestLayout.maximumVCPUs) * 4096, GuestLayout.dataAddress.rawValue)
        XCTAssertLessThanOrEqual(GuestLayout.dataBuffer(forVCPU: GuestLayout.maximumVCPUs).rawValue, BundledGuestMachine.defaultMemorySize)
        // The ring echo's rings fit its data buffer.
        XCTAssertLessThanOrEqual(ring.receiveSlot(ring.entries - 1).rawValue + UInt64(ring.slotSize), base + GuestLayout.dataSize)
        // The TSS and its bitmap must end before the kernel stack and the image.
        XCTAssertLessThanOrEqual(GuestLayout.tssAddress.rawValue + UInt64(X86LongMode.taskStateSegmentSize), GuestLayout.kernelStackTop - 0x1000)
        XCTAssertLessThanOrEqual(GuestLayout.pageTableAddress.rawValue + 6 * 0x1000, GuestLayout.tssAddress.rawValue)
    }
}

final class BundledGuestTests: XCTestCase {
    func testJumpAheadMatchesStepByStep() {
        for seed: UInt64 in [0, 1, 0xDEAD_BEEF] {
            var x = seed
            for iterations: UInt64 in 0...300 {
                XCTAssertEqual(BundledGuestMode.expectedComputeResult(iterations: iterations, seed: seed), x)
                x = x &* BundledGuestMode.lcgMultiplier &+ BundledGuestMode.lcgIncrement
            }
        }
    }

    func testImageIsBuiltFromSourceAndStartsWithTheModeDispatch() {
        let image = BundledGuest.image
        XCTAssertGreaterThan(image.count, 32)
        XCTAssertLessThan(image.count, 64 * 1024)
        XCTAssertEqual(Array(image.prefix(4)), [0x48, 0x83, 0xFF, 0x01], "cmp $GUEST_MODE_COMPUTE, %rdi")
    }
}
