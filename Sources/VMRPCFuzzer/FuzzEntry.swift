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
@main
struct VMRPCFuzzReplayer {
    static func main() { FuzzReplay.main(program: "VMRPCFuzzer", VMRPCFuzzHarness.run) }
}
#endif
