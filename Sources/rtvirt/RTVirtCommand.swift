import Foundation
import ArgumentParser

/// The `rtvirt` tool: runs the bundled guest and shows what RTVirt does on this host.
@main
struct RTVirtCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rtvirt",
        abstract: "Real-time behaviour for KVM virtual machines: run the bundled guest, check a host.",
        subcommands: [CyclicTestCommand.self, NetLatencyCommand.self, RunCommand.self, CheckCommand.self, RPCBenchCommand.self,
                      PartitionCommand.self, RunawayCommand.self, TSCOffsetCommand.self, NetEchoCommand.self, NetBenchCommand.self],
        defaultSubcommand: CyclicTestCommand.self)
}

/// Prints `value` as one pretty, key-sorted JSON object (the `--json` output of every command).
func printJSON(_ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}
