import RTVirtCore
import XCTest

final class GuestMemoryTests: XCTestCase {
    func testReadsAndWritesAreLittleEndianAndBoundsChecked() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0x10000), size: 0x2000)
        try memory.write(UInt32(0x1122_3344), at: GuestAddress(0x10000))
        XCTAssertEqual(try memory.readBytes(count: 4, at: GuestAddress(0x10000)), [0x44, 0x33, 0x22, 0x11])
        XCTAssertEqual(try memory.read(UInt16.self, at: GuestAddress(0x10001)), 0x2233)
        try memory.write(bytes: [1, 2, 3], at: GuestAddress(0x11FFD))
        XCTAssertEqual(try memory.readBytes(count: 3, at: GuestAddress(0x11FFD)), [1, 2, 3])
        for (address, length) in [(0xFFFF, 1), (0x11FFE, 4), (0x12000, 1), (UInt64.max, 2)] as [(UInt64, Int)] {
            XCTAssertThrowsError(try memory.readBytes(count: length, at: GuestAddress(address))) {
                XCTAssertEqual($0 as? GuestMemoryError, .outOfBounds(address: GuestAddress(address), length: UInt64(length)))
            }
        }
    }

    func testAccessesDoNotSpanTwoRegions() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x1000)
        try memory.addRegion(at: GuestAddress(0x1000), size: 0x1000)
        XCTAssertThrowsError(try memory.read(UInt32.self, at: GuestAddress(0xFFE)))
        XCTAssertEqual(memory.totalSize, 0x2000)
        XCTAssertEqual(memory.regions.map(\.base), [GuestAddress(0), GuestAddress(0x1000)])
    }

    func testRegionValidation() throws {
        let memory = GuestMemoryMap()
        XCTAssertThrowsError(try memory.addRegion(at: GuestAddress(0), size: 0)) { XCTAssertEqual($0 as? MemoryLayoutError, .emptyRegion) }
        XCTAssertThrowsError(try memory.addRegion(at: GuestAddress(1), size: 0x1000))
        XCTAssertThrowsError(try memory.addRegion(at: GuestAddress(0), size: 0x1001))
        XCTAssertThrowsError(try memory.addRegion(at: GuestAddress(UInt64.max - 0xFFF), size: 0x2000)) {
            XCTAssertEqual($0 as? MemoryLayoutError, .addressOverflow(base: GuestAddress(UInt64.max - 0xFFF), size: 0x2000))
        }
        try memory.addRegion(at: GuestAddress(0x4000), size: 0x2000)
        XCTAssertThrowsError(try memory.addRegion(at: GuestAddress(0x5000), size: 0x1000))
        XCTAssertThrowsError(try memory.addRegion(at: GuestAddress(0x3000), size: 0x2000))
        XCTAssertEqual(memory.regions.count, 1)
    }

    func testHostPointerAccessIsRangeChecked() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x1000)
        try memory.withHostPointer(at: GuestAddress(0x10), length: 8) { $0.storeBytes(of: UInt64(42), as: UInt64.self) }
        XCTAssertEqual(try memory.read(UInt64.self, at: GuestAddress(0x10)), 42)
        XCTAssertThrowsError(try memory.withHostPointer(at: GuestAddress(0xFFC), length: 8) { _ in })
    }

    func testGuestAddressArithmetic() {
        XCTAssertNil(GuestAddress(UInt64.max).checkedAdding(1))
        XCTAssertEqual(GuestAddress(0x1000).checkedAdding(0x10), GuestAddress(0x1010))
        XCTAssertTrue(GuestAddress(0x2000).isAligned(to: 0x1000))
        XCTAssertFalse(GuestAddress(0x2001).isAligned(to: 0x1000))
        XCTAssertEqual(GuestAddress(0xD000_0000).description, "0xd0000000")
    }
}
