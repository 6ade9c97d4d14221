// The libFuzzer target over the net.* socket procedures (an in-memory backend: no real socket).
// Build and run (see Docs/Fuzzing.md):
//   swift build --sanitize=fuzzer -Xswiftc -DFUZZING --product VMRPCSocketsFuzzer --scratch-path .build-fuzz
//   .build-fuzz/debug/VMRPCSocketsFuzzer -max_total_time=60 CORPUS_DIR
// Without FUZZING it is a replayer: `swift run VMRPCSocketsFuzzer FILE...` runs each file once.
import VMRPCFuzzHarness

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data else { return 0 }
    SocketsFuzzHarness.run(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}

#if !FUZZING
import Foundation

@main
struct SocketsFuzzReplayer {
    static func main() {
        let paths = CommandLine.arguments.dropFirst()
        if paths.isEmpty {
            print("usage: VMRPCSocketsFuzzer FILE... (built with -DFUZZING and --sanitize=fuzzer it is a libFuzzer target)")
            exit(2)
        }
        for path in paths {
            guard let data = FileManager.default.contents(atPath: path) else {
                print("cannot read \(path)")
                exit(1)
            }
            print("\(path): \(SocketsFuzzHarness.run(Array(data)))")
        }
    }
}
#endif
