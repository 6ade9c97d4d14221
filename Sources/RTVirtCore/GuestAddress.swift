/// A guest-physical address.
///
/// A distinct type so that guest addresses and host pointers or plain integers cannot be
/// mixed up. Arithmetic is checked: `checkedAdding(_:)` returns `nil` on overflow.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The address as an integer.
    public var rawValue: UInt64

    /// Wraps an integer address.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Wraps an integer address.
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    /// This address plus `offset`, or `nil` when the sum overflows 64 bits.
    public func checkedAdding(_ offset: UInt64) -> GuestAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(offset)
        return overflow ? nil : GuestAddress(sum)
    }

    /// Whether the address is a multiple of `alignment` (a power of two).
    public func isAligned(to alignment: UInt64) -> Bool { rawValue & (alignment &- 1) == 0 }

    public static func < (lhs: GuestAddress, rhs: GuestAddress) -> Bool { lhs.rawValue < rhs.rawValue }

    /// The address in hexadecimal, for example `0x10000`.
    public var description: String { "0x" + String(rawValue, radix: 16) }
}
