//! Charts drawn on the server as SVG: no script, no external library, readable without CSS.
//! Only numbers and escaped text reach the markup.

use std::fmt::Write;

/// One bar of the chart: a label for its bucket, all requests, and the failed ones (4xx + 5xx).
pub struct Bar {
    pub label: String,
    pub requests: u64,
    pub errors: u64,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Requests and errors per bucket as stacked bars, with an accessible title and description.
pub fn requests(id: &str, title: &str, bars: &[Bar]) -> String {
    let (w, h, left, bottom, top) = (720.0_f64, 220.0_f64, 48.0_f64, 28.0_f64, 12.0_f64);
    let max = bars.iter().map(|b| b.requests).max().unwrap_or(0).max(1);
    let total: u64 = bars.iter().map(|b| b.requests).sum();
    let errors: u64 = bars.iter().map(|b| b.errors).sum();
    let n = bars.len().max(1) as f64;
    let slot = (w - left - 8.0) / n;
    let bar_w = (slot * 0.8).max(1.0);
    let plot_h = h - bottom - top;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg id="{id}" class="chart" viewBox="0 0 {w} {h}" role="img" aria-labelledby="{id}-title {id}-desc" data-total="{total}" data-errors="{errors}"><title id="{id}-title">{}</title><desc id="{id}-desc">{total} requests, {errors} of them errors, over {} buckets.</desc>"##,
        escape(title),
        bars.len()
    );
    // Axis and two grid lines with their values.
    // Grid lines at 0, the maximum, and half of it when that is a whole number of requests.
    let fracs: &[f64] = if max >= 2 && max % 2 == 0 { &[0.0, 0.5, 1.0] } else { &[0.0, 1.0] };
    for frac in fracs {
        let y = top + plot_h * (1.0 - frac);
        let value = (max as f64 * frac).round() as u64;
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{w}" y2="{y:.1}" stroke="#dde1e7" stroke-width="1"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#5a6272">{value}</text>"##,
            left - 6.0,
            y + 4.0
        );
    }
    for (i, b) in bars.iter().enumerate() {
        let x = left + slot * i as f64 + (slot - bar_w) / 2.0;
        let rh = plot_h * b.requests as f64 / max as f64;
        let eh = plot_h * b.errors.min(b.requests) as f64 / max as f64;
        if b.requests > 0 {
            let _ = write!(
                svg,
                r##"<rect x="{x:.1}" y="{:.1}" width="{bar_w:.1}" height="{rh:.1}" fill="#1f5fd1"><title>{}: {} requests, {} errors</title></rect>"##,
                top + plot_h - rh,
                escape(&b.label),
                b.requests,
                b.errors
            );
        }
        if b.errors > 0 {
            let _ = write!(
                svg,
                r##"<rect x="{x:.1}" y="{:.1}" width="{bar_w:.1}" height="{eh:.1}" fill="#b3261e"/>"##,
                top + plot_h - eh
            );
        }
    }
    // First and last bucket labels.
    if let (Some(first), Some(last)) = (bars.first(), bars.last()) {
        let _ = write!(
            svg,
            r##"<text x="{left}" y="{:.1}" font-size="11" fill="#5a6272">{}</text><text x="{w}" y="{:.1}" font-size="11" text-anchor="end" fill="#5a6272">{}</text>"##,
            h - 8.0,
            escape(&first.label),
            h - 8.0,
            escape(&last.label)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_escapes_labels_and_counts_totals() {
        let bars = vec![
            Bar { label: "<script>".into(), requests: 10, errors: 2 },
            Bar { label: "b".into(), requests: 0, errors: 0 },
        ];
        let svg = requests("c", "Requests & errors", &bars);
        assert!(svg.contains("data-total=\"10\"") && svg.contains("data-errors=\"2\""));
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;"));
        assert!(svg.contains("Requests &amp; errors"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
    }
}
