import Foundation
import PackagePlugin

/// Builds the guest from `Guest/` with the clang and ld.lld of the Swift toolchain and hands
/// the flat image to the target as a generated Swift file (`let guestImage: [UInt8]`).
///
/// One build command whose only declared output is that Swift file: SwiftPM would copy any
/// other declared output (an object file, the binary) into a resource bundle.
@main
struct GuestBuilder: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let guest = context.package.directoryURL.appending(path: "Guest")
        let sources = ["guest.c"].map { guest.appending(path: $0) }
        let linkerScript = guest.appending(path: "guest.ld")
        // guest.c includes RTVirt's public guest header by relative path; a change to it rebuilds the guest.
        let header = context.package.directoryURL.appending(path: "../../Sources/CVMRPCGuest/include/rtvirt_vmrpc.h").standardized
        let work = context.pluginWorkDirectoryURL
        let output = work.appending(path: "GuestImage.swift")
        return [.buildCommand(
            displayName: "Building the MinimalVMM guest from Guest/",
            executable: try context.tool(named: "GuestEmbedder").url,
            arguments: [try context.tool(named: "clang").url.path, try context.tool(named: "ld.lld").url.path,
                        linkerScript.path, work.path, output.path] + sources.map(\.path),
            inputFiles: sources + [linkerScript, header],
            outputFiles: [output])]
    }
}
