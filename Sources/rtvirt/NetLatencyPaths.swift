#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KVMBackend
import LongPoll
import Logging
import NetLatency
import PacketRing
import RTVirtCore
import RTVirtGuestImage
import RealtimeVCPU
import VMRPC
import VMRPCSockets

/// The measured paths of `rtvirt netlatency`. The raw values are the names in the table and the
/// JSON; they are stable.
enum NetPath: String, CaseIterable, Codable, Sendable, MeasuredPath {
    /// A host thread in the VM's namespace: blocking `recvfrom`, then `sendto`. The native baseline.
    case hostEcho = "host-echo"
    /// The guest's UDP echo over outsourced sockets; its receive is a long poll (no interrupt).
    case guestLongPoll = "guest-longpoll"
    /// The conventional path: an I/O thread fills a receive ring in guest memory and raises an
    /// interrupt through KVM; the halted guest (CPL 0) echoes through a transmit ring and a doorbell.
    case guestInterrupt = "guest-interrupt"
    /// The guest spins on a non-blocking receive (timeout 0) and never waits: the poll-mode way.
    case guestBusyPoll = "guest-busypoll"

    var name: String { rawValue }

    var plotColor: String {
        switch self {
        case .hostEcho: return "#1f77b4"
        case .guestLongPoll: return "#2ca02c"
        case .guestInterrupt: return "#d62728"
        case .guestBusyPoll: return "#9467bd"
        }
    }

    /// The service's UDP port in the VM's namespace (one per path, so that a late reply of one
    /// path can never pass for another's).
    var port: UInt16 {
        switch self {
        case .hostEcho: return 7001
        case .guestLongPoll: return 7002
        case .guestInterrupt: return 7003
        case .guestBusyPoll: return 7004
        }
    }
}

/// How the I/O thread of `guest-interrupt` raises its interrupt.
enum NetInterruptMechanism: String, CaseIterable, Sendable {
    /// `KVM_IRQFD`: an eventfd whose GSI routes to an MSI (vhost-net's way).
    case irqfd
    /// `KVM_SIGNAL_MSI`: one ioctl per interrupt.
    case msi
}

/// What every path's service shares: where it listens, the policy of its threads, who may talk to it.
struct NetServiceSettings: Sendable {
    /// The services' address in the VM's namespace.
    var serviceAddress: IPAddress
    /// The tester's address (the only destination the guests may send to).
    var testerAddress: IPAddress
    /// The real-time policy of every service thread (host echo, vCPU, I/O thread).
    var policy: RealtimePolicy
    var interrupt: NetInterruptMechanism
    /// Mark each service receive and send (`--breakdown`).
    var breakdown = false
}

enum NetLatencyRunError: Error, CustomStringConvertible {
    case policy(String)
    case service(NetPath, String)

    var description: String {
        switch self {
        case .policy(let message): return "could not apply the real-time policy: \(message)"
        case let .service(path, message): return "\(path.rawValue): \(message)"
        }
    }
}

/// The runners' lifecycle log: one VM start and stop per round is not news; failures are.
let netLatencyRunnerLogger: Logger = {
    var logger = Logger(label: "rtvirt.netlatency")
    logger.logLevel = .warning
    return logger
}()

/// Applies the policy on the thread it runs on and tells the starter whether that worked.
final class ServicePolicyHook: Sendable {
    private let policy: RealtimePolicy
    private let outcome = ConditionLock<String??>(nil)

    init(_ policy: RealtimePolicy) { self.policy = policy }

    /// On the service thread, first.
    func apply() throws {
        do {
            _ = try RealtimeThreadPolicy.apply(policy)
            outcome.withLockAndBroadcast { $0 = .some(nil) }
        } catch {
            outcome.withLockAndBroadcast { $0 = .some("\(error)") }
            throw error
        }
    }

    /// Waits (hang detector: 10 s) for the thread's report; throws its failure.
    func check() throws {
        let result = outcome.wait(until: { $0 != nil }, deadlineNanoseconds: monotonicNanoseconds() + 10_000_000_000) { value, _ in value }
        guard let result else { throw NetLatencyRunError.policy("the service thread did not start within 10 s") }
        if let failure = result { throw NetLatencyRunError.policy(failure) }
    }
}

/// One path's service: started before its round, stopped after it.
protocol NetServiceRunner: AnyObject {
    var path: NetPath { get }
    /// Starts the service and returns once it echoes.
    func start() throws
    /// The kernel ids of the service's threads while it runs (their CPU time is its cost).
    var serviceThreads: [pid_t] { get }
    /// The service's receive and send marks (with `--breakdown`), emptied at each start.
    var timeline: ServiceTimeline? { get }
    /// Stops the service; throws when it failed while it ran.
    func stop() throws
}

/// `host-echo`: `HostUDPEcho` in the VM's namespace on a thread with the service policy.
final class HostEchoRunner: NetServiceRunner {
    let path = NetPath.hostEcho
    let timeline: ServiceTimeline?
    private let backend: HostSocketBackend
    private let settings: NetServiceSettings
    private var echo: HostUDPEcho?

    init(namespace: NetworkNamespace, settings: NetServiceSettings) throws {
        backend = try HostSocketBackend(namespace: namespace)
        self.settings = settings
        timeline = settings.breakdown ? ServiceTimeline() : nil
    }

    func start() throws {
        timeline?.reset()
        let hook = ServicePolicyHook(settings.policy)
        let echo = try HostUDPEcho(backend: backend, at: SocketEndpoint(settings.serviceAddress, port: path.port), name: "host-echo",
                                   onThreadStart: { try? hook.apply() }, timeline: timeline)
        do { try hook.check() } catch {
            echo.stop()
            throw error
        }
        self.echo = echo
    }

    var serviceThreads: [pid_t] { echo.map { [$0.threadID] } ?? [] }

    func stop() throws {
        echo?.stop()
        echo = nil
    }
}

/// `guest-longpoll` (mode 13, one datagram per `receiveFrom`, parked in the host until one
/// comes) and `guest-busypoll` (mode 30, `receiveFrom` with timeout 0 in a loop): the bundled
/// guest with its sockets outsourced into the VM's namespace. One VM per path lives across
/// rounds; each round re-enters the guest on a new vCPU thread with the service policy.
final class GuestSocketEchoRunner: NetServiceRunner {
    let path: NetPath
    let timeline: ServiceTimeline?
    private let settings: NetServiceSettings
    private let machine: BundledGuestMachine
    private let dispatcher: LongPollDispatcher
    private let service: VMRPCSocketService
    private let server: VMRPCServer
    private let bus: IOBus
    private let mode: BundledGuestMode
    private var runner: VirtualMachineRunner?

    init(path: NetPath, system: KVMSystem, namespace: NetworkNamespace, settings: NetServiceSettings) throws {
        precondition(path == .guestLongPoll || path == .guestBusyPoll)
        self.path = path
        self.settings = settings
        mode = path == .guestLongPoll ? .udpEcho : .udpBusyPoll
        machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: mode)])
        dispatcher = try LongPollDispatcher(vcpuCount: 1)
        var policy = SocketPolicy()
        policy.bindPorts = [path.port...path.port]
        policy.remotes = [SocketRemoteRule(prefix: IPPrefix(settings.testerAddress, length: settings.testerAddress.bytes.count * 8)!)]
        let timeline = settings.breakdown ? ServiceTimeline() : nil
        self.timeline = timeline
        let sockets: any SocketBackend = try HostSocketBackend(namespace: namespace)
        service = try VMRPCSocketService(backend: timeline.map { TimelineSocketBackend(sockets, timeline: $0) } ?? sockets, policy: policy,
                                         memory: machine.vm.guestMemory, dispatcher: dispatcher)
        server = try machine.makeVMRPCServer(dispatcher: dispatcher, extra: service.procedures)
        bus = try machine.makeBus(server: server)
    }

    deinit {
        runner?.stopAndWait()
        server.shutdown()
    }

    func start() throws {
        timeline?.reset()
        try machine.reenter(vcpu: 0, BundledGuestVCPU(mode: mode, arguments: (UInt64(path.port), 1)))
        // The previous round's stop kicked the vCPU and closed it on the dispatcher.
        machine.vcpus[0].acknowledgeKick()
        dispatcher.resume(vcpu: 0)
        let readyBefore = machine.ports.results(ofVCPU: 0).filter { $0 == GuestLayout.netReady }.count
        let hook = ServicePolicyHook(settings.policy)
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: bus, dispatcher: dispatcher,
                                              onThreadStart: { _ in try hook.apply() }, logger: netLatencyRunnerLogger)
        self.runner = runner
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while machine.ports.results(ofVCPU: 0).filter({ $0 == GuestLayout.netReady }).count <= readyBefore {
            if let reason = runner.stopReasons[0] {
                throw NetLatencyRunError.service(path, "the guest stopped before it was ready: \(reason), reported \(machine.ports.results(ofVCPU: 0).suffix(4))")
            }
            guard monotonicNanoseconds() < deadline else { throw NetLatencyRunError.service(path, "the guest was not ready within 20 s") }
            usleep(200)
        }
    }

    var serviceThreads: [pid_t] { runner?.threads.map(\.kernelThreadID) ?? [] }

    func stop() throws {
        guard let runner else { return }
        self.runner = nil
        runner.stop()
        let reasons = runner.waitForAll(timeoutNanoseconds: 10_000_000_000)
        // The echo exits 0 when its wait is cancelled; a stop while it runs is a stop request.
        guard let reason = reasons[0], reason == .stopRequested || reason == .guestRequested(status: 0) else {
            throw NetLatencyRunError.service(path, "the guest ended with \(reasons), reported \(machine.ports.results(ofVCPU: 0).suffix(4))")
        }
    }
}

/// `guest-interrupt`: the ring echo guest (mode 31, CPL 0, halted with interrupts on), a socket
/// in the VM's namespace, a `PacketRingReceiver` I/O thread that fills the receive ring and
/// raises the interrupt (irqfd routed to an MSI, or `KVM_SIGNAL_MSI`), and the transmit doorbell
/// that the vCPU thread serves by sending from guest memory. The vCPU thread and the I/O thread
/// both run with the service policy on the real-time CPU.
final class GuestInterruptEchoRunner: NetServiceRunner {
    let path = NetPath.guestInterrupt
    let timeline: ServiceTimeline?
    private let settings: NetServiceSettings
    private let machine: BundledGuestMachine
    private let ring: PacketRing
    private let sockets: any SocketBackend
    private let descriptor: Int32
    private let bus: IOBus
    private let irqfd: KVMInterruptEventFD?
    private var runner: VirtualMachineRunner?
    private var receiver: PacketRingReceiver?

    init(system: KVMSystem, namespace: NetworkNamespace, settings: NetServiceSettings) throws {
        self.settings = settings
        machine = try BundledGuestMachine(system: system, vcpus: [BundledGuestVCPU(mode: .ringEcho)], interruptController: true)
        ring = try PacketRing(memory: machine.vm.guestMemory, layout: GuestLayout.packetRingLayout(forVCPU: 0))
        let timeline = settings.breakdown ? ServiceTimeline() : nil
        self.timeline = timeline
        let hostSockets: any SocketBackend = try HostSocketBackend(namespace: namespace)
        let sockets = timeline.map { TimelineSocketBackend(hostSockets, timeline: $0) } ?? hostSockets
        self.sockets = sockets
        descriptor = try sockets.open(settings.serviceAddress.family, .datagram)
        do {
            try sockets.bind(descriptor, SocketEndpoint(settings.serviceAddress, port: NetPath.guestInterrupt.port))
            _ = try? sockets.setOption(descriptor, .receiveBuffer, 1 << 20)
            var policy = SocketPolicy()
            policy.remotes = [SocketRemoteRule(prefix: IPPrefix(settings.testerAddress, length: settings.testerAddress.bytes.count * 8)!)]
            var bus = try machine.makeBus()
            try bus.register(PacketRingTransmitDoorbell(ring: ring, backend: sockets, descriptor: descriptor, policy: policy),
                             space: .port, base: UInt64(GuestLayout.ringDoorbellPort), length: 1)
            self.bus = bus
            let message = X86MSIMessage.localAPIC(apicID: 0, vector: GuestLayout.ringVector)
            irqfd = settings.interrupt == .irqfd ? try machine.vm.connectMSI(message) : nil
        } catch {
            sockets.close(descriptor)
            throw error
        }
    }

    deinit {
        receiver?.stop()
        runner?.stopAndWait()
        sockets.close(descriptor)
    }

    /// The ring's counters (drops when the guest fell behind, invalid descriptors, ...).
    var ringStatistics: PacketRingStatistics { ring.statistics }

    func start() throws {
        try ring.reset()
        // Datagrams that came while no round ran (a late request) are not this round's.
        // Sound: the scratch buffer is used only in this call and freed by the defer.
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 65_536, alignment: 16)
        defer { scratch.deallocate() }
        for _ in 0..<4096 { guard (try? sockets.receive(descriptor, into: scratch)) != nil else { break } }
        timeline?.reset() // the drain is not the round's
        try machine.reenter(vcpu: 0, BundledGuestVCPU(mode: .ringEcho))
        machine.vcpus[0].acknowledgeKick()
        let readyBefore = machine.ports.results(ofVCPU: 0).filter { $0 == GuestLayout.netReady }.count
        let vcpuHook = ServicePolicyHook(settings.policy)
        let runner = try VirtualMachineRunner(vcpus: machine.vcpus, bus: bus, onThreadStart: { _ in try vcpuHook.apply() },
                                              logger: netLatencyRunnerLogger)
        self.runner = runner
        let deadline = monotonicNanoseconds() + 20_000_000_000
        while machine.ports.results(ofVCPU: 0).filter({ $0 == GuestLayout.netReady }).count <= readyBefore {
            if let reason = runner.stopReasons[0] {
                throw NetLatencyRunError.service(path, "the guest stopped before it was ready: \(reason)")
            }
            guard monotonicNanoseconds() < deadline else { throw NetLatencyRunError.service(path, "the guest was not ready within 20 s") }
            usleep(200)
        }
        let ioHook = ServicePolicyHook(settings.policy)
        let raise: @Sendable () -> Void
        if let irqfd {
            raise = { irqfd.signal() }
        } else {
            let vm = machine.vm
            raise = { _ = try? vm.signalLocalAPICInterrupt(apicID: 0, vector: GuestLayout.ringVector) }
        }
        receiver = try PacketRingReceiver(ring: ring, backend: sockets, descriptor: descriptor, name: "ring-io",
                                          onThreadStart: { try? ioHook.apply() }, raiseInterrupt: raise)
        try ioHook.check()
    }

    var serviceThreads: [pid_t] {
        (runner?.threads.map(\.kernelThreadID) ?? []) + (receiver.map { [$0.threadID] } ?? [])
    }

    func stop() throws {
        receiver?.stop()
        receiver = nil
        guard let runner else { return }
        self.runner = nil
        runner.stop()
        let reasons = runner.waitForAll(timeoutNanoseconds: 10_000_000_000)
        guard reasons == [.stopRequested] else {
            throw NetLatencyRunError.service(path, "the guest ended with \(reasons), reported \(machine.ports.results(ofVCPU: 0).suffix(4))")
        }
    }
}
