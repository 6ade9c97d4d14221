#if canImport(Glibc)
import Glibc
#endif
import RTVirtCore
import Synchronization

/// How an exitless poller runs.
public struct VMRPCPollerConfiguration: Equatable, Sendable {
    /// The housekeeping CPUs the poller's thread is pinned to (the partition plan's); never a
    /// real-time vCPU's CPU.
    public var cpus: CPUSet
    /// CPUs the poller must never run on: those of the real-time vCPUs. A configuration whose
    /// `cpus` overlap them is refused.
    public var realtimeCPUs: CPUSet
    /// How long the poller keeps spinning without a call before it sets `needs_doorbell` on
    /// every slot and sleeps until a doorbell or a new server wakes it (1 µs ... 1 s).
    public var idleNanoseconds: UInt64
    /// The most `pause` instructions between two empty scans: the back-off starts at 1 after
    /// each call and doubles up to this (1 ... 4096). Higher costs latency, lower memory traffic.
    public var maximumBackoffPauses: Int
    /// The poller thread's scheduling class; nil keeps what the thread inherits.
    public var schedulingClass: SchedulingClass?

    /// A configuration; the defaults spin 50 µs after the last call, back off to 16 `pause`s.
    public init(cpus: CPUSet, realtimeCPUs: CPUSet = [], idleNanoseconds: UInt64 = 50_000,
                maximumBackoffPauses: Int = 16, schedulingClass: SchedulingClass? = nil) {
        self.cpus = cpus
        self.realtimeCPUs = realtimeCPUs
        self.idleNanoseconds = idleNanoseconds
        self.maximumBackoffPauses = maximumBackoffPauses
        self.schedulingClass = schedulingClass
    }

    /// Throws the first value out of range.
    public func validate() throws(VMRPCPollerError) {
        guard !cpus.isEmpty else { throw .noCPUs }
        let overlap = cpus.intersection(realtimeCPUs)
        guard overlap.isEmpty else { throw .overlapsRealtimeCPUs(overlap) }
        guard (1_000...1_000_000_000).contains(idleNanoseconds) else { throw .invalidIdlePeriod(nanoseconds: idleNanoseconds) }
        guard (1...4096).contains(maximumBackoffPauses) else { throw .invalidBackoff(maximumBackoffPauses) }
    }
}

/// Why a poller could not be made or could not take a server.
public enum VMRPCPollerError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The configuration names no CPU.
    case noCPUs
    /// The configuration's CPUs include real-time vCPUs' CPUs.
    case overlapsRealtimeCPUs(CPUSet)
    /// The idle period is outside 1 µs ... 1 s.
    case invalidIdlePeriod(nanoseconds: UInt64)
    /// The back-off is outside 1 ... 4096 pauses.
    case invalidBackoff(Int)
    /// The poller's thread could not be started.
    case threadFailed(HostThreadError)
    /// The poller's thread could not be pinned or given its scheduling class.
    case threadSetupFailed(SchedulingError)
    /// The server does not offer the `exitless` feature.
    case serverWithoutExitless
    /// The server is already linked to a poller (this one or another).
    case alreadyAttached
    /// The poller was stopped.
    case stopped

    public var description: String {
        switch self {
        case .noCPUs: return "the poller's CPU set is empty"
        case let .overlapsRealtimeCPUs(cpus): return "the poller may not run on the real-time CPUs \(cpus)"
        case let .invalidIdlePeriod(nanoseconds): return "an idle period of \(nanoseconds) ns is outside 1 µs ... 1 s"
        case let .invalidBackoff(pauses): return "a back-off of \(pauses) pauses is outside 1 ... 4096"
        case let .threadFailed(error): return "poller thread: \(error)"
        case let .threadSetupFailed(error): return "poller thread setup: \(error)"
        case .serverWithoutExitless: return "the server does not offer the exitless feature"
        case .alreadyAttached: return "the server is already attached to a poller"
        case .stopped: return "the poller was stopped"
        }
    }
}

/// Counters of a poller, and the CPU its thread used.
public struct VMRPCPollerStatistics: Equatable, Sendable {
    /// CPU time of the poller's thread since it started, nanoseconds (0 for a manual poller).
    public var cpuNanoseconds: UInt64
    /// Monotonic time since the poller was made, nanoseconds.
    public var wallNanoseconds: UInt64
    /// Posted calls answered.
    public var answeredCalls: UInt64
    /// Posted calls handed to the doorbell (blocking procedures).
    public var handedOffCalls: UInt64
    /// Times the poller went to sleep.
    public var sleeps: UInt64
    /// Times it was woken (a doorbell that carried a posted call, a new server, a stop).
    public var wakeUps: UInt64
    /// Whether it sleeps now.
    public var isAsleep: Bool

    /// The poller's CPU time over wall time between `earlier` and this sample (0 ... 1 on one CPU).
    public func cpuFraction(since earlier: VMRPCPollerStatistics) -> Double {
        let wall = wallNanoseconds &- earlier.wallNanoseconds
        guard wall > 0, wallNanoseconds >= earlier.wallNanoseconds, cpuNanoseconds >= earlier.cpuNanoseconds else { return 0 }
        return Double(cpuNanoseconds - earlier.cpuNanoseconds) / Double(wall)
    }
}

/// The exitless poller: a host thread, pinned to housekeeping CPUs, that serves the posted calls
/// of the slots of one or more VMs' VMRPC servers without a VM exit (`Docs/VMRPC.md`, "Exitless
/// calls").
///
/// It validates with the servers' own code (fetch once, the same limits). It never parks: a
/// blocking procedure's call is handed to the vCPU's doorbell. It is adaptive: it scans while
/// calls arrive, backs off between empty scans, and after `idleNanoseconds` without a call sets
/// `needs_doorbell` on every slot, fences, looks once more, and sleeps until a doorbell that
/// carried a posted call, a new server or `stop()` wakes it. Asleep it uses no CPU.
///
/// A poller made with `manual()` has no thread: `scanOnce()`, `prepareToSleep()` and
/// `awaken()` drive it (tests, and VMMs that poll from a housekeeping loop of their own).
public final class VMRPCPoller: Sendable {
    /// The configuration (a manual poller's is a placeholder).
    public let configuration: VMRPCPollerConfiguration
    private let core: PollerCore
    private let thread: HostThread?

    /// Starts a poller thread on `configuration.cpus` with `configuration.schedulingClass`.
    /// - Throws: `VMRPCPollerError` for an invalid configuration, or when the thread cannot be
    ///   started, pinned or given its class (then no thread is left running).
    public init(configuration: VMRPCPollerConfiguration) throws(VMRPCPollerError) {
        try configuration.validate()
        self.configuration = configuration
        let core = PollerCore(configuration: configuration)
        self.core = core
        let setup = ConditionLock<SchedulingError??>(nil)
        do {
            thread = try HostThread(name: "rtvirt-poller") {
                do throws(SchedulingError) {
                    try ThreadScheduling.setAffinity(configuration.cpus)
                    if let schedulingClass = configuration.schedulingClass {
                        try ThreadScheduling.setSchedulingClass(schedulingClass, resetOnFork: true)
                    }
                    setup.withLockAndBroadcast { $0 = .some(nil) }
                } catch {
                    setup.withLockAndBroadcast { $0 = .some(error) }
                    return
                }
                core.run()
            }
        } catch {
            throw .threadFailed(error)
        }
        let failure = setup.wait(until: { $0 != nil }) { state, _ in state! }
        if let failure {
            thread?.join()
            throw .threadSetupFailed(failure)
        }
    }

    private init(manualWith configuration: VMRPCPollerConfiguration) {
        self.configuration = configuration
        core = PollerCore(configuration: configuration)
        thread = nil
    }

    /// A poller without a thread: nothing happens until `scanOnce()`, `prepareToSleep()` or
    /// `awaken()` is called. Servers attached to it are marked awake at once.
    public static func manual() -> VMRPCPoller {
        VMRPCPoller(manualWith: VMRPCPollerConfiguration(cpus: [0]))
    }

    /// Stops the thread and detaches every server.
    deinit { stop() }

    /// Serves `server`'s slots from now on (and wakes the poller). The server must offer
    /// `exitless` and must not be attached to a poller already. `server.shutdown()` detaches it.
    public func attach(_ server: VMRPCServer) throws(VMRPCPollerError) {
        try core.attach(server, awakeAtOnce: thread == nil)
    }

    /// Stops serving `server`: every slot of it needs the doorbell again. A scan in progress
    /// may still finish a call of it.
    public func detach(_ server: VMRPCServer) { core.detach(server) }

    /// The kernel thread id of the poller's thread (nil for a manual poller), for placing it in
    /// a cgroup or checking where it runs.
    public var kernelThreadID: pid_t? { thread?.kernelThreadID }

    /// The attached servers.
    public var servers: [VMRPCServer] { core.members.withLock { $0.servers } }

    /// Stops the thread (waiting for it) and detaches every server. Idempotent.
    public func stop() {
        core.requestStop()
        thread?.join()
        core.detachAll()
    }

    /// Counters and the thread's CPU time.
    public var statistics: VMRPCPollerStatistics { core.statistics() }

    /// One scan of every attached server's slots: serves each posted call found. Returns how
    /// many calls it took (answered or handed over). For a manual poller.
    @discardableResult
    public func scanOnce() -> Int { core.scan(core.members.withLock { $0.servers }) }

    /// The first half of going to sleep: marks every server's poller asleep (`needs_doorbell`
    /// = 1 on every slot), fences, and looks for posted calls once more. Returns true when
    /// none was posted (the poller may sleep); otherwise marks the servers awake again and
    /// returns false. For a manual poller.
    @discardableResult
    public func prepareToSleep() -> Bool { core.prepareToSleep(core.members.withLock { $0.servers }) }

    /// Marks every server's poller awake (`needs_doorbell` = 0 where nothing else needs it).
    /// For a manual poller.
    public func awaken() { core.awaken(core.members.withLock { $0.servers }) }
}

/// The state and loop of a poller; the thread holds it, not the `VMRPCPoller`, so that
/// dropping the poller stops the thread.
final class PollerCore: Sendable {
    struct Members {
        var servers: [VMRPCServer] = []
        var stopped = false
    }
    struct SleepState {
        var wakeRequests: UInt64 = 0
        var stopRequested = false
    }
    struct ThreadClock {
        var clock: clockid_t?
        var finalCPUNanoseconds: UInt64 = 0
    }

    let configuration: VMRPCPollerConfiguration
    let members = LockedValue(Members())
    private let generation = Atomic<UInt64>(0)
    private let sleepState = ConditionLock(SleepState())
    private let stopRequested = Atomic<Bool>(false)
    private let asleep = Atomic<Bool>(false)
    private let answered = Atomic<UInt64>(0)
    private let handedOff = Atomic<UInt64>(0)
    private let sleeps = Atomic<UInt64>(0)
    private let wakeUps = Atomic<UInt64>(0)
    private let threadClock = LockedValue(ThreadClock())
    private let startedAt = monotonicNanoseconds()

    init(configuration: VMRPCPollerConfiguration) { self.configuration = configuration }

    private var id: ObjectIdentifier { ObjectIdentifier(self) }

    func attach(_ server: VMRPCServer, awakeAtOnce: Bool) throws(VMRPCPollerError) {
        guard server.features.contains(.exitless) else { throw .serverWithoutExitless }
        try members.withLock { (members) throws(VMRPCPollerError) in
            guard !members.stopped else { throw .stopped }
            let linked = server.attach(poller: id, wake: { [weak self] in self?.wake() },
                                       detach: { [weak self, weak server] in
                                           if let self, let server { self.detach(server) }
                                       })
            guard linked else { throw .alreadyAttached }
            members.servers.append(server)
        }
        generation.wrappingAdd(1, ordering: .releasing)
        if awakeAtOnce { server.setPoller(id, awake: true) } else { wake() }
    }

    func detach(_ server: VMRPCServer) {
        members.withLock { members in members.servers.removeAll { $0 === server } }
        generation.wrappingAdd(1, ordering: .releasing)
        server.detach(poller: id)
    }


    func detachAll() {
        let servers = members.withLock { members -> [VMRPCServer] in
            members.stopped = true
            defer { members.servers = [] }
            return members.servers
        }
        for server in servers { server.detach(poller: id) }
    }

    func requestStop() {
        stopRequested.store(true, ordering: .relaxed)
        sleepState.withLockAndBroadcast { $0.stopRequested = true }
    }

    /// Wakes the poller if it sleeps (or makes its next sleep return at once).
    func wake() { sleepState.withLockAndBroadcast { $0.wakeRequests &+= 1 } }

    func scan(_ servers: [VMRPCServer]) -> Int {
        var taken = 0
        for server in servers {
            let result = server.serveExitlessAll()
            taken += result.taken
            if result.answered > 0 { answered.wrappingAdd(UInt64(result.answered), ordering: .relaxed) }
            if result.taken > result.answered { handedOff.wrappingAdd(UInt64(result.taken - result.answered), ordering: .relaxed) }
        }
        return taken
    }

    func awaken(_ servers: [VMRPCServer]) {
        for server in servers { server.setPoller(id, awake: true) }
    }

    /// Sets `needs_doorbell` everywhere, then (after a full fence, so that a guest that posted
    /// before it saw the flag is seen here) looks once more: the store-buffering pattern whose
    /// other half is the guest's post, fence, check.
    func prepareToSleep(_ servers: [VMRPCServer]) -> Bool {
        for server in servers { server.setPoller(id, awake: false) }
        guestMemoryFullFence()
        if servers.contains(where: { $0.hasPostedCall() }) {
            awaken(servers)
            return false
        }
        return true
    }

    /// The poller thread's loop.
    func run() {
        var clock = clockid_t()
        if pthread_getcpuclockid(pthread_self(), &clock) == 0 { threadClock.withLock { $0.clock = clock } }
        defer {
            var now = timespec()
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
            threadClock.withLock { state in
                state.clock = nil
                state.finalCPUNanoseconds = UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
            }
        }
        var servers: [VMRPCServer] = []
        var seenGeneration = UInt64.max
        var lastCall = monotonicNanoseconds()
        var backoff = 1
        let idle = configuration.idleNanoseconds, maximumBackoff = configuration.maximumBackoffPauses
        while !stopRequested.load(ordering: .relaxed) {
            let current = generation.load(ordering: .acquiring)
            if current != seenGeneration {
                seenGeneration = current
                servers = members.withLock { $0.servers }
                awaken(servers)
            }
            if scan(servers) > 0 {
                lastCall = monotonicNanoseconds()
                backoff = 1
                continue
            }
            if monotonicNanoseconds() &- lastCall >= idle {
                sleep(servers, generation: seenGeneration)
                lastCall = monotonicNanoseconds()
                backoff = 1
                continue
            }
            for _ in 0..<backoff { spinLoopHint() }
            backoff = min(backoff &* 2, maximumBackoff)
        }
        for server in servers { server.setPoller(id, awake: false) }
    }

    /// Sleeps until a wake request, a stop, or a change of the servers (an attach increments
    /// the generation before it requests a wake, so the predicate, checked under the lock the
    /// request takes, cannot miss it).
    private func sleep(_ servers: [VMRPCServer], generation seenGeneration: UInt64) {
        let seen = sleepState.withLock { $0.wakeRequests }
        guard prepareToSleep(servers) else { return }
        sleeps.wrappingAdd(1, ordering: .relaxed)
        asleep.store(true, ordering: .relaxed)
        sleepState.wait(until: { state in
            state.wakeRequests != seen || state.stopRequested || self.generation.load(ordering: .acquiring) != seenGeneration
        }) { _, _ in }
        asleep.store(false, ordering: .relaxed)
        wakeUps.wrappingAdd(1, ordering: .relaxed)
        if !stopRequested.load(ordering: .relaxed) { awaken(servers) }
    }

    func statistics() -> VMRPCPollerStatistics {
        let cpu = threadClock.withLock { state -> UInt64 in
            guard let clock = state.clock else { return state.finalCPUNanoseconds }
            var now = timespec()
            // The thread is alive while `clock` is set: it clears it under this lock before it ends.
            guard clock_gettime(clock, &now) == 0 else { return state.finalCPUNanoseconds }
            return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
        }
        return VMRPCPollerStatistics(
            cpuNanoseconds: cpu, wallNanoseconds: monotonicNanoseconds() &- startedAt,
            answeredCalls: answered.load(ordering: .relaxed), handedOffCalls: handedOff.load(ordering: .relaxed),
            sleeps: sleeps.load(ordering: .relaxed), wakeUps: wakeUps.load(ordering: .relaxed),
            isAsleep: asleep.load(ordering: .relaxed))
    }
}
