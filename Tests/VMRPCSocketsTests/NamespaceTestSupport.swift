#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RTVirtCore
import RTVirtTesting
import VMRPCSockets
import XCTest
import RTVirtXCTestSupport

/// A VM network whose veth's other end is in a client namespace of its own, so that test
/// packets never touch the VMM's namespace: the guest side is 198.18.5.2/24 and fd00:5::2/64, the
/// client 198.18.5.1/24 and fd00:5::1/64.
final class ClientTopology {
    let client: NetworkNamespace
    let network: VMNetwork
    let clientSockets: HostSocketBackend
    static let guestV4 = IPAddress("198.18.5.2")!
    static let clientV4 = IPAddress("198.18.5.1")!
    static let guestV6 = IPAddress("fd00:5::2")!
    static let clientV6 = IPAddress("fd00:5::1")!

    init(label: String) throws {
        client = try NetworkNamespace.create(label: "\(label)-c")
        do {
            network = try VMNetwork(VMNetworkConfiguration(
                label: label, hostAddresses: [IPPrefix("198.18.5.1/24")!, IPPrefix("fd00:5::1/64")!],
                guestAddresses: [IPPrefix("198.18.5.2/24")!, IPPrefix("fd00:5::2/64")!], peerNamespace: client))
            clientSockets = try HostSocketBackend(namespace: client)
        } catch {
            client.remove()
            throw error
        }
    }

    /// Removes the VM network, then the client namespace.
    func remove() {
        network.remove()
        client.remove()
    }

    /// UDP datagrams the VM namespace's stack sent (IPv4 `Udp: OutDatagrams` plus IPv6
    /// `Udp6OutDatagrams`): unlike the veth's packet counter, not moved by ARP or neighbour discovery.
    func guestUDPDatagramsSent() throws -> UInt64 {
        let name = network.namespace.name!
        let snmp = try runCapturing(["/usr/sbin/ip", "netns", "exec", name, "cat", "/proc/net/snmp", "/proc/net/snmp6"])
        let lines = snmp.split(separator: "\n").map { $0.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init) }
        var total: UInt64 = 0
        let udp = lines.filter { $0.first == "Udp:" }
        if udp.count == 2, let column = udp[0].firstIndex(of: "OutDatagrams"), let value = UInt64(udp[1][column]) { total += value }
        if let line = lines.first(where: { $0.first == "Udp6OutDatagrams" }), let value = UInt64(line[1]) { total += value }
        return total
    }
}

func runCapturing(_ arguments: [String]) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: arguments[0])
    process.arguments = Array(arguments.dropFirst())
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return String(decoding: data, as: UTF8.self)
}

/// Blocking helpers over a backend's non-blocking sockets (the client side of the tests).
struct BlockingSockets {
    let backend: any SocketBackend

    func wait(_ descriptor: Int32, events: Int16, milliseconds: Int32) -> Bool {
        var entry = pollfd(fd: descriptor, events: events, revents: 0)
        return poll(&entry, 1, milliseconds) > 0
    }

    func udp(_ family: SocketFamily, bind endpoint: SocketEndpoint? = nil) throws -> Int32 {
        let descriptor = try backend.open(family, .datagram)
        if let endpoint { try backend.bind(descriptor, endpoint) }
        return descriptor
    }

    func send(_ descriptor: Int32, _ bytes: [UInt8], to endpoint: SocketEndpoint? = nil) throws -> Int {
        try bytes.withUnsafeBytes { (buffer) throws -> Int in try backend.send(descriptor, buffer, to: endpoint) }
    }

    /// Receives one datagram (or stream chunk) within `milliseconds`; nil on timeout.
    func receive(_ descriptor: Int32, capacity: Int = 65536, milliseconds: Int32) throws -> (bytes: [UInt8], source: SocketEndpoint)? {
        guard wait(descriptor, events: Int16(POLLIN), milliseconds: milliseconds) else { return nil }
        var buffer = [UInt8](repeating: 0, count: capacity)
        let received = try buffer.withUnsafeMutableBytes { (bytes) throws -> SocketReceivedDatagram in try backend.receive(descriptor, into: bytes) }
        return (Array(buffer.prefix(received.length)), received.source)
    }

    /// A TCP connection to `endpoint`, made within `milliseconds`.
    func connect(_ family: SocketFamily, to endpoint: SocketEndpoint, milliseconds: Int32) throws -> Int32? {
        let descriptor = try backend.open(family, .stream)
        do { try backend.connect(descriptor, endpoint) } catch where error.status == .inProgress {
            guard wait(descriptor, events: Int16(POLLOUT), milliseconds: milliseconds),
                  try backend.getOption(descriptor, .error) == 0 else {
                backend.close(descriptor)
                return nil
            }
        }
        return descriptor
    }

    /// Reads until `count` bytes arrived, the peer closed, or `milliseconds` passed per chunk.
    func receiveExactly(_ descriptor: Int32, count: Int, milliseconds: Int32) throws -> [UInt8] {
        var bytes: [UInt8] = []
        for _ in 0..<10_000 where bytes.count < count {
            guard let chunk = try receive(descriptor, capacity: count - bytes.count, milliseconds: milliseconds), !chunk.bytes.isEmpty else { break }
            bytes += chunk.bytes
        }
        return bytes
    }

    /// Sends everything (waiting for room up to `milliseconds` each time).
    func sendAll(_ descriptor: Int32, _ bytes: [UInt8], milliseconds: Int32) throws {
        var offset = 0
        for _ in 0..<10_000 where offset < bytes.count {
            do { offset += try send(descriptor, Array(bytes[offset...])) } catch let error as SocketErrno where error.status == .wouldBlock {
                _ = wait(descriptor, events: Int16(POLLOUT), milliseconds: milliseconds)
            }
        }
    }
}
