//! Training curves as a self-contained SVG (no plotting dependency): the training loss per step
//! (raw and smoothed) on the left, and the evaluation AUC of each task per epoch on the right.

use std::fmt::Write;

/// One named series of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

fn panel(svg: &mut String, x0: f64, title: &str, x_label: &str, series: &[Series]) {
    let (w, h, pad) = (420.0, 300.0, 50.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (xmin, xmax, ymin, ymax) = (xmin.min(x), xmax.max(x), ymin.min(y), ymax.max(y));
    }
    if xmin > xmax {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    if xmax == xmin {
        xmax = xmin + 1.0;
    }
    if ymax == ymin {
        (ymin, ymax) = (ymin - 0.5, ymax + 0.5);
    }
    let sx = |x: f64| x0 + pad + (x - xmin) / (xmax - xmin) * (w - 2.0 * pad);
    let sy = |y: f64| 30.0 + (h - pad) - (y - ymin) / (ymax - ymin) * (h - pad - 10.0);
    let _ = write!(svg, r#"<text x="{:.1}" y="20" font-size="14" text-anchor="middle">{title}</text>"#, x0 + w / 2.0);
    let _ = write!(
        svg,
        r##"<rect x="{:.1}" y="30" width="{:.1}" height="{:.1}" fill="none" stroke="#999"/>"##,
        x0 + pad,
        w - 2.0 * pad,
        h - pad - 10.0 + 10.0
    );
    for i in 0..=4 {
        let y = ymin + (ymax - ymin) * i as f64 / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{y:.4}</text>"#,
            x0 + pad - 4.0,
            sy(y) + 3.0
        );
        let x = xmin + (xmax - xmin) * i as f64 / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{x:.0}</text>"#,
            sx(x),
            30.0 + h - pad + 14.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{x_label}</text>"#,
        x0 + w / 2.0,
        30.0 + h - pad + 30.0
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> =
            s.points.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ =
            write!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        if s.points.len() < 30 {
            for &(x, y) in s.points.iter().filter(|p| p.1.is_finite()) {
                let _ = write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#, sx(x), sy(y));
            }
        }
        let ly = 44.0 + 14.0 * i as f64;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{ly:.1}" font-size="10" fill="{color}">{}</text>"#,
            x0 + w - pad - 90.0,
            xml_escape(&s.name)
        );
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Exponential moving average `s_t = α·x_t + (1 − α)·s_{t−1}` (bias-corrected like Adam's
/// moments, so early values are not pulled towards 0).
pub fn smooth(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut s = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            s = alpha * y + (1.0 - alpha) * s;
            (x, s / (1.0 - (1.0 - alpha).powi(i as i32 + 1)))
        })
        .collect()
}

/// The two-panel SVG document.
pub fn training_curves(loss: &[(f64, f64)], auc: &[Series]) -> String {
    let mut svg =
        String::from(r#"<svg xmlns="http://www.w3.org/2000/svg" width="860" height="330" font-family="sans-serif">"#);
    svg.push_str(r#"<rect width="860" height="330" fill="white"/>"#);
    let loss_series = [
        Series { name: "loss".into(), points: loss.to_vec() },
        Series { name: "loss (smoothed)".into(), points: smooth(loss, 0.05) },
    ];
    panel(&mut svg, 0.0, "training loss", "step", &loss_series);
    panel(&mut svg, 430.0, "evaluation AUC", "epoch", auc);
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_bias_corrected_and_svg_is_well_formed() {
        let s = smooth(&[(0.0, 2.0), (1.0, 2.0)], 0.1);
        assert!((s[0].1 - 2.0).abs() < 1e-12 && (s[1].1 - 2.0).abs() < 1e-12);
        let svg = training_curves(
            &[(0.0, 0.7), (1.0, 0.6)],
            &[Series { name: "save <AUC>".into(), points: vec![(1.0, 0.7)] }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("save &lt;AUC&gt;") && svg.matches("<polyline").count() == 3);
    }
}
