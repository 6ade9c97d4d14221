#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KVMBackend
import RTVirtCore
@testable import rtvirt
import VMRPCSockets
import XCTest
import RTVirtXCTestSupport

/// `rtvirt net-bench` and `rtvirt net-echo`, short (root, /dev/kvm, iproute2; run under
/// flock /tmp/rtvirt-hw.lock).
final class NetCommandTests: XCTestCase {
    func requirements() throws {
        guard geteuid() == 0 else { throw unavailable("net command test skipped: network namespaces need root") }
        _ = try openKVMOrSkip("net command test")
        guard access("/usr/sbin/ip", X_OK) == 0 || access("/sbin/ip", X_OK) == 0 else {
            throw unavailable("net command test skipped: iproute2 is not installed")
        }
    }

    func testNetBenchMeasuresBothEchoesAndCleansUp() throws {
        try requirements()
        let cpus = try ThreadScheduling.affinity().cpus
        guard let first = cpus.first, let last = cpus.last else { throw unavailable("net-bench test skipped: no CPU in this process's affinity") }
        let report = try NetBenchCommand.measure(batch: 16, size: 64, window: 32, rounds: 1, roundSeconds: 0.3, cpu: last, clientCPU: first)
        print("net-bench (short): host \(report.hostPps) pps, guest \(report.guestPps) pps, ratio \(report.ratio), batch \(report.batch)")
        XCTAssertGreaterThan(report.hostPps, 0, "the host echo answered")
        XCTAssertGreaterThan(report.guestPps, 0, "the guest echo answered")
        XCTAssertEqual(report.batch, 16)
        XCTAssertEqual(report.hostRounds.count, 1)
        XCTAssertFalse(NetworkNamespace.leftovers(isAlive: { _ in false }).contains { $0.contains("bench") && $0.contains("-\(getpid())-") },
                       "the namespaces are removed")
        let json = try JSONEncoder().encode(report)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: json) as? [String: Any])
        for key in ["hostPps", "guestPps", "ratio", "batch"] { XCTAssertNotNil(object[key], key) }
    }

    func testNetEchoServesFromItsNamespaceUntilStopped() throws {
        try requirements()
        let command = try NetEchoCommand.parse(["--host-address", "198.18.11.1/24", "--guest-address", "198.18.11.2/24",
                                                "--host-address6", "fd00:11::1/64", "--guest-address6", "fd00:11::2/64",
                                                "--seconds", "4"])
        let thread = try HostThread(name: "net-echo") { try? command.run() }
        // The host end of the veth is in this (the VMM's) namespace: talk to the guest from here.
        let backend = HostSocketBackend.unconfinedInVMMsOwnNetworkNamespace()
        let descriptor = try backend.open(.ipv4, .datagram)
        defer { backend.close(descriptor) }
        let payload = Array("hello, guest".utf8)
        var echoed: [UInt8]?
        for _ in 0..<30 where echoed == nil { // the guest needs a moment to boot; bounded
            _ = try? payload.withUnsafeBytes { try backend.send(descriptor, $0, to: SocketEndpoint(IPAddress("198.18.11.2")!, port: 7000)) }
            var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, 100) > 0 else { continue }
            var buffer = [UInt8](repeating: 0, count: 256)
            let received = try buffer.withUnsafeMutableBytes { try backend.receive(descriptor, into: $0) }
            echoed = Array(buffer.prefix(received.length))
        }
        XCTAssertEqual(echoed, payload)
        thread.join()
        XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: "/sys/class/net").contains { $0.hasPrefix("rtv\(getpid())h") },
                       "the veth is removed")
        XCTAssertFalse(((try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []).contains { $0.hasPrefix("rtvirt-echo-\(getpid())-") },
                       "the namespace is removed")
    }
}
