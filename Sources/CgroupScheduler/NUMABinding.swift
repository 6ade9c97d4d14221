import CLibnuma

/// Binds memory and threads to a NUMA node through libnuma.
public enum NUMABinding {
    /// Binds `[pointer, pointer + size)` to `node` (`numa_tonode_memory`). Returns what was done;
    /// on a host with one node (or without NUMA) nothing is done and the text says so.
    public static func bindMemory(_ pointer: UnsafeMutableRawPointer, size: Int, node: Int) -> String {
        guard numa_available() >= 0 else { return "NUMA is not available on this host: memory not bound" }
        let nodes = Int(numa_num_configured_nodes())
        guard nodes > 1 else { return "one NUMA node: binding is a no-op" }
        guard node >= 0, node < nodes else { return "memory node \(node) does not exist (\(nodes) nodes): memory not bound" }
        numa_tonode_memory(pointer, size, Int32(node))
        return "guest memory bound to node \(node)"
    }
}
