import Foundation
import Histogram

/// An SVG of each path's latency distribution: lateness (x, logarithmic or linear, round tick
/// values) against the share of wake-ups at or below it (y, on a "nines" scale: 0, 90 %, 99 %,
/// 99.9 %, ...). The legend sits in its own column inside the canvas, sized to its longest label.
enum CyclicPlot {
    /// A stable colour per path.
    static func color(of path: CyclicPath) -> String {
        switch path {
        case .host: return "#7f7f7f"
        case .hostCompensated: return "#1f77b4"
        case .guestLongPollRaw: return "#ff7f0e"
        case .guestLongPoll: return "#2ca02c"
        case .guestInterrupt: return "#d62728"
        }
    }

    /// Tick values for a linear axis from 0 to at least `maximum`: steps of 1, 2 or 5 × 10^k,
    /// at most 8 intervals. Returns the ticks; the last one is the axis end.
    static func linearTicks(upTo maximum: Double) -> [Double] {
        let target = max(maximum, 1e-9)
        var step = pow(10, floor(log10(target / 8)))
        for multiplier in [1.0, 2, 5, 10] where target / (step * multiplier) <= 8 {
            step *= multiplier
            break
        }
        let intervals = Int((target / step).rounded(.up))
        return (0...intervals).map { Double($0) * step }
    }

    /// Decades covering `minimum...maximum` (both > 0): the powers of ten from below the minimum
    /// to above the maximum.
    static func logTicks(from minimum: Double, to maximum: Double) -> [Double] {
        let low = Int(floor(log10(max(minimum, 1e-9))))
        let high = max(low + 1, Int(ceil(log10(max(maximum, minimum)))))
        return (low...high).map { pow(10, Double($0)) }
    }

    /// A tick label: "0.1", "5", "250", "1 ms", "20 ms".
    static func label(microseconds value: Double) -> String {
        if value >= 1000 {
            let ms = value / 1000
            return (ms == ms.rounded() ? String(Int(ms)) : String(format: "%g", ms)) + " ms"
        }
        return value == value.rounded() ? String(Int(value)) : String(format: "%g", value)
    }

    static func svg(_ paths: [CyclicPathStatistics], intervalMicroseconds: Int, scale: CyclicPlotScale) -> String {
        svg(paths, title: "Timer wake-up lateness, \(intervalMicroseconds) µs period (share of wake-ups at or below)",
            quantity: "lateness after the deadline", lowEdgeNote: "early wake-ups at the left edge", scale: scale)
    }

    /// The plot of any paths' latency distributions: `title` on top, `quantity` names the x axis,
    /// `lowEdgeNote` says what sits at the left edge of a logarithmic axis.
    static func svg<Path>(_ paths: [PathStatistics<Path>], title: String, quantity: String,
                          lowEdgeNote: String = "values below the axis at the left edge", scale: CyclicPlotScale) -> String {
        let plotWidth = 640.0, plotHeight = 380.0, left = 70.0, top = 50.0, bottom = 60.0
        let legends = paths.map { statistics -> String in
            String(format: "%@  p50 %.1f  p99 %.1f µs", statistics.path.name, statistics.microseconds(atPercentile: 50),
                   statistics.microseconds(atPercentile: 99))
                + (statistics.earlyWakes > 0 ? "  (\(statistics.earlyWakes) early!)" : "")
        }
        // At most 8 px per character at 12 px sans-serif, plus the colour swatch and margins.
        let legendWidth = Double(legends.map(\.count).max() ?? 10) * 8 + 60
        let width = left + plotWidth + legendWidth, height = top + plotHeight + bottom
        let maximumNines = min(5, max(1, log10(Double(paths.map(\.count).max() ?? 10))))

        // x in microseconds.
        let largest = max(0.1, paths.map { Double($0.total.max) / 1000 }.max() ?? 1)
        let ticks: [Double]
        let x: (Double) -> Double
        switch scale {
        case .log:
            let smallestPositive = paths.compactMap { statistics -> Double? in
                let value = Double(statistics.total.valueAtPercentile(0.1)) / 1000
                return value > 0 ? value : nil
            }.min() ?? 0.1
            ticks = logTicks(from: max(0.1, smallestPositive), to: largest)
            let low = log10(ticks.first!), high = log10(ticks.last!)
            x = { value in left + (log10(min(max(value, ticks.first!), ticks.last!)) - low) / (high - low) * plotWidth }
        case .linear:
            // The body matters: the axis ends past the largest p99.9, and rarer outliers sit at the edge.
            let p999 = paths.map { Double($0.total.valueAtPercentile(99.9)) / 1000 }.max() ?? 1
            ticks = linearTicks(upTo: max(p999 * 1.2, 1))
            x = { value in left + min(max(value, 0), ticks.last!) / ticks.last! * plotWidth }
        }
        func y(nines: Double) -> Double { top + plotHeight - min(nines, maximumNines) / maximumNines * plotHeight }

        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(Int(left))" y="24" font-size="15">\(title.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;"))</text>

            """
        // y grid: 0, 90 %, 99 %, ...
        var nines = 0.0
        while nines <= maximumNines + 1e-9 {
            let label = nines == 0 ? "0" : String(format: "%g%%", (1 - pow(10, -nines)) * 100)
            svg += line(left, y(nines: nines), left + plotWidth, y(nines: nines), stroke: "#ddd")
            svg += text(label, x: left - 8, y: y(nines: nines) + 4, anchor: "end")
            nines += 1
        }
        // x grid and ticks (log: minor lines at 2 and 5 of each decade).
        if scale == .log {
            for decade in ticks.dropLast() {
                for multiple in [2.0, 5.0] { svg += line(x(decade * multiple), top, x(decade * multiple), top + plotHeight, stroke: "#f0f0f0") }
            }
        }
        for tick in ticks {
            svg += line(x(tick), top, x(tick), top + plotHeight, stroke: "#ddd")
            svg += text(label(microseconds: tick), x: x(tick), y: top + plotHeight + 18, anchor: "middle")
        }
        svg += line(left, top, left, top + plotHeight, stroke: "#444") + line(left, top + plotHeight, left + plotWidth, top + plotHeight, stroke: "#444")
        let axis = scale == .log ? "\(quantity) (µs, logarithmic; \(lowEdgeNote))"
            : "\(quantity) (µs; values past the axis at the right edge)"
        svg += text(axis, x: left + plotWidth / 2, y: height - 18, anchor: "middle")

        for (index, statistics) in paths.enumerated() where statistics.count > 0 {
            var points: [String] = []
            var n = 0.0
            while n <= maximumNines + 1e-9 {
                let percentile = n == 0 ? 0 : (1 - pow(10, -n)) * 100
                let value = Double(statistics.total.valueAtPercentile(percentile)) / 1000
                points.append(String(format: "%.1f,%.1f", x(value), y(nines: n)))
                n += 0.02
            }
            points.append(String(format: "%.1f,%.1f", x(Double(statistics.total.max) / 1000), y(nines: maximumNines)))
            let color = statistics.path.plotColor
            svg += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\" points=\"\(points.joined(separator: " "))\"/>\n"
            let legendY = top + 14 + Double(index) * 20
            svg += line(left + plotWidth + 16, legendY - 4, left + plotWidth + 36, legendY - 4, stroke: color, width: 3)
            svg += text(legends[index], x: left + plotWidth + 42, y: legendY, anchor: "start", fill: color)
        }
        return svg + "</svg>\n"
    }

    private static func line(_ x1: Double, _ y1: Double, _ x2: Double, _ y2: Double, stroke: String, width: Double = 1) -> String {
        String(format: "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%@\" stroke-width=\"%g\"/>\n", x1, y1, x2, y2, stroke, width)
    }

    private static func text(_ content: String, x: Double, y: Double, anchor: String, fill: String = "black") -> String {
        let escaped = content.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
        return String(format: "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%@\" fill=\"%@\">", x, y, anchor, fill) + escaped + "</text>\n"
    }
}
