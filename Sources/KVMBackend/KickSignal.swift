import CKVMShim
import Glibc
import SystemPackage

/// The signal that kicks a vCPU thread out of `KVM_RUN`, and what to do when the embedding
/// process already handles it.
///
/// A kick first sets the vCPU's `immediate_exit` (so a `KVM_RUN` about to start returns at
/// once), then sends this signal to the vCPU's thread (so one already running returns with
/// `EINTR`). The handler does nothing and is installed without `SA_RESTART`, process-wide, when
/// a `KVMSystem` is opened. Each vCPU thread unblocks this one signal in its own mask the first
/// time it runs the vCPU (threads inherit masks, and a thread started from a libdispatch worker
/// has every signal blocked); no other signal and no other thread is touched.
public struct KVMKickSignal: Equatable, Sendable, CustomStringConvertible {
    /// What to do when the signal already has a handler that RTVirt did not install.
    public enum ForeignHandler: Equatable, Sendable {
        /// Refuse: opening `KVMSystem` throws `KVMError.kickSignalInUse`.
        case refuse
        /// Keep that handler and call it after each delivery of the signal, kicks included.
        case chain
    }

    /// The signal number.
    public var number: Int32
    /// What to do with a handler that is already installed.
    public var foreignHandler: ForeignHandler

    /// A kick signal: `number` between 1 and the highest real-time signal.
    public init(number: Int32, foreignHandler: ForeignHandler = .refuse) {
        self.number = number
        self.foreignHandler = foreignHandler
    }

    /// SIGRTMIN + 3; a foreign handler is refused.
    public static let `default` = KVMKickSignal(number: rtv_kick_default_signal())

    public var description: String {
        let offset = number - rtv_kick_default_signal() + 3
        return offset >= 0 && offset < 32 ? "SIGRTMIN+\(offset) (\(number))" : "signal \(number)"
    }

    /// Installs the handler (once per signal and process; later calls check it is still ours).
    func install() throws(KVMError) {
        let result = rtv_kick_install_handler(number, foreignHandler == .chain ? 1 : 0)
        switch result {
        case 0: return
        case EBUSY: throw .kickSignalInUse(signal: number)
        default: throw .ioctlFailed(operation: "sigaction(\(self))", errno: Errno(rawValue: result))
        }
    }
}
