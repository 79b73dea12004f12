//! Throughput against file size: ferry on tmpfs staging beside its same-run ceilings.
//!
//! What it does: for each file size (default 16 KiB to 1 GiB, x16 apart) generates a shard of
//! [`files_for`] files of that size on the shard folder, then over `rounds` alternating rounds
//! copies it with ferry in this process (default shape, tmpfs staging), with raw quinn at
//! ferry's exact endpoint settings and shape ([`RawSettings::FERRY_DEFAULT`]) and with rustls
//! over TCP, the same number of bytes each; keeps the medians and each point's ratios, and
//! draws them as an SVG ([`svg`]: log file size across, MB/s up, the ratio to raw quinn
//! written at each ferry point).
//!
//! What it does not: stage on disk (the disk's own figures are the e2e bench's `dd` column),
//! or assert on any figure.

use std::fmt::Write as _;
use std::path::Path;

use crate::certs::BenchCerts;
use crate::ferry_copy::{ferry_copy, FerryShape};
use crate::format_bytes;
use crate::raw_quinn::{raw_quinn_copy, RawSettings};
use crate::shard::Shard;
use crate::tls_tcp::tls_tcp_copy;

/// The default sizes: 16 KiB, 256 KiB, 4 MiB, 64 MiB, 1 GiB.
pub const CURVE_FILE_SIZES_BYTES: [u64; 5] = [16 << 10, 256 << 10, 4 << 20, 64 << 20, 1 << 30];

/// Bytes a point aims at (fewer files of the largest sizes would not fill it).
const POINT_BYTES: u64 = 512 << 20;
/// Most files in one point (16 KiB files: 32 MiB in all).
const POINT_FILES_MAX: u64 = 2048;

/// How many files of `file_bytes` one point copies: about [`POINT_BYTES`], between 1 and
/// [`POINT_FILES_MAX`].
pub fn files_for(file_bytes: u64) -> u32 {
    let files = (POINT_BYTES / file_bytes.max(1)).clamp(1, POINT_FILES_MAX);
    u32::try_from(files).unwrap_or(1)
}

/// One point's medians, in bytes per second.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CurvePoint {
    pub file_bytes: u64,
    pub files_count: u32,
    pub ferry_tmpfs: f64,
    pub raw_quinn_ferry: f64,
    pub tls_tcp: f64,
}

impl CurvePoint {
    pub fn ratio_to_raw_quinn(&self) -> f64 {
        ratio(self.ferry_tmpfs, self.raw_quinn_ferry)
    }

    pub fn ratio_to_tls_tcp(&self) -> f64 {
        ratio(self.ferry_tmpfs, self.tls_tcp)
    }
}

fn ratio(top: f64, bottom: f64) -> f64 {
    if bottom > 0.0 {
        top / bottom
    } else {
        0.0
    }
}

/// The median of `values` (0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Measures every size of `sizes` (see the module doc), printing each run.
pub fn run_curve(
    runtime: &tokio::runtime::Runtime,
    certs: &BenchCerts,
    shard_dir: &Path,
    tmpfs_dir: &Path,
    sizes: &[u64],
    rounds: u32,
) -> anyhow::Result<Vec<CurvePoint>> {
    let mut points = Vec::new();
    for (index, &file_bytes) in sizes.iter().enumerate() {
        let files_count = files_for(file_bytes);
        let bytes_total = file_bytes * u64::from(files_count);
        let shard = Shard::generate(shard_dir, bytes_total, files_count, 0xc0 + index as u64)?;
        let (mut ferry, mut raw, mut tls) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds.max(1) {
            let id = format!("bench-curve-{index}-{round}");
            let f = runtime.block_on(ferry_copy(certs, &shard, tmpfs_dir, &id, FerryShape::default()))?.0;
            let r = runtime.block_on(raw_quinn_copy(certs, bytes_total, RawSettings::FERRY_DEFAULT))?;
            let t = tls_tcp_copy(certs, bytes_total)?;
            println!(
                "  {} x {}: ferry_tmpfs {:.1}, raw_quinn_ferry {:.1}, tls_tcp {:.1} MB/s",
                files_count,
                format_bytes(file_bytes),
                f.bytes_per_sec() / 1e6,
                r.bytes_per_sec() / 1e6,
                t.bytes_per_sec() / 1e6
            );
            ferry.push(f.bytes_per_sec());
            raw.push(r.bytes_per_sec());
            tls.push(t.bytes_per_sec());
        }
        points.push(CurvePoint {
            file_bytes,
            files_count,
            ferry_tmpfs: median(&ferry),
            raw_quinn_ferry: median(&raw),
            tls_tcp: median(&tls),
        });
    }
    Ok(points)
}

/// Prints the points as a table.
pub fn print_table(points: &[CurvePoint]) {
    println!(
        "{:>10} {:>6} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "file size", "files", "ferry MB/s", "rawq MB/s", "tls MB/s", "/rawq", "/tls"
    );
    for p in points {
        println!(
            "{:>10} {:>6} {:>12.1} {:>12.1} {:>12.1} {:>10.3} {:>10.3}",
            format_bytes(p.file_bytes),
            p.files_count,
            p.ferry_tmpfs / 1e6,
            p.raw_quinn_ferry / 1e6,
            p.tls_tcp / 1e6,
            p.ratio_to_raw_quinn(),
            p.ratio_to_tls_tcp()
        );
    }
}

/// One line of the plot: its legend, its colour, and the rate it draws from a point.
type Series = (&'static str, &'static str, fn(&CurvePoint) -> f64);

/// The curve as an SVG: one line per contender, log2 file size across, MB/s up.
pub fn svg(points: &[CurvePoint], title: &str) -> String {
    let (width, height, left, bottom, top, right) = (1000.0, 460.0, 70.0, 60.0, 50.0, 310.0);
    let plot_w = width - left - right;
    let plot_h = height - bottom - top;
    let max_rate = points.iter().flat_map(|p| [p.ferry_tmpfs, p.raw_quinn_ferry, p.tls_tcp]).fold(1.0, f64::max);
    let y_max_mb = (max_rate / 1e6 / 250.0).ceil().max(1.0) * 250.0;
    let lg = |bytes: u64| (bytes.max(1) as f64).log2();
    let (x_lo, x_hi) = match (points.first(), points.last()) {
        (Some(a), Some(b)) if b.file_bytes > a.file_bytes => (lg(a.file_bytes), lg(b.file_bytes)),
        (Some(a), _) => (lg(a.file_bytes) - 1.0, lg(a.file_bytes) + 1.0),
        _ => (0.0, 1.0),
    };
    let x_of = |bytes: u64| left + (lg(bytes) - x_lo) / (x_hi - x_lo) * plot_w;
    let y_of = |rate: f64| top + plot_h - (rate / 1e6 / y_max_mb).min(1.0) * plot_h;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    // Axes and grid.
    for step in 0..=4 {
        let mb = y_max_mb * f64::from(step) / 4.0;
        let y = top + plot_h - plot_h * f64::from(step) / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{mb:.0}</text>",
            left + plot_w,
            left - 6.0,
            y + 4.0
        );
    }
    for p in points {
        let x = x_of(p.file_bytes);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            top + plot_h,
            top + plot_h + 16.0,
            format_bytes(p.file_bytes)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{:.1}\">file size (log scale); each point a median of alternating rounds</text><text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">MB/s</text>",
        height - 14.0,
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    let series: [Series; 3] = [
        ("raw quinn, ferry's settings (1 conn x 4 streams)", "#2ca02c", |p| p.raw_quinn_ferry),
        ("rustls over TCP", "#ff7f0e", |p| p.tls_tcp),
        ("ferry, tmpfs staging", "#1f77b4", |p| p.ferry_tmpfs),
    ];
    for (i, (name, color, rate)) in series.iter().enumerate() {
        let path: Vec<String> =
            points.iter().map(|p| format!("{:.1},{:.1}", x_of(p.file_bytes), y_of(rate(p)))).collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for p in points {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{name}, {}: {:.1} MB/s</title></circle>",
                x_of(p.file_bytes),
                y_of(rate(p)),
                format_bytes(p.file_bytes),
                rate(p) / 1e6
            );
        }
        let ly = top + 10.0 + i as f64 * 16.0;
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            left + plot_w + 10.0,
            ly - 9.0,
            left + plot_w + 24.0,
            ly,
            escape(name)
        );
    }
    for p in points {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#1f77b4\">{:.2}x / {:.2}x</text>",
            x_of(p.file_bytes),
            y_of(p.ferry_tmpfs) - 8.0,
            p.ratio_to_raw_quinn(),
            p.ratio_to_tls_tcp()
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\">labels: ferry / raw quinn, ferry / rustls</text>\n</svg>",
        left + plot_w + 10.0,
        top + 70.0
    );
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A curve run's result as JSON, for `--json`.
pub fn to_json(points: &[CurvePoint]) -> serde_json::Value {
    serde_json::json!(points
        .iter()
        .map(|p| serde_json::json!({
            "file_bytes": p.file_bytes,
            "files": p.files_count,
            "ferry_tmpfs_bytes_per_sec": p.ferry_tmpfs,
            "raw_quinn_ferry_bytes_per_sec": p.raw_quinn_ferry,
            "tls_tcp_bytes_per_sec": p.tls_tcp,
            "ferry_over_raw_quinn": p.ratio_to_raw_quinn(),
            "ferry_over_tls_tcp": p.ratio_to_tls_tcp(),
        }))
        .collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn points_aim_at_half_a_gib_within_bounds() {
        assert_eq!(files_for(16 << 10), 2048);
        assert_eq!(files_for(4 << 20), 128);
        assert_eq!(files_for(1 << 30), 1);
        assert_eq!(files_for(0), 2048);
    }

    #[test]
    fn the_svg_has_a_line_per_contender_and_a_ratio_per_point() {
        let points: Vec<CurvePoint> = CURVE_FILE_SIZES_BYTES
            .iter()
            .map(|&file_bytes| CurvePoint {
                file_bytes,
                files_count: files_for(file_bytes),
                ferry_tmpfs: 5e8,
                raw_quinn_ferry: 1e9,
                tls_tcp: 8e8,
            })
            .collect();
        let svg = svg(&points, "a <test>");
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert_eq!(svg.matches("0.50x / 0.62x").count(), CURVE_FILE_SIZES_BYTES.len());
        assert!(svg.contains("a &lt;test&gt;") && svg.ends_with("</svg>\n"));
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
    }
}
