#if canImport(Glibc)
import Glibc
#endif
import VMRPC

/// An IP address, version 4 or 6.
public struct IPAddress: Hashable, Sendable, CustomStringConvertible {
    /// The family.
    public let family: SocketFamily
    /// 4 bytes (IPv4) or 16 bytes (IPv6), network order.
    public let bytes: [UInt8]

    /// An address from its bytes; nil unless there are 4 (IPv4) or 16 (IPv6).
    public init?(family: SocketFamily, bytes: [UInt8]) {
        guard bytes.count == (family == .ipv4 ? 4 : 16) else { return nil }
        self.family = family
        self.bytes = bytes
    }

    /// Parses "198.18.0.1" or "fd00::1"; nil when it is neither.
    public init?(_ text: String) {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            // Sound: in_addr is 4 plain bytes.
            self.init(family: .ipv4, bytes: withUnsafeBytes(of: &v4) { Array($0) })
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            // Sound: in6_addr is 16 plain bytes.
            self.init(family: .ipv6, bytes: withUnsafeBytes(of: &v6) { Array($0) })
        } else {
            return nil
        }
    }

    /// The unspecified address (0.0.0.0 or ::).
    public static func any(_ family: SocketFamily) -> IPAddress {
        IPAddress(family: family, bytes: [UInt8](repeating: 0, count: family == .ipv4 ? 4 : 16))!
    }

    /// The loopback address (127.0.0.1 or ::1).
    public static func loopback(_ family: SocketFamily) -> IPAddress {
        family == .ipv4 ? IPAddress("127.0.0.1")! : IPAddress("::1")!
    }

    public var description: String {
        var text = [UInt8](repeating: 0, count: 64)
        let domain = family == .ipv4 ? AF_INET : AF_INET6
        // Sound: `bytes` has the size inet_ntop expects for the family; `text` has room for any address.
        bytes.withUnsafeBytes { source in
            text.withUnsafeMutableBufferPointer { target in
                _ = target.withMemoryRebound(to: CChar.self) { inet_ntop(domain, source.baseAddress, $0.baseAddress, socklen_t($0.count)) }
            }
        }
        return String(decoding: text.prefix { $0 != 0 }, as: UTF8.self)
    }
}

/// An address and port as `net.*` calls carry them: 24 bytes on the wire, `family` u16 (4, 6,
/// or 0 for none), `port` u16, `scope_id` u32, `address` 16 bytes (IPv4 in the first 4, the rest 0).
public struct SocketEndpoint: Hashable, Sendable, CustomStringConvertible, VMRPCMessage {
    /// The address, or nil for "no address" (family 0 on the wire).
    public var address: IPAddress?
    /// The port.
    public var port: UInt16
    /// The IPv6 scope (interface index); 0 for IPv4.
    public var scopeID: UInt32

    /// An endpoint.
    public init(_ address: IPAddress, port: UInt16, scopeID: UInt32 = 0) {
        self.address = address; self.port = port; self.scopeID = scopeID
    }

    /// "No address": all 24 bytes zero.
    public static let none = SocketEndpoint(address: nil, port: 0, scopeID: 0)

    private init(address: IPAddress?, port: UInt16, scopeID: UInt32) {
        self.address = address; self.port = port; self.scopeID = scopeID
    }

    /// Decodes 24 bytes; `badArguments` for an unknown family, an IPv4 endpoint with a scope or
    /// with bytes after its 4, or a "none" endpoint that is not all zero.
    public init(decoding reader: inout VMRPCByteReader) throws(VMRPCStatus) {
        let family: UInt16 = try reader.read()
        let port: UInt16 = try reader.read()
        let scope: UInt32 = try reader.read()
        let bytes = try reader.readBytes(count: 16)
        switch family {
        case 0:
            guard port == 0, scope == 0, bytes.allSatisfy({ $0 == 0 }) else { throw .badArguments }
            self = .none
        case SocketFamily.ipv4.rawValue:
            guard scope == 0, bytes[4...].allSatisfy({ $0 == 0 }) else { throw .badArguments }
            self.init(address: IPAddress(family: .ipv4, bytes: Array(bytes[0..<4])), port: port, scopeID: 0)
        case SocketFamily.ipv6.rawValue:
            self.init(address: IPAddress(family: .ipv6, bytes: bytes), port: port, scopeID: scope)
        default:
            throw .badArguments
        }
    }

    public func encode(into writer: inout VMRPCByteWriter) {
        writer.append(address?.family.rawValue ?? 0)
        writer.append(port)
        writer.append(scopeID)
        var bytes = address?.bytes ?? []
        bytes += [UInt8](repeating: 0, count: 16 - bytes.count)
        writer.append(bytes: bytes)
    }

    public var description: String {
        guard let address else { return "none" }
        return address.family == .ipv4 ? "\(address):\(port)" : "[\(address)]:\(port)"
    }
}

/// An address prefix such as 198.18.0.0/15 or fd00::/8.
public struct IPPrefix: Hashable, Sendable, CustomStringConvertible {
    /// The network address (bits past `length` are ignored).
    public let address: IPAddress
    /// Prefix length: 0 ... 32 for IPv4, 0 ... 128 for IPv6.
    public let length: Int

    /// A prefix; nil when `length` is out of range for the family.
    public init?(_ address: IPAddress, length: Int) {
        guard (0...(address.bytes.count * 8)).contains(length) else { return nil }
        self.address = address; self.length = length
    }

    /// Parses "198.18.0.0/15"; a bare address is a prefix of its full length.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1).map(String.init)
        guard let first = parts.first, let address = IPAddress(first) else { return nil }
        let length = parts.count == 2 ? Int(parts[1]) : address.bytes.count * 8
        guard let length else { return nil }
        self.init(address, length: length)
    }

    /// Whether `candidate` is inside the prefix (same family, same leading `length` bits).
    public func contains(_ candidate: IPAddress) -> Bool {
        guard candidate.family == address.family else { return false }
        var remaining = length
        for (mine, theirs) in zip(address.bytes, candidate.bytes) where remaining > 0 {
            let bits = min(remaining, 8)
            let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - bits))
            if mine & mask != theirs & mask { return false }
            remaining -= bits
        }
        return true
    }

    public var description: String { "\(address)/\(length)" }
}
