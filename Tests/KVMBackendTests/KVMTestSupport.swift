import KVMBackend
import RTVirtCore
import RTVirtTesting
import XCTest
import RTVirtXCTestSupport

