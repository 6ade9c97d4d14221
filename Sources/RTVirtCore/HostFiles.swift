#if canImport(Glibc)
import Glibc
#endif

/// Reads small text files of the host (`/proc`, `/sys`) under a root directory, so that
/// inspection code can be tested against a fake tree in a temporary directory.
public struct HostFiles: Sendable {
    /// The directory that stands for `/`.
    public var root: String

    /// Files under `root` (default: the real `/`).
    public init(root: String = "/") { self.root = root }

    /// The full path of `path` (an absolute path) under the root.
    public func resolve(_ path: String) -> String {
        root == "/" ? path : root + path
    }

    /// Whether `path` exists.
    public func exists(_ path: String) -> Bool { access(resolve(path), F_OK) == 0 }

    /// The file's text, or nil when it cannot be read. Reads until end of file (files in
    /// /proc and /sys report a size of 0).
    public func read(_ path: String) -> String? {
        let fd = open(resolve(path), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 { return nil }
            if count == 0 { break }
            bytes += chunk[0..<count]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The file's first line without surrounding whitespace, or nil.
    public func readLine(_ path: String) -> String? {
        guard let text = read(path) else { return nil }
        return String(text.split(separator: "\n", omittingEmptySubsequences: false).first ?? "").trimmingCharacters(in: " \t\r")
    }

    /// The file's first line as an integer, or nil.
    public func readInteger(_ path: String) -> Int64? { readLine(path).flatMap { Int64($0) } }

    /// Names in a directory, or an empty array.
    public func list(_ path: String) -> [String] {
        guard let directory = opendir(resolve(path)) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }
}
