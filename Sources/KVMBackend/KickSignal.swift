import CKVMShim
import SystemPackage

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
///
/// A kick first sets the vCPU's `immediate_exit` (so a `KVM_RUN` about to start returns at
/// once), then sends this signal to the vCPU's thread (so one already running returns with
/// EINTR). The handler is empty and installed without `SA_RESTART`.
public enum KickSignal {
    /// The signal number: SIGRTMIN + 3.
    public static let number: Int32 = rtv_kick_default_signal()

    private static let installResult: Int32 = rtv_kick_install_handler(number)

    /// Installs the handler once per process.
    static func installHandler() throws(KVMError) {
        let result = installResult
        if result != 0 { throw .ioctlFailed(operation: "sigaction(SIGRTMIN+3)", errno: Errno(rawValue: result)) }
    }
}
