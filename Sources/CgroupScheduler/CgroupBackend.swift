import CLibcgroup
import RTVirtCore
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Why a cgroup operation failed.
public enum CgroupError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The hierarchy lacks a controller the partition needs.
    case missingController(String)
    /// cgroup v2 only: no RT budget there; the plan must pick a substitute.
    case noRTGroupScheduling
    /// A libcgroup call failed.
    case libcgroup(operation: String, code: Int32, message: String)
    /// A file operation failed.
    case file(operation: String, path: String, errno: Errno)
    /// A path outside the project's subtree was about to be touched (never done).
    case outsideSubtree(String)
    /// Tasks could not be moved out of `group`, so it was not removed; no RT runtime was
    /// given back (the budgets are as they were: removing again may succeed).
    case partitionBusy(group: String, tasks: [pid_t])

    public var description: String {
        switch self {
        case .missingController(let name): return "the cgroup hierarchy has no '\(name)' controller"
        case .noRTGroupScheduling: return "this cgroup hierarchy has no cpu.rt_runtime_us (cgroup v2, or a kernel without RT group scheduling)"
        case let .libcgroup(operation, code, message): return "libcgroup \(operation) failed (\(code)): \(message)"
        case let .file(operation, path, errno): return "\(operation) \(path): \(errno)"
        case .outsideSubtree(let path): return "refusing to touch \(path): outside the rtvirt subtree"
        case let .partitionBusy(group, tasks):
            return "tasks \(tasks.map(String.init).joined(separator: ", ")) could not be moved out of \(group); it was left in place with its RT runtime"
        }
    }
}

/// The cgroup operations a partition needs, on v1 controller hierarchies. Paths are relative
/// to each controller's mount point and always inside the project's subtree.
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
    /// outside it ("" is the hierarchy's root): only to put a task back where it belongs.
    func moveOut(thread tid: pid_t, to path: String, controller: String) throws(CgroupError)
    /// The threads in `path` of `controller` (its `tasks` file); empty when there is none.
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

/// Plain file operations under each controller's mount point (also what tests point at a
/// temporary directory). The only writes outside the subtree are `moveOut`'s, to the `tasks`
/// file of the group a thread came from (or its process's group), to put it back there.
public struct FileCgroupBackend: CgroupBackend {
    /// Mount point per controller.
    public var mounts: [String: String]

    /// Controllers mounted at the given paths.
    public init(mounts: [String: String]) { self.mounts = mounts }

    /// The v1 mounts of `hierarchy` by controller.
    public init(hierarchy: CgroupHierarchy) {
        var mounts: [String: String] = [:]
        for mount in hierarchy.mounts where mount.version == 1 { for controller in mount.controllers { mounts[controller] = mount.path } }
        self.init(mounts: mounts)
    }

    func directory(_ path: String, _ controller: String) throws(CgroupError) -> String {
        guard let mount = mounts[controller] else { throw .missingController(controller) }
        return path.isEmpty ? mount : mount + "/" + path
    }

    public func groupExists(_ path: String, controller: String) -> Bool {
        guard let directory = try? directory(path, controller) else { return false }
        return access(directory, F_OK) == 0
    }

    public func createGroup(_ path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        let directory = try directory(path, controller)
        guard mkdir(directory, 0o755) == 0 || errno == EEXIST else { throw .file(operation: "mkdir", path: directory, errno: Errno(rawValue: errno)) }
    }

    public func setValue(_ value: String, name: String, group path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        try write(value, to: try directory(path, controller) + "/" + name)
    }

    func write(_ value: String, to file: String) throws(CgroupError) {
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .file(operation: "open", path: file, errno: Errno(rawValue: errno)) }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else { throw .file(operation: "write '\(value)' to", path: file, errno: Errno(rawValue: errno)) }
    }

    public func value(name: String, group path: String, controller: String) -> String? {
        guard let directory = try? directory(path, controller) else { return nil }
        return HostFiles().readLine(directory + "/" + name)
    }

    public func attach(thread tid: pid_t, group path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        try write("\(tid)", to: try directory(path, controller) + "/tasks")
    }

    public func moveOut(thread tid: pid_t, to path: String, controller: String) throws(CgroupError) {
        try write("\(tid)", to: try directory(path, controller) + "/tasks")
    }

    public func tasks(in path: String, controller: String) -> [pid_t] {
        guard let directory = try? directory(path, controller) else { return [] }
        return (HostFiles().read(directory + "/tasks") ?? "").split(whereSeparator: \.isNewline).compactMap { pid_t($0) }
    }

    public func deleteGroup(_ path: String, controller: String) throws(CgroupError) {
        try checkInsideSubtree(path)
        let directory = try directory(path, controller)
        // A real cgroup directory is removed with rmdir; a test directory holds plain files first.
        if rmdir(directory) != 0 {
            if errno == ENOTEMPTY || errno == EEXIST {
                for name in HostFiles().list(directory) { unlink(directory + "/" + name) }
                guard rmdir(directory) == 0 else { throw .file(operation: "rmdir", path: directory, errno: Errno(rawValue: errno)) }
            } else if errno != ENOENT {
                throw .file(operation: "rmdir", path: directory, errno: Errno(rawValue: errno))
            }
        }
    }

    public func children(of path: String, controller: String) -> [String] {
        guard let directory = try? directory(path, controller) else { return [] }
        return HostFiles().list(directory).filter { name in
            var status = stat()
            return stat(directory + "/" + name, &status) == 0 && (status.st_mode & S_IFMT) == S_IFDIR
        }
    }
}

/// The same operations through libcgroup (`cgroup_create_cgroup`, `cgroup_modify_cgroup`,
/// `cgroup_attach_task_pid`, `cgroup_delete_cgroup`), on the host's real hierarchies. Reads,
/// and `moveOut` (whose target is outside the subtree libcgroup calls are confined to), are
/// plain file operations.
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
        guard !groupExists(path, controller: controller) else { return }
        try withGroup(path, controller: controller, { cgroup_create_cgroup($0, 0) }, operation: "cgroup_create_cgroup")
    }

    public func setValue(_ value: String, name: String, group path: String, controller: String) throws(CgroupError) {
        try withGroup(path, controller: controller, value: (name, value), { cgroup_modify_cgroup($0) }, operation: "cgroup_modify_cgroup")
    }

    public func value(name: String, group path: String, controller: String) -> String? {
        files.value(name: name, group: path, controller: controller)
    }

    public func attach(thread tid: pid_t, group path: String, controller: String) throws(CgroupError) {
        try withGroup(path, controller: controller, { cgroup_attach_task_pid($0, tid) }, operation: "cgroup_attach_task_pid")
    }

    public func moveOut(thread tid: pid_t, to path: String, controller: String) throws(CgroupError) {
        try files.moveOut(thread: tid, to: path, controller: controller)
    }

    public func tasks(in path: String, controller: String) -> [pid_t] { files.tasks(in: path, controller: controller) }

    public func deleteGroup(_ path: String, controller: String) throws(CgroupError) {
        guard groupExists(path, controller: controller) else { return }
        try withGroup(path, controller: controller, { cgroup_delete_cgroup($0, 1) }, operation: "cgroup_delete_cgroup")
    }

    public func children(of path: String, controller: String) -> [String] { files.children(of: path, controller: controller) }
}
