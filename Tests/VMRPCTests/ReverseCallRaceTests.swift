import Dispatch
import RTVirtCore
import Synchronization
import VMRPC
import XCTest
import LongPoll

/// Races of a hostile guest and of the VMM's own calls against reverse calls, on real threads,
/// the real clock and `GuestMemoryMap`, without KVM. Each test makes at least 10^5 attempts and
/// checks that every call has exactly one outcome and that no reply is accepted for a call the
/// guest was not given. Run them under `swift test --sanitize=thread` too (`.ci/run` does).
final class ReverseCallRaceTests: XCTestCase {
    static let attempts = 100_000

    /// A server on the real clock whose dispatcher queue (2) is smaller than its call table (8),
    /// so that posting a reserved call fails often, and whose malformed budget never runs out.
    static func makeServer(completionContext: VMRPCCompletionContext? = .endingThread) throws -> (GuestMemoryMap, LongPollDispatcher, VMRPCServer) {
        let memory = GuestMemoryMap()
        try memory.addRegion(at: GuestAddress(0), size: 0x20000)
        let dispatcher = try LongPollDispatcher(vcpuCount: 1, queueCapacity: 2)
        var limits = VMRPCLimits()
        limits.reverseCallsPerVCPU = 8
        limits.malformedCallBurst = Int.max / 2
        limits.malformedCallsPerSecond = Int.max / 2
        limits.reverseCallTimeoutNanoseconds = 2_000_000_000 // a call lost by a bug shows as timedOut
        let server = try VMRPCServer(memory: memory, slots: VMRPCSlotLayout(base: GuestAddress(0x10000), count: 1),
                                     dispatcher: dispatcher, procedures: [], limits: limits, completionContext: completionContext)
        return (memory, dispatcher, server)
    }

    /// F1 and F2 together: the host issues reverse calls as fast as it can, many refused by the
    /// full queue, while a guest thread replies to every id the host issued (the best possible
    /// prediction) before and after polling for them.
    func testGuestReplyingToPredictedIDsWhileTheQueueRefusesCalls() throws {
        let (memory, _, server) = try Self.makeServer()
        let log = OutcomeLog()
        let issued = LockedValue<[UInt64]>([])
        let refused = LockedValue<Set<Int>>([])
        let hostDone = Atomic<Bool>(false)
        let acceptedUndelivered = Atomic<Int>(0), acceptedDelivered = Atomic<Int>(0)

        let guest = try HostThread(name: "guest") {
            let client = VMRPCGuestClient(memory: memory, slot: GuestAddress(0x10000), features: .reverseCalls) {
                server.handleDoorbell(vcpu: 0)
            }
            var delivered = Set<UInt64>()
            var cursor = 0
            while !hostDone.load(ordering: .acquiring) {
                // Reply to ids the guest was never given.
                let predicted = issued.withLock { ids in defer { cursor = ids.count }; return Array(ids[min(cursor, ids.count)...]) }
                for id in predicted.suffix(4) where !delivered.contains(id) {
                    if (try? client.reply(callID: id, status: 1, payload: [])) == .ok {
                        acceptedUndelivered.wrappingAdd(1, ordering: .relaxed)
                    }
                }
                // Then poll and answer what it was given.
                guard case (.ok?, let delivery?)? = try? client.poll(timeoutNanoseconds: 0) else { continue }
                delivered.insert(delivery.callID)
                if (try? client.reply(callID: delivery.callID, status: 2, payload: [])) == .ok {
                    acceptedDelivered.wrappingAdd(1, ordering: .relaxed)
                }
            }
        }
        for attempt in 0..<Self.attempts {
            do {
                let handle = try server.reverseCall(vcpu: 0, procedure: 1, payload: [], completion: log.completion(attempt))
                issued.withLock { $0.append(handle.callID) }
            } catch {
                refused.withLock { _ = $0.insert(attempt) }
            }
        }
        hostDone.store(true, ordering: .releasing)
        guest.join()
        server.shutdown()

        let refusedCalls = refused.withLock { $0 }
        XCTAssertEqual(acceptedUndelivered.load(ordering: .relaxed), 0, "no reply accepted for an undelivered call")
        XCTAssertEqual(log.keysWithSeveralOutcomes, [], "no call has two outcomes")
        XCTAssertEqual(log.count, Self.attempts - refusedCalls.count, "every call that started ended")
        XCTAssertTrue(refusedCalls.allSatisfy { log.outcomes($0).isEmpty }, "a refused call has no outcome")
        XCTAssertGreaterThan(refusedCalls.count, 0, "the queue refused calls (the race was reached)")
        XCTAssertGreaterThan(acceptedDelivered.load(ordering: .relaxed), 0, "the guest answered delivered calls")
        print("reverse-call race: \(Self.attempts) attempts, \(refusedCalls.count) refused, "
              + "\(acceptedDelivered.load(ordering: .relaxed)) answered by the guest")
    }

    /// `shutdown()` racing a stream of reverse calls: every call is either refused (and never
    /// completes) or ends exactly once.
    func testShutdownRacingAStreamOfReverseCalls() throws {
        let rounds = 1_000, callsPerRound = Self.attempts / 1_000
        var doubleOutcomes = 0, lost = 0, completedAfterRefusal = 0, refusedTotal = 0
        for round in 0..<rounds {
            let (_, _, server) = try Self.makeServer()
            let log = OutcomeLog()
            let refused = LockedValue<Set<Int>>([])
            let stopper = try HostThread(name: "stopper") {
                // Stop while calls are being made: once the first is outstanding, after a varying delay.
                let giveUp = monotonicNanoseconds() + 100_000_000
                while server.outstandingReverseCalls(vcpu: 0) == 0, monotonicNanoseconds() < giveUp { spin(10) }
                spin((round % 50) * 40)
                server.shutdown()
            }
            for call in 0..<callsPerRound {
                do {
                    try server.reverseCall(vcpu: 0, procedure: 1, payload: [], completion: log.completion(call))
                } catch {
                    refused.withLock { _ = $0.insert(call) }
                }
            }
            stopper.join()
            let refusedCalls = refused.withLock { $0 }
            refusedTotal += refusedCalls.count
            doubleOutcomes += log.keysWithSeveralOutcomes.count
            lost += (0..<callsPerRound).filter { !refusedCalls.contains($0) && log.outcomes($0).isEmpty }.count
            completedAfterRefusal += refusedCalls.filter { !log.outcomes($0).isEmpty }.count
        }
        print("reverse calls racing shutdown: \(Self.attempts) attempts, \(refusedTotal) refused")
        XCTAssertEqual(doubleOutcomes, 0)
        XCTAssertEqual(lost, 0)
        XCTAssertEqual(completedAfterRefusal, 0)
        XCTAssertGreaterThan(refusedTotal, 0)
    }

    /// The async form racing `shutdown()`: each task gets exactly one result (a second resume of
    /// its continuation would crash the process).
    func testShutdownRacingAsyncReverseCalls() async throws {
        let rounds = 1_000, callsPerRound = Self.attempts / 1_000
        var results: [String: Int] = [:]
        for round in 0..<rounds {
            let (_, _, server) = try Self.makeServer(completionContext: round % 2 == 0 ? .endingThread : nil)
            let stopper = try HostThread(name: "stopper") {
                // Stop while calls are being made: once the first is outstanding, after a varying delay.
                let giveUp = monotonicNanoseconds() + 100_000_000
                while server.outstandingReverseCalls(vcpu: 0) == 0, monotonicNanoseconds() < giveUp { spin(10) }
                spin((round % 50) * 40)
                server.shutdown()
            }
            let outcomes = await withTaskGroup(of: Result<VMRPCReverseCallReply, VMRPCReverseCallError>.self) { group in
                for _ in 0..<callsPerRound {
                    group.addTask {
                        do throws(VMRPCReverseCallError) {
                            return .success(try await server.reverseCall(vcpu: 0, procedure: 1, payload: []))
                        } catch {
                            return .failure(error)
                        }
                    }
                }
                var outcomes: [Result<VMRPCReverseCallReply, VMRPCReverseCallError>] = []
                for await outcome in group { outcomes.append(outcome) }
                return outcomes
            }
            stopper.join()
            XCTAssertEqual(outcomes.count, callsPerRound)
            for outcome in outcomes {
                if case .failure(let error) = outcome { results["\(error)", default: 0] += 1 } else { results["success", default: 0] += 1 }
            }
        }
        XCTAssertEqual(results.values.reduce(0, +), Self.attempts)
        XCTAssertNil(results["success"], "nobody replied")
        XCTAssertNil(results["\(VMRPCReverseCallError.timedOut)"], "no call outlived the shutdown")
        print("async reverse calls racing shutdown: \(results)")
    }
}

/// Busy work of about `iterations` steps, to vary where a race lands.
@inline(never)
@discardableResult
func spin(_ iterations: Int) -> Int {
    var accumulator = 0
    for step in 0..<iterations { accumulator &+= step &* 31 }
    return accumulator
}
