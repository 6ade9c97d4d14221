import CgroupScheduler
@testable import rtvirt
import XCTest

/// `rtvirt check` lists the budget modes this host supports, why the others are absent, and
/// whether the real-time CPU has a root domain of its own (and, where not, what an
/// administrator would set).
final class CheckBudgetModeTests: XCTestCase {
    func testCheckListsBudgetModesAndTheRootDomain() throws {
        let report = HostCheckReport.inspect()
        XCTAssertEqual(report.budgetModes.map(\.mode), [.rtGroup, .deadline])
        let text = CheckCommand.text(of: report)
        XCTAssertTrue(text.contains("Budget modes"), text)
        for mode in report.budgetModes {
            XCTAssertTrue(text.contains(mode.reason), "every mode says why: \(mode)")
        }
        XCTAssertTrue(text.contains("root domain of CPU \(report.deadlineRootDomain.realtimeCPUs)"), text)
        if !report.deadlineRootDomain.present {
            XCTAssertTrue(text.contains("cpuset.sched_load_balance"), "what an administrator would set: \(text)")
        }
        if report.cgroups.rtGroupScheduling && report.cgroups.v1Mount(for: "cpuset") != nil {
            XCTAssertEqual(report.automaticBudgetMode, "rtGroup", "this hybrid host's automatic choice")
        }
    }
}
