import CZlib
import Foundation
import Histogram

/// HdrHistogram's portable encodings of a histogram (the "V2" format that the Java, C, Go,
/// Python and JavaScript implementations read): a 40-byte big-endian header, then the counts
/// array as ZigZag LEB128 varints, with a run of zero counts written as one negative number.
/// The compressed form wraps that in a zlib stream behind an 8-byte header.
enum HistogramEncoding {
    /// The cookie of the uncompressed V2 encoding (`0x1c849303 | 0x10`).
    static let cookie: UInt32 = 0x1C84_9313
    /// The cookie of the compressed V2 encoding (`0x1c849304 | 0x10`); in base64 it starts "HISTF".
    static let compressedCookie: UInt32 = 0x1C84_9314

    /// Errors of the compressed encoding.
    enum Failure: Error { case zlib(Int32) }

    /// The counts-array index of `value` in HdrHistogram's layout: bucket 0 holds `subBucketCount`
    /// unit-wide sub-buckets, every later bucket the upper half of as many at twice the width.
    static func countsIndex(of value: UInt64, unitMagnitude: Int, subBucketHalfCountMagnitude: Int) -> Int {
        let subBucketCountMagnitude = subBucketHalfCountMagnitude + 1
        let subBucketMask = (UInt64(1) << subBucketCountMagnitude - 1) << unitMagnitude
        let leadingZeroCountBase = 64 - unitMagnitude - subBucketCountMagnitude
        let bucketIndex = leadingZeroCountBase - (value | subBucketMask).leadingZeroBitCount
        let subBucketIndex = Int(value >> (bucketIndex + unitMagnitude))
        return (bucketIndex + 1) << subBucketHalfCountMagnitude + subBucketIndex - (1 << subBucketHalfCountMagnitude)
    }

    /// The smallest value stored at counts-array index `index` (the inverse of `countsIndex`).
    static func value(atIndex index: Int, unitMagnitude: Int, subBucketHalfCountMagnitude: Int) -> UInt64 {
        let subBucketHalfCount = 1 << subBucketHalfCountMagnitude
        var bucketIndex = (index >> subBucketHalfCountMagnitude) - 1
        var subBucketIndex = (index & (subBucketHalfCount - 1)) + subBucketHalfCount
        if bucketIndex < 0 {
            subBucketIndex -= subBucketHalfCount
            bucketIndex = 0
        }
        return UInt64(subBucketIndex) << (bucketIndex + unitMagnitude)
    }

    /// The layout parameters of `histogram` (as every HdrHistogram derives them).
    static func layout(of histogram: Histogram<UInt64>) -> (unitMagnitude: Int, subBucketHalfCountMagnitude: Int) {
        let unitMagnitude = UInt64.bitWidth - 1 - histogram.lowestDiscernibleValue.leadingZeroBitCount
        var largestWithUnitResolution: UInt64 = 2
        for _ in 0..<histogram.numberOfSignificantValueDigits.rawValue { largestWithUnitResolution *= 10 }
        // ceil(log2(largestWithUnitResolution)) sub-buckets bits, half of them per bucket after the first.
        let subBucketCountMagnitude = UInt64.bitWidth - (largestWithUnitResolution - 1).leadingZeroBitCount
        return (unitMagnitude, max(subBucketCountMagnitude, 1) - 1)
    }

    /// The uncompressed V2 encoding of `histogram`.
    static func encode(_ histogram: Histogram<UInt64>) -> [UInt8] {
        let (unitMagnitude, halfMagnitude) = layout(of: histogram)
        // Counts by index, from the recorded values (the iterator skips zero counts).
        var counts: [(index: Int, count: UInt64)] = []
        for recorded in histogram.recordedValues() {
            counts.append((countsIndex(of: recorded.value, unitMagnitude: unitMagnitude, subBucketHalfCountMagnitude: halfMagnitude),
                           UInt64(recorded.count)))
        }
        var payload: [UInt8] = []
        var nextIndex = 0
        for (index, count) in counts {
            let zeros = index - nextIndex
            if zeros == 1 { appendZigZag(0, to: &payload) } else if zeros > 1 { appendZigZag(-Int64(zeros), to: &payload) }
            appendZigZag(Int64(clamping: count), to: &payload)
            nextIndex = index + 1
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(40 + payload.count)
        appendBigEndian(cookie, to: &bytes)
        appendBigEndian(UInt32(payload.count), to: &bytes)
        appendBigEndian(UInt32(0), to: &bytes) // normalizing index offset
        appendBigEndian(UInt32(histogram.numberOfSignificantValueDigits.rawValue), to: &bytes)
        appendBigEndian(histogram.lowestDiscernibleValue, to: &bytes)
        appendBigEndian(histogram.highestTrackableValue, to: &bytes)
        appendBigEndian(Double(1).bitPattern, to: &bytes) // integer-to-double conversion ratio
        return bytes + payload
    }

    /// The compressed V2 encoding: cookie, length, then the zlib stream of `encode(histogram)`.
    static func encodeCompressed(_ histogram: Histogram<UInt64>) throws -> [UInt8] {
        let plain = encode(histogram)
        var capacity = compressBound(uLong(plain.count))
        var compressed = [UInt8](repeating: 0, count: Int(capacity))
        let status = compressed.withUnsafeMutableBufferPointer { target in
            plain.withUnsafeBufferPointer { source in
                // Sound: zlib writes at most `capacity` bytes into `target` (its size) and reads
                // `source.count` bytes from `source`; both buffers outlive the call.
                compress2(target.baseAddress, &capacity, source.baseAddress, uLong(source.count), Z_DEFAULT_COMPRESSION)
            }
        }
        guard status == Z_OK else { throw Failure.zlib(status) }
        var bytes: [UInt8] = []
        appendBigEndian(compressedCookie, to: &bytes)
        appendBigEndian(UInt32(capacity), to: &bytes)
        return bytes + compressed.prefix(Int(capacity))
    }

    /// HdrHistogram's ZigZag LEB128: up to 8 groups of 7 bits with a continuation bit, then a
    /// ninth byte with the remaining 8 bits.
    static func appendZigZag(_ value: Int64, to bytes: inout [UInt8]) {
        var v = UInt64(bitPattern: (value << 1) ^ (value >> 63))
        for _ in 0..<8 {
            if v >> 7 == 0 {
                bytes.append(UInt8(v))
                return
            }
            bytes.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(truncatingIfNeeded: v))
    }

    static func appendBigEndian<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        // Sound: the buffer is a copy of `value` that lives for the closure, which copies it out.
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
    }
}

/// Writes HdrHistogram's interval log format (version 1.3), which `HistogramLogProcessor`,
/// HistogramLogAnalyzer and the other HdrHistogram tools read: a header, then one line per
/// interval histogram, `Tag=NAME,start,length,max,HISTF...` (seconds relative to the start
/// time; the maximum in `maxValueUnitRatio` units).
final class HistogramLogWriter {
    private let handle: FileHandle
    private let maxValueUnitRatio: Double

    /// Creates (or truncates) `path` and writes the header. Values are recorded in nanoseconds:
    /// the maximum column is in milliseconds, as the Java writer does by default.
    init(path: String, startTime: Date, comment: String, maxValueUnitRatio: Double = 1_000_000) throws {
        guard FileManager.default.createFile(atPath: path, contents: nil) else {
            throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: path])
        }
        handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        self.maxValueUnitRatio = maxValueUnitRatio
        let epoch = startTime.timeIntervalSince1970
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.dateFormat = "EEE MMM dd HH:mm:ss zzz yyyy"
        try write("#[\(comment)]\n")
        try write("#[Histogram log format version 1.3]\n")
        try write(String(format: "#[StartTime: %.3f (seconds since epoch), %@]\n", epoch, formatter.string(from: startTime)))
        try write(String(format: "#[BaseTime: %.3f (seconds since epoch)]\n", epoch))
        try write("\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n")
    }

    /// Appends one interval: `histogram` recorded from `start` to `end` seconds after the start time.
    func append(_ histogram: Histogram<UInt64>, tag: String?, start: Double, end: Double) throws {
        let encoded = try HistogramEncoding.encodeCompressed(histogram)
        let prefix = tag.map { "Tag=\($0)," } ?? ""
        try write(prefix + String(format: "%.3f,%.3f,%.3f,", start, end - start, Double(histogram.max) / maxValueUnitRatio)
                  + Data(encoded).base64EncodedString() + "\n")
    }

    /// Flushes and closes the file.
    func close() throws {
        try handle.synchronize()
        try handle.close()
    }

    private func write(_ text: String) throws { try handle.write(contentsOf: Data(text.utf8)) }
}
