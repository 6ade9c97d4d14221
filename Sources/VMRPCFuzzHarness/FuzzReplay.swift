import Foundation

/// The replay mode of the fuzz targets (built without `FUZZING`): runs a harness once on each
/// file named on the command line and prints what it reported, so that a crash input found by
/// libFuzzer can be rerun under a debugger or a plain build.
public enum FuzzReplay {
    /// Runs `harness` on the bytes of each file in `CommandLine.arguments` and prints its report.
    /// Exits with 2 (and a usage line naming `program`) without files, with 1 on a file that
    /// cannot be read.
    public static func main<Report>(program: String, _ harness: ([UInt8]) -> Report) {
        let paths = CommandLine.arguments.dropFirst()
        if paths.isEmpty {
            print("usage: \(program) FILE... (built with -DFUZZING and --sanitize=fuzzer it is a libFuzzer target)")
            exit(2)
        }
        for path in paths {
            guard let data = FileManager.default.contents(atPath: path) else {
                print("cannot read \(path)")
                exit(1)
            }
            print("\(path): \(harness(Array(data)))")
        }
    }
}
