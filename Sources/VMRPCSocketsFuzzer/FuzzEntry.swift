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
@main
struct SocketsFuzzReplayer {
    static func main() { FuzzReplay.main(program: "VMRPCSocketsFuzzer", SocketsFuzzHarness.run) }
}
#endif
