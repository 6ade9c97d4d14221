import CgroupScheduler
import Foundation
import RTVirtCore
import XCTest
import RTVirtXCTestSupport

/// A temporary directory standing for cgroup mount points, removed at deinit, with a lock
/// file of its own so that fixture tests never wait for real partitions.
final class CgroupFixture {
    let root: String
    let log = CgroupAccessLog()
    var lock: PartitionLock { PartitionLock(path: root + "/run/partition.lock") }

    init() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-cg-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    func write(_ relative: String, _ text: String) throws {
        let url = URL(fileURLWithPath: root + "/" + relative)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try text.write(to: url, atomically: true, encoding: .utf8)
    }

    func read(_ relative: String) -> String? { try? String(contentsOfFile: root + "/" + relative, encoding: .utf8) }

    func exists(_ relative: String) -> Bool { FileManager.default.fileExists(atPath: root + "/" + relative) }

    /// v1 `cpu` and `cpuset` mounts (with `cpu.rt_runtime_us` at the root when `rtGroup`), each
    /// root with its `tasks` file.
    func v1(rtGroup: Bool = true) throws -> (CgroupHierarchy, FileCgroupBackend) {
        for controller in ["cpu", "cpuset"] {
            try FileManager.default.createDirectory(atPath: "\(root)/\(controller)", withIntermediateDirectories: true)
            try write("\(controller)/tasks", "") // every real group has its tasks file; a move out never creates one
        }
        if rtGroup { try write("cpu/cpu.rt_runtime_us", "950000\n") }
        let backend = FileCgroupBackend(mounts: ["cpu": "\(root)/cpu", "cpuset": "\(root)/cpuset"], log: log)
        let hierarchy = CgroupHierarchy(layout: .v1, mounts: [CgroupMount(path: "\(root)/cpu", version: 1, controllers: ["cpu"]),
                                                              CgroupMount(path: "\(root)/cpuset", version: 1, controllers: ["cpuset"])],
                                        rtGroupScheduling: rtGroup)
        return (hierarchy, backend)
    }

    /// A v2-only host: the unified hierarchy at `unified/` offering `controllers` and
    /// delegating `delegated` to its children.
    func v2(controllers: [String] = ["cpuset", "cpu", "io", "memory", "pids"], delegated: [String] = ["cpuset", "cpu", "memory", "pids"])
        throws -> CgroupHierarchy {
        try write("unified/cgroup.controllers", controllers.joined(separator: " ") + "\n")
        try write("unified/cgroup.subtree_control", delegated.joined(separator: " ") + "\n")
        try write("unified/cpuset.cpus.effective", "0-3\n")
        try write("unified/cgroup.procs", "")
        return CgroupHierarchy(layout: .v2, mounts: [CgroupMount(path: "\(root)/unified", version: 2, controllers: controllers)],
                               rtGroupScheduling: false, v2DelegatedControllers: delegated)
    }

    /// Every write (and mkdir, rmdir, unlink) the backend was asked for, as paths relative to
    /// the fixture root.
    var writes: [CgroupAccessLog.Entry] {
        log.entries.filter(\.isWrite).map { entry in
            var relative = entry
            relative.path = String(entry.path.dropFirst(root.count + 1))
            return relative
        }
    }

    /// Fails unless every write is inside some mount's `rtvirt/` subtree, or is one of the
    /// thread moves back out (`tasks` on v1, `cgroup.procs` on v2) that put a task back where
    /// it came from: no control file outside the subtree is ever written.
    func assertOnlySubtreeWritten(mounts: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(writes.isEmpty, "the test wrote something", file: file, line: line)
        for entry in writes {
            let inside = mounts.contains { entry.path.hasPrefix("\($0)/rtvirt/") || entry.path == "\($0)/rtvirt" }
            let taskMove = entry.operation == "write" && (entry.path.hasSuffix("/tasks") || entry.path.hasSuffix("/cgroup.procs"))
            XCTAssertTrue(inside || taskMove, "written outside the rtvirt subtree: \(entry)", file: file, line: line)
        }
        for entry in writes where !mounts.contains(where: { entry.path.hasPrefix("\($0)/rtvirt") }) {
            // A task move back: a thread id, nothing else.
            XCTAssertNotNil(entry.value.flatMap { pid_t($0) }, "only thread ids go outside: \(entry)", file: file, line: line)
        }
    }
}

/// A deadline admission probe that answers from a script: per affinity, in order. It records
/// what it was asked, and places a made-up thread (which then "exits") when given `place`.
final class ScriptedProbe: DeadlineAdmissionProbe, @unchecked Sendable {
    // @unchecked: `answers` and `asked` are only touched under `lock`.
    private let lock = NSLock()
    private var answers: [CPUSet: [DeadlineProbeOutcome]]
    private(set) var asked: [(cpus: CPUSet, placed: Bool)] = []
    /// Called with the made-up thread after it was placed (a simulated kernel lets it exit).
    var afterPlace: ((pid_t) -> Void)?
    static let probeThread: pid_t = 999_999

    init(_ answers: [CPUSet: [DeadlineProbeOutcome]]) { self.answers = answers }

    func probe(_ parameters: DeadlineParameters, cpus: CPUSet, place: (@Sendable (pid_t) throws -> Void)?) -> DeadlineProbeOutcome {
        lock.lock()
        defer { lock.unlock() }
        asked.append((cpus, place != nil))
        if let place {
            do { try place(Self.probeThread) } catch { return .refused(.unavailable("\(error)")) }
            afterPlace?(Self.probeThread)
        }
        guard var queue = answers[cpus], !queue.isEmpty else { return .refused(.unavailable("no scripted answer for \(cpus)")) }
        let answer = queue.removeFirst()
        answers[cpus] = queue.isEmpty ? [answer] : queue
        return answer
    }
}

/// A v2 kernel in a fixture: plain files (through a logging `FileCgroupBackend`), plus what
/// the kernel does that files do not: a new group gets its control files, threads belong to
/// one group at a time (a thread that exits leaves), and `cpuset.cpus.partition` reads back
/// what the script says the kernel made of a write.
final class SimulatedV2Kernel: CgroupBackend, @unchecked Sendable {
    // @unchecked: `membership` and `partitionAnswers` are only touched under `lock`.
    let files: FileCgroupBackend
    private let lock = NSLock()
    private var membership: [pid_t: String] = [:]
    /// What `cpuset.cpus.partition` reads after a write of the key ("isolated" → "isolated").
    var partitionAnswers: [String: String] = [:]
    var writesRefused: Set<String> = []

    init(fixture: CgroupFixture) {
        files = FileCgroupBackend(mounts: [unifiedHierarchy: fixture.root + "/unified"], log: fixture.log)
    }

    func groupExists(_ path: String, controller: String) -> Bool { files.groupExists(path, controller: controller) }

    func createGroup(_ path: String, controller: String) throws(CgroupError) {
        try files.createGroup(path, controller: controller)
        let directory = path.isEmpty ? files.mounts[controller]! : files.mounts[controller]! + "/" + path // created just now
        for (name, value) in [("cgroup.type", "domain"), ("cgroup.subtree_control", ""), ("cgroup.procs", ""), ("cgroup.threads", ""),
                              ("cpuset.cpus", ""), ("cpuset.mems", ""), ("cpuset.cpus.exclusive", ""), ("cpuset.cpus.partition", "member")] {
            _ = FileManager.default.createFile(atPath: directory + "/" + name, contents: Data(value.utf8))
        }
    }

    func setValue(_ value: String, name: String, group path: String, controller: String) throws(CgroupError) {
        if writesRefused.contains("\(name)=\(value)") { throw .file(operation: "write '\(value)' to", path: path + "/" + name, errno: .invalidArgument) }
        try files.setValue(value, name: name, group: path, controller: controller)
        if name == "cpuset.cpus.partition" {
            let reported = lock.withLock { partitionAnswers[value] } ?? value
            let directory = path.isEmpty ? files.mounts[controller]! : files.mounts[controller]! + "/" + path // written just now
            try? reported.write(toFile: directory + "/" + name, atomically: false, encoding: .utf8)
        }
        if name == "cgroup.procs", let pid = pid_t(value) { lock.withLock { membership[pid] = path } }
    }

    func value(name: String, group path: String, controller: String) -> String? { files.value(name: name, group: path, controller: controller) }

    func attach(thread tid: pid_t, group path: String, controller: String) throws(CgroupError) {
        try files.attach(thread: tid, group: path, controller: controller)
        lock.withLock { membership[tid] = path }
    }

    func moveOut(thread tid: pid_t, to path: String, controller: String) throws(CgroupError) {
        try files.moveOut(thread: tid, to: path, controller: controller)
        lock.withLock { membership[tid] = path }
    }

    func tasks(in path: String, controller: String) -> [pid_t] {
        lock.withLock { membership.filter { $0.value == path }.map(\.key).sorted() }
    }

    func deleteGroup(_ path: String, controller: String) throws(CgroupError) { try files.deleteGroup(path, controller: controller) }

    func children(of path: String, controller: String) -> [String] { files.children(of: path, controller: controller) }

    /// A thread that ended leaves its group.
    func exit(_ tid: pid_t) { lock.withLock { _ = membership.removeValue(forKey: tid) } }

    /// Where `tid` is.
    func group(of tid: pid_t) -> String? { lock.withLock { membership[tid] } }
}
