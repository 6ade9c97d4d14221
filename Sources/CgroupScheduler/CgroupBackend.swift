import CLibcgroup
import RTVirtCore
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Why a cgroup operation failed.
public enum CgroupError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The v1 hierarchy lacks a controller the partition needs.
    case missingController(String)
    /// No per-group RT budget here (cgroup v2, or a v1 kernel without RT group scheduling):
    /// the `rtGroup` budget mode is impossible; `deadline` is the substitute.
    case noRTGroupScheduling
    /// cgroup v2: `controller` is not in the v2 root's `cgroup.controllers` (on a hybrid host
    /// it is bound to a v1 hierarchy instead). `available` is what the root offers.
    case v2ControllerUnavailable(controller: String, available: [String])
    /// cgroup v2: the root offers `controller` but does not enable it for its children
    /// (`cgroup.subtree_control`). RTVirt never writes outside its subtree; an administrator
    /// would write `+controller` to `file`.
    case v2ControllerNotDelegated(controller: String, file: String)
    /// cgroup v2: the kernel reports the real-time group's `cpuset.cpus.partition` as
    /// `state` (for example `root invalid (Cpu list in cpuset.cpus not exclusive)`).
    case partitionInvalid(group: String, state: String)
    /// cgroup v2: one process has one threaded subtree, so it holds at most one partition.
    case oneV2PartitionPerProcess(existing: String)
    /// The SCHED_DEADLINE budget is not admitted (see `DeadlineAdmissionError`).
    case deadline(DeadlineAdmissionError)
    /// The RT budget does not fit in what the shared `rtvirt` group can still give (checked
    /// under the cross-process lock, so two VMMs cannot both take the last share).
    case budgetUnavailable(requested: Double, available: Double)
    /// No budget mode works on this host; `reasons` says why for each.
    case noBudgetMode(reasons: [String])
    /// The cross-process lock could not be taken.
    case lock(path: String, errno: Errno)
    /// A libcgroup call failed.
    case libcgroup(operation: String, code: Int32, message: String)
    /// A file operation failed.
    case file(operation: String, path: String, errno: Errno)
    /// A path outside the project's subtree was about to be touched (never done).
    case outsideSubtree(String)
    /// A group path with a `..` component (`/proc/<pid>/cgroup` shows such paths for groups
    /// outside the reader's cgroup namespace): refused, never opened.
    case unsafeGroupPath(String)
    /// Tasks could not be moved out of `group`, so it was not removed; no RT runtime was
    /// given back (the budgets are as they were: removing again may succeed).
    case partitionBusy(group: String, tasks: [pid_t])

    public var description: String {
        switch self {
        case .missingController(let name): return "the cgroup v1 hierarchy has no '\(name)' controller"
        case .noRTGroupScheduling:
            return "no per-group RT budget here (cgroup v2 has none; a v1 kernel without RT_GROUP_SCHED has no cpu.rt_runtime_us): use the deadline budget mode"
        case let .v2ControllerUnavailable(controller, available):
            return "the cgroup v2 root does not offer '\(controller)' (cgroup.controllers: \(available.isEmpty ? "none" : available.joined(separator: " "))); on a hybrid host it is bound to a v1 hierarchy"
        case let .v2ControllerNotDelegated(controller, file):
            return "the cgroup v2 root offers '\(controller)' but does not enable it for its children; RTVirt does not write outside its subtree: an administrator would run 'echo +\(controller) > \(file)'"
        case let .partitionInvalid(group, state): return "the kernel reports \(group)/cpuset.cpus.partition as '\(state)'"
        case .oneV2PartitionPerProcess(let existing):
            return "this process already holds \(existing): on cgroup v2 a process's threads live in one threaded subtree, so one partition per process"
        case .deadline(let error): return "\(error)"
        case let .budgetUnavailable(requested, available):
            return "RT budget \(Int((requested * 100).rounded())) % of a CPU exceeds what the shared rtvirt group can still give (\(Int((available * 100).rounded())) %)"
        case .noBudgetMode(let reasons): return "no budget mode works on this host: " + reasons.joined(separator: "; ")
        case let .lock(path, errno): return "cannot lock \(path): \(errno)"
        case let .libcgroup(operation, code, message): return "libcgroup \(operation) failed (\(code)): \(message)"
        case let .file(operation, path, errno): return "\(operation) \(path): \(errno)"
        case .outsideSubtree(let path): return "refusing to touch \(path): outside the rtvirt subtree"
        case .unsafeGroupPath(let path): return "refusing to move a task to \(path): the path has a '..' component"
        case let .partitionBusy(group, tasks):
            return "tasks \(tasks.map(String.init).joined(separator: ", ")) could not be moved out of \(group); it was left in place with its RT runtime"
        }
    }
}

/// The key that names the unified cgroup v2 hierarchy where the operations below take a
/// controller: on it threads are listed in and attached through `cgroup.threads`, and a
/// thread moved out moves its whole process (`cgroup.procs`).
public let unifiedHierarchy = "cgroup2"

/// The cgroup operations a partition needs, on v1 controller hierarchies (`controller` names
/// one) and on the v2 hierarchy (`controller` is `unifiedHierarchy`). Paths are relative to
/// the hierarchy's mount point and always inside the project's subtree.
public protocol CgroupBackend: Sendable {
    /// Whether `controller` has group `path`.
    func groupExists(_ path: String, controller: String) -> Bool
    /// Creates `path` in `controller`'s hierarchy (the parent must exist).
    func createGroup(_ path: String, controller: String) throws(CgroupError)
    /// Writes `value` to the control file `name` of `path`.
    func setValue(_ value: String, name: String, group path: String, controller: String) throws(CgroupError)
    /// Reads the control file `name` of `path`.
    func value(name: String, group path: String, controller: String) -> String?
    /// Moves thread `tid` into `path` of `controller`.
    func attach(thread tid: pid_t, group path: String, controller: String) throws(CgroupError)
    /// Moves thread `tid` out of the project's subtree into `path` of `controller`, a group
    /// outside it ("" is the hierarchy's root): only to put a task back where it belongs. On
    /// v2 this moves the thread's whole process (a thread cannot leave its threaded subtree).
    /// A path with a `..` component is refused (`CgroupError.unsafeGroupPath`).
    func moveOut(thread tid: pid_t, to path: String, controller: String) throws(CgroupError)
    /// The threads in `path` of `controller` (its `tasks` file, on v2 `cgroup.threads`);
    /// empty when there is none.
    func tasks(in path: String, controller: String) -> [pid_t]
    /// Removes the (empty) group `path`.
    func deleteGroup(_ path: String, controller: String) throws(CgroupError)
    /// Child group names of `path`.
    func children(of path: String, controller: String) -> [String]
}

/// The project's subtree name; nothing outside it is ever created, changed or removed.
public let projectSubtree = "rtvirt"

func checkInsideSubtree(_ path: String) throws(CgroupError) {
    guard path == projectSubtree || path.hasPrefix(projectSubtree + "/"), !path.contains("..") else { throw .outsideSubtree(path) }
}

/// Every path a `FileCgroupBackend` was asked to touch, in order: what tests read to prove
/// that nothing outside the subtree is written.
public final class CgroupAccessLog: Sendable {
    /// One file-system operation.
    public struct Entry: Equatable, Sendable, CustomStringConvertible {
        /// What was done: `mkdir`, `write`, `rmdir`, `unlink`, `read`, `list`.
        public var operation: String
        /// The absolute path.
        public var path: String
        /// The value written, for writes.
        public var value: String?
        /// Whether it changes something (everything but reads and listings).
        public var isWrite: Bool { operation != "read" && operation != "list" }
        public var description: String { "\(operation) \(path)" + (value.map { " = \($0)" } ?? "") }
    }
    private let storage = LockedValue<[Entry]>([])

    /// An empty log.
    public init() {}

    /// Everything recorded so far.
    public var entries: [Entry] { storage.withLock { $0 } }

    func record(_ operation: String, _ path: String, _ value: String? = nil) {
        storage.withLock { $0.append(Entry(operation: operation, path: path, value: value)) }
    }
}

/// Plain file operations under each hierarchy's mount point (also what tests point at a
/// temporary directory). The only writes outside the subtree are `moveOut`'s, to the `tasks`
/// file (on v2 `cgroup.procs`) of the group a thread came from (or its process's, or the VMM's), to
/// put it back there.
public struct FileCgroupBackend: CgroupBackend {
    /// Mount point per controller (`unifiedHierarchy` for cgroup v2).
    public var mounts: [String: String]
    /// Where every operation is recorded, if anywhere.
    public var log: CgroupAccessLog?

    /// Hierarchies mounted at the given paths.
    public init(mounts: [String: String], log: CgroupAccessLog? = nil) { self.mounts = mounts; self.log = log }

    /// The v1 mounts of `hierarchy` by controller, and its v2 mount as `unifiedHierarchy`.
    public init(hierarchy: CgroupHierarchy, log: CgroupAccessLog? = nil) {
        var mounts: [String: String] = [:]
        for mount in hierarchy.mounts where mount.version == 1 { for controller in mount.controllers { mounts[controller] = mount.path } }
        if let v2 = hierarchy.v2Mount { mounts[unifiedHierarchy] = v2.path }
        self.init(mounts: mounts, log: log)
    }

    func directory(_ path: String, _ controller: String) throws(CgroupError) -> String {
        guard let mount = mounts[controller] else { throw .missingController(controller) }
        return path.isEmpty ? mount : mount + "/" + path
    }

    /// The file threads are listed in and attached through.
    static func threadsFile(_ controller: String) -> String { controller == unifiedHierarchy ? "cgroup.threads" : "tasks" }

    public func groupExists(_ path: String, controller: String) -> Bool {
        guard let directory = try? directory(path, controller) else { return false }
        return access(directory, F_OK) == 0
    }

    public func createGroup(_ path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        let directory = try directory(path, controller)
        log?.record("mkdir", directory)
        guard mkdir(directory, 0o755) == 0 || errno == EEXIST else { throw .file(operation: "mkdir", path: directory, errno: Errno(rawValue: errno)) }
    }

    public func setValue(_ value: String, name: String, group path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        try write(value, to: try directory(path, controller) + "/" + name)
    }

    /// Writes `value` to `file`; `create`: a missing file is created (what a test directory
    /// needs for control files inside the subtree), else it is an error.
    func write(_ value: String, to file: String, create: Bool = true) throws(CgroupError) {
        log?.record("write", file, value)
        let fd = create ? open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) : open(file, O_WRONLY | O_TRUNC | O_CLOEXEC)
        guard fd >= 0 else { throw .file(operation: "open", path: file, errno: Errno(rawValue: errno)) }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else { throw .file(operation: "write '\(value)' to", path: file, errno: Errno(rawValue: errno)) }
    }

    public func value(name: String, group path: String, controller: String) -> String? {
        guard let directory = try? directory(path, controller) else { return nil }
        log?.record("read", directory + "/" + name)
        return HostFiles().readLine(directory + "/" + name)
    }

    public func attach(thread tid: pid_t, group path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        try write("\(tid)", to: try directory(path, controller) + "/" + Self.threadsFile(controller))
    }

    public func moveOut(thread tid: pid_t, to path: String, controller: String) throws(CgroupError) {
        // The path may come from /proc/<pid>/cgroup, which names groups outside the reader's
        // cgroup namespace with "..": never follow one out of the mount.
        guard !path.split(separator: "/").contains("..") else { throw .unsafeGroupPath(path) }
        // On v2 a thread cannot leave its threaded subtree alone: cgroup.procs moves its process.
        let file = controller == unifiedHierarchy ? "cgroup.procs" : "tasks"
        // Outside the subtree nothing is ever created: the group's own file or an error.
        try write("\(tid)", to: try directory(path, controller) + "/" + file, create: false)
    }

    public func tasks(in path: String, controller: String) -> [pid_t] {
        guard let directory = try? directory(path, controller) else { return [] }
        let file = directory + "/" + Self.threadsFile(controller)
        log?.record("read", file)
        return (HostFiles().read(file) ?? "").split(whereSeparator: \.isNewline).compactMap { pid_t($0) }
    }

    public func deleteGroup(_ path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        let directory = try directory(path, controller)
        log?.record("rmdir", directory)
        // A real cgroup directory is removed with rmdir; a test directory holds plain files first.
        if rmdir(directory) != 0 {
            if errno == ENOTEMPTY || errno == EEXIST {
                for name in HostFiles().list(directory) {
                    log?.record("unlink", directory + "/" + name)
                    unlink(directory + "/" + name)
                }
                guard rmdir(directory) == 0 else { throw .file(operation: "rmdir", path: directory, errno: Errno(rawValue: errno)) }
            } else if errno != ENOENT {
                throw .file(operation: "rmdir", path: directory, errno: Errno(rawValue: errno))
            }
        }
    }

    public func children(of path: String, controller: String) -> [String] {
        guard let directory = try? directory(path, controller) else { return [] }
        log?.record("list", directory)
        return HostFiles().list(directory).filter { name in
            var status = stat()
            return stat(directory + "/" + name, &status) == 0 && (status.st_mode & S_IFMT) == S_IFDIR
        }
    }
}

/// The same operations through libcgroup (`cgroup_create_cgroup`, `cgroup_modify_cgroup`,
/// `cgroup_attach_task_pid`, `cgroup_delete_cgroup`) on the host's v1 hierarchies. Reads,
/// and `moveOut` (whose target is outside the subtree libcgroup calls are confined to), are
/// plain file operations.
///
/// On the v2 hierarchy (`unifiedHierarchy`) every operation is a plain file operation:
/// libcgroup 2.0.2 creating a v2 group with a controller writes `+controller` into the
/// `cgroup.subtree_control` of every ancestor from the mount point down (the root's too,
/// outside RTVirt's subtree); without a controller it returns success and creates nothing
/// (seen on these hybrid hosts); and it attaches through `cgroup.procs` (whole processes)
/// where a partition needs `cgroup.threads`. See Docs/CgroupScheduler.md.
public struct LibcgroupBackend: CgroupBackend {
    let files: FileCgroupBackend

    /// Initializes libcgroup (`cgroup_init`).
    public init(hierarchy: CgroupHierarchy) throws(CgroupError) {
        let result = cgroup_init()
        guard result == 0 else { throw Self.error("cgroup_init", result) }
        files = FileCgroupBackend(hierarchy: hierarchy)
    }

    static func error(_ operation: String, _ code: Int32) -> CgroupError {
        .libcgroup(operation: operation, code: code, message: String(cString: cgroup_strerror(code)))
    }

    /// Runs `body` with a libcgroup `struct cgroup` for `path` with `controller` added.
    private func withGroup(_ path: String, controller: String, value: (name: String, value: String)? = nil,
                           _ body: (OpaquePointer) -> Int32, operation: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        var group: OpaquePointer? = cgroup_new_cgroup(path)
        guard let created = group else { throw Self.error("cgroup_new_cgroup", -1) }
        defer { cgroup_free(&group) }
        guard let handle = cgroup_add_controller(created, controller) else { throw .missingController(controller) }
        if let value {
            let result = cgroup_add_value_string(handle, value.name, value.value)
            guard result == 0 else { throw Self.error("cgroup_add_value_string(\(value.name))", result) }
        }
        let result = body(created)
        guard result == 0 else { throw Self.error("\(operation) \(controller):/\(path)", result) }
    }

    public func groupExists(_ path: String, controller: String) -> Bool { files.groupExists(path, controller: controller) }

    public func createGroup(_ path: String, controller: String) throws(CgroupError) {
        if controller == unifiedHierarchy { return try files.createGroup(path, controller: controller) }
        guard !groupExists(path, controller: controller) else { return }
        try withGroup(path, controller: controller, { cgroup_create_cgroup($0, 0) }, operation: "cgroup_create_cgroup")
    }

    public func setValue(_ value: String, name: String, group path: String, controller: String) throws(CgroupError) {
        if controller == unifiedHierarchy { return try files.setValue(value, name: name, group: path, controller: controller) }
        try withGroup(path, controller: controller, value: (name, value), { cgroup_modify_cgroup($0) }, operation: "cgroup_modify_cgroup")
    }

    public func value(name: String, group path: String, controller: String) -> String? {
        files.value(name: name, group: path, controller: controller)
    }

    public func attach(thread tid: pid_t, group path: String, controller: String) throws(CgroupError) {
        if controller == unifiedHierarchy { return try files.attach(thread: tid, group: path, controller: controller) }
        try withGroup(path, controller: controller, { cgroup_attach_task_pid($0, tid) }, operation: "cgroup_attach_task_pid")
    }

    public func moveOut(thread tid: pid_t, to path: String, controller: String) throws(CgroupError) {
        try files.moveOut(thread: tid, to: path, controller: controller)
    }

    public func tasks(in path: String, controller: String) -> [pid_t] { files.tasks(in: path, controller: controller) }

    public func deleteGroup(_ path: String, controller: String) throws(CgroupError) {
        if controller == unifiedHierarchy { return try files.deleteGroup(path, controller: controller) }
        guard groupExists(path, controller: controller) else { return }
        try withGroup(path, controller: controller, { cgroup_delete_cgroup($0, 1) }, operation: "cgroup_delete_cgroup")
    }

    public func children(of path: String, controller: String) -> [String] { files.children(of: path, controller: controller) }
}
