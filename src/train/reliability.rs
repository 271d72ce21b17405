//! Reliability diagrams: how well a task's predicted probabilities match observed rates.
//!
//! The labelled examples of a task are sorted by predicted probability and cut into deciles of
//! (almost) equal size — equal-count bins, so a task whose predictions all sit near its low base
//! rate still gets ten informative points, where fixed-width bins would put nearly everything in
//! the first bin. Each decile is drawn at (mean prediction, observed rate) with a 95% Wilson
//! interval for the rate; a calibrated model lies on the diagonal.

use rankstack_nn::Result;
use serde::Serialize;

use super::plot::{color, page, AxisKind, Line, Panel, Segment, Stroke};

/// Equal-count bins of a reliability diagram.
pub const DECILES: usize = 10;

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// Labelled examples in the bin.
    pub count: usize,
    /// Sum of the labels (positives; soft labels count fractionally).
    pub positives: f64,
    /// Mean predicted probability.
    pub mean_prediction: f64,
    /// Mean label.
    pub observed_rate: f64,
    /// Lower end of the 95% Wilson interval of the observed rate.
    pub low: f64,
    /// Upper end of the 95% Wilson interval of the observed rate.
    pub high: f64,
}

/// The reliability diagram of one task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reliability {
    /// Task name.
    pub task: String,
    /// Bins in order of increasing prediction (fewer than [`DECILES`] with fewer examples).
    pub bins: Vec<ReliabilityBin>,
}

/// The 95% Wilson score interval of a rate `p` observed over `n` examples.
fn wilson(p: f64, n: f64) -> (f64, f64) {
    let z: f64 = 1.959_963_984_540_054;
    let z2 = z * z;
    let center = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).max(0.0).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

impl Reliability {
    /// Bins `probabilities` against `labels` (examples with a NaN label are skipped) into `bins`
    /// equal-count bins by predicted probability; ties are split by example order.
    pub fn new(task: &str, probabilities: &[f64], labels: &[f64], bins: usize) -> Self {
        let mut pairs: Vec<(f64, f64)> =
            probabilities.iter().zip(labels).filter(|(_, y)| !y.is_nan()).map(|(p, y)| (*p, *y)).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = pairs.len();
        let bins = bins.min(n);
        let bins = (0..bins)
            .map(|b| {
                let part = &pairs[b * n / bins..(b + 1) * n / bins];
                let count = part.len() as f64;
                let positives: f64 = part.iter().map(|p| p.1).sum();
                let observed_rate = positives / count;
                let (low, high) = wilson(observed_rate, count);
                ReliabilityBin {
                    count: part.len(),
                    positives,
                    mean_prediction: part.iter().map(|p| p.0).sum::<f64>() / count,
                    observed_rate,
                    low,
                    high,
                }
            })
            .collect();
        Self { task: task.to_string(), bins }
    }

    /// The panel: the diagonal, the bins and their intervals, and the counts.
    pub fn panel(&self, index: usize) -> Panel {
        let total: usize = self.bins.iter().map(|b| b.count).sum();
        let positives: f64 = self.bins.iter().map(|b| b.positives).sum();
        let (smallest, largest) =
            self.bins.iter().fold((usize::MAX, 0), |(lo, hi), b| (lo.min(b.count), hi.max(b.count)));
        let per_bin = if smallest == largest { format!("{smallest}") } else { format!("{smallest}-{largest}") };
        let top = self.bins.iter().map(|b| b.mean_prediction.max(b.high)).fold(0.0, f64::max);
        let c = color(index);
        Panel {
            title: format!("{}: calibration by decile", self.task),
            x_label: "mean predicted probability".to_string(),
            y_label: "observed rate".to_string(),
            x_kind: AxisKind::Enclosing,
            include: vec![(0.0, 0.0), (top, top)],
            lines: vec![
                Line {
                    name: Some("ideal".into()),
                    points: vec![(0.0, 0.0), (top, top)],
                    color: c,
                    stroke: Stroke::Diagonal,
                },
                Line {
                    name: Some("observed, 95% interval".into()),
                    points: self.bins.iter().map(|b| (b.mean_prediction, b.observed_rate)).collect(),
                    color: c,
                    stroke: Stroke::Markers,
                },
            ],
            segments: self
                .bins
                .iter()
                .map(|b| Segment { ends: ((b.mean_prediction, b.low), (b.mean_prediction, b.high)), color: c })
                .collect(),
            notes: vec![format!(
                "{total} labelled rows ({positives:.0} positive) in {} bins of {per_bin} rows",
                self.bins.len()
            )],
            empty_note: "no labelled example".to_string(),
        }
    }
}

/// Width and height of one panel, pixels.
const PANEL_SIZE: (u32, u32) = (400, 360);

/// The first line of every reliability SVG rankstack writes: `eval` overwrites a file only if it
/// starts with this line.
pub const RELIABILITY_MARKER: &str = "<!-- rankstack eval: reliability diagrams -->";

/// One SVG document with a panel per task (two per row), starting with [`RELIABILITY_MARKER`].
pub fn reliability_svg(tasks: &[Reliability]) -> Result<String> {
    let panels: Vec<Panel> = tasks.iter().enumerate().map(|(i, r)| r.panel(i)).collect();
    Ok(format!("{RELIABILITY_MARKER}\n{}", page(&panels, 2, PANEL_SIZE)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deciles_have_equal_counts_and_the_right_rates() {
        // 100 examples, predictions 0.00..0.99; label 1 for every tenth, NaN labels skipped.
        let p: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).rev().collect();
        let y: Vec<f64> = (0..100).map(|i| if i % 10 == 0 { 1.0 } else { 0.0 }).rev().collect();
        let mut p2 = p.clone();
        let mut y2 = y.clone();
        p2.push(0.5);
        y2.push(f64::NAN);
        let r = Reliability::new("save", &p2, &y2, DECILES);
        assert_eq!(r.bins.len(), 10);
        for (k, b) in r.bins.iter().enumerate() {
            assert_eq!(b.count, 10);
            assert_eq!(b.positives, 1.0);
            assert!((b.mean_prediction - (k as f64 * 0.1 + 0.045)).abs() < 1e-12, "{b:?}");
            assert!((b.observed_rate - 0.1).abs() < 1e-12);
            assert!(b.low < 0.1 && b.high > 0.1);
        }
        // The Wilson interval for 1 of 10 (a textbook value): [0.0179, 0.4042].
        assert!((r.bins[0].low - 0.0179).abs() < 1e-4 && (r.bins[0].high - 0.4042).abs() < 1e-4);
        // Fewer examples than bins: one bin per example; none: no bins, still drawable.
        assert_eq!(Reliability::new("t", &[0.2, 0.4], &[0.0, 1.0], DECILES).bins.len(), 2);
        let empty = Reliability::new("t", &[0.2], &[f64::NAN], DECILES);
        assert!(empty.bins.is_empty());
        let svg = reliability_svg(&[r, empty]).unwrap();
        assert!(svg.starts_with(RELIABILITY_MARKER));
        assert!(svg.contains("100 labelled rows (10 positive) in 10 bins of 10 rows"), "{svg}");
        assert!(svg.contains("no labelled example"));
    }
}
