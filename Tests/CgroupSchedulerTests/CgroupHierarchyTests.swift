import CgroupScheduler
import Foundation
import RTVirtCore
import XCTest

/// A fake `/` in a temporary directory, removed at deinit.
final class FakeRoot {
    let path: String
    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-fake-root-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func write(_ relativePath: String, _ text: String) throws {
        let url = URL(fileURLWithPath: path + relativePath)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try text.write(to: url, atomically: true, encoding: .utf8)
    }
    var files: HostFiles { HostFiles(root: path) }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

final class CgroupHierarchyTests: XCTestCase {
    private let hybridMountInfo = """
        31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
        34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
        40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
        """

    func testHybridLayoutWithRTGroupScheduling() throws {
        let root = try FakeRoot()
        try root.write("/proc/self/mountinfo", hybridMountInfo)
        try root.write("/sys/fs/cgroup/cpu/cpu.rt_runtime_us", "950000\n")
        let hierarchy = CgroupHierarchy.detect(files: root.files)
        XCTAssertEqual(hierarchy.layout, .hybrid)
        XCTAssertTrue(hierarchy.rtGroupScheduling)
        XCTAssertEqual(hierarchy.v1Mount(for: "cpuset")?.path, "/sys/fs/cgroup/cpuset")
        XCTAssertEqual(hierarchy.v1Mount(for: "systemd"), nil, "named hierarchies are not controllers")
        XCTAssertEqual(hierarchy.v2Mount?.path, "/sys/fs/cgroup/unified")
        XCTAssertEqual(hierarchy.v2Mount?.controllers, [])
    }

    func testV1WithoutRTGroupScheduling() throws {
        let root = try FakeRoot()
        try root.write("/proc/self/mountinfo", "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")
        let hierarchy = CgroupHierarchy.detect(files: root.files)
        XCTAssertEqual(hierarchy.layout, .v1)
        XCTAssertEqual(hierarchy.v1Mount(for: "cpuacct")?.controllers, ["cpu", "cpuacct"])
        XCTAssertFalse(hierarchy.rtGroupScheduling)
    }

    func testPureV2ReadsItsControllersAndEscapedPaths() throws {
        let root = try FakeRoot()
        try root.write("/proc/self/mountinfo", "29 23 0:26 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
        try root.write("/sys/fs/my cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
        let hierarchy = CgroupHierarchy.detect(files: root.files)
        XCTAssertEqual(hierarchy.layout, .v2)
        XCTAssertEqual(hierarchy.v2Mount?.path, "/sys/fs/my cgroup")
        XCTAssertEqual(hierarchy.v2Mount?.controllers, ["cpuset", "cpu", "io", "memory", "pids"])
        XCTAssertFalse(hierarchy.rtGroupScheduling)
    }

    func testNoCgroupsAndGarbage() throws {
        let root = try FakeRoot()
        try root.write("/proc/self/mountinfo", "garbage\n- -\n1 2 3\n")
        XCTAssertEqual(CgroupHierarchy.detect(files: root.files).layout, .none)
        XCTAssertEqual(CgroupHierarchy.detect(files: HostFiles(root: "/nonexistent")).layout, .none)
    }

    func testThisHostIsDetected() {
        // Every Linux host running these tests mounts some cgroup hierarchy.
        XCTAssertNotEqual(CgroupHierarchy.detect().layout, .none)
        let numa = NUMATopology.current()
        if numa.available {
            XCTAssertGreaterThanOrEqual(numa.nodeCount, 1)
            XCTAssertEqual(numa.cpusByNode.count, numa.nodeCount)
        }
    }
}
