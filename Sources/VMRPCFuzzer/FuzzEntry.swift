// The libFuzzer target over the VMRPC server. Build and run (see Docs/Fuzzing.md):
//   swift build --sanitize=fuzzer -Xswiftc -DFUZZING --product VMRPCFuzzer --scratch-path .build-fuzz
//   .build-fuzz/debug/VMRPCFuzzer -max_total_time=60 Tests/VMRPCTests/FuzzCorpus
// Without FUZZING it is a replayer: `swift run VMRPCFuzzer FILE...` runs each file once.
import VMRPCFuzzHarness

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data else { return 0 }
    VMRPCFuzzHarness.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

#if !FUZZING
import Foundation

@main
struct VMRPCFuzzReplayer {
    static func main() {
        let paths = CommandLine.arguments.dropFirst()
        if paths.isEmpty {
            print("usage: VMRPCFuzzer FILE... (built with -DFUZZING and --sanitize=fuzzer it is a libFuzzer target)")
            exit(2)
        }
        for path in paths {
            guard let data = FileManager.default.contents(atPath: path) else {
                print("cannot read \(path)")
                exit(1)
            }
            print("\(path): \(VMRPCFuzzHarness.run(Array(data)))")
        }
    }
}
#endif
