#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RTVirtCore

/// Why a network namespace or a VM network could not be set up.
public enum NetworkNamespaceError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The namespace file could not be opened.
    case open(path: String, errno: Int32)
    /// The helper thread could not join the namespace.
    case join(path: String, errno: Int32)
    /// The helper thread could not be started.
    case helperThread(Int32)
    /// `ip` (iproute2) is not installed.
    case ipToolMissing
    /// An `ip` command failed.
    case command(arguments: [String], status: Int32, output: String)
    /// A name is not usable (empty, too long, or with characters other than letters, digits and `-`).
    case invalidName(String)

    public var description: String {
        switch self {
        case let .open(path, errno): return "cannot open network namespace \(path): \(String(cString: strerror(errno)))"
        case let .join(path, errno): return "cannot join network namespace \(path): \(String(cString: strerror(errno)))"
        case let .helperThread(code): return "cannot start the namespace helper thread: error \(code)"
        case .ipToolMissing: return "the ip tool (iproute2) is not installed"
        case let .command(arguments, status, output): return "ip \(arguments.joined(separator: " ")) exited with \(status): \(output)"
        case let .invalidName(name): return "'\(name)' is not a usable name"
        }
    }
}

/// A network namespace held open by a descriptor. Sockets made for the guest are created in
/// it (see `HostSocketBackend`).
///
/// Either one RTVirt created (`create(name:)`, a named namespace under `/run/netns` whose name
/// ends in the owning process id, removed by `remove()` or when this object goes away, and
/// reclaimed by `reclaimLeftovers()` if the process died first), or an existing one opened by
/// path (`open(path:)`, never removed by RTVirt).
public final class NetworkNamespace: Sendable {
    /// The namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`, ...).
    public let path: String
    /// The name under `/run/netns` when RTVirt created it.
    public let name: String?
    /// The open descriptor (close-on-exec).
    public let descriptor: Int32
    private let removed = LockedValue(false)

    /// Where named namespaces live.
    public static let namedDirectory = "/run/netns"
    /// Names of namespaces RTVirt creates start with this.
    public static let namePrefix = "rtvirt-"
    private static let sequence = LockedValue(0)

    private init(path: String, name: String?, descriptor: Int32) {
        self.path = path; self.name = name; self.descriptor = descriptor
    }

    /// Opens an existing namespace by path. RTVirt never removes it.
    public static func open(path: String) throws(NetworkNamespaceError) -> NetworkNamespace {
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw .open(path: path, errno: errno) }
        return NetworkNamespace(path: path, name: nil, descriptor: descriptor)
    }

    /// Creates a new named namespace `rtvirt-<label>-<pid>-<n>` with its loopback up, first
    /// reclaiming namespaces (and host-side veths) left by RTVirt processes that died.
    /// - Parameter label: letters, digits and `-`, at most 24 characters.
    public static func create(label: String = "vm") throws(NetworkNamespaceError) -> NetworkNamespace {
        guard !label.isEmpty, label.count <= 24, label.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }) else {
            throw .invalidName(label)
        }
        reclaimLeftovers()
        let number = sequence.withLock { value -> Int in
            value = (value + 1) % 10_000
            return value
        }
        let name = "\(namePrefix)\(label)-\(getpid())-\(number)"
        try IPTool.run(["netns", "add", name])
        let path = "\(namedDirectory)/\(name)"
        let descriptor = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
            let error = errno
            _ = try? IPTool.run(["netns", "delete", name])
            throw .open(path: path, errno: error)
        }
        let namespace = NetworkNamespace(path: path, name: name, descriptor: descriptor)
        do {
            try namespace.ip(["link", "set", "lo", "up"])
        } catch {
            namespace.remove()
            throw error
        }
        return namespace
    }

    /// Runs `ip -n NAME ARGUMENTS` (only for namespaces RTVirt created by name).
    public func ip(_ arguments: [String]) throws(NetworkNamespaceError) {
        guard let name else { throw .invalidName(path) }
        try IPTool.run(["-n", name] + arguments)
    }

    /// Closes the descriptor and, for a namespace RTVirt created, deletes its name. The kernel
    /// frees the namespace once no socket or process uses it. Idempotent.
    public func remove() {
        let first = removed.withLock { removed -> Bool in
            defer { removed = true }
            return !removed
        }
        guard first else { return }
        Glibc.close(descriptor)
        if let name { _ = try? IPTool.run(["netns", "delete", name]) }
    }

    deinit { remove() }

    /// The names of namespaces (under `/run/netns`) that RTVirt processes created and that
    /// are still there although their process is gone.
    public static func leftovers(isAlive: (pid_t) -> Bool = processIsAlive) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: namedDirectory)) ?? []
        return names.filter { name in
            guard name.hasPrefix(namePrefix) else { return false }
            let parts = name.split(separator: "-")
            guard parts.count >= 3, let pid = pid_t(parts[parts.count - 2]) else { return false }
            return !isAlive(pid)
        }.sorted()
    }

    /// Deletes the namespaces and host-side veths of RTVirt processes that died (a crashed
    /// VMM); returns the namespaces deleted. Called by `create`.
    @discardableResult
    public static func reclaimLeftovers(isAlive: (pid_t) -> Bool = processIsAlive) -> [String] {
        for interface in VMNetwork.leftoverInterfaces(isAlive: isAlive) { _ = try? IPTool.run(["link", "delete", interface]) }
        let names = leftovers(isAlive: isAlive)
        for name in names { _ = try? IPTool.run(["netns", "delete", name]) }
        return names
    }

    /// Whether process `pid` exists.
    public static func processIsAlive(_ pid: pid_t) -> Bool { kill(pid, 0) == 0 || errno == EPERM }
}

/// Runs iproute2's `ip`.
enum IPTool {
    static let candidates = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]

    static func run(_ arguments: [String]) throws(NetworkNamespaceError) {
        guard let tool = candidates.first(where: { access($0, X_OK) == 0 }) else { throw .ipToolMissing }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch { throw .ipToolMissing }
        let data = output.fileHandleForReading.readDataToEndOfFile()
        try? output.fileHandleForReading.close()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw .command(arguments: arguments, status: process.terminationStatus,
                           output: String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
        }
    }
}

/// The addresses of a VM's network: its namespace is joined to the host by a veth pair; the
/// host end gets `hostAddresses`, the end inside the namespace (`eth0`) `guestAddresses`.
public struct VMNetworkConfiguration: Equatable, Sendable {
    /// A label for the namespace's name.
    public var label: String
    /// Addresses with prefix length of the host end, for example 198.18.0.1/24 and fd00:18::1/64.
    public var hostAddresses: [IPPrefix]
    /// Addresses with prefix length of the namespace end (the guest's sockets are bound here).
    public var guestAddresses: [IPPrefix]
    /// Give the namespace a default route through the host end (for each family with addresses).
    /// Off by default: the guest then reaches only the veth's subnets.
    public var defaultRouteThroughHost: Bool
    /// Where the other end of the veth goes: nil, the VMM's own namespace; or another namespace
    /// RTVirt created (a test client's, so that no packet touches the VMM's namespace).
    public var peerNamespace: NetworkNamespace?

    /// A configuration.
    public init(label: String = "vm", hostAddresses: [IPPrefix], guestAddresses: [IPPrefix], defaultRouteThroughHost: Bool = false,
                peerNamespace: NetworkNamespace? = nil) {
        self.label = label; self.hostAddresses = hostAddresses; self.guestAddresses = guestAddresses
        self.defaultRouteThroughHost = defaultRouteThroughHost; self.peerNamespace = peerNamespace
    }

    public static func == (left: VMNetworkConfiguration, right: VMNetworkConfiguration) -> Bool {
        left.label == right.label && left.hostAddresses == right.hostAddresses && left.guestAddresses == right.guestAddresses
            && left.defaultRouteThroughHost == right.defaultRouteThroughHost && left.peerNamespace === right.peerNamespace
    }
}

/// A VM's own network: a namespace RTVirt created, joined to the VMM's namespace by a veth pair
/// with the configured addresses. `remove()` (or dropping it) deletes the veth and the namespace.
public final class VMNetwork: Sendable {
    /// The namespace the guest's sockets live in.
    public let namespace: NetworkNamespace
    /// The veth end in the VMM's namespace (or the peer namespace): `rtv<pid>h<n>`.
    public let hostInterface: String
    /// The veth end inside the namespace.
    public let guestInterface = "eth0"
    /// The addresses.
    public let configuration: VMNetworkConfiguration
    private let removed = LockedValue(false)

    /// Creates the namespace and the veth pair, assigns the addresses and brings the links up.
    /// On any failure everything created so far is removed.
    public init(_ configuration: VMNetworkConfiguration) throws(NetworkNamespaceError) {
        let namespace = try NetworkNamespace.create(label: configuration.label)
        let number = namespace.name?.split(separator: "-").last.map(String.init) ?? "0"
        let host = "rtv\(getpid())h\(number)"
        do throws(NetworkNamespaceError) {
            guard let name = namespace.name else { throw .invalidName(namespace.path) }
            try IPTool.run(["link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", name])
            // Commands for the peer end: in the VMM's namespace, or inside the peer namespace.
            var peer: [String] = []
            if let peerNamespace = configuration.peerNamespace {
                guard let peerName = peerNamespace.name else { throw .invalidName(peerNamespace.path) }
                try IPTool.run(["link", "set", host, "netns", peerName])
                peer = ["-n", peerName]
            }
            for prefix in configuration.hostAddresses {
                try IPTool.run(peer + ["address", "add", prefix.description, "dev", host] + (prefix.address.family == .ipv6 ? ["nodad"] : []))
            }
            try IPTool.run(peer + ["link", "set", host, "up"])
            for prefix in configuration.guestAddresses {
                try namespace.ip(["address", "add", prefix.description, "dev", "eth0"] + (prefix.address.family == .ipv6 ? ["nodad"] : []))
            }
            try namespace.ip(["link", "set", "eth0", "up"])
            if configuration.defaultRouteThroughHost {
                for family in SocketFamily.allCases {
                    guard let gateway = configuration.hostAddresses.first(where: { $0.address.family == family }) else { continue }
                    try namespace.ip([family == .ipv4 ? "-4" : "-6", "route", "add", "default", "via", gateway.address.description])
                }
            }
        } catch {
            _ = try? IPTool.run(["link", "delete", host])
            if let peerName = configuration.peerNamespace?.name { _ = try? IPTool.run(["-n", peerName, "link", "delete", host]) }
            namespace.remove()
            throw error
        }
        self.namespace = namespace
        self.hostInterface = host
        self.configuration = configuration
    }

    /// The first guest address of `family`, if configured.
    public func guestAddress(_ family: SocketFamily) -> IPAddress? {
        configuration.guestAddresses.first { $0.address.family == family }?.address
    }

    /// Deletes the veth pair and the namespace. Idempotent. Close the guest's sockets first
    /// (the socket service does at VM teardown): a socket keeps its namespace alive.
    public func remove() {
        let first = removed.withLock { removed -> Bool in
            defer { removed = true }
            return !removed
        }
        guard first else { return }
        if let peerName = configuration.peerNamespace?.name {
            _ = try? IPTool.run(["-n", peerName, "link", "delete", hostInterface])
        } else {
            _ = try? IPTool.run(["link", "delete", hostInterface])
        }
        namespace.remove()
    }

    deinit { remove() }

    /// Host-side veth ends (`rtv<pid>h<n>`) of RTVirt processes that died.
    public static func leftoverInterfaces(isAlive: (pid_t) -> Bool = NetworkNamespace.processIsAlive) -> [String] {
        let interfaces = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/net")) ?? []
        return interfaces.filter { name in
            guard name.hasPrefix("rtv"), let h = name.firstIndex(of: "h"),
                  let pid = pid_t(name[name.index(name.startIndex, offsetBy: 3)..<h]),
                  Int(name[name.index(after: h)...]) != nil else { return false }
            return !isAlive(pid)
        }.sorted()
    }
}
