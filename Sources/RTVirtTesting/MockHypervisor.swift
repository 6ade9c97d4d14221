import RTVirtCore

/// A hypervisor that runs no guest: its vCPUs replay scripted exits.
///
/// ```swift
/// let vm = try MockHypervisor().makeMockVirtualMachine(memorySize: 1 << 20)
/// let cpu = try vm.makeMockVCPU(id: 0, script: [.portOut(port: 0x510, size: 4, data: 7)])
/// ```
public final class MockHypervisor: Hypervisor {
    public var name: String { "mock" }

    /// A mock hypervisor.
    public init() {}

    public func makeVirtualMachine() throws -> any VirtualMachine { MockVirtualMachine() }

    /// A VM with `memorySize` bytes of anonymous memory at guest address 0 (none when 0).
    public func makeMockVirtualMachine(memorySize: UInt64 = 0) throws -> MockVirtualMachine {
        let vm = MockVirtualMachine()
        if memorySize > 0 { try vm.addMemory(at: GuestAddress(0), size: memorySize) }
        return vm
    }
}

/// A VM whose memory is real anonymous memory and whose vCPUs are `MockVirtualCPU`s.
public final class MockVirtualMachine: VirtualMachine {
    /// The guest memory.
    public let guestMemory = GuestMemoryMap()
    public var memory: any GuestMemory { guestMemory }
    public let maximumVCPUCount = 64
    private let created = LockedValue<Set<Int>>([])

    /// An empty VM.
    public init() {}

    public func addMemory(at base: GuestAddress, size: UInt64) throws {
        try guestMemory.addRegion(at: base, size: size)
    }

    public func makeVCPU(id: Int) throws -> any VirtualCPU { try makeMockVCPU(id: id) }

    /// A vCPU that replays `script`; then it behaves like a guest spinning forever.
    public func makeMockVCPU(id: Int, script: [VCPUExit] = []) throws -> MockVirtualCPU {
        try reserve(id)
        return MockVirtualCPU(id: id, script: script)
    }

    /// A vCPU whose guest is `program`: Swift code that runs on a thread of its own, reads and
    /// writes this VM's memory as a guest would, and makes exits through the `MockGuest` it is
    /// given (each blocks until the VMM runs the vCPU again, as a real exit does). The program
    /// starts at the vCPU's first `run()`. When it returns, the vCPU behaves like a guest
    /// spinning forever; when it throws, like a guest that shut down.
    ///
    /// ```swift
    /// let cpu = try vm.makeMockVCPU(id: 0) { guest in
    ///     try guest.memory.write(UInt32(7), at: GuestAddress(0x1000))
    ///     guest.portOut(0x510, size: 4, value: 1)       // the VMM's device sees it
    ///     let reply = guest.portIn(0x512, size: 4)      // and answers this
    /// }
    /// ```
    public func makeMockVCPU(id: Int, program: @escaping @Sendable (MockGuest) throws -> Void) throws -> MockVirtualCPU {
        try reserve(id)
        return MockVirtualCPU(id: id, memory: guestMemory, program: program)
    }

    private func reserve(_ id: Int) throws {
        let isNew = created.withLock { ids in
            id >= 0 && id < maximumVCPUCount && ids.insert(id).inserted
        }
        guard isNew else { throw MockError.invalidVCPUID(id) }
    }
}

/// Errors from the mock.
public enum MockError: Error, Equatable, Sendable {
    /// A vCPU id out of range or used twice.
    case invalidVCPUID(Int)
    /// A port-in or MMIO-read reply with no such exit pending.
    case noPendingRead
}

/// A vCPU that returns the exits of its script in order, or of its guest program as the
/// program makes them. After the script (or the program) it blocks in `run()` like a guest
/// that never exits, until kicked. Replies to reads are recorded.
public final class MockVirtualCPU: VirtualCPU {
    public let id: Int
    struct State {
        var script: [VCPUExit]
        var position = 0
        var kicked = false
        var pendingRead = false
        var replies: [UInt64] = []
        var registers = X86Registers()
        var systemRegisters = X86SystemRegisters()
        var msrs: [UInt32: UInt64] = [:]
        var runCalls = 0
        // A guest program's hand-over: it appends an exit to `script` and waits until the
        // VMM runs the vCPU again (`resumed` reaches its exit count).
        var exitsResumed = 0
        var lastReply: UInt64 = 0
        var programFailed = false
        var tornDown = false
    }
    let state: ConditionLock<State>
    private let program: (@Sendable (MockGuest) throws -> Void)?
    private let memory: (any GuestMemory)?
    private let guestThread = LockedValue<HostThread?>(nil)

    init(id: Int, script: [VCPUExit]) {
        self.id = id
        state = ConditionLock(State(script: script))
        program = nil
        memory = nil
    }

    init(id: Int, memory: any GuestMemory, program: @escaping @Sendable (MockGuest) throws -> Void) {
        self.id = id
        state = ConditionLock(State(script: []))
        self.program = program
        self.memory = memory
    }

    /// Stops a guest program: its exits return at once from now on (it must then end).
    deinit {
        state.withLockAndBroadcast { $0.tornDown = true }
        guestThread.withLock { $0 }?.join()
    }

    /// Whether the guest program threw (the vCPU then reports `.shutdown`).
    public var guestProgramFailed: Bool { state.withLock { $0.programFailed } }

    private func startProgramIfNeeded() throws {
        guard let program, let memory else { return }
        try guestThread.withLock { (thread) throws(HostThreadError) in
            guard thread == nil else { return }
            let guest = MockGuest(memory: memory, state: state)
            let state = self.state
            thread = try HostThread(name: "mock-guest\(id)") {
                do { try program(guest) } catch {
                    state.withLockAndBroadcast { state in
                        state.programFailed = true
                        state.script.append(.shutdown)
                    }
                }
            }
        }
    }

    /// Appends exits to the script (wakes a `run()` waiting at the end of it).
    public func append(_ exits: [VCPUExit]) { state.withLockAndBroadcast { $0.script += exits } }

    /// The values given to `completePortIn`/`completeMMIORead`, in order.
    public var readReplies: [UInt64] { state.withLock { $0.replies } }

    /// How many times `run()` was called.
    public var runCount: Int { state.withLock { $0.runCalls } }

    public func run() throws -> VCPUExit {
        try startProgramIfNeeded()
        // Entering the guest again resumes a program waiting in its last exit.
        state.withLockAndBroadcast { $0.exitsResumed = $0.position }
        return state.wait(until: { $0.kicked || $0.position < $0.script.count }) { state, _ in
            state.runCalls += 1
            if state.kicked { return .interrupted }
            let exit = state.script[state.position]
            state.position += 1
            switch exit {
            case .portIn, .portInString, .mmioRead: state.pendingRead = true
            default: state.pendingRead = false
            }
            return exit
        }
    }

    public func completePortIn(_ value: UInt64) throws { try completeRead(value) }
    public func completePortInString(_ values: [UInt64]) throws {
        let hadPendingRead = state.withLock { state -> Bool in
            guard state.pendingRead else { return false }
            state.pendingRead = false
            state.replies.append(contentsOf: values)
            state.lastReply = values.last ?? 0
            return true
        }
        if !hadPendingRead { throw MockError.noPendingRead }
    }
    public func completeMMIORead(_ value: UInt64) throws { try completeRead(value) }

    private func completeRead(_ value: UInt64) throws {
        let hadPendingRead = state.withLock { state -> Bool in
            guard state.pendingRead else { return false }
            state.pendingRead = false
            state.replies.append(value)
            state.lastReply = value
            return true
        }
        if !hadPendingRead { throw MockError.noPendingRead }
    }

    public func kick() { state.withLockAndBroadcast { $0.kicked = true } }
    public func acknowledgeKick() { state.withLock { $0.kicked = false } }

    public func registers() throws -> X86Registers { state.withLock { $0.registers } }
    public func setRegisters(_ registers: X86Registers) throws { state.withLock { $0.registers = registers } }
    public func systemRegisters() throws -> X86SystemRegisters { state.withLock { $0.systemRegisters } }
    public func setSystemRegisters(_ registers: X86SystemRegisters) throws { state.withLock { $0.systemRegisters = registers } }
    public func readMSRs(_ indices: [UInt32]) throws -> [X86MSR] {
        state.withLock { state in indices.map { X86MSR(index: $0, value: state.msrs[$0] ?? 0) } }
    }
    public func writeMSRs(_ msrs: [X86MSR]) throws {
        state.withLock { state in for msr in msrs { state.msrs[msr.index] = msr.value } }
    }
}
