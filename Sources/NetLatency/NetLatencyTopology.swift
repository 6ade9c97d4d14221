#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RTVirtCore
import VMRPCSockets

/// The instrument's network: a tester namespace of its own (the "tester host"), joined by a veth
/// pair to the VM's namespace, where the measured services (host-native and the guest's
/// outsourced sockets) have their sockets. Nothing of it touches the VMM's own namespace.
///
/// Both namespaces are named `rtvirt-<label>-<pid>-<n>`; `remove()` (or dropping the value)
/// deletes the veth and both namespaces, and a later run reclaims what a crashed one left
/// (`NetworkNamespace.reclaimLeftovers`, which `NetworkNamespace.create` calls).
public final class NetLatencyTopology: Sendable {
    /// The tester's namespace.
    public let tester: NetworkNamespace
    /// The VM's network: its namespace and the veth whose other end (`testerInterface`) is in the tester's.
    public let network: VMNetwork
    /// The tester's address and the services' address on the veth.
    public let testerAddress: IPAddress
    /// The services' address (in the VM's namespace).
    public let serviceAddress: IPAddress
    private let removed = LockedValue(false)

    /// The veth end in the tester's namespace.
    public var testerInterface: String { network.hostInterface }
    /// The VM's namespace.
    public var serviceNamespace: NetworkNamespace { network.namespace }

    /// Creates both namespaces and the veth with `testerAddress`/`serviceAddress` in `prefixLength`.
    /// On any failure everything created so far is removed.
    /// - Throws: `NetLatencyError.namespace`.
    public init(label: String = "netlat", testerAddress: IPAddress = IPAddress("198.18.20.1")!,
                serviceAddress: IPAddress = IPAddress("198.18.20.2")!, prefixLength: Int = 24) throws(NetLatencyError) {
        let tester: NetworkNamespace
        do { tester = try NetworkNamespace.create(label: "\(label)-t") } catch { throw .namespace(error) }
        guard let testerPrefix = IPPrefix(testerAddress, length: prefixLength), let servicePrefix = IPPrefix(serviceAddress, length: prefixLength) else {
            tester.remove()
            throw .invalidPlan("prefix length \(prefixLength) does not fit the addresses")
        }
        do {
            network = try VMNetwork(VMNetworkConfiguration(label: label, hostAddresses: [testerPrefix], guestAddresses: [servicePrefix],
                                                           peerNamespace: tester))
        } catch {
            tester.remove()
            throw .namespace(error)
        }
        self.tester = tester
        self.testerAddress = testerAddress
        self.serviceAddress = serviceAddress
    }

    /// Deletes the veth and both namespaces. Idempotent. Close the sockets in them first (a
    /// socket keeps its namespace alive in the kernel, though its name is gone).
    public func remove() {
        let first = removed.withLock { removed -> Bool in
            defer { removed = true }
            return !removed
        }
        guard first else { return }
        network.remove()
        tester.remove()
    }

    deinit { remove() }

    /// Names (under `/run/netns`) and veths (`/sys/class/net`) of this process's instrument
    /// networks still present: empty after `remove()`.
    public static func presentOfThisProcess(label: String = "netlat") -> [String] {
        let pid = getpid()
        let namespaces = ((try? FileManager.default.contentsOfDirectory(atPath: NetworkNamespace.namedDirectory)) ?? [])
            .filter { $0.hasPrefix("\(NetworkNamespace.namePrefix)\(label)") && $0.contains("-\(pid)-") }
        let links = ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/net")) ?? [])
            .filter { $0.hasPrefix("rtv\(pid)h") }
        return (namespaces + links).sorted()
    }
}
