#if canImport(Glibc)
import Glibc
#endif
import Logging
import RTVirtCore

/// How a vCPU's host thread is scheduled when it runs real-time work.
public struct RealtimePolicy: Equatable, Sendable {
    /// When the policy takes effect.
    public enum Activation: Equatable, Sendable {
        /// On the vCPU's thread before it first enters the guest.
        case atStart
        /// When `RealtimeVCPUScheduler.activate(vcpu:)` is called (at the vCPU's next exit).
        case onRequest
    }

    /// Scheduling class and priority (default SCHED_FIFO 50).
    public var schedulingClass: SchedulingClass
    /// CPUs to pin the thread to (nil: leave the affinity as it is).
    public var cpus: CPUSet?
    /// Timer slack in nanoseconds (nil: leave it). 1 ns is the minimum: Linux treats 0 as
    /// "reset to the default" (50 µs for SCHED_OTHER threads).
    public var timerSlackNanoseconds: UInt64?
    /// Whether to `mlockall` the process (all current and future memory).
    public var lockMemory: Bool
    /// When to apply it.
    public var activation: Activation

    /// A policy; the defaults are SCHED_FIFO 50, timer slack 1 ns, applied at start.
    public init(schedulingClass: SchedulingClass = .fifo(priority: 50), cpus: CPUSet? = nil,
                timerSlackNanoseconds: UInt64? = 1, lockMemory: Bool = false, activation: Activation = .atStart) {
        self.schedulingClass = schedulingClass
        self.cpus = cpus
        self.timerSlackNanoseconds = timerSlackNanoseconds
        self.lockMemory = lockMemory
        self.activation = activation
    }
}

/// Places real-time threads in a CPU partition (for example a cgroup with an RT budget).
/// `CgroupScheduler` implements it; a VMM with its own cgroup manager can plug in its own.
public protocol CPUPartitionAssigner: Sendable {
    /// Moves thread `threadID` into the real-time partition.
    func assignRealtimeThread(_ threadID: pid_t) throws
    /// Moves thread `threadID` back out of it.
    func releaseThread(_ threadID: pid_t) throws
    /// The policy a real-time thread gets in this partition: `policy`, or one whose class and
    /// CPUs the partition's budget dictates (a SCHED_DEADLINE budget, say).
    func realtimePolicy(for policy: RealtimePolicy) -> RealtimePolicy
}

extension CPUPartitionAssigner {
    /// `policy` unchanged: the partition does not dictate the class.
    public func realtimePolicy(for policy: RealtimePolicy) -> RealtimePolicy { policy }
}

/// A thread's scheduling state, saved so that it can be restored.
public struct SavedThreadScheduling: Equatable, Sendable {
    /// The thread's kernel id.
    public var threadID: pid_t
    /// Its scheduling class before the policy.
    public var schedulingClass: SchedulingClass
    /// Whether it had `SCHED_RESET_ON_FORK` before the policy (restored with the class).
    public var resetOnFork: Bool
    /// Its CPU affinity before the policy.
    public var cpus: CPUSet
    /// Its timer slack before the policy, nanoseconds.
    public var timerSlackNanoseconds: UInt64
    /// Whether it joined a partition (and is released from it on restore).
    public var joinedPartition: Bool
    /// Whether applying the policy took a reference on the process-wide memory lock
    /// (`ProcessMemoryLock`), which the restore gives back.
    public var holdsMemoryLock: Bool

    /// Captures the calling thread's state.
    public static func captureCurrentThread() throws(SchedulingError) -> SavedThreadScheduling {
        SavedThreadScheduling(threadID: ThreadScheduling.currentThreadID(), schedulingClass: try ThreadScheduling.schedulingClass(),
                              resetOnFork: try ThreadScheduling.resetsOnFork(),
                              cpus: try ThreadScheduling.affinity(), timerSlackNanoseconds: ThreadScheduling.timerSlack(),
                              joinedPartition: false, holdsMemoryLock: false)
    }
}

/// The process-wide memory lock (`mlockall(MCL_CURRENT | MCL_FUTURE)`) that policies with
/// `lockMemory` share, reference-counted: the first reference locks the process's memory,
/// giving back the last one unlocks it (`munlockall`). `RealtimeThreadPolicy` takes one
/// reference per thread it applies such a policy to and gives it back when it restores the
/// thread, so the lock does not outlive the real-time threads that asked for it.
///
/// Memory locked by other means (a direct `mlockall` outside this type) is not counted: the
/// last release unlocks the whole process.
public enum ProcessMemoryLock {
    private static let references = LockedValue(0)

    /// How many references are held now (0: the process's memory is not locked by RTVirt).
    public static var referenceCount: Int { references.withLock { $0 } }

    /// Takes a reference; the first one locks all current and future memory of the process.
    /// On failure no reference is taken.
    public static func acquire() throws(SchedulingError) {
        try references.withLock { (count) throws(SchedulingError) in
            if count == 0 { try ThreadScheduling.lockAllMemory() }
            count += 1
        }
    }

    /// Gives a reference back; the last one unlocks the process's memory. Does nothing when
    /// no reference is held.
    public static func release() {
        references.withLock { count in
            guard count > 0 else { return }
            count -= 1
            if count == 0 { ThreadScheduling.unlockAllMemory() }
        }
    }
}

/// Applies a `RealtimePolicy` to the calling thread, in the order that keeps each step in
/// force: join the partition (a cgroup move can reset affinity), set affinity, then the
/// scheduling class; timer slack and memory locking last. Restores what it saved.
///
/// Memory locking is process-wide and reference-counted (`ProcessMemoryLock`): the process
/// stays locked until every thread that asked for it was restored.
///
/// The class is set with `SCHED_RESET_ON_FORK`: threads and kernel workers created from the
/// thread later start as SCHED_OTHER instead of inheriting it.
public enum RealtimeThreadPolicy {
    /// Applies `policy` (as the partition adjusts it, `realtimePolicy(for:)`) to the calling
    /// thread. On failure, undoes what it did and throws.
    public static func apply(_ requested: RealtimePolicy, partition: (any CPUPartitionAssigner)? = nil) throws -> SavedThreadScheduling {
        let policy = partition?.realtimePolicy(for: requested) ?? requested
        var saved = try SavedThreadScheduling.captureCurrentThread()
        do {
            if let partition {
                try partition.assignRealtimeThread(saved.threadID)
                saved.joinedPartition = true
            }
            if let cpus = policy.cpus { try ThreadScheduling.setAffinity(cpus) }
            // Reset on fork: nothing created from a vCPU thread inherits its real-time class.
            try ThreadScheduling.setSchedulingClass(policy.schedulingClass, resetOnFork: true)
            if let slack = policy.timerSlackNanoseconds { try ThreadScheduling.setTimerSlack(max(slack, 1)) }
            if policy.lockMemory {
                try ProcessMemoryLock.acquire()
                saved.holdsMemoryLock = true
            }
        } catch {
            restore(saved, partition: partition)
            throw error
        }
        return saved
    }

    /// Restores the calling thread to `saved` (best effort: every step is tried), its
    /// `SCHED_RESET_ON_FORK` flag included, and gives back its memory-lock reference. Restore
    /// each saved state once.
    public static func restore(_ saved: SavedThreadScheduling, partition: (any CPUPartitionAssigner)? = nil) {
        try? ThreadScheduling.setSchedulingClass(saved.schedulingClass, resetOnFork: saved.resetOnFork)
        try? ThreadScheduling.setTimerSlack(max(saved.timerSlackNanoseconds, 1))
        if saved.joinedPartition { try? partition?.releaseThread(saved.threadID) }
        try? ThreadScheduling.setAffinity(saved.cpus)
        if saved.holdsMemoryLock { ProcessMemoryLock.release() }
    }
}

/// What happens when a vCPU's real-time policy cannot be applied.
public enum RealtimeFailureHandling: Equatable, Sendable {
    /// Fail closed (the default): a vCPU whose policy fails at start keeps the whole VM from
    /// starting (`VirtualMachineRunner` throws `.threadSetupFailed`); one whose deferred policy
    /// fails is stopped. Nothing runs real-time work at normal priority by accident.
    case refuseToRun
    /// Keep running with the thread's previous scheduling, and log a warning. An explicit
    /// opt-in for VMMs that prefer a degraded guest to a stopped one.
    case degradeToNormalPriority
}

/// Why a real-time policy was not applied to a vCPU's thread.
public struct RealtimePolicyFailure: Error, Equatable, Sendable, CustomStringConvertible {
    /// The vCPU.
    public var vcpu: Int
    /// What failed (a `SchedulingError`, a partition error, ...).
    public var reason: String

    public var description: String { "the real-time policy of vCPU \(vcpu) could not be applied: \(reason)" }
}

/// Real-time policies for the vCPUs of one VM: gives `VirtualMachineRunner` the hooks that
/// apply each vCPU's policy on its own thread and restore the thread when it stops. vCPUs
/// without a policy are left alone.
///
/// Before a policy is applied, the vCPU's `prepareHostThread()` runs on the thread, so that
/// the tasks the hypervisor starts at the VM's first run (KVM's `kvm-nx-lpage-recovery`) are
/// created from an ordinary thread and stay out of the real-time partition and class.
///
/// A policy that cannot be applied fails closed by default (`RealtimeFailureHandling`).
public final class RealtimeVCPUScheduler: Sendable {
    /// What happened to one vCPU's thread.
    public enum Status: Equatable, Sendable {
        /// No policy for this vCPU.
        case untouched
        /// The policy waits for `activate(vcpu:)`.
        case pending
        /// Applied to thread `threadID`.
        case applied(threadID: pid_t)
        /// Applying failed: the vCPU did not run (or was stopped), or, when degrading is
        /// allowed, runs with its previous scheduling.
        case failed(String)
        /// The thread stopped and was restored.
        case restored
    }

    private let policies: [Int: RealtimePolicy]
    private let partition: (any CPUPartitionAssigner)?
    /// What a failure does.
    public let failureHandling: RealtimeFailureHandling
    private let logger: Logger
    private struct VCPUState {
        var status: Status
        var saved: SavedThreadScheduling?
    }
    private let states: LockedValue<[Int: VCPUState]>
    private let threads = LockedValue<[Int: any VCPUThreadWork]>([:])
    private let applied = LockedValue<[Int: AppliedRealtimePolicy]>([:])

    /// Policies by vCPU id, an optional partition real-time threads join, what a failure does,
    /// and where applied, failed and restored policies are logged.
    public init(policies: [Int: RealtimePolicy], partition: (any CPUPartitionAssigner)? = nil,
                failureHandling: RealtimeFailureHandling = .refuseToRun,
                logger: Logger = Logger(label: "rtvirt.realtime")) {
        self.policies = policies
        self.partition = partition
        self.failureHandling = failureHandling
        self.logger = logger
        states = LockedValue(policies.mapValues { VCPUState(status: $0.activation == .atStart ? .untouched : .pending, saved: nil) })
    }

    /// The status of `vcpu`'s thread.
    public func status(vcpu: Int) -> Status { states.withLock { $0[vcpu]?.status ?? .untouched } }

    /// What the kernel reported on `vcpu`'s thread right after its policy was applied: kept
    /// after the thread is restored, as evidence of how the vCPU ran. Nil if never applied.
    public func appliedPolicy(vcpu: Int) -> AppliedRealtimePolicy? { applied.withLock { $0[vcpu] } }

    /// For `VirtualMachineRunner(onThreadStart:)`. Throws `RealtimePolicyFailure` when the
    /// policy cannot be applied and failures are refused, which keeps the VM from starting.
    public func threadStarted(_ vcpu: any VirtualCPU) throws(RealtimePolicyFailure) {
        guard let policy = policies[vcpu.id], policy.activation == .atStart else { return }
        if let failure = applyOnCurrentThread(vcpu: vcpu, policy: policy), failureHandling == .refuseToRun {
            throw failure
        }
    }

    /// For `VirtualMachineRunner(onThreadEnd:)`.
    public func threadEnded(_ vcpu: any VirtualCPU) {
        let saved = states.withLock { states -> SavedThreadScheduling? in
            guard let saved = states[vcpu.id]?.saved else { return nil }
            states[vcpu.id] = VCPUState(status: .restored, saved: nil)
            return saved
        }
        if let saved {
            RealtimeThreadPolicy.restore(saved, partition: partition)
            logger.debug("real-time policy restored", metadata: ["vcpu": "\(vcpu.id)"])
        }
    }

    /// Lets deferred policies be activated: call with the runner once it started.
    public func attach(_ runner: VirtualMachineRunner) { attach(runner.loops) }

    /// Lets deferred policies be activated on a VMM's own run loops.
    public func attach(_ vcpuThreads: [any VCPUThreadWork]) {
        threads.withLock { threads in for thread in vcpuThreads { threads[thread.vcpu.id] = thread } }
    }

    /// Applies `vcpu`'s deferred policy on its thread at its next exit (the vCPU is kicked).
    /// If it fails and failures are refused, the vCPU is stopped.
    ///
    /// Activating a vCPU whose policy is already applied does nothing and returns true: the
    /// policy is in force, and the state saved when it was applied (what the thread is
    /// restored to when it ends) is kept. The same holds for an activation that reaches the
    /// thread after an earlier one applied the policy.
    ///
    /// Returns whether the policy was queued or is already applied: false (and a warning is
    /// logged) when `vcpu` has no policy, no thread was attached for it, or its thread no
    /// longer runs it.
    @discardableResult
    public func activate(vcpu: Int) -> Bool {
        guard let policy = policies[vcpu] else {
            logger.warning("activate: the vCPU has no real-time policy", metadata: ["vcpu": "\(vcpu)"])
            return false
        }
        if isApplied(vcpu) {
            logger.debug("activate: the real-time policy is already applied", metadata: ["vcpu": "\(vcpu)"])
            return true
        }
        guard let thread = threads.withLock({ $0[vcpu] }) else {
            logger.warning("activate: no thread attached for the vCPU (call attach first)", metadata: ["vcpu": "\(vcpu)"])
            return false
        }
        let queued = thread.performOnThread { [self] in
            if applyOnCurrentThread(vcpu: thread.vcpu, policy: policy) != nil, failureHandling == .refuseToRun {
                thread.requestStop()
            }
        }
        if !queued {
            logger.warning("activate: the vCPU's thread no longer runs it; the policy was not applied", metadata: ["vcpu": "\(vcpu)"])
        }
        return queued
    }

    /// Whether `vcpu`'s policy is applied now (a saved state waits for the restore).
    private func isApplied(_ vcpu: Int) -> Bool { states.withLock { $0[vcpu]?.saved != nil } }

    /// First lets the hypervisor start the helper tasks of the VM's first run from this thread
    /// while it is still an ordinary thread (`VirtualCPU.prepareHostThread`), then applies.
    /// Returns the failure, if any (already logged).
    private func applyOnCurrentThread(vcpu: any VirtualCPU, policy: RealtimePolicy) -> RealtimePolicyFailure? {
        // Applying again would save the real-time state as the thread's own: keep the first.
        if isApplied(vcpu.id) {
            logger.debug("real-time policy already applied", metadata: ["vcpu": "\(vcpu.id)"])
            return nil
        }
        do {
            try vcpu.prepareHostThread()
            let saved = try RealtimeThreadPolicy.apply(policy, partition: partition)
            states.withLock { $0[vcpu.id] = VCPUState(status: .applied(threadID: saved.threadID), saved: saved) }
            let record = AppliedRealtimePolicy(threadID: saved.threadID, schedulingClass: try? ThreadScheduling.schedulingClass(),
                                               cpus: try? ThreadScheduling.affinity(), joinedPartition: saved.joinedPartition)
            applied.withLock { $0[vcpu.id] = record }
            logger.info("real-time policy applied",
                        metadata: ["vcpu": "\(vcpu.id)", "class": "\((partition?.realtimePolicy(for: policy) ?? policy).schedulingClass)",
                                  "thread": "\(saved.threadID)"])
            return nil
        } catch {
            states.withLock { states in
                // Never discard a saved state: the thread would not be restored.
                guard states[vcpu.id]?.saved == nil else { return }
                states[vcpu.id] = VCPUState(status: .failed("\(error)"), saved: nil)
            }
            let failure = RealtimePolicyFailure(vcpu: vcpu.id, reason: "\(error)")
            switch failureHandling {
            case .refuseToRun:
                logger.error("real-time policy failed; the vCPU does not run", metadata: ["vcpu": "\(vcpu.id)", "reason": "\(error)"])
            case .degradeToNormalPriority:
                logger.warning("real-time policy failed; the vCPU runs at its previous priority (degrading was allowed)",
                               metadata: ["vcpu": "\(vcpu.id)", "reason": "\(error)"])
            }
            return failure
        }
    }
}

/// How a vCPU's thread was scheduled right after its real-time policy was applied, read back
/// from the kernel on that thread.
public struct AppliedRealtimePolicy: Equatable, Sendable {
    /// The thread's kernel id.
    public var threadID: pid_t
    /// The class the kernel reported (nil if it could not be read).
    public var schedulingClass: SchedulingClass?
    /// The CPUs the thread may run on (nil if they could not be read).
    public var cpus: CPUSet?
    /// Whether the thread joined the partition.
    public var joinedPartition: Bool
}
