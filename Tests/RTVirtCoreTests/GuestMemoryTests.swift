import RTVirtCore
import Synchronization
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

final class GuestMemoryAtomicTests: XCTestCase {
    func testAtomicWordsAreCheckedForAlignmentAndBounds() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0x1000), size: 0x1000)
        try memory.atomicStore(UInt32(0xDEAD_BEEF), at: GuestAddress(0x1004), ordering: .releasing)
        XCTAssertEqual(try memory.atomicLoad(UInt32.self, at: GuestAddress(0x1004), ordering: .acquiring), 0xDEAD_BEEF)
        XCTAssertEqual(try memory.read(UInt32.self, at: GuestAddress(0x1004)), 0xDEAD_BEEF, "little-endian, as plain reads see it")
        try memory.atomicStore(UInt64.max - 1, at: GuestAddress(0x1FF8), ordering: .sequentiallyConsistent)
        XCTAssertEqual(try memory.atomicLoad(UInt64.self, at: GuestAddress(0x1FF8), ordering: .relaxed), UInt64.max - 1)
        XCTAssertEqual(try memory.atomicCompareExchange(0xDEAD_BEEF, 7, at: GuestAddress(0x1004)), 0xDEAD_BEEF)
        XCTAssertEqual(try memory.atomicCompareExchange(0xDEAD_BEEF, 9, at: GuestAddress(0x1004)), 7, "no exchange")
        XCTAssertThrowsError(try memory.atomicLoad(UInt32.self, at: GuestAddress(0x1002), ordering: .relaxed)) {
            XCTAssertEqual($0 as? GuestMemoryError, .misaligned(address: GuestAddress(0x1002), alignment: 4))
        }
        XCTAssertThrowsError(try memory.atomicStore(UInt64(1), at: GuestAddress(0x1004), ordering: .relaxed)) {
            XCTAssertEqual($0 as? GuestMemoryError, .misaligned(address: GuestAddress(0x1004), alignment: 8))
        }
        XCTAssertThrowsError(try memory.atomicLoad(UInt64.self, at: GuestAddress(0x2000), ordering: .relaxed)) {
            XCTAssertEqual($0 as? GuestMemoryError, .outOfBounds(address: GuestAddress(0x2000), length: 8))
        }
    }

    /// A flag published with release and observed with acquire carries the data written
    /// before it (checked by the thread sanitizer in CI, and by the values here).
    func testReleaseAcquirePublishesData() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x1000)
        let rounds = 10_000
        let reader = try HostThread(name: "consumer") {
            var seen: UInt32 = 0
            while seen < UInt32(rounds) {
                let flag = (try? memory.atomicLoad(UInt32.self, at: GuestAddress(0), ordering: .acquiring)) ?? 0
                if flag > seen {
                    seen = flag
                    let data = (try? memory.atomicLoad(UInt64.self, at: GuestAddress(8), ordering: .relaxed)) ?? 0
                    precondition(data >= UInt64(flag), "data \(data) older than its flag \(flag)")
                }
            }
        }
        for round in 1...rounds {
            try memory.atomicStore(UInt64(round), at: GuestAddress(8), ordering: .relaxed)
            try memory.atomicStore(UInt32(round), at: GuestAddress(0), ordering: .releasing)
        }
        XCTAssertTrue(reader.waitForFinish(timeoutNanoseconds: 30_000_000_000), "hang detector")
    }

    /// Lookups take no lock: readers on other threads see every region a writer added, and
    /// never a partly added one.
    func testRegionsAddedWhileOthersReadAreSeenWhole() throws {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x1000)
        let done = Atomic<Bool>(false)
        let readers = try (0..<2).map { index in
            try HostThread(name: "reader\(index)") {
                while !done.load(ordering: .acquiring) {
                    for region in memory.regions { precondition(region.size == 0x1000 && region.mapping.size == 0x1000) }
                    _ = memory.region(containing: GuestAddress(0x10_0000), length: 8)
                }
            }
        }
        for index in 1..<200 { try memory.addRegion(at: GuestAddress(UInt64(index) * 0x10_0000), size: 0x1000) }
        done.store(true, ordering: .releasing)
        for reader in readers { reader.join() }
        XCTAssertEqual(memory.regions.count, 200)
        XCTAssertNotNil(memory.region(containing: GuestAddress(199 * 0x10_0000 + 8), length: 8))
    }
}
