import RTVirtCore
import XCTest

final class CPUSetTests: XCTestCase {
    func testParsesAndPrintsTheKernelListFormat() {
        XCTAssertEqual(CPUSet(listFormat: "0-3,6,8-9\n")?.cpus, [0, 1, 2, 3, 6, 8, 9])
        XCTAssertEqual(CPUSet(listFormat: "0-3,6,8-9")?.description, "0-3,6,8-9")
        XCTAssertEqual(CPUSet(listFormat: "")?.isEmpty, true)
        XCTAssertEqual(CPUSet([5, 1, 1, 2]).description, "1-2,5")
        for bad in ["a", "3-1", "1,,2", "-1", "1-2-3", "0-999999"] { XCTAssertNil(CPUSet(listFormat: bad), bad) }
    }

    func testSetOperations() {
        let set: CPUSet = [0, 1, 2]
        XCTAssertTrue(set.contains(1))
        XCTAssertEqual(set.intersection([1, 2, 3]), [1, 2])
    }
}
