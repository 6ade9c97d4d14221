/// A hypervisor that can create virtual machines (for example `/dev/kvm`).
public protocol Hypervisor: AnyObject, Sendable {
    /// A short name of the backend, for reports (for example `"kvm"`).
    var name: String { get }
    /// Creates an empty virtual machine.
    func makeVirtualMachine() throws -> any VirtualMachine
}

/// A virtual machine: guest memory, vCPUs and the devices the VMM puts on its bus.
public protocol VirtualMachine: AnyObject, Sendable {
    /// The guest's memory.
    var memory: any GuestMemory { get }
    /// Highest vCPU id this VM accepts plus one.
    var maximumVCPUCount: Int { get }
    /// Adds `size` bytes of RAM at guest-physical `base` (page-aligned, not overlapping).
    func addMemory(at base: GuestAddress, size: UInt64) throws
    /// Creates the vCPU with `id` (0 ..< maximumVCPUCount).
    func makeVCPU(id: Int) throws -> any VirtualCPU
}

/// One virtual CPU. `run()` is called from a single thread at a time (the vCPU's thread);
/// `kick()` may be called from any thread.
public protocol VirtualCPU: AnyObject, Sendable {
    /// The vCPU's id inside its VM.
    var id: Int { get }
    /// Runs the guest until the next exit.
    func run() throws -> VCPUExit
    /// Answers the pending port-in exit with `value` (its low `size` bytes).
    func completePortIn(_ value: UInt64) throws
    /// Answers the pending string port-in exit with one value per element.
    func completePortInString(_ values: [UInt64]) throws
    /// Answers the pending MMIO-read exit with `value` (its low `size` bytes).
    func completeMMIORead(_ value: UInt64) throws
    /// Makes a current or the next `run()` return `.interrupted` promptly; safe from any thread.
    func kick()
    /// Allows `run()` to enter the guest again after a kick. Call it on the vCPU's thread
    /// after `run()` returned `.interrupted` and before deciding whether to run again.
    func acknowledgeKick()

    /// General registers.
    func registers() throws -> X86Registers
    /// Sets the general registers.
    func setRegisters(_ registers: X86Registers) throws
    /// Segment, control and descriptor-table registers.
    func systemRegisters() throws -> X86SystemRegisters
    /// Sets the segment, control and descriptor-table registers.
    func setSystemRegisters(_ registers: X86SystemRegisters) throws
    /// Reads the given MSRs.
    func readMSRs(_ indices: [UInt32]) throws -> [X86MSR]
    /// Writes the given MSRs.
    func writeMSRs(_ msrs: [X86MSR]) throws

    /// Does on the calling thread, without running the guest, the setup the hypervisor does at
    /// a VM's first run, so that helper tasks it starts then (KVM's per-VM workers) inherit
    /// this thread's cgroups, scheduling class and affinity. Called on a vCPU thread before a
    /// real-time policy is applied to it. Does nothing by default.
    func prepareHostThread() throws
}

extension VirtualCPU {
    /// Nothing to prepare.
    public func prepareHostThread() throws {}
}
