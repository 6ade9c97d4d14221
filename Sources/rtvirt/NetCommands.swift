#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Dispatch
import Foundation
import KVMBackend
import RTVirtCore
import RTVirtGuestImage
import VMRPC
import VMRPCSockets
import LongPoll

/// The bundled echo guest on one vCPU with its sockets in `namespace`.
struct EchoGuest {
    let machine: BundledGuestMachine
    let dispatcher: LongPollDispatcher
    let service: VMRPCSocketService
    let server: VMRPCServer
    let runner: VirtualMachineRunner

    init(mode: BundledGuestMode, port: UInt16, family: SocketFamily, batch: Int, namespace: NetworkNamespace,
         remotes: [IPPrefix], cpu: Int?) throws {
        machine = try BundledGuestMachine(system: try KVMSystem(), vcpus: [BundledGuestVCPU(
            mode: mode, arguments: (UInt64(port) | (family == .ipv6 ? 1 << 16 : 0), UInt64(batch)))])
        dispatcher = try LongPollDispatcher(vcpuCount: 1)
        var policy = SocketPolicy()
        policy.bindPorts = [port...port]
        policy.remotes = remotes.map { SocketRemoteRule(prefix: $0) }
        service = try VMRPCSocketService(backend: try HostSocketBackend(namespace: namespace), policy: policy,
                                         memory: machine.vm.guestMemory, dispatcher: dispatcher)
        server = try machine.makeVMRPCServer(dispatcher: dispatcher, extra: service.procedures)
        runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: machine.makeBus(server: server), dispatcher: dispatcher,
                                          onThreadStart: { _ in if let cpu { _ = try? ThreadScheduling.setAffinity(CPUSet([cpu])) } })
    }

    /// Waits up to 20 s for the guest to report its socket ready.
    func waitUntilReady() throws {
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while monotonicNanoseconds() < deadline {
            if machine.ports.results(ofVCPU: 0).contains(GuestLayout.netReady) { return }
            if let reason = runner.stopReasons[0] {
                throw ValidationError("the echo guest stopped before it was ready: \(reason), reported \(machine.ports.results(ofVCPU: 0))")
            }
            usleep(1000)
        }
        throw ValidationError("the echo guest did not get ready within 20 s")
    }

    /// Stops the VM (its sockets close) and waits for the vCPU thread.
    func stop() {
        runner.stop()
        runner.waitForAll(timeoutNanoseconds: 10_000_000_000)
        server.shutdown()
    }
}

/// Blocks until SIGINT or SIGTERM, or `seconds` (if given).
func waitForInterrupt(seconds: Double?) {
    let semaphore = DispatchSemaphore(value: 0)
    var sources: [any DispatchSourceSignal] = []
    for number in [SIGINT, SIGTERM] {
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
        source.setEventHandler { semaphore.signal() }
        source.activate()
        sources.append(source)
    }
    if let seconds { _ = semaphore.wait(timeout: .now() + seconds) } else { semaphore.wait() }
    for source in sources { source.cancel() }
}

struct NetEchoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net-echo",
        abstract: "Boot the bundled guest as a UDP or TCP echo server with its own network namespace.",
        discussion: """
            The guest's sockets live in a network namespace that rtvirt creates for it, joined to this host by a veth \
            pair (host end --host-address, guest end --guest-address). The guest may bind only --port and send only \
            to the veth's subnets. It serves until Ctrl-C; then the VM stops, its sockets close and the namespace and \
            veth are removed.
            """)

    @Option(help: "udp or tcp.") var proto = "udp"
    @Option(help: "The port the guest listens on.") var port: UInt16 = 7000
    @Option(help: "Datagrams per batch call (UDP; 1: one receiveFrom/sendTo per datagram).") var batch = 16
    @Option(help: "Host end of the veth, with prefix length.") var hostAddress = "198.18.0.1/24"
    @Option(help: "Guest end of the veth (inside the namespace), with prefix length.") var guestAddress = "198.18.0.2/24"
    @Option(help: "Host end's IPv6 address.") var hostAddress6 = "fd00:18::1/64"
    @Option(help: "Guest end's IPv6 address.") var guestAddress6 = "fd00:18::2/64"
    @Flag(help: "Serve IPv6 instead of IPv4.") var ipv6 = false
    @Option(help: "Stop after this many seconds instead of waiting for Ctrl-C.") var seconds: Double?

    func validate() throws {
        guard ["udp", "tcp"].contains(proto) else { throw ValidationError("--proto is udp or tcp") }
        guard (1...SocketWire.maximumBatchCount).contains(batch) else { throw ValidationError("--batch must be 1...64") }
        for text in [hostAddress, guestAddress, hostAddress6, guestAddress6] where IPPrefix(text) == nil {
            throw ValidationError("'\(text)' is not an address with prefix length")
        }
    }

    func run() throws {
        let hosts = [IPPrefix(hostAddress)!, IPPrefix(hostAddress6)!], guests = [IPPrefix(guestAddress)!, IPPrefix(guestAddress6)!]
        let network = try VMNetwork(VMNetworkConfiguration(label: "echo", hostAddresses: hosts, guestAddresses: guests))
        defer { network.remove() }
        let family: SocketFamily = ipv6 ? .ipv6 : .ipv4
        // The guest may answer only peers on the veth's subnets.
        let subnets = hosts.map { IPPrefix($0.address, length: $0.length)! }
        let guest = try EchoGuest(mode: proto == "udp" ? .udpEcho : .tcpEcho, port: port, family: family, batch: batch,
                                  namespace: network.namespace, remotes: subnets, cpu: nil)
        defer { guest.stop() }
        try guest.waitUntilReady()
        let address = network.guestAddress(family)!
        let shown = family == .ipv4 ? "\(address):\(port)" : "[\(address)]:\(port)"
        let module = KVMHostInfo.detectModule()
        print("KVM backend: \(module.rawValue) — \(module.implication)")
        print("guest \(proto) echo at \(shown) (namespace \(network.namespace.name!), veth \(network.hostInterface) on this host)")
        print("try it:            \(proto == "udp" ? "echo hello | nc -u -w1" : "echo hello | nc -q1") \(ipv6 ? "-6 " : "")\(address) \(port)")
        print("enter the namespace: ip netns exec \(network.namespace.name!) bash")
        print("Ctrl-C stops the VM and removes the namespace and veth.")
        waitForInterrupt(seconds: seconds)
        let statistics = guest.service.statistics
        print("stopping: \(statistics.receives) received, \(statistics.sends) sent, \(statistics.deniedCalls) refused by the policy")
    }
}

/// What `rtvirt net-bench --json` prints.
struct NetBenchReport: Codable {
    var hostPps: Double
    var guestPps: Double
    var ratio: Double
    var batch: Int
    var payloadBytes: Int
    var window: Int
    var rounds: Int
    var roundSeconds: Double
    var hostRounds: [Double]
    var guestRounds: [Double]
    var kvmModule: String
    var nested: Bool
}

/// A UDP load client: keeps `window` datagrams in flight to an echo server and counts echoes.
struct EchoLoadClient {
    let backend: HostSocketBackend
    let descriptor: Int32
    let payload: Int
    let window: Int
    static let stride = 2048

    /// Echoes per second to `target` over `seconds`.
    func run(to target: SocketEndpoint, seconds: Double) -> Double {
        drain()
        var buffer = [UInt8](repeating: 0x5A, count: 64 * Self.stride)
        let batch = (0..<64).map { SocketBatchDatagram(offset: $0 * Self.stride + 32, length: payload, destination: target) }
        func send(_ count: Int) {
            var remaining = count
            while remaining > 0 {
                let chunk = min(remaining, 64)
                let sent = buffer.withUnsafeBytes { (try? backend.sendBatch(descriptor, from: $0, datagrams: Array(batch.prefix(chunk)))) ?? 0 }
                if sent <= 0 { return }
                remaining -= sent
            }
        }
        let start = monotonicNanoseconds(), end = start + UInt64(seconds * 1e9)
        var echoes = 0
        send(window)
        while monotonicNanoseconds() < end {
            var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, 50) > 0 else {
                send(window) // lost datagrams: refill the window
                continue
            }
            let received = buffer.withUnsafeMutableBytes {
                (try? backend.receiveBatch(descriptor, into: $0, count: 64, stride: Self.stride, headerSize: 32, capacity: Self.stride - 32)) ?? []
            }
            echoes += received.count
            send(received.count)
        }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        return Double(echoes) / elapsed
    }

    /// Discards echoes still in flight from an earlier round.
    func drain() {
        var buffer = [UInt8](repeating: 0, count: 64 * Self.stride)
        for _ in 0..<100 {
            var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, 20) > 0 else { return }
            _ = buffer.withUnsafeMutableBytes {
                try? backend.receiveBatch(descriptor, into: $0, count: 64, stride: Self.stride, headerSize: 32, capacity: Self.stride - 32)
            }
        }
    }
}

/// A host-native UDP echo: one thread, `recvmmsg`/`sendmmsg` of up to `batch` datagrams, on a socket in the VM's namespace.
final class HostNativeEcho: Sendable {
    private let stopFlag = LockedValue(false)
    private let thread: HostThread

    init(backend: HostSocketBackend, at endpoint: SocketEndpoint, batch: Int, cpu: Int) throws {
        let descriptor = try backend.open(.ipv4, .datagram)
        do { try backend.bind(descriptor, endpoint) } catch {
            backend.close(descriptor)
            throw error
        }
        let stopFlag = self.stopFlag
        thread = try HostThread(name: "host-echo") {
            _ = try? ThreadScheduling.setAffinity(CPUSet([cpu]))
            var buffer = [UInt8](repeating: 0, count: batch * EchoLoadClient.stride)
            let stride = EchoLoadClient.stride
            while !stopFlag.withLock({ $0 }) {
                var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
                guard poll(&entry, 1, 100) > 0 else { continue }
                let received = buffer.withUnsafeMutableBytes {
                    (try? backend.receiveBatch(descriptor, into: $0, count: batch, stride: stride, headerSize: 32, capacity: stride - 32)) ?? []
                }
                let echoes = received.enumerated().map { SocketBatchDatagram(offset: $0.offset * stride + 32, length: $0.element.length,
                                                                            destination: $0.element.source) }
                if !echoes.isEmpty { _ = buffer.withUnsafeBytes { try? backend.sendBatch(descriptor, from: $0, datagrams: echoes) } }
            }
            backend.close(descriptor)
        }
    }

    func stop() {
        stopFlag.withLock { $0 = true }
        thread.join()
    }
}

struct NetBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net-bench",
        abstract: "Datagrams per second of the guest's UDP echo (batched net.* calls) against a host-native UDP echo.",
        discussion: """
            Both echo servers have their sockets in the VM's network namespace and run on the same host CPU (--cpu): \
            the guest's vCPU thread, and a host thread doing recvmmsg/sendmmsg with the same batch size. One client in \
            another namespace (joined to the VM's by a veth pair, 198.18.9.0/24) keeps --window datagrams in flight to \
            one server at a time, in interleaved rounds, and counts the echoes.
            """)

    @Option(help: "Datagrams per batch call, guest and host alike (1...64).") var batch = 64
    @Option(help: "Payload bytes per datagram.") var size = 64
    @Option(help: "Datagrams the client keeps in flight.") var window = 128
    @Option(help: "Rounds per server, interleaved.") var rounds = 5
    @Option(help: "Seconds per round.") var roundSeconds = 1.0
    @Option(help: "Host CPU of both echo servers.") var cpu = 1
    @Option(help: "Host CPU of the client.") var clientCPU = 0
    @Flag(help: "Print one JSON object.") var json = false

    func validate() throws {
        guard (1...SocketWire.maximumBatchCount).contains(batch) else { throw ValidationError("--batch must be 1...64") }
        guard (1...1400).contains(size) else { throw ValidationError("--size must be 1...1400") }
        guard (1...1024).contains(window) else { throw ValidationError("--window must be 1...1024") }
        guard (1...50).contains(rounds), (0.1...10).contains(roundSeconds) else { throw ValidationError("--rounds 1...50, --round-seconds 0.1...10") }
    }

    func run() throws {
        let report = try Self.measure(batch: batch, size: size, window: window, rounds: rounds, roundSeconds: roundSeconds,
                                      cpu: cpu, clientCPU: clientCPU)
        if json { return try printJSON(report) }
        let module = KVMHostInfo.detectModule()
        print("KVM backend: \(module.rawValue) — \(module.implication)")
        print("UDP echo, \(size)-byte datagrams, \(window) in flight, batch \(batch), both servers on CPU \(cpu), client on CPU \(clientCPU)")
        print("round   host-native pps   guest pps")
        for (index, (hostRate, guestRate)) in zip(report.hostRounds, report.guestRounds).enumerated() {
            print(String(format: "%5d   %15.0f   %9.0f", index + 1, hostRate, guestRate))
        }
        print(String(format: "median  %15.0f   %9.0f   ratio (guest / host) %.3f", report.hostPps, report.guestPps, report.ratio))
    }

    /// Sets up both echo servers and the client, runs the interleaved rounds, removes everything.
    static func measure(batch: Int, size: Int, window: Int, rounds: Int, roundSeconds: Double, cpu: Int,
                        clientCPU: Int) throws -> NetBenchReport {
        let client = try NetworkNamespace.create(label: "bench-c")
        defer { client.remove() }
        let network = try VMNetwork(VMNetworkConfiguration(label: "bench", hostAddresses: [IPPrefix("198.18.9.1/24")!],
                                                           guestAddresses: [IPPrefix("198.18.9.2/24")!], peerNamespace: client))
        defer { network.remove() }
        let guestAddress = IPAddress("198.18.9.2")!
        let guest = try EchoGuest(mode: .udpEcho, port: 7000, family: .ipv4, batch: batch, namespace: network.namespace,
                                  remotes: [IPPrefix("198.18.9.1/32")!], cpu: cpu)
        defer { guest.stop() }
        try guest.waitUntilReady()
        let host = try HostNativeEcho(backend: try HostSocketBackend(namespace: network.namespace),
                                      at: SocketEndpoint(guestAddress, port: 7001), batch: batch, cpu: cpu)
        defer { host.stop() }
        let clientBackend = try HostSocketBackend(namespace: client)
        let descriptor = try clientBackend.open(.ipv4, .datagram)
        defer { clientBackend.close(descriptor) }
        try clientBackend.bind(descriptor, SocketEndpoint(IPAddress("198.18.9.1")!, port: 9000))
        _ = try? clientBackend.setOption(descriptor, .receiveBuffer, 4 << 20)
        let load = EchoLoadClient(backend: clientBackend, descriptor: descriptor, payload: size, window: window)
        let results = LockedValue<(host: [Double], guest: [Double])>(([], []))
        let (roundCount, seconds, pin) = (rounds, roundSeconds, clientCPU)
        let driver = try HostThread(name: "bench-client") {
            _ = try? ThreadScheduling.setAffinity(CPUSet([pin]))
            _ = load.run(to: SocketEndpoint(guestAddress, port: 7001), seconds: 0.2) // warm-up
            for _ in 0..<roundCount {
                let hostRate = load.run(to: SocketEndpoint(guestAddress, port: 7001), seconds: seconds)
                let guestRate = load.run(to: SocketEndpoint(guestAddress, port: 7000), seconds: seconds)
                results.withLock { $0.host.append(hostRate); $0.guest.append(guestRate) }
            }
        }
        driver.join()
        let (hostRounds, guestRounds) = results.withLock { ($0.host, $0.guest) }
        func median(_ values: [Double]) -> Double {
            let sorted = values.sorted()
            return sorted.isEmpty ? 0 : sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
        }
        let hostPps = median(hostRounds), guestPps = median(guestRounds)
        let module = KVMHostInfo.detectModule()
        return NetBenchReport(hostPps: hostPps, guestPps: guestPps, ratio: hostPps > 0 ? guestPps / hostPps : 0, batch: batch,
                              payloadBytes: size, window: window, rounds: rounds, roundSeconds: roundSeconds,
                              hostRounds: hostRounds, guestRounds: guestRounds, kvmModule: module.rawValue, nested: module == .pvm)
    }
}
