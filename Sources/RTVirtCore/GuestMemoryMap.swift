import Synchronization

/// One contiguous region of guest-physical memory backed by host memory.
public struct GuestMemoryRegion: Sendable {
    /// A region at `base` backed by `mapping`.
    public init(base: GuestAddress, mapping: AnonymousMemoryMapping) {
        self.base = base
        self.mapping = mapping
    }

    /// Guest-physical start address.
    public let base: GuestAddress
    /// The host memory behind it.
    public let mapping: AnonymousMemoryMapping
    /// Size in bytes.
    public var size: UInt64 { mapping.size }
    /// Guest-physical address one past the end.
    public var end: UInt64 { base.rawValue + size }

    /// Whether `[address, address + length)` lies inside this region.
    func contains(_ address: GuestAddress, length: UInt64) -> Bool {
        guard address.rawValue >= base.rawValue else { return false }
        let offset = address.rawValue - base.rawValue
        return offset <= size && length <= size - offset
    }
}

/// Guest memory made of non-overlapping, page-aligned regions of anonymous host memory.
///
/// Regions are added while the VM is set up and never removed. Lookups take no lock, so vCPUs
/// never contend on the map (the doorbell path reads guest memory on every call): the regions
/// live in a fixed table that only grows; a writer fills the next entry under a lock and then
/// publishes the new count with a release store, and a reader loads the count with acquire
/// and reads only entries below it, which never change once published.
public final class GuestMemoryMap: GuestMemory, @unchecked Sendable {
    // @unchecked: `table` entries below `published` are immutable once published (release
    // store of the count after the write, acquire load before any read); entries at or above
    // it are written only under `writerLock`.
    private let table: UnsafeMutablePointer<GuestMemoryRegion?>
    private let published = Atomic<Int>(0)
    private let writerLock = LockedValue<Void>(())

    /// The most regions a map holds (KVM's default memory-slot limit is lower on most hosts).
    public static let maximumRegionCount = 512

    /// An empty map.
    public init() {
        table = .allocate(capacity: Self.maximumRegionCount)
        table.initialize(repeating: nil, count: Self.maximumRegionCount)
    }

    deinit {
        table.deinitialize(count: Self.maximumRegionCount)
        table.deallocate()
    }

    /// The regions, in the order they were added.
    public var regions: [GuestMemoryRegion] {
        let count = published.load(ordering: .acquiring)
        // Sound: entries below the published count are initialized and never written again.
        return (0..<count).map { table[$0]! }
    }

    /// Total bytes of guest memory.
    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// Maps `size` bytes of anonymous host memory at guest address `base`.
    /// - Throws: `MemoryLayoutError` when unaligned, empty, overflowing, overlapping, or past
    ///   `maximumRegionCount`.
    @discardableResult
    public func addRegion(at base: GuestAddress, size: UInt64) throws(MemoryLayoutError) -> GuestMemoryRegion {
        try Self.validate(base: base, size: size, against: regions)
        let region = GuestMemoryRegion(base: base, mapping: try AnonymousMemoryMapping(size: size))
        try insert(region)
        return region
    }

    /// Adds an already mapped region (for a hypervisor that registers the mapping first).
    /// - Throws: `MemoryLayoutError.overlapping` when it overlaps a region already present,
    ///   `.tooManyRegions` past `maximumRegionCount`.
    public func insert(_ region: GuestMemoryRegion) throws(MemoryLayoutError) {
        try writerLock.withLock { (_) throws(MemoryLayoutError) in
            let count = published.load(ordering: .relaxed) // only writers change it, under this lock
            guard count < Self.maximumRegionCount else { throw .tooManyRegions(limit: Self.maximumRegionCount) }
            try Self.validate(base: region.base, size: region.size, against: regions)
            // Sound: entry `count` is not yet published, so no reader looks at it.
            table[count] = region
            published.store(count + 1, ordering: .releasing)
        }
    }

    /// Checks a proposed region against the page size and the existing regions.
    public static func validate(base: GuestAddress, size: UInt64, against existing: [GuestMemoryRegion]) throws(MemoryLayoutError) {
        guard size > 0 else { throw .emptyRegion }
        guard base.isAligned(to: hostPageSize) else {
            throw .unaligned(what: "guest address", value: base.rawValue, pageSize: hostPageSize)
        }
        guard size % hostPageSize == 0 else { throw .unaligned(what: "size", value: size, pageSize: hostPageSize) }
        guard let end = base.checkedAdding(size) else { throw .addressOverflow(base: base, size: size) }
        for region in existing where base.rawValue < region.end && region.base.rawValue < end.rawValue {
            throw .overlapping(base: base, size: size, existingBase: region.base, existingSize: region.size)
        }
    }

    /// The region containing the whole range, or `nil`. Takes no lock.
    public func region(containing address: GuestAddress, length: UInt64) -> GuestMemoryRegion? {
        let count = published.load(ordering: .acquiring)
        for index in 0..<count {
            // Sound: entries below the published count are initialized and never written again.
            if let region = table[index], region.contains(address, length: length) { return region }
        }
        return nil
    }

    public func withHostPointer<R>(
        at address: GuestAddress, length: UInt64,
        _ body: (UnsafeMutableRawPointer) throws -> R
    ) throws -> R {
        guard let region = region(containing: address, length: length) else {
            throw GuestMemoryError.outOfBounds(address: address, length: length)
        }
        // The region's mapping lives as long as `region`, which this frame holds.
        return try withExtendedLifetime(region) {
            try body(region.mapping.pointer + Int(address.rawValue - region.base.rawValue))
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        let length = UInt64(buffer.count)
        guard let region = region(containing: address, length: length) else {
            throw .outOfBounds(address: address, length: length)
        }
        guard let destination = buffer.baseAddress else { return }
        // Sound: the range was checked to lie inside the region's mapping, kept alive here.
        withExtendedLifetime(region) {
            destination.copyMemory(
                from: region.mapping.pointer + Int(address.rawValue - region.base.rawValue), byteCount: buffer.count)
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        let length = UInt64(bytes.count)
        guard let region = region(containing: address, length: length) else {
            throw .outOfBounds(address: address, length: length)
        }
        guard let source = bytes.baseAddress else { return }
        // Sound: the range was checked to lie inside the region's mapping, kept alive here.
        withExtendedLifetime(region) {
            (region.mapping.pointer + Int(address.rawValue - region.base.rawValue))
                .copyMemory(from: source, byteCount: bytes.count)
        }
    }
}
