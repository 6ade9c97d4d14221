import CLinuxSupport
import RTVirtCore
import XCTest

final class GuestTSCMappingTests: XCTestCase {
    /// 1 GHz: one tick is one nanosecond.
    private let anchor = HostClockSample(hostTSC: 1_000_000, monotonicNanoseconds: 5_000_000)

    func testExactMappingConvertsBothWays() {
        let mapping = GuestTSCMapping(frequencyHz: 1_000_000_000, guestOffset: -400_000)
        XCTAssertEqual(mapping.guestTSC(at: anchor), 600_000)
        XCTAssertEqual(mapping.monotonicNanoseconds(forGuestTSC: 600_000, anchor: anchor), 5_000_000)
        XCTAssertEqual(mapping.monotonicNanoseconds(forGuestTSC: 700_000, anchor: anchor), 5_100_000)
        XCTAssertEqual(mapping.monotonicNanoseconds(forGuestTSC: 500_000, anchor: anchor), 4_900_000)
        XCTAssertEqual(mapping.offsetErrorBoundNanoseconds, 0)
    }

    /// An offset known only within ±bound: a deadline is converted to the latest host time it
    /// may correspond to, so that a timer never fires before the guest's TSC reaches it.
    func testDeadlinesAreConvertedLateByTheOffsetBound() {
        let bound: UInt64 = 2_500
        for error in [-2_500, -1_000, 0, 1_000, 2_500] as [Int64] {
            let trueOffset: Int64 = -400_000
            let mapping = GuestTSCMapping(frequencyHz: 1_000_000_000, guestOffset: trueOffset + error, offsetErrorBound: bound)
            let deadline: UInt64 = 700_000
            let host = mapping.monotonicNanoseconds(forGuestTSC: deadline, anchor: anchor)
            // When the host reaches `host`, the guest TSC truly reads:
            let guestThen = Int64(anchor.hostTSC) + Int64(host) - Int64(anchor.monotonicNanoseconds) + trueOffset
            XCTAssertGreaterThanOrEqual(guestThen, Int64(deadline), "offset error \(error) within the bound made the deadline early")
            XCTAssertLessThanOrEqual(guestThen - Int64(deadline), 2 * Int64(bound), "no later than twice the bound")
        }
        XCTAssertEqual(GuestTSCMapping(frequencyHz: 2_000_000_000, guestOffset: 0, offsetErrorBound: 5_000).offsetErrorBoundNanoseconds, 2_500)
    }

    /// A zero frequency (a mapping filled in wrongly) converts without trapping: 0 / 0 would be
    /// a NaN, which `UInt64(_:)` traps on.
    func testZeroFrequencyNeverTraps() {
        let mapping = GuestTSCMapping(frequencyHz: 0, guestOffset: 0)
        XCTAssertEqual(mapping.monotonicNanoseconds(forGuestTSC: anchor.hostTSC, anchor: anchor), anchor.monotonicNanoseconds)
        XCTAssertEqual(mapping.monotonicNanoseconds(forGuestTSC: anchor.hostTSC + 1, anchor: anchor), anchor.monotonicNanoseconds + 1_000_000_000)
    }

    func testHostClockSampleBracketsItsTSC() {
        for _ in 0..<1_000 {
            let before = rtv_rdtsc()
            let sample = HostClockSample.now()
            let after = rtv_rdtsc()
            XCTAssertLessThanOrEqual(before, sample.hostTSC)
            XCTAssertLessThanOrEqual(sample.hostTSC, after)
        }
    }
}
