/// A remote destination a guest may connect or send to: an address prefix and a port range.
public struct SocketRemoteRule: Hashable, Sendable {
    /// Addresses the rule covers.
    public var prefix: IPPrefix
    /// Ports the rule covers.
    public var ports: ClosedRange<UInt16>
    /// A rule.
    public init(prefix: IPPrefix, ports: ClosedRange<UInt16> = 1...65535) { self.prefix = prefix; self.ports = ports }
}

/// Why a `SocketPolicy` or a socket service could not be set up: the VMM's mistakes, refused
/// when the service is made.
public enum SocketConfigurationError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A policy limit is out of range.
    case invalidLimit(name: String, value: String)

    public var description: String {
        switch self {
        case let .invalidLimit(name, value): return "SocketPolicy.\(name) = \(value) is out of range"
        }
    }
}

/// What one VM's guest may do with sockets. Checked on every call; anything not allowed is
/// answered `denied` and has no effect (nothing is sent, bound or connected).
///
/// The default allows nothing on the network: no local ports, no remote destinations. A VMM
/// lists what its guest needs:
///
/// ```swift
/// var policy = SocketPolicy()
/// policy.bindPorts = [7777...7777]
/// policy.remotes = [SocketRemoteRule(prefix: IPPrefix("198.18.0.0/24")!)]
/// ```
public struct SocketPolicy: Equatable, Sendable {
    /// Families the guest may open.
    public var families: Set<SocketFamily> = [.ipv4, .ipv6]
    /// Types the guest may open.
    public var types: Set<SocketType> = [.datagram, .stream]
    /// Local ports the guest may bind explicitly.
    public var bindPorts: [ClosedRange<UInt16>] = []
    /// Whether the guest may bind port 0 (the host picks a free ephemeral port). Sockets that
    /// send or connect without binding get an ephemeral port from the kernel either way.
    public var allowsEphemeralBind = true
    /// Destinations the guest may connect or send to.
    public var remotes: [SocketRemoteRule] = []
    /// Sockets (including accepted ones) open at once, 1 ... 4095.
    public var maximumOpenSockets = 64
    /// Payload bytes one call may move (a batch counts count·stride), 1 ... 4 MiB.
    public var maximumBytesPerCall = 262_144
    /// The longest one blocking call may park its vCPU, nanoseconds (≥ 1; the dispatcher's own
    /// park limit applies too).
    public var maximumBlockNanoseconds: UInt64 = 10_000_000_000

    /// The default policy: both families and types, no ports, no destinations.
    public init() {}

    /// Throws `SocketConfigurationError.invalidLimit` for the first value out of range.
    public func validate() throws(SocketConfigurationError) {
        guard (1...SocketTable.maximumCapacity).contains(maximumOpenSockets) else {
            throw .invalidLimit(name: "maximumOpenSockets", value: "\(maximumOpenSockets)")
        }
        guard (1...4 << 20).contains(maximumBytesPerCall) else {
            throw .invalidLimit(name: "maximumBytesPerCall", value: "\(maximumBytesPerCall)")
        }
        guard maximumBlockNanoseconds >= 1 else {
            throw .invalidLimit(name: "maximumBlockNanoseconds", value: "\(maximumBlockNanoseconds)")
        }
    }

    /// Whether the guest may open a socket of `family` and `type`.
    public func allowsOpen(_ family: SocketFamily, _ type: SocketType) -> Bool {
        families.contains(family) && types.contains(type)
    }

    /// Whether the guest may bind `endpoint`'s port.
    public func allowsBind(_ endpoint: SocketEndpoint) -> Bool {
        if endpoint.port == 0 { return allowsEphemeralBind }
        return bindPorts.contains { $0.contains(endpoint.port) }
    }

    /// Whether the guest may connect or send to `endpoint`.
    public func allowsRemote(_ endpoint: SocketEndpoint) -> Bool {
        guard let address = endpoint.address, endpoint.port != 0 else { return false }
        return remotes.contains { $0.prefix.contains(address) && $0.ports.contains(endpoint.port) }
    }
}
