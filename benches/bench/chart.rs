//! The oneway throughput chart (SVG, no plotting crate).

use std::fmt::Write as _;

use crate::report::{size_name, Report};
use crate::scenarios::oneway::SIZES;

/// A hand-written SVG line chart: messages/s (log scale) against message
/// size (log scale) for the stacks that matter.
pub(crate) fn oneway_svg(rep: &Report, subtitle: &str) -> String {
    let series: [(&str, &str, &str); 6] = [
        ("raw", "#444444", ""),
        ("tokio-util feed", "#1f77b4", ""),
        ("tokio-util send", "#1f77b4", "4 4"),
        ("asynchronous-codec feed", "#2ca02c", ""),
        ("chatpipe send", "#d62728", ""),
        ("chatpipe send (tokio)", "#d62728", "4 4"),
    ];
    let (w, h) = (720.0, 440.0);
    let (l, r, t, b) = (80.0, 190.0, 50.0, 60.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let vals: Vec<f64> = rep
        .oneway
        .iter()
        .filter(|o| series.iter().any(|s| s.0 == o.1))
        .map(|o| o.3)
        .filter(|v| *v > 0.0)
        .collect();
    let lo = vals
        .iter()
        .cloned()
        .fold(f64::MAX, f64::min)
        .log10()
        .floor();
    let hi = vals.iter().cloned().fold(0.0, f64::max).log10().ceil();
    let (lo, hi) = if lo < hi { (lo, hi) } else { (3.0, 9.0) };
    let (xlo, xhi) = (16f64.log2(), (64.0 * 1024f64).log2());
    let x = |size: usize| l + pw * ((size as f64).log2() - xlo) / (xhi - xlo);
    let y = |v: f64| t + ph * (1.0 - (v.log10() - lo) / (hi - lo));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{l}" y="22" font-size="15" font-weight="bold">oneway throughput: messages/s vs message size (log-log)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{l}" y="38" fill="#666">{}</text>"##,
        xml_escape(subtitle)
    );
    let mut d = lo as i32;
    while d <= hi as i32 {
        let yy = y(10f64.powi(d));
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0,
            decade(d)
        );
        d += 1;
    }
    for size in SIZES {
        let xx = x(size);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{t}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            t + ph,
            t + ph + 18.0,
            size_name(size)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">payload size</text>"#,
        l + pw / 2.0,
        h - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">messages/s</text>"#,
        t + ph / 2.0
    );
    for (i, (name, color, dash)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = rep
            .oneway
            .iter()
            .filter(|o| o.1 == *name && o.3 > 0.0)
            .map(|o| (x(o.0), y(o.3)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            path.join(" ")
        );
        for (a, b) in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{color}"/>"#
            );
        }
        let ly = t + 10.0 + 22.0 * i as f64;
        let lx = l + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 10^d as 1, 10, 100, 1k, ..., 1G.
fn decade(d: i32) -> String {
    let units = ["", "k", "M", "G", "T"];
    let d = d.max(0) as usize;
    format!(
        "{}{}",
        10u64.pow((d % 3) as u32),
        units.get(d / 3).copied().unwrap_or("?")
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
