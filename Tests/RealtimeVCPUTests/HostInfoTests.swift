import Foundation
import RTVirtCore
import XCTest
import RealtimeVCPU

final class HostInfoTests: XCTestCase {
    private func fakeRoot(_ files: [String: String]) throws -> (HostFiles, () -> Void) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("rtvirt-host-\(UUID().uuidString)").path
        for (relative, text) in files {
            let url = URL(fileURLWithPath: path + relative)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try text.write(to: url, atomically: true, encoding: .utf8)
        }
        return (HostFiles(root: path), { try? FileManager.default.removeItem(atPath: path) })
    }

    func testPreemptionModel() throws {
        let (dynamic, cleanup1) = try fakeRoot([
            "/proc/sys/kernel/version": "#1 SMP PREEMPT_DYNAMIC @0\n",
            "/sys/kernel/debug/sched/preempt": "none (voluntary) full\n",
        ])
        defer { cleanup1() }
        XCTAssertEqual(RealtimeHostInfo.preemptionModel(files: dynamic), "PREEMPT_DYNAMIC (mode: voluntary)")
        let (cmdline, cleanup2) = try fakeRoot([
            "/proc/sys/kernel/version": "#1 SMP PREEMPT_DYNAMIC\n", "/proc/cmdline": "quiet preempt=none ro\n",
        ])
        defer { cleanup2() }
        XCTAssertEqual(RealtimeHostInfo.preemptionModel(files: cmdline), "PREEMPT_DYNAMIC (mode: none)")
        let (rt, cleanup3) = try fakeRoot(["/proc/sys/kernel/version": "#1 SMP PREEMPT_RT Tue\n"])
        defer { cleanup3() }
        XCTAssertEqual(RealtimeHostInfo.preemptionModel(files: rt), "PREEMPT_RT")
    }

    func testCPUFlagsAndFiles() throws {
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu tsc constant_tsc hypervisor\n\nprocessor\t: 1\nflags\t\t: fpu\n"
        XCTAssertEqual(RealtimeHostInfo.cpuFlags(cpuinfo: cpuinfo), ["fpu", "tsc", "constant_tsc", "hypervisor"])
        let (files, cleanup) = try fakeRoot(["/a/b": " 42 \nmore\n", "/a/c": "x"])
        defer { cleanup() }
        XCTAssertEqual(files.readInteger("/a/b"), 42)
        XCTAssertNil(files.readInteger("/a/c"))
        XCTAssertEqual(files.list("/a"), ["b", "c"])
        XCTAssertTrue(files.exists("/a/b"))
        XCTAssertNil(files.read("/a/missing"))
    }

    func testThisHostIsInspected() {
        let info = RealtimeHostInfo.inspect()
        XCTAssertGreaterThan(info.onlineCPUCount, 0)
        XCTAssertFalse(info.preemption.isEmpty)
        if geteuid() == 0 { XCTAssertTrue(info.fifoPermitted, info.fifoError ?? "") }
    }
}
