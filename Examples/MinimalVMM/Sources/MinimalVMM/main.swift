// MinimalVMM: a VMM that boots its own tiny guest (Guest/guest.c) on KVM with RTVirt's
// real-time features: VMRPC calls through a port doorbell, a `timer.sleepUntil` long poll that
// parks the vCPU in the host, a SCHED_FIFO vCPU thread pinned to one CPU, inside a cgroup
// partition with an RT budget. README.md walks through it step by step.
//
// Usage: MinimalVMM [--require-partition]   (as root, with /dev/kvm)
#if canImport(Glibc)
import Glibc
#endif
import CgroupScheduler
import KVMBackend
import LongPoll
import RealtimeVCPU
import RTVirtCore
import VMRPC
import X86GuestSetup

/// What the guest does: this many sleeps of this many microseconds.
let sleeps: UInt64 = 1000
let periodMicroseconds: UInt64 = 1000
/// The partition's RT budget: 50 % of the real-time CPU.
let budget = RTBudget(runtimeMicroseconds: 500_000, periodMicroseconds: 1_000_000)

/// Guest-physical memory (X86LongMode identity-maps it, so it is also the guest's virtual memory).
enum GuestLayout {
    static let memorySize: UInt64 = 2 << 20
    static let tables = X86LongModeLayout(gdt: GuestAddress(0x1000), tss: GuestAddress(0xA000), idt: GuestAddress(0x2000),
                                          pageTables: GuestAddress(0x3000), kernelStackTop: 0xF000)
    static let image = GuestAddress(0x10000)      // Guest/guest.ld links the image here
    static let vmrpcSlot = GuestAddress(0x100000) // vCPU 0's 4096-byte VMRPC call slot
    static let stackTop: UInt64 = 0x200000        // the end of RAM; the stack grows down
}

/// The guest's ports (Guest/guest.c has the same numbers; the in-kernel PIC/PIT ports would never reach us).
enum Ports {
    static let report: UInt16 = 0x510   // ReportPort: one signed 32-bit value per write
    static let exit: UInt16 = 0x511     // GuestExitDevice: stops the vCPU with the value as status
    static let doorbell: UInt16 = 0x512 // the VMRPC server's doorbell
}

/// What one run of the guest left behind: everything the VMM prints and checks, and no
/// reference to the VM, so the VM is gone when `runGuest` returns.
struct GuestRun {
    var stopReason: VCPUStopReason
    var reports: [Int32]
    var vmrpc: VMRPCChannelStatistics
    var vcpuThread: VCPUThreadState?
}

/// Boots the guest on one vCPU, runs it to its exit, and returns what happened.
func runGuest(realtimeCPU: Int, partition: CgroupPartition?) throws -> GuestRun {
    // 1. A VM with RAM, the long-mode system tables (page tables, GDT, TSS with an all-open
    //    I/O bitmap) and the guest image.
    let kvm = try KVMSystem()
    let vm = try kvm.makeKVMVirtualMachine()
    try vm.addKVMMemory(at: GuestAddress(0), size: GuestLayout.memorySize)
    try X86LongMode.writeSystemTables(GuestLayout.tables, into: vm.guestMemory)
    try FlatImage.load(guestImage, into: vm.guestMemory, at: GuestLayout.image)

    // 2. One vCPU entering the image in 64-bit mode at CPL 3 with IOPL 3: its code runs natively
    //    even on nested KVM, and its `out` instructions exit to this VMM. Arguments: RDI, RSI, RDX.
    let vcpu = try vm.makeKVMVCPU(id: 0)
    try vcpu.setCPUID(kvm.supportedCPUID())
    try vcpu.setSystemRegisters(X86LongMode.systemRegisters(
        GuestLayout.tables, privilege: .userWithIOPrivilege, startingFrom: vcpu.systemRegisters()))
    try vcpu.setRegisters(X86LongMode.entryRegisters(
        entry: GuestLayout.image, stack: GuestLayout.stackTop, privilege: .userWithIOPrivilege,
        arguments: [GuestLayout.vmrpcSlot.rawValue, sleeps, periodMicroseconds]))
    // How the vCPU's TSC maps to host time (clock.read and timer.sleepUntil need it). Read it
    // before the vCPU runs: a vCPU ioctl waits while the vCPU is inside KVM_RUN.
    let tsc = try vcpu.tscMapping()

    // 3. VMRPC. The dispatcher parks the vCPU's thread in the host during a long poll (`ppoll`
    //    until the deadline). timer.sleepUntil releases the vCPU early by the return latency it
    //    learns, and the guest spins to its own deadline. (A `DeadlineTimerStrategy` would also
    //    wake the host thread early and spin; over this short run it did not help: see README.)
    let dispatcher = try LongPollDispatcher(vcpuCount: 1)
    let server = try VMRPCServer(
        memory: vm.guestMemory, slots: VMRPCSlotTable([0: GuestLayout.vmrpcSlot]), dispatcher: dispatcher,
        procedures: VMRPCStandardProcedures.all(clock: HostGuestClockSource(mappings: [tsc])))

    // 4. The bus: the VMRPC doorbell, this VMM's own report port, and the exit port.
    let reportPort = ReportPort(capacity: Int(sleeps) * 2)
    var bus = IOBus()
    try server.registerDoorbell(on: &bus, port: Ports.doorbell)
    try bus.register(reportPort, space: .port, base: UInt64(Ports.report), length: 1)
    try bus.register(GuestExitDevice(), space: .port, base: UInt64(Ports.exit), length: 1)

    // 5. Real time: the vCPU's thread runs SCHED_FIFO 50 pinned to the real-time CPU, inside
    //    the partition, with memory locked. Fail-closed: if that cannot be applied, the runner
    //    throws and the guest never runs at normal priority.
    let scheduler = RealtimeVCPUScheduler(
        policies: [0: RealtimePolicy(schedulingClass: .fifo(priority: 50), cpus: [realtimeCPU], lockMemory: true)],
        partition: partition)
    let seenOnThread = LockedValue<VCPUThreadState?>(nil)

    // 6. Run: one host thread per vCPU. The same dispatcher goes to the runner, so that a stop
    //    also ends a parked long poll at once.
    let runner = try VirtualMachineRunner(
        vcpus: [vcpu], bus: bus, dispatcher: dispatcher,
        onThreadStart: scheduler.threadStarted,
        onThreadEnd: { vcpu in
            seenOnThread.withLock { $0 = VCPUThreadState.current() } // still real-time here
            scheduler.threadEnded(vcpu)                              // restores the thread
        })
    guard let stopReason = runner.waitForAll(timeoutNanoseconds: 60_000_000_000)[0] else {
        runner.stopAndWait()
        throw MinimalVMMError.guestDidNotFinish(seconds: 60)
    }
    return GuestRun(stopReason: stopReason, reports: reportPort.values, vmrpc: server.statistics(vcpu: 0)!,
                    vcpuThread: seenOnThread.withLock { $0 })
}

/// Runs the VMM; returns the checks that failed (none on success).
func runVMM() throws -> [String] {
    let requirePartition = CommandLine.arguments.contains("--require-partition")
    let module = KVMHostInfo.detectModule()
    print("MinimalVMM on \(module.rawValue): \(module.implication)")

    // The real-time CPU: the last one this process may use; the others do housekeeping.
    let allowed = try ThreadScheduling.affinity()
    let realtimeCPU = allowed.cpus.last ?? 0
    let partition: CgroupPartition?
    do {
        let created = try makePartition(realtimeCPU: realtimeCPU, allowed: allowed, budget: budget)
        print("partition: \(created.realtimeGroup) on CPU \(realtimeCPU), RT budget \(budget)")
        partition = created
    } catch {
        if requirePartition { throw error }
        partition = nil
        print("partition: none (\(error)); the vCPU runs SCHED_FIFO under the global RT limit only")
    }

    // Keep the CPUs out of deep idle states while the guest runs, as cyclictest does: waking
    // from one adds tens of microseconds to a timer. Best effort; released when dropped.
    let idleBound = try? CPUDMALatencyRequest(microseconds: 0)
    let run: GuestRun
    do {
        run = try withExtendedLifetime(idleBound) { try runGuest(realtimeCPU: realtimeCPU, partition: partition) }
    } catch {
        _ = try? partition?.remove()
        throw error
    }
    let failures = report(run, realtimeCPU: realtimeCPU, partition: partition)
    // The VM is gone (runGuest's locals were released with it): now the partition can go.
    if let partition { print("partition \(partition.vmGroup) removed in \(milliseconds(try partition.remove())) ms") }
    return failures
}

do {
    let failures = try runVMM()
    if failures.isEmpty {
        print("OK")
        exit(0)
    }
    for failure in failures { print("FAILED: \(failure)") }
    exit(1)
} catch {
    print("FAILED: \(error)")
    exit(1)
}
