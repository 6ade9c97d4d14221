/// What a vCPU run loop needs from whatever parks its vCPUs in long polls (the `LongPoll`
/// module's `LongPollDispatcher` conforms; a VMM with its own waiting mechanism may too).
///
/// The run loop calls `cancel(vcpu:)` when it is asked to stop, `interruptDelivered(vcpu:)`
/// before each entry into the guest, and `VirtualMachineRunner.stop()` calls `close(vcpu:)`
/// for each of its vCPUs: the VM stopped.
public protocol VCPUParking: Sendable {
    /// Ends the vCPU's current wait, and every later one until it is resumed.
    func cancel(vcpu: Int)
    /// The VM stopped: ends the vCPU's wait and whatever waits on the vCPU (queued messages,
    /// reverse calls). Returns nothing the caller needs.
    func closeVCPU(_ vcpu: Int)
    /// The vCPU is about to enter the guest, which delivers any interrupt injected for it.
    func interruptDelivered(vcpu: Int)
}
