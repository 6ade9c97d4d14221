import RTVirtCore
import RTVirtTesting
import XCTest
import RealtimeVCPU
import RTVirtXCTestSupport

/// Skips when this process may not use real-time scheduling (EPERM: not root, no CAP_SYS_NICE,
/// RLIMIT_RTPRIO 0). Any other error of the probe fails the test.
func requireRealtimeOrSkip() throws {
    let outcome = LockedValue<SchedulingError?>(nil)
    let thread = try HostThread(name: "rt-probe") {
        do throws(SchedulingError) {
            try ThreadScheduling.setSchedulingClass(.fifo(priority: 1))
            try ThreadScheduling.setSchedulingClass(.other())
        } catch {
            outcome.withLock { $0 = error }
        }
    }
    thread.join()
    switch outcome.withLock({ $0 }) {
    case nil: return
    case .notPermitted?:
        throw unavailable("real-time scheduling test skipped: SCHED_FIFO is not permitted here (needs root, CAP_SYS_NICE or RLIMIT_RTPRIO)")
    case let error?: throw error
    }
}

final class RealtimePolicyTests: XCTestCase {
    func testPolicyIsVisibleFromOutsideTheThreadAndRestored() throws {
        try requireRealtimeOrSkip()
        let onlineCPUs = try ThreadScheduling.affinity()
        let pin = CPUSet([onlineCPUs.cpus.last!])
        let phase = ConditionLock(0)
        let thread = try HostThread(name: "rt-policy") {
            let saved = try? RealtimeThreadPolicy.apply(RealtimePolicy(schedulingClass: .fifo(priority: 42), cpus: pin))
            phase.withLockAndBroadcast { $0 = 1 }
            phase.wait(until: { $0 == 2 }) { _, _ in }
            if let saved { RealtimeThreadPolicy.restore(saved) }
            phase.withLockAndBroadcast { $0 = 3 }
            phase.wait(until: { $0 == 4 }) { _, _ in }
        }
        let tid = thread.kernelThreadID
        phase.wait(until: { $0 == 1 }) { _, _ in }
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tid), .fifo(priority: 42))
        XCTAssertEqual(try ThreadScheduling.affinity(of: tid), pin)
        XCTAssertEqual(try ThreadScheduling.schedulingClass(), .other(nice: 0), "the calling thread is untouched")
        phase.withLockAndBroadcast { $0 = 2 }
        phase.wait(until: { $0 == 3 }) { _, _ in }
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tid), .other(nice: 0))
        XCTAssertEqual(try ThreadScheduling.affinity(of: tid), onlineCPUs)
        phase.withLockAndBroadcast { $0 = 4 }
        thread.join()
    }

    /// A thread created from a real-time vCPU thread (or a kernel worker, such as KVM's
    /// kvm-nx-lpage-recovery) must not inherit its real-time class.
    func testThreadsCreatedFromARealtimeThreadStartAsSchedOther() throws {
        try requireRealtimeOrSkip()
        let observed = LockedValue<(parent: SchedulingClass?, resets: Bool?, child: SchedulingClass?, restoredResets: Bool?)>((nil, nil, nil, nil))
        let thread = try HostThread(name: "rt-parent") {
            guard let saved = try? RealtimeThreadPolicy.apply(RealtimePolicy(schedulingClass: .fifo(priority: 20))) else { return }
            let childClass = LockedValue<SchedulingClass?>(nil)
            if let child = try? HostThread(name: "rt-child", { childClass.withLock { $0 = try? ThreadScheduling.schedulingClass() } }) {
                child.join()
            }
            let parent = try? ThreadScheduling.schedulingClass(), resets = try? ThreadScheduling.resetsOnFork()
            RealtimeThreadPolicy.restore(saved)
            let restoredResets = try? ThreadScheduling.resetsOnFork()
            observed.withLock { $0 = (parent, resets, childClass.withLock { $0 }, restoredResets) }
        }
        thread.join()
        let result = observed.withLock { $0 }
        XCTAssertEqual(result.parent, .fifo(priority: 20), "the policy was applied")
        XCTAssertEqual(result.resets, true)
        XCTAssertEqual(result.child, .other(nice: 0), "the child did not inherit SCHED_FIFO")
        XCTAssertEqual(result.restoredResets, false, "restoring the thread clears the flag")
    }

    func testTimerSlackZeroMeansMinimumNotDefault() throws {
        let result = LockedValue<(UInt64, UInt64)>((0, 0))
        let thread = try HostThread(name: "slack") {
            let before = ThreadScheduling.timerSlack()
            try? ThreadScheduling.setTimerSlack(1)
            result.withLock { $0 = (before, ThreadScheduling.timerSlack()) }
        }
        thread.join()
        XCTAssertEqual(result.withLock { $0.1 }, 1)
        XCTAssertGreaterThan(result.withLock { $0.0 }, 1, "SCHED_OTHER threads start with a slack of tens of µs")
    }

    func testInvalidRequestsAreTypedErrors() {
        XCTAssertThrowsError(try ThreadScheduling.setSchedulingClass(.fifo(priority: 100))) {
            guard case .invalid? = $0 as? SchedulingError else { return XCTFail("\($0)") }
        }
        XCTAssertThrowsError(try ThreadScheduling.setSchedulingClass(.deadline(runtime: 10, deadline: 5, period: 20))) {
            guard case .invalid? = $0 as? SchedulingError else { return XCTFail("\($0)") }
        }
        XCTAssertThrowsError(try ThreadScheduling.schedulingClass(of: 999_999_999))
        XCTAssertThrowsError(try ThreadScheduling.setAffinity(CPUSet([100_000])))
    }

    func testSchedulerAppliesPoliciesOnlyToItsVCPUsAndDefersOnRequest() throws {
        try requireRealtimeOrSkip()
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpus = try (0..<3).map { try vm.makeMockVCPU(id: $0) } // never exit: they block until kicked
        let scheduler = RealtimeVCPUScheduler(policies: [
            0: RealtimePolicy(schedulingClass: .fifo(priority: 30)),
            2: RealtimePolicy(schedulingClass: .roundRobin(priority: 20), activation: .onRequest),
        ])
        let runner = try VirtualMachineRunner(vcpus: cpus, bus: IOBus(),
                                              onThreadStart: scheduler.threadStarted, onThreadEnd: scheduler.threadEnded)
        scheduler.attach(runner)
        let tids = runner.threads.map(\.kernelThreadID)
        let deadline = monotonicNanoseconds() + 2_000_000_000
        while scheduler.status(vcpu: 0) == .untouched && monotonicNanoseconds() < deadline { usleep(1000) }
        XCTAssertEqual(scheduler.status(vcpu: 0), .applied(threadID: tids[0]))
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tids[0]), .fifo(priority: 30))
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tids[1]), .other(nice: 0), "vCPU 1 has no policy")
        XCTAssertEqual(scheduler.status(vcpu: 2), .pending)
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tids[2]), .other(nice: 0))
        scheduler.activate(vcpu: 2)
        while scheduler.status(vcpu: 2) == .pending && monotonicNanoseconds() < deadline { usleep(1000) }
        XCTAssertEqual(try ThreadScheduling.schedulingClass(of: tids[2]), .roundRobin(priority: 20))
        runner.stopAndWait()
        XCTAssertEqual(scheduler.status(vcpu: 0), .restored)
        XCTAssertEqual(scheduler.appliedPolicy(vcpu: 0)?.schedulingClass, .fifo(priority: 30), "kept after the restore")
        XCTAssertEqual(scheduler.appliedPolicy(vcpu: 0)?.threadID, tids[0])
        XCTAssertNil(scheduler.appliedPolicy(vcpu: 1))
        XCTAssertEqual(scheduler.status(vcpu: 2), .restored)
        XCTAssertEqual(scheduler.status(vcpu: 1), .untouched)
    }

    func testDeadlineClassRoundTrips() throws {
        try requireRealtimeOrSkip()
        let outcome = LockedValue<Result<SchedulingClass, SchedulingError>?>(nil)
        let thread = try HostThread(name: "deadline") {
            do throws(SchedulingError) {
                try ThreadScheduling.setSchedulingClass(.deadline(runtime: 100_000, deadline: 1_000_000, period: 1_000_000))
                outcome.withLock { $0 = .success(try! ThreadScheduling.schedulingClass()) }
                try ThreadScheduling.setSchedulingClass(.other())
            } catch {
                outcome.withLock { $0 = .failure(error) }
            }
        }
        thread.join()
        switch outcome.withLock({ $0 }) {
        case .success(let value)?: XCTAssertEqual(value, .deadline(runtime: 100_000, deadline: 1_000_000, period: 1_000_000))
        case .failure(.notPermitted)? where geteuid() != 0:
            // SCHED_DEADLINE needs CAP_SYS_NICE; RLIMIT_RTPRIO, which may have let SCHED_FIFO through, does not grant it.
            throw unavailable("SCHED_DEADLINE test skipped: not root (SCHED_DEADLINE needs CAP_SYS_NICE)")
        case .failure(let error)?:
            // The thread spans the whole root domain and asks for 10 % of a CPU: admission must succeed.
            XCTFail("SCHED_DEADLINE round trip failed: \(error)")
        case nil: XCTFail("no outcome")
        }
    }
}

/// A real-time policy that cannot be applied fails closed unless degrading was asked for.
final class RealtimeFailureTests: XCTestCase {
    /// A policy no host can apply (a CPU that does not exist): needs no privilege.
    static let impossible = RealtimePolicy(schedulingClass: .other(), cpus: CPUSet([100_000]))

    func testAFailedPolicyKeepsTheWholeVMFromRunning() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpus = try (0..<2).map { try vm.makeMockVCPU(id: $0, script: [.halt]) }
        let scheduler = RealtimeVCPUScheduler(policies: [1: Self.impossible])
        XCTAssertThrowsError(try VirtualMachineRunner(vcpus: cpus, bus: IOBus(), onThreadStart: scheduler.threadStarted,
                                                      onThreadEnd: scheduler.threadEnded)) { error in
            guard case .threadSetupFailed(vcpu: 1, _)? = error as? VirtualMachineRunnerError else { return XCTFail("\(error)") }
        }
        XCTAssertEqual(cpus.map(\.runCount), [0, 0], "no vCPU entered the guest")
        guard case .failed? = Optional(scheduler.status(vcpu: 1)) else { return XCTFail("\(scheduler.status(vcpu: 1))") }
    }

    func testDegradingIsAnExplicitOptIn() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpu = try vm.makeMockVCPU(id: 0, script: [.halt])
        let scheduler = RealtimeVCPUScheduler(policies: [0: Self.impossible], failureHandling: .degradeToNormalPriority)
        let runner = try VirtualMachineRunner(vcpus: [cpu], bus: IOBus(), onThreadStart: scheduler.threadStarted,
                                              onThreadEnd: scheduler.threadEnded)
        XCTAssertEqual(runner.waitForAll(timeoutNanoseconds: 10_000_000_000), [.halted], "it ran at its previous priority")
        guard case .failed? = Optional(scheduler.status(vcpu: 0)) else { return XCTFail("\(scheduler.status(vcpu: 0))") }
    }

    func testActivatingAfterTheVCPUStoppedIsRefusedAndReported() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpus = try (0..<1).map { try vm.makeMockVCPU(id: $0) } // block until kicked
        let scheduler = RealtimeVCPUScheduler(policies: [
            0: RealtimePolicy(schedulingClass: .fifo(priority: 30), activation: .onRequest)])
        XCTAssertFalse(scheduler.activate(vcpu: 0), "no thread attached yet")
        XCTAssertFalse(scheduler.activate(vcpu: 5), "no policy for vCPU 5")
        let runner = try VirtualMachineRunner(vcpus: cpus, bus: IOBus(), onThreadStart: scheduler.threadStarted,
                                              onThreadEnd: scheduler.threadEnded)
        scheduler.attach(runner)
        runner.stopAndWait()
        XCTAssertFalse(scheduler.activate(vcpu: 0), "the thread no longer runs the vCPU")
        XCTAssertEqual(scheduler.status(vcpu: 0), .pending, "never applied")
        XCTAssertNil(scheduler.appliedPolicy(vcpu: 0))
    }

    func testAFailedDeferredPolicyStopsTheVCPU() throws {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpus = try (0..<2).map { try vm.makeMockVCPU(id: $0) } // block until kicked
        var deferred = Self.impossible
        deferred.activation = .onRequest
        let scheduler = RealtimeVCPUScheduler(policies: [0: deferred])
        let runner = try VirtualMachineRunner(vcpus: cpus, bus: IOBus(), onThreadStart: scheduler.threadStarted,
                                              onThreadEnd: scheduler.threadEnded)
        scheduler.attach(runner)
        scheduler.activate(vcpu: 0)
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while runner.stopReasons[0] == nil, monotonicNanoseconds() < deadline { usleep(1_000) }
        XCTAssertEqual(runner.stopReasons[0], .stopRequested, "vCPU 0 was stopped")
        XCTAssertNil(runner.stopReasons[1], "vCPU 1 runs on")
        runner.stopAndWait()
    }
}

/// What applying a policy changes beyond the class comes back on restore: the process-wide
/// memory lock and the thread's `SCHED_RESET_ON_FORK` flag.
final class RealtimeRestoreTests: XCTestCase {
    /// The process's locked memory (`VmLck` in /proc/self/status), kB.
    static func lockedKilobytes() -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
        for line in status.split(separator: "\n") where line.hasPrefix("VmLck:") {
            return Int(line.dropFirst("VmLck:".count).filter(\.isNumber))
        }
        return nil
    }

    /// A thread that applies `policy` when told to, then restores it when told to.
    final class PolicyThread {
        private let phase = ConditionLock(0)
        private let thread: HostThread
        let applied = LockedValue<Bool?>(nil)

        init(_ name: String, policy: RealtimePolicy) throws {
            let phase = phase, applied = applied
            thread = try HostThread(name: name) {
                let saved = try? RealtimeThreadPolicy.apply(policy)
                applied.withLock { $0 = saved != nil }
                phase.withLockAndBroadcast { $0 = 1 }
                phase.wait(until: { $0 == 2 }) { _, _ in }
                if let saved { RealtimeThreadPolicy.restore(saved) }
                phase.withLockAndBroadcast { $0 = 3 }
            }
            phase.wait(until: { $0 == 1 }) { _, _ in }
        }

        func restore() {
            phase.withLockAndBroadcast { $0 = 2 }
            phase.wait(until: { $0 == 3 }) { _, _ in }
            thread.join()
        }
    }

    func testMemoryLockIsGivenBackWhenTheLastThreadThatAskedIsRestored() throws {
        guard let before = Self.lockedKilobytes() else { throw unavailable("no VmLck in /proc/self/status") }
        XCTAssertEqual(before, 0, "nothing else in the test process locks memory (RTVirt references held: \(ProcessMemoryLock.referenceCount))")
        // SCHED_OTHER: the memory lock is what is tested, no real-time class is needed.
        let policy = RealtimePolicy(schedulingClass: .other(), timerSlackNanoseconds: nil, lockMemory: true)
        let first = try PolicyThread("mlock-1", policy: policy)
        guard first.applied.withLock({ $0 }) == true else {
            first.restore()
            throw unavailable("mlockall is not permitted here (RLIMIT_MEMLOCK, no CAP_IPC_LOCK)")
        }
        XCTAssertGreaterThan(Self.lockedKilobytes() ?? 0, 0, "the process is locked")
        XCTAssertEqual(ProcessMemoryLock.referenceCount, 1)
        let second = try PolicyThread("mlock-2", policy: policy)
        XCTAssertEqual(second.applied.withLock { $0 }, true)
        XCTAssertEqual(ProcessMemoryLock.referenceCount, 2)
        first.restore()
        XCTAssertGreaterThan(Self.lockedKilobytes() ?? 0, 0, "still locked: the second thread asked for it too")
        XCTAssertEqual(ProcessMemoryLock.referenceCount, 1)
        second.restore()
        XCTAssertEqual(Self.lockedKilobytes(), 0, "unlocked once the last thread that asked was restored")
        XCTAssertEqual(ProcessMemoryLock.referenceCount, 0)
    }

    func testRestoreKeepsTheThreadsOwnResetOnForkFlag() throws {
        try requireRealtimeOrSkip()
        let observed = LockedValue<(before: Bool?, applied: Bool?, restored: Bool?, restoredClass: SchedulingClass?)>((nil, nil, nil, nil))
        let thread = try HostThread(name: "rt-reset-fork") {
            // The thread had the flag before any policy (a VMM that sets it on every thread).
            try? ThreadScheduling.setSchedulingClass(.other(), resetOnFork: true)
            let before = try? ThreadScheduling.resetsOnFork()
            guard let saved = try? RealtimeThreadPolicy.apply(RealtimePolicy(schedulingClass: .fifo(priority: 10))) else { return }
            let applied = try? ThreadScheduling.resetsOnFork()
            RealtimeThreadPolicy.restore(saved)
            observed.withLock { $0 = (before, applied, try? ThreadScheduling.resetsOnFork(), try? ThreadScheduling.schedulingClass()) }
        }
        thread.join()
        let result = observed.withLock { $0 }
        XCTAssertEqual(result.before, true)
        XCTAssertEqual(result.applied, true)
        XCTAssertEqual(result.restoredClass, .other(nice: 0))
        XCTAssertEqual(result.restored, true, "the thread's own flag is restored, not cleared")
    }
}

/// A deferred policy activated more than once keeps the state saved the first time.
final class RealtimeReactivationTests: XCTestCase {
    /// A partition whose assignments after the first fail.
    final class FirstAssignmentOnly: CPUPartitionAssigner {
        let assignments = LockedValue(0)
        func assignRealtimeThread(_ threadID: pid_t) throws {
            let count = assignments.withLock { count -> Int in
                count += 1
                return count
            }
            if count > 1 { throw SchedulingError.invalid(what: "a second assignment (test)") }
        }
        func releaseThread(_ threadID: pid_t) throws {}
    }

    /// Runs one never-exiting mock vCPU with a deferred FIFO policy; `activations` activates
    /// it; returns the class, reset-on-fork flag and status its thread had once it ended.
    func runActivated(partition: (any CPUPartitionAssigner)? = nil,
                      _ activations: (RealtimeVCPUScheduler) -> Void) throws -> (SchedulingClass?, RealtimeVCPUScheduler.Status) {
        let vm = try MockHypervisor().makeMockVirtualMachine()
        let cpu = try vm.makeMockVCPU(id: 0) // blocks until kicked
        let scheduler = RealtimeVCPUScheduler(policies: [0: RealtimePolicy(schedulingClass: .fifo(priority: 30), activation: .onRequest)],
                                              partition: partition)
        let atEnd = LockedValue<SchedulingClass?>(nil)
        let runner = try VirtualMachineRunner(vcpus: [cpu], bus: IOBus(), onThreadStart: scheduler.threadStarted,
                                              onThreadEnd: { vcpu in
                                                  scheduler.threadEnded(vcpu)
                                                  atEnd.withLock { $0 = try? ThreadScheduling.schedulingClass() } // after the restore
                                              })
        scheduler.attach(runner)
        activations(scheduler)
        runner.stopAndWait() // work queued before the stop runs first
        return (atEnd.withLock { $0 }, scheduler.status(vcpu: 0))
    }

    func testActivatingAnAppliedPolicyAgainKeepsWhatTheThreadIsRestoredTo() throws {
        try requireRealtimeOrSkip()
        let (classAtEnd, status) = try runActivated { scheduler in
            XCTAssertTrue(scheduler.activate(vcpu: 0))
            let deadline = monotonicNanoseconds() + 10_000_000_000
            while scheduler.status(vcpu: 0) == .pending && monotonicNanoseconds() < deadline { usleep(1000) }
            guard case .applied? = Optional(scheduler.status(vcpu: 0)) else { return XCTFail("hang detector: \(scheduler.status(vcpu: 0))") }
            XCTAssertTrue(scheduler.activate(vcpu: 0), "already applied: nothing to do")
        }
        XCTAssertEqual(status, .restored)
        XCTAssertEqual(classAtEnd, .other(nice: 0), "restored to SCHED_OTHER, not to the policy's SCHED_FIFO")
    }

    func testASecondActivationThatWouldFailDoesNotDropTheSavedState() throws {
        try requireRealtimeOrSkip()
        let partition = FirstAssignmentOnly()
        let (classAtEnd, status) = try runActivated(partition: partition) { scheduler in
            XCTAssertTrue(scheduler.activate(vcpu: 0))
            XCTAssertTrue(scheduler.activate(vcpu: 0)) // queued before the first ran, or after: either way a no-op
        }
        XCTAssertEqual(partition.assignments.withLock { $0 }, 1, "the policy was applied once")
        XCTAssertEqual(status, .restored, "the thread was restored")
        XCTAssertEqual(classAtEnd, .other(nice: 0))
    }
}
