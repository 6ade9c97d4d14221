import CKVMShim
import CLinuxSupport
import Glibc
import RTVirtCore
import SystemPackage

/// A KVM vCPU: owns the vCPU file descriptor and its mapped `kvm_run` area.
///
/// `run()` is called by one thread at a time; `kick()` from any thread. The state accessors
/// (registers, MSRs, CPUID) wait while the vCPU is inside `KVM_RUN` on another thread (the
/// kernel serializes vCPU ioctls): call them before the vCPU runs, after it stopped, or from
/// its own thread. While `run()` is
/// inside `KVM_RUN` the vCPU remembers the running thread, so that a kick can signal it;
/// outside, a kick only sets `immediate_exit`, which makes the next `run()` return
/// `.interrupted` without entering the guest.
public final class KVMVirtualCPU: VirtualCPU, @unchecked Sendable {
    // @unchecked: `runArea` points at kernel-shared memory. Only the thread inside `run()`
    // touches the exit fields; `immediate_exit` is written with atomic stores from the C shim.

    public let id: Int
    /// The VM this vCPU belongs to (kept alive by the vCPU).
    public let vm: KVMVirtualMachine
    let descriptor: OwnedDescriptor
    let runArea: UnsafeMutablePointer<kvm_run>
    private let runAreaSize: Int
    private let runningThread = LockedValue<pthread_t?>(nil)
    /// The last thread whose signal mask was checked to let the kick signal through.
    private let kickableThread = LockedValue<pthread_t?>(nil)

    /// Takes over `descriptor`, the result of `KVM_CREATE_VCPU` for `id` (closed if this throws).
    init(vm: KVMVirtualMachine, id: Int, descriptor: OwnedDescriptor) throws(KVMError) {
        self.vm = vm
        self.id = id
        self.descriptor = descriptor
        runAreaSize = vm.system.vcpuRunAreaSize
        let mapped = mmap(nil, runAreaSize, PROT_READ | PROT_WRITE, MAP_SHARED, descriptor.rawValue, 0)
        guard let mapped, mapped != MAP_FAILED else { throw .runAreaMappingFailed(errno: Errno(rawValue: errno)) }
        // Sound: KVM maps a `struct kvm_run` at offset 0 of the vCPU descriptor.
        runArea = mapped.assumingMemoryBound(to: kvm_run.self)
    }

    deinit {
        munmap(runArea, runAreaSize)
    }

    // MARK: Running

    public func run() throws -> VCPUExit { try runOnce() }

    /// Enters the guest until the next exit (`KVM_RUN`) and decodes the exit.
    public func runOnce() throws(KVMError) -> VCPUExit {
        let thread = pthread_self()
        if kickableThread.withLock({ $0 }) != thread {
            // Threads inherit signal masks; a vCPU thread started from a thread that blocks the
            // kick signal could never be kicked out of KVM_RUN.
            let result = rtv_kick_unblock_in_current_thread(vm.system.kickSignal.number)
            guard result == 0 else { throw .ioctlFailed(operation: "pthread_sigmask", errno: Errno(rawValue: result)) }
            kickableThread.withLock { $0 = thread }
        }
        runningThread.withLock { $0 = thread }
        let result = rtv_kvm_run(descriptor.rawValue)
        let code = errno
        runningThread.withLock { $0 = nil }
        if !vm.hasRun.load(ordering: .relaxed) { vm.hasRun.store(true, ordering: .releasing) }
        if result < 0 {
            if code == EINTR { return .interrupted }
            throw .ioctlFailed(operation: "KVM_RUN", errno: Errno(rawValue: code))
        }
        var info = rtv_exit_info()
        rtv_exit_decode(runArea, runAreaSize, &info)
        if Int32(info.reason) == KVM_EXIT_IO, info.io_count > 1, [1, 2, 4].contains(info.io_size) {
            return stringIOExit(info)
        }
        return Self.exit(from: info)
    }

    /// Does on the calling thread what the VM's first `KVM_RUN` does besides running the guest,
    /// so that the tasks KVM starts then inherit this thread's cgroups, scheduling class and
    /// affinity before it becomes real-time, not after.
    ///
    /// KVM starts per-VM workers in the VMM's own thread group from the thread of the VM's first
    /// `KVM_RUN`: on Linux 6.13 and later `kvm-nx-lpage-recovery` (which `nx_huge_pages` and
    /// `nx_huge_pages_recovery_ratio` govern). Started from a real-time vCPU thread, it would run
    /// real-time inside the partition's budget and keep the partition from being removed. This
    /// is a `KVM_RUN` with `immediate_exit` set, which returns EINTR without entering the guest.
    /// Once per VM: after any `KVM_RUN` of the VM has returned it does nothing.
    /// `RealtimeVCPUScheduler` calls it on each vCPU thread before applying a policy.
    /// - Throws: `KVMError.ioctlFailed` when `KVM_RUN` fails with anything but EINTR.
    public func prepareHostThread() throws(KVMError) {
        guard !vm.hasRun.load(ordering: .acquiring) else { return }
        try runningThread.withLock { (_) throws(KVMError) in
            // Under the kick lock: a concurrent kick waits, so the immediate_exit it sets is
            // neither lost when the previous value is put back nor taken as this call's.
            let armed = rtv_run_get_immediate_exit(runArea)
            rtv_run_set_immediate_exit(runArea, 1)
            defer { rtv_run_set_immediate_exit(runArea, armed) }
            let result = rtv_kvm_run(descriptor.rawValue)
            let code = errno
            guard result < 0, code == EINTR else {
                throw .ioctlFailed(operation: "KVM_RUN with immediate_exit (starting KVM's per-VM workers)",
                                   errno: Errno(rawValue: result < 0 ? code : EPROTO))
            }
        }
        vm.hasRun.store(true, ordering: .releasing)
    }

    /// A `rep ins`/`rep outs` exit; elements outside the kvm_run area make it unsupported.
    private func stringIOExit(_ info: rtv_exit_info) -> VCPUExit {
        let count = Int(info.io_count), size = Int(info.io_size)
        if Int32(info.io_direction) == KVM_EXIT_IO_IN {
            var probe: UInt64 = 0
            guard rtv_exit_io_element(runArea, runAreaSize, UInt32(count - 1), &probe) == 0 else {
                return .unsupported(reason: info.reason, detail: "string port-in of \(count) elements outside kvm_run")
            }
            return .portInString(port: info.io_port, size: size, count: count)
        }
        var values: [UInt64] = []
        values.reserveCapacity(count)
        for index in 0..<count {
            var value: UInt64 = 0
            guard rtv_exit_io_element(runArea, runAreaSize, UInt32(index), &value) == 0 else {
                return .unsupported(reason: info.reason, detail: "string port-out element \(index) outside kvm_run")
            }
            values.append(value)
        }
        return .portOutString(port: info.io_port, size: size, data: values)
    }

    static func exit(from info: rtv_exit_info) -> VCPUExit {
        switch Int32(info.reason) {
        case KVM_EXIT_IO:
            let size = Int(info.io_size)
            guard size == 1 || size == 2 || size == 4 else {
                return .unsupported(reason: info.reason, detail: "port I/O of size \(size)")
            }
            guard info.io_count == 1 else {
                return .unsupported(reason: info.reason, detail: "port I/O with count \(info.io_count) at port 0x\(String(info.io_port, radix: 16))")
            }
            if Int32(info.io_direction) == KVM_EXIT_IO_OUT {
                return .portOut(port: info.io_port, size: size, data: info.io_data)
            }
            return .portIn(port: info.io_port, size: size)
        case KVM_EXIT_MMIO:
            let size = Int(info.mmio_length)
            guard (1...8).contains(size) else {
                return .unsupported(reason: info.reason, detail: "MMIO access of length \(size)")
            }
            let address = GuestAddress(info.mmio_address)
            return info.mmio_is_write != 0 ? .mmioWrite(address: address, size: size, data: info.mmio_data)
                                           : .mmioRead(address: address, size: size)
        case KVM_EXIT_HLT: return .halt
        case KVM_EXIT_SHUTDOWN: return .shutdown
        case KVM_EXIT_INTR: return .interrupted
        case KVM_EXIT_FAIL_ENTRY: return .failedEntry(hardwareReason: info.fail_reason, cpu: info.fail_cpu)
        case KVM_EXIT_INTERNAL_ERROR: return .internalError(suberror: info.internal_suberror)
        case KVM_EXIT_SYSTEM_EVENT: return .systemEvent(type: info.system_event_type)
        default: return .unsupported(reason: info.reason, detail: "exit reason \(info.reason)")
        }
    }

    public func completePortIn(_ value: UInt64) throws {
        guard rtv_exit_complete_io_in(runArea, runAreaSize, value) == 0 else { throw KVMError.noPendingRead("port-in") }
    }

    public func completePortInString(_ values: [UInt64]) throws {
        for (index, value) in values.enumerated() {
            guard rtv_exit_set_io_element(runArea, runAreaSize, UInt32(index), value) == 0 else {
                throw KVMError.noPendingRead("string port-in element \(index)")
            }
        }
    }

    public func completeMMIORead(_ value: UInt64) throws {
        guard rtv_exit_complete_mmio_read(runArea, value) == 0 else { throw KVMError.noPendingRead("MMIO-read") }
    }

    public func kick() {
        runningThread.withLock { thread in
            // Order matters: immediate_exit first covers a thread about to enter KVM_RUN;
            // the signal covers one already inside. The lock keeps the thread alive while
            // it is signalled (it clears `runningThread` under the same lock after KVM_RUN).
            rtv_run_set_immediate_exit(runArea, 1)
            if let thread { _ = rtv_kick_thread(thread, vm.system.kickSignal.number) }
        }
    }

    public func acknowledgeKick() { rtv_run_set_immediate_exit(runArea, 0) }

    // MARK: State

    public func registers() throws -> X86Registers {
        var regs = kvm_regs()
        _ = try checkedIoctl("KVM_GET_REGS") { rtv_kvm_get_regs(descriptor.rawValue, &regs) }
        return X86Registers(regs)
    }

    public func setRegisters(_ registers: X86Registers) throws {
        var regs = registers.kernelRegisters
        _ = try checkedIoctl("KVM_SET_REGS") { rtv_kvm_set_regs(descriptor.rawValue, &regs) }
    }

    public func systemRegisters() throws -> X86SystemRegisters {
        var sregs = kvm_sregs()
        _ = try checkedIoctl("KVM_GET_SREGS") { rtv_kvm_get_sregs(descriptor.rawValue, &sregs) }
        return X86SystemRegisters(sregs)
    }

    public func setSystemRegisters(_ registers: X86SystemRegisters) throws {
        var sregs = kvm_sregs()
        // Start from the current state so fields this type does not model (the pending
        // interrupt bitmap) are kept.
        _ = try checkedIoctl("KVM_GET_SREGS") { rtv_kvm_get_sregs(descriptor.rawValue, &sregs) }
        registers.apply(to: &sregs)
        _ = try checkedIoctl("KVM_SET_SREGS") { rtv_kvm_set_sregs(descriptor.rawValue, &sregs) }
    }

    public func readMSRs(_ indices: [UInt32]) throws -> [X86MSR] {
        try withMSRBuffer(indices.map { X86MSR(index: $0, value: 0) }) { (buffer) throws(KVMError) in
            let read = try checkedIoctl("KVM_GET_MSRS") { rtv_kvm_get_msrs(descriptor.rawValue, buffer) }
            guard Int(read) == indices.count else {
                throw .ioctlFailed(operation: "KVM_GET_MSRS (read \(read) of \(indices.count))", errno: .invalidArgument)
            }
        }
    }

    public func writeMSRs(_ msrs: [X86MSR]) throws {
        _ = try withMSRBuffer(msrs) { (buffer) throws(KVMError) in
            let written = try checkedIoctl("KVM_SET_MSRS") { rtv_kvm_set_msrs(descriptor.rawValue, buffer) }
            guard Int(written) == msrs.count else {
                throw .ioctlFailed(operation: "KVM_SET_MSRS (wrote \(written) of \(msrs.count))", errno: .invalidArgument)
            }
        }
    }

    /// Builds a `struct kvm_msrs` with `msrs`, calls `body`, and returns the entries after it.
    private func withMSRBuffer(
        _ msrs: [X86MSR], _ body: (UnsafeMutablePointer<kvm_msrs>) throws(KVMError) -> Void
    ) throws(KVMError) -> [X86MSR] {
        try withFlexibleArray(header: kvm_msrs.self, entry: kvm_msr_entry.self, count: msrs.count) { (header, entries) throws(KVMError) in
            header.pointee.nmsrs = UInt32(msrs.count)
            for (slot, msr) in zip(entries.indices, msrs) {
                entries[slot].index = msr.index
                entries[slot].data = msr.value
            }
            try body(header)
            return entries.map { X86MSR(index: $0.index, value: $0.data) }
        }
    }

    /// Sets the CPUID leaves the guest sees (`KVM_SET_CPUID2`), typically from
    /// `KVMSystem.supportedCPUID()`.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        try withFlexibleArray(header: kvm_cpuid2.self, entry: kvm_cpuid_entry2.self, count: entries.count) { (header, slots) throws(KVMError) in
            header.pointee.nent = UInt32(entries.count)
            for (index, entry) in entries.enumerated() { slots[index] = entry.kernelEntry }
            _ = try checkedIoctl("KVM_SET_CPUID2") { rtv_kvm_set_cpuid2(descriptor.rawValue, header) }
        }
    }

    /// The guest TSC frequency in kHz (`KVM_GET_TSC_KHZ`), or nil when unsupported.
    public func tscFrequencyKHz() -> UInt64? {
        guard vm.system.hasCapability(.getTSCKHz) else { return nil }
        let khz = rtv_kvm_get_tsc_khz(descriptor.rawValue)
        return khz > 0 ? UInt64(khz) : nil
    }

    /// Guest TSC minus host TSC, with its error bound: read exactly from the kernel where it
    /// offers the offset as a vCPU attribute, otherwise sampled (`TSCOffsetReading`).
    ///
    /// - Parameters:
    ///   - method: nil (the default) reads the attribute when the kernel has it and
    ///     samples otherwise; `.kernelAttribute` only reads the attribute (throwing
    ///     `.ioctlFailed` where there is none); `.msrSampling` always samples (to compare, or to
    ///     test the fallback on a kernel that has the attribute).
    ///   - limits: how many samples, attempts and how wide a window sampling accepts.
    /// - Throws: `KVMError.tscOffsetUnbounded` when sampling finds no window narrow enough,
    ///   `.tscOffsetInconsistent`, `.invalidTSCSamplingLimits`, or `.ioctlFailed`.
    public func readTSCOffset(method: TSCOffsetMethod? = nil, limits: TSCSamplingLimits = TSCSamplingLimits()) throws(KVMError) -> TSCOffsetReading {
        if method != .msrSampling {
            var offset: Int64 = 0
            let result = rtv_kvm_get_tsc_offset(descriptor.rawValue, &offset)
            if result == 0 { return TSCOffsetReading(offset: offset, errorBound: 0, method: .kernelAttribute, samples: 1) }
            guard result == ENXIO || result == ENOTTY || result == EINVAL else {
                throw .ioctlFailed(operation: "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)", errno: Errno(rawValue: result))
            }
            if method == .kernelAttribute { throw .ioctlFailed(operation: "KVM_HAS_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)", errno: Errno(rawValue: result)) }
        }
        return try sampleTSCOffset(limits: limits)
    }

    /// Brackets `KVM_GET_MSRS(IA32_TSC)` between two host TSC reads, many times. Each accepted
    /// bracket (one CPU, at most `limits.maximumWindowNanoseconds` wide) says the offset lies in
    /// [guest − after, guest − before]; the offset is the middle of the intersection of all of
    /// them, and the bound half its width (never wider than the narrowest bracket).
    private func sampleTSCOffset(limits: TSCSamplingLimits) throws(KVMError) -> TSCOffsetReading {
        guard limits.samples > 0, limits.maximumAttempts > 0, limits.maximumWindowNanoseconds > 0 else { throw .invalidTSCSamplingLimits }
        let frequency = tscFrequencyKHz().map { $0 * 1000 } ?? GuestTSCMapping.measureHostTSCFrequency()
        let maximumWindow = UInt64(Double(limits.maximumWindowNanoseconds) * Double(frequency) / 1e9)
        var lower = Int64.min, upper = Int64.max
        var accepted = 0, attempts = 0, narrowest = UInt64.max
        // One kvm_msrs buffer for all tries: only the ioctl sits between the two host reads.
        try withFlexibleArray(header: kvm_msrs.self, entry: kvm_msr_entry.self, count: 1) { (header, entries) throws(KVMError) in
            header.pointee.nmsrs = 1
            entries[0].index = X86MSR.timeStampCounter
            while accepted < limits.samples && attempts < limits.maximumAttempts {
                attempts += 1
                var beforeCPU: UInt32 = 0, afterCPU: UInt32 = 0
                let before = rtv_rdtscp_fenced(&beforeCPU)
                let read = rtv_kvm_get_msrs(descriptor.rawValue, header)
                let after = rtv_rdtscp_fenced(&afterCPU)
                guard read == 1 else {
                    throw .ioctlFailed(operation: "KVM_GET_MSRS(IA32_TSC)", errno: Errno(rawValue: read < 0 ? errno : EIO))
                }
                guard beforeCPU == afterCPU, after >= before else { continue } // migrated between the reads
                narrowest = min(narrowest, after - before)
                guard after - before <= maximumWindow else { continue }
                let guest = entries[0].data
                lower = max(lower, Int64(bitPattern: guest &- after))
                upper = min(upper, Int64(bitPattern: guest &- before))
                accepted += 1
            }
        }
        guard accepted > 0 else {
            let narrowestNanoseconds = narrowest == .max ? UInt64.max : UInt64(Double(narrowest) * 1e9 / Double(frequency))
            throw .tscOffsetUnbounded(narrowestWindowNanoseconds: narrowestNanoseconds, limitNanoseconds: limits.maximumWindowNanoseconds,
                                      attempts: attempts)
        }
        guard lower <= upper else { throw .tscOffsetInconsistent }
        let width = UInt64(bitPattern: upper &- lower)
        return TSCOffsetReading(offset: lower &+ Int64(bitPattern: width / 2), errorBound: (width + 1) / 2, method: .msrSampling,
                                samples: accepted)
    }

    /// This vCPU's TSC mapping with its error bound: the offset from `readTSCOffset()` (exact
    /// where the kernel reports it), the frequency `frequencyHz`, else `KVM_GET_TSC_KHZ`, else
    /// measured against `CLOCK_MONOTONIC`. Read it before the vCPU runs: a vCPU ioctl waits
    /// while the vCPU is inside `KVM_RUN` on another thread. The mapping assumes no TSC
    /// scaling (KVM's default: the guest TSC counts at the host's rate).
    public func tscMapping(frequencyHz: UInt64? = nil, limits: TSCSamplingLimits = TSCSamplingLimits()) throws(KVMError) -> GuestTSCMapping {
        let reading = try readTSCOffset(limits: limits)
        let frequency = frequencyHz ?? tscFrequencyKHz().map { $0 * 1000 } ?? GuestTSCMapping.measureHostTSCFrequency()
        return GuestTSCMapping(frequencyHz: frequency, guestOffset: reading.offset, offsetErrorBound: reading.errorBound)
    }
}

/// How a guest TSC offset was obtained.
public enum TSCOffsetMethod: String, Codable, Sendable {
    /// `KVM_GET_DEVICE_ATTR` with `KVM_VCPU_TSC_CTRL` / `KVM_VCPU_TSC_OFFSET` (Linux 5.16 and
    /// later): the offset KVM applies, exactly.
    case kernelAttribute
    /// `IA32_TSC` through `KVM_GET_MSRS`, bracketed by host TSC reads, sampled many times.
    case msrSampling
}

/// A guest TSC offset (guest TSC − host TSC, ticks) and how far from the truth it may be.
public struct TSCOffsetReading: Equatable, Sendable {
    /// The offset, in TSC ticks.
    public var offset: Int64
    /// The true offset lies within `offset ± errorBound` ticks (0: exact).
    public var errorBound: UInt64
    /// How it was obtained.
    public var method: TSCOffsetMethod
    /// Brackets that went into it (1 for the kernel attribute).
    public var samples: Int

    /// A reading.
    public init(offset: Int64, errorBound: UInt64, method: TSCOffsetMethod, samples: Int) {
        self.offset = offset; self.errorBound = errorBound; self.method = method; self.samples = samples
    }
}

/// How `KVMVirtualCPU.readTSCOffset` samples when the kernel does not report the offset.
public struct TSCSamplingLimits: Equatable, Sendable {
    /// Accepted brackets to collect.
    public var samples: Int
    /// Brackets to try at most.
    public var maximumAttempts: Int
    /// Widest accepted bracket, nanoseconds: a wider one (the thread was preempted, or the
    /// ioctl was slow) is rejected. The error bound is at most half of it.
    public var maximumWindowNanoseconds: UInt64

    /// Limits; the defaults collect 32 brackets of at most 10 µs in at most 2,000 tries (one
    /// `KVM_GET_MSRS` takes about 5 µs on a nested `kvm_pvm` host, ~1 µs on bare metal).
    public init(samples: Int = 32, maximumAttempts: Int = 2_000, maximumWindowNanoseconds: UInt64 = 10_000) {
        self.samples = samples; self.maximumAttempts = maximumAttempts; self.maximumWindowNanoseconds = maximumWindowNanoseconds
    }
}
