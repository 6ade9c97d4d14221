import RTVirtCore

/// How the cgroup filesystems are mounted.
public enum CgroupLayout: String, Codable, Sendable {
    /// Only cgroup v1 controller hierarchies.
    case v1
    /// Only the unified cgroup v2 hierarchy.
    case v2
    /// v1 controllers plus a v2 hierarchy (often with no controllers enabled in it).
    case hybrid
    /// No cgroup filesystem mounted.
    case none
}

/// One mounted cgroup hierarchy.
public struct CgroupMount: Codable, Equatable, Sendable {
    /// Where it is mounted.
    public var path: String
    /// 1 or 2.
    public var version: Int
    /// Controllers: for v1 the mount options naming controllers; for v2 `cgroup.controllers`.
    public var controllers: [String]

    /// A mount.
    public init(path: String, version: Int, controllers: [String]) {
        self.path = path; self.version = version; self.controllers = controllers
    }
}

/// The host's cgroup hierarchies, read from `/proc/self/mountinfo`.
public struct CgroupHierarchy: Codable, Equatable, Sendable {
    /// v1, v2, hybrid or none.
    public var layout: CgroupLayout
    /// Every cgroup mount.
    public var mounts: [CgroupMount]
    /// Whether real-time group scheduling is available: the v1 `cpu` controller has
    /// `cpu.rt_runtime_us` (v2 has no RT budget).
    public var rtGroupScheduling: Bool
    /// The controllers the v2 root enables for its children (its `cgroup.subtree_control`):
    /// RTVirt's v2 partitions need `cpuset` there, and never write it themselves.
    public var v2DelegatedControllers: [String]

    /// A hierarchy description.
    public init(layout: CgroupLayout, mounts: [CgroupMount], rtGroupScheduling: Bool, v2DelegatedControllers: [String] = []) {
        self.layout = layout; self.mounts = mounts; self.rtGroupScheduling = rtGroupScheduling
        self.v2DelegatedControllers = v2DelegatedControllers
    }

    /// Whether partitions are built on the v2 hierarchy: no v1 `cpuset` and `cpu` with RT group
    /// scheduling, and a v2 mount. A hybrid host with v1 controllers takes the v1 path.
    public var usesV2Partitions: Bool { v2Mount != nil && v1Mount(for: "cpuset") == nil }

    /// The v1 mount that carries `controller`, if any.
    public func v1Mount(for controller: String) -> CgroupMount? {
        mounts.first { $0.version == 1 && $0.controllers.contains(controller) }
    }

    /// The v2 mount, if any.
    public var v2Mount: CgroupMount? { mounts.first { $0.version == 2 } }

    /// The v1 controller names that can appear as mount options.
    static let v1Controllers: Set<String> = [
        "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio", "perf_event",
        "net_prio", "hugetlb", "pids", "rdma", "misc",
    ]

    /// Detects the hierarchies through `files`.
    public static func detect(files: HostFiles = HostFiles()) -> CgroupHierarchy {
        var mounts: [CgroupMount] = []
        for line in (files.read("/proc/self/mountinfo") ?? "").split(separator: "\n") {
            // mountinfo: id parent major:minor root mountpoint options [optional...] - fstype source superoptions
            let fields = line.split(separator: " ")
            guard let separator = fields.firstIndex(of: "-"), separator + 3 < fields.count, fields.count > 4 else { continue }
            let fileSystem = fields[separator + 1]
            let mountPoint = unescapeMountPath(String(fields[4]))
            if fileSystem == "cgroup" {
                let options = fields[separator + 3].split(separator: ",").map(String.init)
                mounts.append(CgroupMount(path: mountPoint, version: 1,
                                          controllers: options.filter(v1Controllers.contains)))
            } else if fileSystem == "cgroup2" {
                let controllers = files.readLine(mountPoint + "/cgroup.controllers")?.split(separator: " ").map(String.init) ?? []
                mounts.append(CgroupMount(path: mountPoint, version: 2, controllers: controllers))
            }
        }
        let hasV1 = mounts.contains { $0.version == 1 }, hasV2 = mounts.contains { $0.version == 2 }
        let layout: CgroupLayout = hasV1 && hasV2 ? .hybrid : hasV1 ? .v1 : hasV2 ? .v2 : .none
        let delegated = mounts.first { $0.version == 2 }.flatMap { files.readLine($0.path + "/cgroup.subtree_control") }?
            .split(separator: " ").map(String.init) ?? []
        var hierarchy = CgroupHierarchy(layout: layout, mounts: mounts, rtGroupScheduling: false, v2DelegatedControllers: delegated)
        if let cpu = hierarchy.v1Mount(for: "cpu") {
            hierarchy.rtGroupScheduling = files.exists(cpu.path + "/cpu.rt_runtime_us")
        }
        return hierarchy
    }

    /// Undoes mountinfo's octal escapes (`\040` for a space).
    static func unescapeMountPath(_ path: String) -> String {
        guard path.contains("\\") else { return path }
        var bytes: [UInt8] = []
        let source = Array(path.utf8)
        var index = 0
        while index < source.count {
            if source[index] == UInt8(ascii: "\\"), index + 3 < source.count,
               let value = UInt8(String(decoding: source[(index + 1)...(index + 3)], as: UTF8.self), radix: 8) {
                bytes.append(value)
                index += 4
            } else {
                bytes.append(source[index])
                index += 1
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
