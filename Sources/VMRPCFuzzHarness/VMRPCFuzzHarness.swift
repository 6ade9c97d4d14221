import RTVirtCore
import RTVirtTesting
import VMRPC
import LongPoll

/// Runs the VMRPC server on guest-controlled bytes: the input's first 4096 bytes become vCPU 0's
/// call slot, the rest a program of at most 64 operations, each two bytes or more: doorbells on
/// either of two vCPUs, byte rewrites of the slot, reverse calls issued and cancelled by the
/// host, well-formed `poll`s and `reply`s by the guest with ids chosen from those it was given,
/// those it was not, another vCPU's, and forged ones, VM stops and restarts, clock jumps.
/// No real time passes and nothing really blocks.
///
/// Invariants, checked after every operation; a violation traps, which is what the fuzzer
/// looks for:
/// - every response is well formed (known status, result length in range, host features);
/// - a `poll` hands out only calls issued to that vCPU, still outstanding, each once;
/// - a `reply` is accepted only for a call delivered to that vCPU and not yet ended;
/// - every reverse call ends exactly once (none before the end of the run is left without an
///   outcome after `shutdown()`), and a call whose start threw never gets an outcome.
public enum VMRPCFuzzHarness {
    static let slotBase = GuestAddress(0x1000)
    static let vcpuCount = 2

    /// What one run did.
    public struct Report: Equatable, Sendable {
        /// Doorbells handled.
        public var doorbells = 0
        /// Reverse calls started (not refused).
        public var reverseCalls = 0
        /// Reverse calls a `poll` handed to the guest.
        public var deliveries = 0
        /// Replies the host accepted.
        public var acceptedReplies = 0
        /// Reverse calls that ended with an error (timeout, cancel, stop).
        public var failedCalls = 0
        /// Exitless harness: posted calls the poller answered.
        public var exitlessCalls = 0
        /// Exitless harness: posted calls a doorbell took.
        public var postedDoorbellCalls = 0
        /// Exitless harness: calls the poller handed to the doorbell.
        public var handoffs = 0
        /// Exitless harness: doorbells that found the call answered already.
        public var lateDoorbells = 0
        /// Exitless harness: whether a channel was broken (and so fell back to doorbell-only).
        public var brokenChannels = 0
        /// An empty report.
        public init() {}
    }

    /// Runs one input: an input that starts with `VMRPCExitlessFuzzHarness.prefix` ("RTVX")
    /// goes to the exitless harness, any other to the doorbell harness.
    @discardableResult
    public static func run(_ input: [UInt8]) -> Report {
        if input.starts(with: VMRPCExitlessFuzzHarness.prefix) {
            return VMRPCExitlessFuzzHarness.run(Array(input.dropFirst(VMRPCExitlessFuzzHarness.prefix.count)))
        }
        return runDoorbells(input)
    }

    static func runDoorbells(_ input: [UInt8]) -> Report {
        let memory = GuestMemoryMap()
        guard (try? memory.addRegion(at: GuestAddress(0), size: 0x4000)) != nil else { return Report() }
        let clock = ManualClock(start: 1_000_000_000)
        var limits = VMRPCLimits()
        limits.reverseCallsPerVCPU = 4 // small, so that full tables are reached
        guard let dispatcher = try? LongPollDispatcher(vcpuCount: vcpuCount, clock: clock,
                                                       waiter: ManualClockWaiter(clock: clock, lateness: 100)),
              let server = try? VMRPCServer(
                memory: memory, slots: VMRPCSlotLayout(base: slotBase, count: vcpuCount), dispatcher: dispatcher,
                procedures: VMRPCStandardProcedures.all(clock: FuzzClock(clock: clock)), limits: limits,
                completionContext: .endingThread)
        else { return Report() }
        let page = Array(input.prefix(VMRPCWire.slotSize))
        try? memory.write(bytes: page, at: slotBase)
        var program = input.dropFirst(VMRPCWire.slotSize).makeIterator()
        let model = ReverseCallModel()
        var doorbells = 0
        var sequence: UInt32 = 0x4000_0000

        func ring(_ vcpu: Int) {
            let slot = slot(of: vcpu)
            let request = (try? memory.readBytes(count: 32, at: slot)).map { $0.withUnsafeBytes { VMRPCRequestHeader(decoding: $0) } }
            let arguments = (try? memory.readBytes(count: VMRPCWire.maximumArgumentLength,
                                                   at: GuestAddress(slot.rawValue + UInt64(VMRPCWire.argumentsOffset)))) ?? []
            let callsBefore = model.snapshot()
            let lateBefore = server.statistics(vcpu: vcpu)?.lateDoorbells
            let responseBefore = try? memory.readBytes(count: VMRPCWire.responseLength, at: GuestAddress(slot.rawValue + 32))
            server.handleDoorbell(vcpu: vcpu)
            doorbells += 1
            if server.statistics(vcpu: vcpu)?.lateDoorbells != lateBefore {
                // A request with the `exitless` bit and nothing posted: a late doorbell, which writes nothing.
                let responseAfter = try? memory.readBytes(count: VMRPCWire.responseLength, at: GuestAddress(slot.rawValue + 32))
                precondition(responseAfter == responseBefore, "a late doorbell wrote a response")
                return
            }
            guard let response = checkResponse(memory: memory, vcpu: vcpu), let request else { return }
            model.check(vcpu: vcpu, request: request, arguments: arguments, response: response, memory: memory,
                        slot: slot, before: callsBefore)
        }

        func guestCall(_ vcpu: Int, _ procedure: UInt32, _ arguments: [UInt8]) {
            sequence &+= 1
            let header = VMRPCRequestHeader(procedure: procedure, sequence: sequence, argumentLength: UInt32(arguments.count),
                                            features: .reverseCalls)
            try? memory.write(bytes: header.bytes, at: slot(of: vcpu))
            try? memory.write(bytes: arguments, at: GuestAddress(slot(of: vcpu).rawValue + UInt64(VMRPCWire.argumentsOffset)))
            ring(vcpu)
        }

        for _ in 0..<64 {
            guard let opcode = program.next(), let argument = program.next() else { break }
            let vcpu = Int(argument % UInt8(vcpuCount))
            switch opcode % 8 {
            case 0:
                ring(vcpu)
            case 1:
                let offset = UInt64(argument) * 16 + UInt64(program.next() ?? 0) % 16
                try? memory.write(program.next() ?? 0, at: GuestAddress(slotBase.rawValue + offset))
            case 2:
                let number = model.nextCallNumber()
                do {
                    let handle = try server.reverseCall(vcpu: vcpu, procedure: UInt32(argument),
                                                        payload: Array(page.prefix(Int(argument)))) { model.record(number, $0) }
                    model.started(number, handle)
                } catch {
                    model.refused(number)
                }
            case 3:
                guestCall(vcpu, VMRPCProcedureID.poll, VMRPCPoll(timeoutNanoseconds: UInt64(argument) << 10).encoded)
            case 4:
                let id = model.chooseID(for: vcpu, selector: program.next() ?? 0, forged: argument)
                guestCall(vcpu, VMRPCProcedureID.reply,
                          VMRPCReplyArguments(callID: id, status: UInt32(argument), payload: Array(page.prefix(Int(argument) / 8))).encoded)
            case 5:
                if let handle = model.chooseHandle(selector: argument) { server.cancelReverseCall(handle) }
            case 6:
                dispatcher.close(vcpu: vcpu) // the VM stops ...
                if argument & 1 == 0 { dispatcher.resume(vcpu: vcpu) } // ... and maybe restarts
            default:
                clock.advance(by: UInt64(argument) << 20)
            }
            model.checkOutcomes(final: false)
        }
        server.shutdown()
        model.checkOutcomes(final: true)
        var report = model.report()
        report.doorbells = doorbells
        return report
    }

    static func slot(of vcpu: Int) -> GuestAddress {
        GuestAddress(slotBase.rawValue + UInt64(vcpu) * UInt64(VMRPCWire.slotSize))
    }

    /// Checks the response header in `vcpu`'s slot; returns it.
    @discardableResult
    static func checkResponse(memory: GuestMemoryMap, vcpu: Int) -> VMRPCResponseHeader? {
        guard let bytes = try? memory.readBytes(count: 32, at: GuestAddress(slot(of: vcpu).rawValue + 32)) else { return nil }
        let response = bytes.withUnsafeBytes { VMRPCResponseHeader(decoding: $0) }
        precondition(VMRPCStatus(rawValue: response.status) != nil, "the host wrote an unknown status \(response.status)")
        precondition(response.resultLength <= UInt32(VMRPCWire.maximumResultLength), "result length \(response.resultLength)")
        precondition(response.hostFeatures == VMRPCFeatures.all.rawValue, "host features \(response.hostFeatures)")
        return response
    }
}

/// What the harness knows of the reverse calls it issued, and the checks on them.
final class ReverseCallModel: Sendable {
    struct Call {
        var handle: VMRPCReverseCallHandle?
        var refused = false
        var delivered = false
        var outcomes: [Result<VMRPCReverseCallReply, VMRPCReverseCallError>] = []
    }
    private let calls = LockedValue<[Call]>([])
    /// Ids the guest has seen answered (stale ids to replay).
    private let answered = LockedValue<[UInt64]>([])

    func nextCallNumber() -> Int { calls.withLock { $0.append(Call()); return $0.count - 1 } }
    func started(_ number: Int, _ handle: VMRPCReverseCallHandle) { calls.withLock { $0[number].handle = handle } }
    func refused(_ number: Int) { calls.withLock { $0[number].refused = true } }
    func record(_ number: Int, _ outcome: Result<VMRPCReverseCallReply, VMRPCReverseCallError>) {
        calls.withLock { $0[number].outcomes.append(outcome) }
    }
    func snapshot() -> [Call] { calls.withLock { $0 } }

    /// An id for a guest `reply` on `vcpu`: one delivered to it, one issued to it but not
    /// delivered, one of the other vCPU, one already answered, or a forged one.
    func chooseID(for vcpu: Int, selector: UInt8, forged: UInt8) -> UInt64 {
        let calls = snapshot()
        let mine = calls.compactMap { $0.handle }.filter { $0.vcpu == vcpu }
        let pick: [UInt64]
        switch selector % 5 {
        case 0: pick = calls.filter { $0.delivered && $0.handle?.vcpu == vcpu }.compactMap { $0.handle?.callID }
        case 1: pick = calls.filter { !$0.delivered && $0.handle?.vcpu == vcpu }.compactMap { $0.handle?.callID }
        case 2: pick = calls.compactMap { $0.handle }.filter { $0.vcpu != vcpu }.map(\.callID)
        case 3: pick = answered.withLock { $0 }
        default: pick = [UInt64(forged) << 32 | UInt64(selector % 4 + 1), mine.first.map { $0.callID &+ (1 << 32) } ?? 1]
        }
        return pick.isEmpty ? UInt64(selector) : pick[Int(forged) % pick.count]
    }

    func chooseHandle(selector: UInt8) -> VMRPCReverseCallHandle? {
        let handles = snapshot().compactMap(\.handle)
        return handles.isEmpty ? nil : handles[Int(selector) % handles.count]
    }

    /// Checks a call the guest made on `vcpu`, given the calls as they were before it.
    func check(vcpu: Int, request: VMRPCRequestHeader, arguments: [UInt8], response: VMRPCResponseHeader,
               memory: GuestMemoryMap, slot: GuestAddress, before: [Call]) {
        guard response.status == VMRPCStatus.ok.rawValue, response.sequence == request.sequence else { return }
        let live = { (call: Call) in call.handle != nil && call.outcomes.isEmpty }
        if request.procedure == VMRPCProcedureID.poll {
            guard let results = try? memory.readBytes(count: Int(response.resultLength),
                                                      at: GuestAddress(slot.rawValue + UInt64(VMRPCWire.resultsOffset))),
                  let delivery = try? VMRPCReverseCallDelivery.decode(results) else {
                preconditionFailure("poll answered ok with results that do not decode")
            }
            guard let index = before.firstIndex(where: { $0.handle?.callID == delivery.callID && $0.handle?.vcpu == vcpu }) else {
                preconditionFailure("poll handed out \(delivery.callID), which was not issued to vCPU \(vcpu)")
            }
            precondition(live(before[index]), "poll handed out \(delivery.callID), which had ended")
            precondition(!before[index].delivered, "poll handed out \(delivery.callID) twice")
            calls.withLock { $0[index].delivered = true }
        } else if request.procedure == VMRPCProcedureID.reply {
            guard let reply = try? VMRPCReplyArguments.decode(Array(arguments.prefix(Int(request.argumentLength)))) else {
                preconditionFailure("a reply that does not decode was accepted")
            }
            let index = before.firstIndex { $0.handle?.callID == reply.callID && $0.handle?.vcpu == vcpu }
            precondition(index.map { before[$0].delivered && live(before[$0]) } ?? false,
                         "a reply to \(reply.callID), not delivered to vCPU \(vcpu) or ended, was accepted")
            answered.withLock { $0.append(reply.callID) }
            let after = snapshot()[index!]
            precondition(after.outcomes == [.success(VMRPCReverseCallReply(status: reply.status, payload: reply.payload))],
                         "the accepted reply is not the call's one outcome: \(after.outcomes)")
        }
    }

    /// Counts of what happened to the calls.
    func report() -> VMRPCFuzzHarness.Report {
        let calls = snapshot()
        var report = VMRPCFuzzHarness.Report()
        report.reverseCalls = calls.filter { $0.handle != nil }.count
        report.deliveries = calls.filter(\.delivered).count
        report.acceptedReplies = calls.filter { if case .success? = $0.outcomes.first { return true }; return false }.count
        report.failedCalls = calls.filter { if case .failure? = $0.outcomes.first { return true }; return false }.count
        return report
    }

    /// Every call has at most one outcome (exactly one at the end); refused calls have none.
    func checkOutcomes(final: Bool) {
        for (number, call) in snapshot().enumerated() {
            precondition(call.outcomes.count <= 1, "call \(number) has \(call.outcomes.count) outcomes: \(call.outcomes)")
            if call.refused { precondition(call.outcomes.isEmpty, "refused call \(number) got an outcome") }
            if final, !call.refused { precondition(call.outcomes.count == 1, "call \(number) never ended") }
        }
    }
}

/// A 1 GHz guest clock on the manual clock.
struct FuzzClock: GuestClockSource {
    let clock: ManualClock
    func mapping(forVCPU vcpu: Int) -> GuestTSCMapping? { GuestTSCMapping(frequencyHz: 1_000_000_000, guestOffset: 12_345) }
    func sampleHost() -> HostClockSample {
        let now = clock.nowNanoseconds()
        return HostClockSample(hostTSC: now, monotonicNanoseconds: now)
    }
}
