import CLibnuma
import RTVirtCore

/// The host's NUMA memory nodes, through libnuma.
public struct NUMATopology: Codable, Equatable, Sendable {
    /// Whether the kernel supports the NUMA policy calls (`numa_available()`).
    public var available: Bool
    /// Configured memory nodes.
    public var nodeCount: Int
    /// CPUs of each node, in the kernel's list format, by node number.
    public var cpusByNode: [String]

    /// Reads the topology from libnuma.
    public static func current() -> NUMATopology {
        guard numa_available() >= 0 else { return NUMATopology(available: false, nodeCount: 1, cpusByNode: []) }
        let nodes = Int(numa_num_configured_nodes())
        var cpusByNode: [String] = []
        let cpuCount = Int(numa_num_configured_cpus())
        for node in 0..<max(nodes, 0) {
            guard let mask = numa_allocate_cpumask() else { break }
            defer { numa_free_cpumask(mask) }
            var cpus: [Int] = []
            if numa_node_to_cpus(Int32(node), mask) == 0 {
                for cpu in 0..<cpuCount where numa_bitmask_isbitset(mask, UInt32(cpu)) != 0 { cpus.append(cpu) }
            }
            cpusByNode.append(CPUSet(cpus).description)
        }
        return NUMATopology(available: true, nodeCount: nodes, cpusByNode: cpusByNode)
    }
}
