import RTVirtCore

/// Why a flat image could not be loaded.
public enum FlatImageError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The image does not fit in the memory region at the load address.
    case doesNotFit(imageSize: Int, address: GuestAddress)
    /// An empty image.
    case empty

    public var description: String {
        switch self {
        case let .doesNotFit(size, address): return "a \(size)-byte image does not fit in guest memory at \(address)"
        case .empty: return "the guest image is empty"
        }
    }
}

/// Loads a flat binary (no headers; entered at its first byte) into guest memory.
public enum FlatImage {
    /// Copies `image` to `address`. Returns the guest range it occupies.
    @discardableResult
    public static func load(_ image: [UInt8], into memory: any GuestMemory, at address: GuestAddress) throws(FlatImageError) -> ClosedRange<UInt64> {
        guard !image.isEmpty else { throw .empty }
        do {
            try memory.write(bytes: image, at: address)
        } catch {
            throw .doesNotFit(imageSize: image.count, address: address)
        }
        return address.rawValue...(address.rawValue + UInt64(image.count) - 1)
    }
}
