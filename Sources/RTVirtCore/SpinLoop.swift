import CLinuxSupport

/// A hint to the CPU that the caller spins (`pause` on x86): it saves power and lets the
/// sibling hyperthread run while a thread polls a word another CPU will write.
@inline(__always)
public func spinLoopHint() { rtv_cpu_relax() }
