import LongPoll
import RTVirtCore
import RTVirtTesting
import Synchronization
import VMRPC

/// Runs the exitless path of the VMRPC server on guest-controlled bytes: the slot *and* its
/// control area (`posted`, `completed`, `needs_doorbell`), a manual poller, and doorbells,
/// in any order. The input's first 4096 bytes become vCPU 0's slot, control area included; the
/// rest is a program of at most 64 operations: doorbells, byte rewrites of the slot, writes of
/// a control word, posts, poller scans, the poller going to sleep and waking, well-formed
/// exitless calls that finish through the poller, the doorbell, or are left posted or handed
/// over, ordinary calls, clock jumps, channel repairs, reverse calls, VM stops and restarts.
/// No real time passes and nothing really blocks.
///
/// Invariants, checked after every operation (a violation traps):
/// - the host takes a posted call at most once per post: calls taken (by the poller or a
///   doorbell) plus the call still posted never exceed the guest's posts;
/// - no operation runs the counting procedure twice for one vCPU (a call answered twice would);
/// - a well-formed exitless call the program finishes has exactly its answer: `completed` and
///   the response's sequence are the call's;
/// - after every doorbell, and after the poller sleeps or wakes, `needs_doorbell` is 1 exactly
///   when the poller is asleep, the channel is broken, or a handed-over call waits;
/// - the poller never parks (the dispatcher traps if it is asked to wait during a scan), and
///   never takes a call from a broken channel;
/// - a late doorbell writes nothing; every response written is well formed.
public enum VMRPCExitlessFuzzHarness {
    /// Inputs that start with these bytes are run by this harness (`VMRPCFuzzHarness.run`).
    public static let prefix: [UInt8] = Array("RTVX".utf8)
    static let slotBase = GuestAddress(0x1000)
    static let vcpuCount = 2
    /// A non-blocking procedure that counts its calls per vCPU and returns the count (u64).
    static let countProcedure: UInt32 = 0x300
    /// A procedure not marked blocking that answers `.wait` (the poller hands its `.wait` over).
    static let waitingProcedure: UInt32 = 0x301

    /// Runs one input (without the prefix).
    @discardableResult
    public static func run(_ input: [UInt8]) -> VMRPCFuzzHarness.Report {
        let memory = GuestMemoryMap()
        guard (try? memory.addRegion(at: GuestAddress(0), size: 0x4000)) != nil else { return .init() }
        let clock = ManualClock(start: 1_000_000_000)
        let counts = LockedValue<[Int]>(Array(repeating: 0, count: vcpuCount))
        let count = VMRPCProcedure(id: countProcedure, name: "count", argumentLength: 0...0) { context, _ in
            let value = counts.withLock { counts -> Int in
                counts[context.vcpuID] += 1
                return counts[context.vcpuID]
            }
            return .done(status: .ok, results: VMRPCByteWriter.encode(UInt64(value)))
        }
        let waiting = VMRPCProcedure(id: waitingProcedure, name: "waiting", argumentLength: 0...0) { _, _ in
            .wait(LongPollRequest(deadline: clock.nowNanoseconds() &+ 1_000)) { _ in .done(status: .ok, results: [7]) }
        }
        var limits = VMRPCLimits()
        limits.malformedCallBurst = 6 // small, so that broken channels (doorbell-only) are reached
        limits.malformedCallsPerSecond = 1
        limits.reverseCallsPerVCPU = 4
        guard let inner = try? LongPollDispatcher(vcpuCount: vcpuCount, clock: clock,
                                                  waiter: ManualClockWaiter(clock: clock, lateness: 100)) else { return .init() }
        let dispatcher = GuardedDispatcher(inner)
        guard let server = try? VMRPCServer(
                memory: memory, slots: VMRPCSlotLayout(base: slotBase, count: vcpuCount), dispatcher: dispatcher,
                procedures: VMRPCStandardProcedures.all(clock: FuzzClock(clock: clock)) + [count, waiting], limits: limits,
                completionContext: .endingThread)
        else { return .init() }
        let poller = VMRPCPoller.manual()
        guard (try? poller.attach(server)) != nil else { return .init() }

        let page = Array(input.prefix(VMRPCWire.slotSize))
        var posts = [Int](repeating: 0, count: vcpuCount)
        func postedWord(_ vcpu: Int) -> UInt32 { (try? memory.atomicLoad(UInt32.self, at: word(vcpu, VMRPCWire.postedOffset), ordering: .acquiring)) ?? 0 }
        /// Runs a write of guest memory, counting a new post when it makes `posted` 1.
        func guestWrite(_ vcpu: Int, _ body: () -> Void) {
            let before = postedWord(vcpu)
            body()
            if before != 1 && postedWord(vcpu) == 1 { posts[vcpu] += 1 }
        }
        guestWrite(0) { try? memory.write(bytes: page, at: slotBase) }
        var program = input.dropFirst(VMRPCWire.slotSize).makeIterator()
        var sequence: UInt32 = 0x4000_0000

        func ring(_ vcpu: Int) {
            let lateBefore = server.statistics(vcpu: vcpu)?.lateDoorbells
            let responseBefore = try? memory.readBytes(count: VMRPCWire.responseLength, at: word(vcpu, VMRPCWire.responseOffset))
            server.handleDoorbell(vcpu: vcpu)
            if server.statistics(vcpu: vcpu)?.lateDoorbells != lateBefore {
                let responseAfter = try? memory.readBytes(count: VMRPCWire.responseLength, at: word(vcpu, VMRPCWire.responseOffset))
                precondition(responseAfter == responseBefore, "a late doorbell wrote a response")
            } else {
                checkResponse(memory: memory, vcpu: vcpu)
            }
            checkNeedsDoorbell(server: server, memory: memory, vcpu: vcpu)
        }

        func scan() {
            let brokenTakes = (0..<vcpuCount).map { vcpu -> Int? in
                guard let statistics = server.statistics(vcpu: vcpu), statistics.broken else { return nil }
                return takes(statistics)
            }
            dispatcher.onPoller.store(true, ordering: .relaxed)
            poller.scanOnce()
            dispatcher.onPoller.store(false, ordering: .relaxed)
            for vcpu in 0..<vcpuCount {
                if let before = brokenTakes[vcpu] {
                    precondition(takes(server.statistics(vcpu: vcpu)!) == before, "the poller took a call from a broken channel")
                }
            }
        }

        /// A well-formed exitless call on `vcpu`, finished as `finish` says.
        func exitlessCall(_ vcpu: Int, selector: UInt8, finish: UInt8) {
            sequence &+= 1
            let slot = slot(of: vcpu)
            let procedures: [(UInt32, [UInt8])] = [
                (VMRPCProcedureID.null, []), (countProcedure, []), (VMRPCProcedureID.clockRead, []),
                (VMRPCProcedureID.timerSleepUntil, VMRPCSleepUntil(deadlineGuestTSC: clock.nowNanoseconds() &+ UInt64(selector) << 8).encoded),
                (waitingProcedure, []), (VMRPCProcedureID.poll, VMRPCPoll(timeoutNanoseconds: UInt64(selector) << 10).encoded),
                (VMRPCProcedureID.reply, VMRPCReplyArguments(callID: UInt64(selector), status: 0, payload: []).encoded),
                (0x999, []),
            ]
            let (procedure, arguments) = procedures[Int(selector) % procedures.count]
            let header = VMRPCRequestHeader(procedure: procedure, sequence: sequence, argumentLength: UInt32(arguments.count),
                                            features: [.exitless, .reverseCalls])
            let presetCompleted = (try? memory.atomicLoad(UInt32.self, at: word(vcpu, VMRPCWire.completedOffset), ordering: .acquiring)) == sequence
            try? memory.write(bytes: header.bytes, at: slot)
            try? memory.write(bytes: arguments, at: GuestAddress(slot.rawValue + UInt64(VMRPCWire.argumentsOffset)))
            guestWrite(vcpu) { try? memory.atomicStore(UInt32(1), at: word(vcpu, VMRPCWire.postedOffset), ordering: .releasing) }
            guestMemoryFullFence()
            switch finish % 3 {
            case 0: // spin (one scan), then ring unless answered
                scan()
                if !completed(vcpu, sequence) { ring(vcpu) }
            case 1: // post and ring at once
                ring(vcpu)
            default: // one scan, nothing else: the call may stay posted or handed over
                let handoffsBefore = server.statistics(vcpu: vcpu)!.handoffs
                scan()
                let statistics = server.statistics(vcpu: vcpu)!
                // (A call handed over earlier may have had needs_doorbell overwritten by the guest since.)
                if statistics.handoffs != handoffsBefore {
                    precondition(statistics.awaitingDoorbell && needsDoorbell(vcpu) == 1, "a handed-over call without needs_doorbell")
                }
                return
            }
            guard !presetCompleted else { return }
            precondition(completed(vcpu, sequence), "a finished exitless call has no completed = its sequence")
            let response = (try? memory.readBytes(count: VMRPCWire.responseLength, at: word(vcpu, VMRPCWire.responseOffset)))
                .map { $0.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) } }
            precondition(response?.sequence == sequence, "a finished exitless call's response is not its own")
        }

        func completed(_ vcpu: Int, _ sequence: UInt32) -> Bool {
            (try? memory.atomicLoad(UInt32.self, at: word(vcpu, VMRPCWire.completedOffset), ordering: .acquiring)) == sequence
        }
        func needsDoorbell(_ vcpu: Int) -> UInt32 {
            (try? memory.atomicLoad(UInt32.self, at: word(vcpu, VMRPCWire.needsDoorbellOffset), ordering: .acquiring)) ?? 0
        }

        for _ in 0..<64 {
            guard let opcode = program.next(), let argument = program.next() else { break }
            let vcpu = Int(argument % UInt8(vcpuCount))
            let countsBefore = counts.withLock { $0 }
            switch opcode % 12 {
            case 0:
                ring(vcpu)
            case 1:
                let offset = UInt64(argument) * 16 + UInt64(program.next() ?? 0) % 16
                let value = program.next() ?? 0
                guestWrite(Int(offset / UInt64(VMRPCWire.slotSize)) % vcpuCount) {
                    try? memory.write(value, at: GuestAddress(slotBase.rawValue + offset))
                }
            case 2:
                let offsets = [VMRPCWire.postedOffset, VMRPCWire.completedOffset, VMRPCWire.needsDoorbellOffset]
                let selector = program.next() ?? 0
                let values: [UInt32] = [0, 1, 2, sequence, UInt32(selector) << 24 | UInt32(argument)]
                guestWrite(vcpu) {
                    try? memory.atomicStore(values[Int(selector) % values.count], at: word(vcpu, offsets[Int(argument / 2) % 3]),
                                            ordering: .releasing)
                }
            case 3:
                guestWrite(vcpu) { try? memory.atomicStore(UInt32(1), at: word(vcpu, VMRPCWire.postedOffset), ordering: .releasing) }
            case 4:
                scan()
            case 5:
                if argument & 2 == 0 { poller.prepareToSleep() } else { poller.awaken() }
                for each in 0..<vcpuCount { checkNeedsDoorbell(server: server, memory: memory, vcpu: each) }
            case 6:
                exitlessCall(vcpu, selector: program.next() ?? 0, finish: argument / 2)
            case 7:
                sequence &+= 1
                let header = VMRPCRequestHeader(procedure: [VMRPCProcedureID.null, countProcedure][Int(argument / 2) % 2],
                                                sequence: sequence, argumentLength: 0)
                try? memory.write(bytes: header.bytes, at: slot(of: vcpu))
                ring(vcpu)
            case 8:
                clock.advance(by: UInt64(argument) << 20)
            case 9:
                server.repairChannel(vcpu: vcpu)
                checkNeedsDoorbell(server: server, memory: memory, vcpu: vcpu)
            case 10:
                _ = try? server.reverseCall(vcpu: vcpu, procedure: UInt32(argument), payload: [argument]) { _ in }
            default:
                dispatcher.close(vcpu: vcpu) // the VM stops ...
                if argument & 2 == 0 { dispatcher.resume(vcpu: vcpu) } // ... and maybe restarts
            }
            let countsAfter = counts.withLock { $0 }
            for each in 0..<vcpuCount {
                precondition(countsAfter[each] - countsBefore[each] <= 1, "one operation ran a call twice on vCPU \(each)")
                let statistics = server.statistics(vcpu: each)!
                let pending = postedWord(each) == 1 ? 1 : 0
                precondition(takes(statistics) + pending <= posts[each],
                             "vCPU \(each): \(takes(statistics)) calls taken and \(pending) posted from \(posts[each]) posts")
            }
        }
        var report = VMRPCFuzzHarness.Report()
        for vcpu in 0..<vcpuCount {
            let statistics = server.statistics(vcpu: vcpu)!
            report.doorbells += Int(statistics.doorbells)
            report.exitlessCalls += Int(statistics.exitlessCalls)
            report.postedDoorbellCalls += Int(statistics.postedDoorbellCalls)
            report.handoffs += Int(statistics.handoffs)
            report.lateDoorbells += Int(statistics.lateDoorbells)
            report.brokenChannels += statistics.broken ? 1 : 0
        }
        server.shutdown()
        poller.stop()
        return report
    }

    static func slot(of vcpu: Int) -> GuestAddress {
        GuestAddress(slotBase.rawValue + UInt64(vcpu) * UInt64(VMRPCWire.slotSize))
    }

    static func word(_ vcpu: Int, _ offset: Int) -> GuestAddress {
        GuestAddress(slot(of: vcpu).rawValue + UInt64(offset))
    }

    /// Calls the host took through `posted`.
    static func takes(_ statistics: VMRPCChannelStatistics) -> Int {
        Int(statistics.exitlessCalls + statistics.handoffs + statistics.postedDoorbellCalls)
    }

    /// `needs_doorbell` says what the host's state says.
    static func checkNeedsDoorbell(server: VMRPCServer, memory: GuestMemoryMap, vcpu: Int) {
        guard let statistics = server.statistics(vcpu: vcpu) else { return }
        let expected: UInt32 = (!server.isPollerAwake || statistics.broken || statistics.awaitingDoorbell) ? 1 : 0
        let actual = try? memory.atomicLoad(UInt32.self, at: word(vcpu, VMRPCWire.needsDoorbellOffset), ordering: .acquiring)
        precondition(actual == expected, "needs_doorbell of vCPU \(vcpu) is \(actual.map(String.init) ?? "?"), the host's state says \(expected)")
    }

    /// Checks the response header in `vcpu`'s slot.
    static func checkResponse(memory: GuestMemoryMap, vcpu: Int) {
        guard let bytes = try? memory.readBytes(count: VMRPCWire.responseLength, at: word(vcpu, VMRPCWire.responseOffset)) else { return }
        let response = bytes.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
        precondition(VMRPCStatus(rawValue: response.status) != nil, "the host wrote an unknown status \(response.status)")
        precondition(response.resultLength <= UInt32(VMRPCWire.maximumResultLength), "result length \(response.resultLength)")
        precondition(response.hostFeatures == VMRPCFeatures.all.rawValue, "host features \(response.hostFeatures)")
    }
}

/// A dispatcher that traps when it is asked to park a vCPU while the poller scans: the poller
/// must never park.
final class GuardedDispatcher: LongPollWaiting {
    let inner: LongPollDispatcher
    let onPoller = Atomic<Bool>(false)
    init(_ inner: LongPollDispatcher) { self.inner = inner }

    var clock: any MonotonicClock { inner.clock }
    var vcpuCount: Int { inner.vcpuCount }
    func wait(vcpu: Int, for request: LongPollRequest) -> LongPollResult {
        precondition(!onPoller.load(ordering: .relaxed), "the poller parked a vCPU's call")
        return inner.wait(vcpu: vcpu, for: request)
    }
    func post(_ message: HostMessage, to vcpu: Int) throws(LongPollError) { try inner.post(message, to: vcpu) }
    func withdraw(messageID: UInt64, from vcpu: Int) -> Int { inner.withdraw(messageID: messageID, from: vcpu) }
    func addCloseHandler(_ handler: @escaping @Sendable (Int) -> Void) -> LongPollCloseHandlerToken { inner.addCloseHandler(handler) }
    func removeCloseHandler(_ token: LongPollCloseHandlerToken) { inner.removeCloseHandler(token) }
    func isWaiting(vcpu: Int) -> Bool { inner.isWaiting(vcpu: vcpu) }
    func cancel(vcpu: Int) { inner.cancel(vcpu: vcpu) }
    func closeVCPU(_ vcpu: Int) { inner.closeVCPU(vcpu) }
    func interruptDelivered(vcpu: Int) { inner.interruptDelivered(vcpu: vcpu) }
    func close(vcpu: Int) { _ = inner.close(vcpu: vcpu) }
    func resume(vcpu: Int) { inner.resume(vcpu: vcpu) }
}

extension VMRPCByteWriter {
    /// The little-endian bytes of `value`.
    static func encode<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        var writer = VMRPCByteWriter()
        writer.append(value)
        return writer.bytes
    }
}
