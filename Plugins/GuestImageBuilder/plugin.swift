import Foundation
import PackagePlugin

/// Builds the bundled bare guest from `Guest/` with the clang and ld.lld of the Swift
/// toolchain and embeds the flat image in the target as a Swift byte array.
///
/// One build command, so that the only declared output is the generated Swift file (any
/// other declared output would be copied into a resource bundle).
@main
struct GuestImageBuilder: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let guestDirectory = context.package.directoryURL.appending(path: "Guest")
        let work = context.pluginWorkDirectoryURL
        let headerDirectory = context.package.directoryURL.appending(path: "Sources/CVMRPCGuest/include")
        let entries = try FileManager.default.contentsOfDirectory(atPath: guestDirectory.path).sorted()
        let inputs = entries.filter { [".S", ".c", ".h", ".ld"].contains(where: $0.hasSuffix) }
            .map { guestDirectory.appending(path: $0) }
            + ["rtvirt_vmrpc.h", "rtvirt_sockets.h"].map { headerDirectory.appending(path: $0) }
        let output = work.appending(path: "GuestImageBytes.swift")
        return [.buildCommand(
            displayName: "Building the bundled guest from Guest/",
            executable: try context.tool(named: "GuestImageEmbedder").url,
            arguments: [
                try context.tool(named: "clang").url.path,
                try context.tool(named: "ld.lld").url.path,
                guestDirectory.path, headerDirectory.path, work.path, output.path,
            ],
            inputFiles: inputs,
            outputFiles: [output])]
    }
}
