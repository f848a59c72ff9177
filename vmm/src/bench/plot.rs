//! Host memory over time, one line per mode, as a self-contained SVG.

use std::fmt::Write;

use super::report::BenchReport;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 4] = ["#7f7f7f", "#1f77b4", "#d62728", "#ff7f0e"];

/// A round step giving about `ticks` ticks up to `max`.
fn tick_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-9);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude)
}

pub fn svg(report: &BenchReport) -> String {
    let samples = report.modes.iter().flat_map(|m| m.samples.iter());
    let max_t = samples.clone().map(|s| s.t).fold(1.0, f64::max);
    let max_mib = samples.map(|s| s.memory_mib).fold(1.0, f64::max) * 1.05;
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |t: f64| LEFT + t / max_t * plot_w;
    let y = |mib: f64| TOP + plot_h - mib / max_mib * plot_h;

    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"22\" font-size=\"15\">Host memory used: {} guests x {} MiB ({})</text>",
        report.guests, report.memory_mib, report.image
    );
    let step = tick_step(max_mib, 6.0);
    let mut v = 0.0;
    while v <= max_mib {
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
        v += step;
    }
    let step = tick_step(max_t, 8.0);
    let mut t = 0.0;
    while t <= max_t {
        let _ =
            writeln!(out, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{t}</text>", x(t), TOP + plot_h + 18.0);
        t += step;
    }
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds since the guests started</text>\n\
         <text transform=\"translate(18 {}) rotate(-90)\" text-anchor=\"middle\">MiB</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0,
        TOP + plot_h / 2.0
    );
    for (i, mode) in report.modes.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> =
            mode.samples.iter().map(|s| format!("{:.1},{:.1}", x(s.t), y(s.memory_mib))).collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            points.join(" "),
            WIDTH - RIGHT + 40.0,
            WIDTH - RIGHT + 46.0,
            TOP + 14.0 + 20.0 * i as f64,
            mode.mode.name(),
            lx = WIDTH - RIGHT + 16.0,
            ly = TOP + 10.0 + 20.0 * i as f64,
        );
    }
    out + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(2000.0, 6.0), 500.0);
        assert_eq!(tick_step(40.0, 8.0), 5.0);
        assert_eq!(tick_step(7.0, 8.0), 1.0);
    }
}
