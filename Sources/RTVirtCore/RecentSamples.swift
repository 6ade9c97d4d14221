/// The last `capacity` samples of a measurement, with a percentile over them. A value type:
/// owners keep it under their own lock.
public struct RecentSamples<Sample: Comparable & Sendable>: Sendable {
    private var samples: [Sample] = []
    private var next = 0
    /// How many samples are kept (at least 1).
    public let capacity: Int

    /// An empty window of `capacity` samples.
    public init(capacity: Int) { self.capacity = max(capacity, 1) }

    /// Adds `sample`, replacing the oldest once the window is full.
    public mutating func append(_ sample: Sample) {
        if samples.count < capacity {
            samples.append(sample)
        } else {
            samples[next] = sample
            next = (next + 1) % capacity
        }
    }

    /// The sample at `fraction` (0...1) of the sorted window, rounding the rank down; nil when empty.
    public func percentile(_ fraction: Double) -> Sample? {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        return sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * fraction))]
    }
}
