/// A set of host CPU numbers, written in the kernel's list format ("0-2,5").
public struct CPUSet: Hashable, Sendable, CustomStringConvertible, ExpressibleByArrayLiteral {
    /// The CPU numbers, ascending.
    public private(set) var cpus: [Int]

    /// A set of the given CPUs (duplicates removed).
    public init(_ cpus: some Sequence<Int>) { self.cpus = Array(Set(cpus)).sorted() }

    /// A set from an array literal.
    public init(arrayLiteral elements: Int...) { self.init(elements) }

    /// Parses the kernel's list format, for example "0-3,6,8-9". Returns nil when malformed.
    public init?(listFormat text: String) {
        var result: [Int] = []
        let trimmed = text.trimmingCharacters(in: " \n\t")
        if trimmed.isEmpty { self.init([]); return }
        for part in trimmed.split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = part.split(separator: "-", omittingEmptySubsequences: false)
            guard let first = bounds.first, let low = Int(first), low >= 0 else { return nil }
            switch bounds.count {
            case 1: result.append(low)
            case 2:
                guard let high = Int(bounds[1]), high >= low, high - low < 65_536 else { return nil }
                result.append(contentsOf: low...high)
            default: return nil
            }
        }
        self.init(result)
    }

    /// Whether the set has no CPUs.
    public var isEmpty: Bool { cpus.isEmpty }
    /// Whether `cpu` is in the set.
    public func contains(_ cpu: Int) -> Bool { cpus.contains(cpu) }
    /// CPUs in both sets.
    public func intersection(_ other: CPUSet) -> CPUSet { CPUSet(cpus.filter(other.contains)) }

    /// The kernel's list format, for example "0-2,5"; empty string for an empty set.
    public var description: String {
        var parts: [String] = []
        var index = 0
        while index < cpus.count {
            var end = index
            while end + 1 < cpus.count && cpus[end + 1] == cpus[end] + 1 { end += 1 }
            parts.append(end == index ? "\(cpus[index])" : "\(cpus[index])-\(cpus[end])")
            index = end + 1
        }
        return parts.joined(separator: ",")
    }
}

extension String {
    func trimmingCharacters(in characters: String) -> String {
        let set = Set(characters)
        var slice = Substring(self)
        while let first = slice.first, set.contains(first) { slice.removeFirst() }
        while let last = slice.last, set.contains(last) { slice.removeLast() }
        return String(slice)
    }
}
