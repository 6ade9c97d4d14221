/// The two address spaces a guest reaches devices through.
public enum AddressSpace: String, Sendable {
    /// x86 port I/O (`in`/`out`), 16-bit addresses.
    case port
    /// Memory-mapped I/O: guest-physical addresses with no RAM behind them.
    case mmio
}

/// One guest access routed to a device.
public struct BusAccess: Equatable, Sendable {
    /// Which address space.
    public var space: AddressSpace
    /// The start of the range the device registered.
    public var base: UInt64
    /// The offset of the access inside that range.
    public var offset: UInt64
    /// Bytes accessed: 1, 2 or 4 for ports; 1...8 for MMIO.
    public var size: Int
    /// The vCPU that made the access.
    public var vcpuID: Int

    /// An access description.
    public init(space: AddressSpace, base: UInt64, offset: UInt64, size: Int, vcpuID: Int) {
        self.space = space; self.base = base; self.offset = offset; self.size = size; self.vcpuID = vcpuID
    }
}

/// What the vCPU's run loop does after a device handled a write.
public enum BusWriteResult: Equatable, Sendable {
    /// Continue running the guest.
    case handled
    /// Stop this vCPU's run loop with a status the guest gave (for example an exit port).
    case stopVCPU(status: UInt64)
}

/// A device on the port-I/O or MMIO bus. Devices are called on the vCPU threads that access
/// them, possibly several at once, and must be thread-safe.
public protocol BusDevice: AnyObject, Sendable {
    /// Answers a guest read; only the low `access.size` bytes are used.
    func read(_ access: BusAccess) -> UInt64
    /// Handles a guest write of the low `access.size` bytes of `value`.
    func write(_ access: BusAccess, value: UInt64) -> BusWriteResult
}

/// Why a device could not be registered.
public enum BusError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A range of length zero.
    case emptyRange(space: AddressSpace, base: UInt64)
    /// The range runs past the end of the address space.
    case rangeOverflow(space: AddressSpace, base: UInt64, length: UInt64)
    /// The range overlaps one registered earlier.
    case overlapping(space: AddressSpace, base: UInt64, length: UInt64, existingBase: UInt64, existingLength: UInt64)

    public var description: String {
        switch self {
        case let .emptyRange(space, base):
            return "\(space) range at 0x\(String(base, radix: 16)) is empty"
        case let .rangeOverflow(space, base, length):
            return "\(space) range at 0x\(String(base, radix: 16)) of length \(length) runs past the address space"
        case let .overlapping(space, base, length, existingBase, existingLength):
            return "\(space) range [0x\(String(base, radix: 16)), +\(length)) overlaps [0x\(String(existingBase, radix: 16)), +\(existingLength))"
        }
    }
}

/// Routes guest port-I/O and MMIO accesses to registered devices.
///
/// A value type: build it while setting the VM up, then hand a copy to the run loops, which
/// only read it. Ranges in one address space never overlap.
public struct IOBus: Sendable {
    struct Entry: Sendable {
        var base: UInt64
        var length: UInt64
        var device: any BusDevice
        /// The last address in the range (inclusive, so a range may end at 2^64 - 1).
        var last: UInt64 { base + (length - 1) }
    }

    private var portEntries: [Entry] = []
    private var mmioEntries: [Entry] = []

    /// An empty bus.
    public init() {}

    /// Registers `device` for `[base, base + length)` in `space`.
    /// - Throws: `BusError` for an empty, overflowing or overlapping range.
    public mutating func register(_ device: any BusDevice, space: AddressSpace, base: UInt64, length: UInt64) throws(BusError) {
        guard length > 0 else { throw .emptyRange(space: space, base: base) }
        let highestAddress: UInt64 = space == .port ? 0xFFFF : UInt64.max
        let (last, overflow) = base.addingReportingOverflow(length - 1)
        guard !overflow, last <= highestAddress else {
            throw .rangeOverflow(space: space, base: base, length: length)
        }
        let entries = space == .port ? portEntries : mmioEntries
        for entry in entries where base <= entry.last && entry.base <= last {
            throw .overlapping(space: space, base: base, length: length, existingBase: entry.base, existingLength: entry.length)
        }
        var updated = entries
        updated.append(Entry(base: base, length: length, device: device))
        updated.sort { $0.base < $1.base }
        if space == .port { portEntries = updated } else { mmioEntries = updated }
    }

    /// The device whose range contains `address`, with the range's base.
    public func device(at address: UInt64, space: AddressSpace) -> (device: any BusDevice, base: UInt64)? {
        let entries = space == .port ? portEntries : mmioEntries
        var low = 0, high = entries.count
        while low < high { // first entry whose last address is at or above `address`
            let middle = (low + high) / 2
            if entries[middle].last < address { low = middle + 1 } else { high = middle }
        }
        guard low < entries.count, entries[low].base <= address else { return nil }
        return (entries[low].device, entries[low].base)
    }

    /// Routes a read; `nil` when no device is there (hardware reads all ones then).
    public func read(space: AddressSpace, address: UInt64, size: Int, vcpuID: Int) -> UInt64? {
        guard let (device, base) = device(at: address, space: space) else { return nil }
        return device.read(BusAccess(space: space, base: base, offset: address - base, size: size, vcpuID: vcpuID))
    }

    /// Routes a write; `nil` when no device is there (the write is dropped).
    public func write(space: AddressSpace, address: UInt64, size: Int, value: UInt64, vcpuID: Int) -> BusWriteResult? {
        guard let (device, base) = device(at: address, space: space) else { return nil }
        return device.write(BusAccess(space: space, base: base, offset: address - base, size: size, vcpuID: vcpuID), value: value)
    }
}

extension UInt64 {
    /// The value with only its low `size` bytes kept (size 1...8).
    @inlinable
    public func truncated(toBytes size: Int) -> UInt64 {
        size >= 8 ? self : self & ((1 << (UInt64(size) * 8)) &- 1)
    }
}

/// A port (or MMIO range) whose write stops the writing vCPU, with the value written as its
/// status (`VCPUStopReason.guestRequested`): how a bare guest says it is done. Reads return 0.
public final class GuestExitDevice: BusDevice {
    /// An exit device.
    public init() {}
    public func read(_ access: BusAccess) -> UInt64 { 0 }
    public func write(_ access: BusAccess, value: UInt64) -> BusWriteResult { .stopVCPU(status: value) }
}
