/// The last `capacity` samples of a measurement, with a percentile over them. A value type:
/// owners keep it under their own lock.
///
/// Inlinable, so that users in other modules (the long-poll timer strategy, the return-latency
/// estimator) get it specialized for their sample type: unspecialized, the sort behind
/// `percentile` took ~100 µs for 128 samples on a deadline wait's path (measured from another
/// module with the release build).
public struct RecentSamples<Sample: Comparable & Sendable>: Sendable {
    @usableFromInline var samples: [Sample] = []
    @usableFromInline var next = 0
    /// How many samples are kept (at least 1).
    public let capacity: Int

    /// An empty window of `capacity` samples.
    @inlinable
    public init(capacity: Int) { self.capacity = max(capacity, 1) }

    /// Adds `sample`, replacing the oldest once the window is full.
    @inlinable
    public mutating func append(_ sample: Sample) {
        if samples.count < capacity {
            samples.append(sample)
        } else {
            samples[next] = sample
            next = (next + 1) % capacity
        }
    }

    /// The sample at `fraction` (0...1) of the sorted window, rounding the rank down; nil when empty.
    @inlinable
    public func percentile(_ fraction: Double) -> Sample? {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        return sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * fraction))]
    }
}
