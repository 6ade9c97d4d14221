#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// A cross-process lock (`flock(LOCK_EX)` on a file) around every read-modify-write of the
/// shared `rtvirt` groups: their RT runtime and cpuset are sums and unions over the VMs of
/// every VMM on the host, so two VMMs creating or removing partitions at once must not
/// interleave. `flock` locks belong to an open file description: two threads of one process
/// that each take the lock exclude each other too, and a process that dies releases it.
public struct PartitionLock: Sendable {
    /// The lock file.
    public var path: String

    /// `/run/rtvirt/partition.lock`, the lock every RTVirt process shares.
    public static let shared = PartitionLock(path: "/run/rtvirt/partition.lock")

    /// A lock on `path` (its directory is created when missing).
    public init(path: String) { self.path = path }

    /// Runs `body` holding the lock.
    public func withLock<Result>(_ body: () throws(CgroupError) -> Result) throws(CgroupError) -> Result {
        let directory = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !directory.isEmpty, access(directory, F_OK) != 0 {
            guard mkdir(directory, 0o755) == 0 || errno == EEXIST else { throw .lock(path: directory, errno: Errno(rawValue: errno)) }
        }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .lock(path: path, errno: Errno(rawValue: errno)) }
        defer { close(fd) } // closing the last descriptor releases the lock
        while flock(fd, LOCK_EX) != 0 {
            guard errno == EINTR else { throw .lock(path: path, errno: Errno(rawValue: errno)) }
        }
        return try body()
    }
}
