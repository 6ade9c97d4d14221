import RTVirtCore
import Synchronization
import XCTest

final class CountingDevice: BusDevice {
    let reads = Atomic<Int>(0)
    let lastWrite = LockedValue<(BusAccess, UInt64)?>(nil)
    let name: UInt64
    init(name: UInt64) { self.name = name }
    func read(_ access: BusAccess) -> UInt64 {
        reads.wrappingAdd(1, ordering: .relaxed)
        return name << 32 | access.offset
    }
    func write(_ access: BusAccess, value: UInt64) -> BusWriteResult {
        lastWrite.withLock { $0 = (access, value) }
        return value == 0xDEAD ? .stopVCPU(status: value) : .handled
    }
}

final class IOBusTests: XCTestCase {
    func testRoutesToTheDeviceWithBaseOffsetSizeAndVCPU() throws {
        var bus = IOBus()
        let a = CountingDevice(name: 1), b = CountingDevice(name: 2)
        try bus.register(a, space: .port, base: 0x510, length: 4)
        try bus.register(b, space: .port, base: 0x520, length: 0x10)
        XCTAssertEqual(bus.read(space: .port, address: 0x513, size: 1, vcpuID: 0), 1 << 32 | 3)
        XCTAssertEqual(bus.read(space: .port, address: 0x520, size: 4, vcpuID: 0), 2 << 32)
        XCTAssertEqual(bus.read(space: .port, address: 0x52F, size: 1, vcpuID: 0), 2 << 32 | 0xF)
        XCTAssertNil(bus.read(space: .port, address: 0x514, size: 1, vcpuID: 0))
        XCTAssertNil(bus.read(space: .port, address: 0x50F, size: 1, vcpuID: 0))
        XCTAssertNil(bus.read(space: .mmio, address: 0x510, size: 1, vcpuID: 0), "spaces are separate")
        XCTAssertEqual(bus.write(space: .port, address: 0x522, size: 2, value: 7, vcpuID: 3), .handled)
        let (access, value) = try XCTUnwrap(b.lastWrite.withLock { $0 })
        XCTAssertEqual(access, BusAccess(space: .port, base: 0x520, offset: 2, size: 2, vcpuID: 3))
        XCTAssertEqual(value, 7)
        XCTAssertEqual(bus.write(space: .port, address: 0x510, size: 2, value: 0xDEAD, vcpuID: 0), .stopVCPU(status: 0xDEAD))
    }

    func testOverlappingRangesAreRejected() throws {
        var bus = IOBus()
        try bus.register(CountingDevice(name: 1), space: .mmio, base: 0x1000, length: 0x1000)
        for (base, length) in [(0x1000, 1), (0xFFF, 2), (0x1FFF, 1), (0x800, 0x2000)] as [(UInt64, UInt64)] {
            XCTAssertThrowsError(try bus.register(CountingDevice(name: 2), space: .mmio, base: base, length: length)) { error in
                XCTAssertEqual(error as? BusError, .overlapping(space: .mmio, base: base, length: length,
                                                                existingBase: 0x1000, existingLength: 0x1000))
            }
        }
        XCTAssertNoThrow(try bus.register(CountingDevice(name: 3), space: .mmio, base: 0x2000, length: 1))
        XCTAssertNoThrow(try bus.register(CountingDevice(name: 4), space: .mmio, base: 0xFFF, length: 1))
        XCTAssertNoThrow(try bus.register(CountingDevice(name: 5), space: .port, base: 0x1000, length: 0x1000))
    }

    func testEmptyAndOverflowingRangesAreRejected() {
        var bus = IOBus()
        XCTAssertThrowsError(try bus.register(CountingDevice(name: 1), space: .port, base: 0x10, length: 0)) {
            XCTAssertEqual($0 as? BusError, .emptyRange(space: .port, base: 0x10))
        }
        XCTAssertThrowsError(try bus.register(CountingDevice(name: 1), space: .port, base: 0xFFFF, length: 2)) {
            XCTAssertEqual($0 as? BusError, .rangeOverflow(space: .port, base: 0xFFFF, length: 2))
        }
        XCTAssertThrowsError(try bus.register(CountingDevice(name: 1), space: .mmio, base: UInt64.max, length: 2))
        XCTAssertNoThrow(try bus.register(CountingDevice(name: 1), space: .port, base: 0xFFFF, length: 1))
        XCTAssertNoThrow(try bus.register(CountingDevice(name: 1), space: .mmio, base: UInt64.max, length: 1))
        XCTAssertNotNil(bus.read(space: .mmio, address: UInt64.max, size: 1, vcpuID: 0))
    }

    func testManyDevicesAreFoundByBinarySearch() throws {
        var bus = IOBus()
        let devices = (0..<100).map { CountingDevice(name: UInt64($0)) }
        for (index, device) in devices.enumerated().shuffled() {
            try bus.register(device, space: .mmio, base: UInt64(index) * 0x100, length: 0x80)
        }
        for index in 0..<100 {
            XCTAssertEqual(bus.read(space: .mmio, address: UInt64(index) * 0x100 + 0x7F, size: 1, vcpuID: 0),
                           UInt64(index) << 32 | 0x7F)
            XCTAssertNil(bus.read(space: .mmio, address: UInt64(index) * 0x100 + 0x80, size: 1, vcpuID: 0))
        }
    }

    func testTruncation() {
        XCTAssertEqual(UInt64.max.truncated(toBytes: 1), 0xFF)
        XCTAssertEqual(UInt64.max.truncated(toBytes: 4), 0xFFFF_FFFF)
        XCTAssertEqual(UInt64.max.truncated(toBytes: 8), UInt64.max)
    }
}
