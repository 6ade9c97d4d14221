#if canImport(Glibc)
import Glibc
#endif
import Logging
import RTVirtCore

/// What the watchdog does with a vCPU that overran.
public enum OverrunAction: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Log it, count it, call the hook.
    case report
    /// And give the vCPU's thread SCHED_OTHER (it keeps running, at normal priority).
    case demote
    /// And call the VMM's `pause` callback (for example to pause the VM or stop the vCPU).
    case pause

    public var description: String { rawValue }
}

/// One vCPU found using its whole budget for `consecutivePeriods` periods in a row.
public struct OverrunEvent: Equatable, Sendable, CustomStringConvertible {
    /// The vCPU.
    public var vcpu: Int
    /// Its host thread.
    public var threadID: pid_t
    /// Over how many periods in a row it used at least the threshold of its runtime.
    public var consecutivePeriods: Int
    /// CPU time it used since the previous sample (about one period), nanoseconds.
    public var lastPeriodNanoseconds: UInt64
    /// The budget it was held to.
    public var budget: RTBudget
    /// From the start of watching the vCPU to this report, nanoseconds.
    public var detectedAfterNanoseconds: UInt64
    /// What was done.
    public var action: OverrunAction
    /// Whether the action worked (a demotion can fail for a thread that is gone).
    public var actionSucceeded: Bool

    public var description: String {
        "vCPU \(vcpu) (thread \(threadID)) used its whole budget (\(budget)) \(consecutivePeriods) periods in a row; "
            + "detected after \(detectedAfterNanoseconds / 1_000_000) ms; action \(action)\(actionSucceeded ? "" : " failed")"
    }
}

/// An opt-in watchdog for real-time vCPU threads: every budget period it samples each watched
/// thread's CPU time (`/proc/self/task/TID/schedstat`); a vCPU that used at least `threshold`
/// of the budget's runtime per period over the last `consecutivePeriods` periods in a row is
/// reported (once, until it stays below that again) (log, the
/// `onOverrun` hook for metrics, `overrunCount`), and on request demoted to SCHED_OTHER or
/// handed to the VMM's `pause` callback. A throttled runaway guest shows up here as a vCPU
/// that always uses exactly its budget; one without any budget uses more.
///
/// The watchdog thread is an ordinary thread; pin it to housekeeping CPUs (`cpus`) so that a
/// runaway real-time thread does not starve it.
public final class OverrunWatchdog: Sendable {
    /// How the watchdog judges and acts.
    public struct Configuration: Sendable {
        /// The budget each watched vCPU is held to; its period is the sampling period.
        public var budget: RTBudget
        /// Periods in a row at the threshold before a report.
        public var consecutivePeriods: Int
        /// The share of the runtime that counts as "the whole budget" (throttling is not
        /// exact to the microsecond, and samples are not aligned with the kernel's periods).
        public var threshold: Double
        /// What to do on a report.
        public var action: OverrunAction
        /// CPUs for the watchdog thread (nil: leave its affinity).
        public var cpus: CPUSet?
        /// Where reports are logged.
        public var logger: Logger
        /// Called for every report (a metrics counter, an alert); on the watchdog thread.
        public var onOverrun: (@Sendable (OverrunEvent) -> Void)?
        /// Called with the vCPU for `.pause`; on the watchdog thread.
        public var pause: (@Sendable (Int) -> Void)?

        /// A configuration; by default 3 periods at 90 % of the runtime are reported.
        public init(budget: RTBudget, consecutivePeriods: Int = 3, threshold: Double = 0.9, action: OverrunAction = .report,
                    cpus: CPUSet? = nil, logger: Logger = Logger(label: "rtvirt.watchdog"),
                    onOverrun: (@Sendable (OverrunEvent) -> Void)? = nil, pause: (@Sendable (Int) -> Void)? = nil) {
            self.budget = budget; self.consecutivePeriods = consecutivePeriods; self.threshold = threshold
            self.action = action; self.cpus = cpus; self.logger = logger; self.onOverrun = onOverrun; self.pause = pause
        }
    }

    /// The configuration.
    public var configuration: Configuration { core.configuration }
    /// Starts a thread with a name and a body (`HostThread.init`; tests give their own).
    typealias ThreadStarter = @Sendable (String, @escaping @Sendable () -> Void) throws(HostThreadError) -> HostThread
    private let core: Core
    private let startThread: ThreadStarter
    private let thread = LockedValue<HostThread?>(nil)

    /// A watchdog. `cpuTime` reads a thread's CPU time in nanoseconds (default: schedstat)
    /// and `clock` the time (default: CLOCK_MONOTONIC); tests give their own and call
    /// `samplePeriod()` themselves.
    public convenience init(configuration: Configuration,
                            cpuTime: @escaping @Sendable (pid_t) -> UInt64? = OverrunWatchdog.schedstatCPUTime,
                            clock: @escaping @Sendable () -> UInt64 = monotonicNanoseconds) {
        self.init(configuration: configuration, cpuTime: cpuTime, clock: clock) { name, body throws(HostThreadError) in
            try HostThread(name: name, body)
        }
    }

    /// A watchdog whose thread `startThread` starts.
    init(configuration: Configuration, cpuTime: @escaping @Sendable (pid_t) -> UInt64?, clock: @escaping @Sendable () -> UInt64,
         startThread: @escaping ThreadStarter) {
        core = Core(configuration: configuration, cpuTime: cpuTime, clock: clock)
        self.startThread = startThread
    }

    /// A thread's CPU time from `/proc/self/task/TID/schedstat` (its first field), or nil.
    @Sendable public static func schedstatCPUTime(_ tid: pid_t) -> UInt64? {
        CPUAccounting.threadCPUNanoseconds(tid)
    }

    /// Starts watching `vcpu`'s thread (again, if it was watched).
    public func watch(vcpu: Int, threadID: pid_t) { core.watch(vcpu: vcpu, threadID: threadID) }

    /// Stops watching `vcpu`.
    public func unwatch(vcpu: Int) { core.state.withLock { _ = $0.watched.removeValue(forKey: vcpu) } }

    /// Reports so far for `vcpu`.
    public func overrunCount(vcpu: Int) -> Int { core.state.withLock { $0.counts[vcpu] ?? 0 } }

    /// Reports so far, all vCPUs.
    public var overrunCount: Int { core.state.withLock { $0.counts.values.reduce(0, +) } }

    /// Every report so far, in order.
    public var events: [OverrunEvent] { core.state.withLock { $0.events } }

    /// One sampling step: what the watchdog thread does every period. Returns the reports it made.
    ///
    /// The judgement is over the last `consecutivePeriods` periods of wall time, from the
    /// thread's own CPU time at both ends, not sample by sample: the watchdog thread may share
    /// a CPU with the vCPU it watches (a deadline vCPU without a root domain of its own runs on
    /// every CPU), and then its samples come late, in step with the vCPU's throttling.
    @discardableResult
    public func samplePeriod() -> [OverrunEvent] { core.samplePeriod() }

    /// Starts the watchdog thread: one `samplePeriod()` every budget period (absolute
    /// deadlines, so the samples do not drift). If the thread cannot be started, it throws and
    /// a later call tries again.
    ///
    /// The thread holds only the watchdog's state, not the watchdog: a watchdog that is no
    /// longer referenced stops its thread (and waits for it, within one period).
    public func start() throws(HostThreadError) {
        guard core.state.withLock({ state -> Bool in
            guard !state.running else { return false }
            state.running = true
            return true
        }) else { return }
        let period = UInt64(max(configuration.budget.periodMicroseconds, 1)) * 1000
        let cpus = configuration.cpus
        let core = core
        let started: HostThread
        do {
            started = try startThread("rtvirt-watchdog") {
                if let cpus { try? ThreadScheduling.setAffinity(cpus) }
                var next = monotonicNanoseconds() + period
                while core.state.withLock({ $0.running }) {
                    var deadline = timespec(tv_sec: Int(next / 1_000_000_000), tv_nsec: Int(next % 1_000_000_000))
                    while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, nil) == EINTR {}
                    guard core.state.withLock({ $0.running }) else { break }
                    core.samplePeriod()
                    next += period
                    let now = monotonicNanoseconds()
                    if next < now { next = now + period } // fell behind (a stall): resume from now
                }
            }
        } catch {
            core.state.withLock { $0.running = false }
            throw error
        }
        thread.withLock { $0 = started }
    }

    /// Stops the watchdog thread and waits for it (within one period).
    public func stop() {
        core.state.withLock { $0.running = false }
        let running = thread.withLock { thread -> HostThread? in
            defer { thread = nil }
            return thread
        }
        running?.join()
    }

    deinit { stop() }
}

/// What the watchdog thread holds: the state and the sampling, without the watchdog itself,
/// so that dropping the watchdog stops the thread.
private final class Core: Sendable {
    let configuration: OverrunWatchdog.Configuration
    let cpuTime: @Sendable (pid_t) -> UInt64?
    let clock: @Sendable () -> UInt64
    struct Watched {
        var threadID: pid_t
        var since: UInt64
        /// (time, CPU time) samples, oldest first: enough to span the last `consecutivePeriods` periods.
        var history: [(time: UInt64, cpu: UInt64)]
        var reported: Bool
    }
    struct State {
        var watched: [Int: Watched] = [:]
        var counts: [Int: Int] = [:]
        var events: [OverrunEvent] = []
        var running = false
    }
    let state = LockedValue(State())

    init(configuration: OverrunWatchdog.Configuration, cpuTime: @escaping @Sendable (pid_t) -> UInt64?,
         clock: @escaping @Sendable () -> UInt64) {
        self.configuration = configuration
        self.cpuTime = cpuTime
        self.clock = clock
    }

    func watch(vcpu: Int, threadID: pid_t) {
        let now = clock()
        let start = cpuTime(threadID)
        state.withLock { $0.watched[vcpu] = Watched(threadID: threadID, since: now, history: start.map { [(now, $0)] } ?? [], reported: false) }
    }

    @discardableResult
    func samplePeriod() -> [OverrunEvent] {
        let now = clock()
        let runtime = Double(max(configuration.budget.runtimeMicroseconds, 0)) * 1000
        let period = Double(max(configuration.budget.periodMicroseconds, 1)) * 1000
        let periods = max(configuration.consecutivePeriods, 1)
        let window = UInt64(period) * UInt64(periods)
        var due: [(vcpu: Int, watched: Watched, used: UInt64)] = []
        let samples = state.withLock { state in state.watched.map { ($0.key, $0.value.threadID) } }
        var times: [Int: UInt64] = [:]
        for (vcpu, tid) in samples { if let time = cpuTime(tid) { times[vcpu] = time } }
        state.withLock { state in
            for (vcpu, var watched) in state.watched {
                guard let time = times[vcpu] else { continue }
                defer { state.watched[vcpu] = watched }
                let last = watched.history.last
                watched.history.append((now, time))
                // The newest sample at least a window old starts the window; older ones go.
                guard let start = watched.history.lastIndex(where: { now >= $0.time && now - $0.time >= window }) else { continue }
                watched.history.removeFirst(start)
                let origin = watched.history[0]
                let used = time >= origin.cpu ? Double(time - origin.cpu) : 0
                let elapsed = Double(now - origin.time)
                if used >= runtime * configuration.threshold * elapsed / period {
                    if !watched.reported {
                        watched.reported = true
                        let lastUsed = last.map { time >= $0.cpu ? time - $0.cpu : 0 } ?? 0
                        due.append((vcpu, watched, lastUsed))
                    }
                } else {
                    watched.reported = false
                }
            }
        }
        var reports: [OverrunEvent] = []
        for (vcpu, watched, used) in due {
            var succeeded = true
            switch configuration.action {
            case .report: break
            case .demote: succeeded = (try? ThreadScheduling.setSchedulingClass(.other(), of: watched.threadID)) != nil
            case .pause:
                if let pause = configuration.pause { pause(vcpu) } else { succeeded = false }
            }
            let event = OverrunEvent(vcpu: vcpu, threadID: watched.threadID, consecutivePeriods: periods, lastPeriodNanoseconds: used,
                                     budget: configuration.budget, detectedAfterNanoseconds: now >= watched.since ? now - watched.since : 0,
                                     action: configuration.action, actionSucceeded: succeeded)
            state.withLock { state in
                state.counts[vcpu, default: 0] += 1
                state.events.append(event)
            }
            configuration.logger.warning("real-time vCPU overran its budget", metadata: [
                "vcpu": "\(vcpu)", "thread": "\(watched.threadID)", "periods": "\(periods)",
                "budget": "\(configuration.budget)", "detected_ms": "\(event.detectedAfterNanoseconds / 1_000_000)",
                "action": "\(configuration.action)", "action_succeeded": "\(succeeded)",
            ])
            configuration.onOverrun?(event)
            reports.append(event)
        }
        return reports
    }
}
