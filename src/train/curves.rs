//! The training curves of a run (`OUT/training_curves.svg`), built from the lines of
//! `metrics.jsonl`: training loss (raw, faint, behind TensorBoard's smoothed curve, with the
//! evaluation loss as dots), learning rate and gradient norm per step; evaluation AUC, log loss and
//! calibration per task and epoch.

use rankstack_nn::Result;
use serde_json::Value;

use super::plot::{color, page, smooth, AxisKind, Line, Panel, Series, Stroke};

/// TensorBoard's default smoothing weight is 0.6: over the few dozen points a run logs, a weight
/// much closer to 1 lags the raw curve by most of the run.
pub const SMOOTHING_WEIGHT: f64 = 0.6;

/// Width and height of one panel, pixels.
const PANEL_SIZE: (u32, u32) = (400, 300);

/// Every curve of a run, appended to line by line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingCurves {
    /// Mean training loss per logged step.
    pub loss: Vec<(f64, f64)>,
    /// Learning rate per logged step.
    pub learning_rate: Vec<(f64, f64)>,
    /// Global gradient norm (before clipping) per logged step.
    pub grad_norm: Vec<(f64, f64)>,
    /// Evaluation loss per evaluated step.
    pub eval_loss: Vec<(f64, f64)>,
    /// Evaluation AUC per task and epoch.
    pub auc: Vec<Series>,
    /// Evaluation log loss per task and epoch.
    pub log_loss: Vec<Series>,
    /// Evaluation calibration (mean prediction / mean label) per task and epoch.
    pub calibration: Vec<Series>,
}

fn push(series: &mut Vec<Series>, name: &str, point: (f64, f64)) {
    match series.iter_mut().find(|s| s.name == name) {
        Some(s) => s.points.push(point),
        None => series.push(Series { name: name.to_string(), points: vec![point] }),
    }
}

/// A JSON number, or NaN for `null` (serde_json writes a non-finite float as `null`).
fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

impl TrainingCurves {
    /// The curves of every line of a `metrics.jsonl` text (unreadable lines are skipped).
    pub fn from_metrics(text: &str) -> Self {
        let mut curves = Self::default();
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                curves.record(&v);
            }
        }
        curves
    }

    /// Appends one `metrics.jsonl` line (`kind` `train` or `eval`; others are ignored).
    pub fn record(&mut self, line: &Value) {
        let step = number(&line["step"]);
        match line["kind"].as_str() {
            Some("train") => {
                self.loss.push((step, number(&line["loss"])));
                self.learning_rate.push((step, number(&line["lr"])));
                self.grad_norm.push((step, number(&line["grad_norm"])));
            }
            Some("eval") => {
                self.eval_loss.push((step, number(&line["loss"])));
                let epoch = number(&line["epoch"]);
                for task in line["tasks"].as_array().into_iter().flatten() {
                    let (Some(name), metrics) = (task[0].as_str(), &task[1]) else { continue };
                    push(&mut self.auc, name, (epoch, number(&metrics["auc"])));
                    push(&mut self.log_loss, name, (epoch, number(&metrics["log_loss"])));
                    push(&mut self.calibration, name, (epoch, number(&metrics["calibration"])));
                }
            }
            _ => {}
        }
    }

    /// The panels: the three per-step panels, then the three per-epoch evaluation panels when
    /// the run evaluates.
    pub fn panels(&self) -> Vec<Panel> {
        let per_step = |title: &str, y_label: &str, lines: Vec<Line>, include: Vec<(f64, f64)>| Panel {
            title: title.to_string(),
            x_label: "step".to_string(),
            y_label: y_label.to_string(),
            x_kind: AxisKind::Enclosing,
            include,
            lines,
            segments: Vec::new(),
            notes: Vec::new(),
            empty_note: "no step logged yet".to_string(),
        };
        let line = |name: Option<&str>, points: &[(f64, f64)], i: usize, stroke: Stroke| Line {
            name: name.map(str::to_string),
            points: points.to_vec(),
            color: color(i),
            stroke,
        };
        let mut loss_lines = vec![
            line(Some("raw"), &self.loss, 0, Stroke::Faint),
            line(
                Some(&format!("smoothed ({SMOOTHING_WEIGHT})")),
                &smooth(&self.loss, SMOOTHING_WEIGHT),
                0,
                Stroke::Solid,
            ),
        ];
        if !self.eval_loss.is_empty() {
            loss_lines.push(line(Some("evaluation"), &self.eval_loss, 3, Stroke::Dots));
        }
        let origin = vec![(0.0, 0.0)];
        let mut panels = vec![
            per_step("training loss", "", loss_lines, vec![(0.0, f64::NAN)]),
            per_step("learning rate", "", vec![line(None, &self.learning_rate, 0, Stroke::Solid)], origin.clone()),
            per_step(
                "gradient norm (before clipping)",
                "",
                vec![line(None, &self.grad_norm, 0, Stroke::Solid)],
                origin,
            ),
        ];
        if self.auc.is_empty() {
            return panels;
        }
        let per_epoch = |title: &str, series: &[Series], reference: Option<f64>| {
            let mut lines: Vec<Line> =
                series.iter().enumerate().map(|(i, s)| line(Some(&s.name), &s.points, i, Stroke::Markers)).collect();
            if let Some(r) = reference {
                let epochs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).filter(|e| e.is_finite());
                let (lo, hi) = epochs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), e| (a.min(e), b.max(e)));
                lines.insert(0, line(None, &[(lo, r), (hi, r)], 0, Stroke::Reference));
            }
            Panel {
                title: title.to_string(),
                x_label: "epoch".to_string(),
                y_label: String::new(),
                x_kind: AxisKind::Integer,
                include: Vec::new(),
                lines,
                segments: Vec::new(),
                notes: Vec::new(),
                empty_note: "no finite value".to_string(),
            }
        };
        panels.push(per_epoch("evaluation AUC", &self.auc, None));
        panels.push(per_epoch("evaluation log loss", &self.log_loss, None));
        panels.push(per_epoch("evaluation calibration (mean p / mean label)", &self.calibration, Some(1.0)));
        panels
    }

    /// The SVG document: panels in rows of three.
    pub fn svg(&self) -> Result<String> {
        page(&self.panels(), 3, PANEL_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_become_curves() {
        let text = r#"{"kind":"train","step":10,"epoch":1,"loss":0.7,"lr":0.001,"grad_norm":2.5,"examples_per_second":100}
{"kind":"eval","step":16,"epoch":1,"loss":0.65,"tasks":[["save",{"count":5,"auc":0.61,"log_loss":0.6,"normalized_entropy":0.9,"calibration":1.1}],["hide",{"count":5,"auc":null,"log_loss":0.2,"normalized_entropy":0.9,"calibration":null}]]}
not json"#;
        let c = TrainingCurves::from_metrics(text);
        assert_eq!(c.loss, vec![(10.0, 0.7)]);
        assert_eq!(c.grad_norm, vec![(10.0, 2.5)]);
        assert_eq!(c.eval_loss, vec![(16.0, 0.65)]);
        assert_eq!(c.auc[0], Series { name: "save".into(), points: vec![(1.0, 0.61)] });
        assert!(c.auc[1].points[0].1.is_nan() && c.log_loss[1].points == vec![(1.0, 0.2)]);
        assert_eq!(c.panels().len(), 6);
        let svg = c.svg().unwrap();
        assert!(svg.contains("evaluation log loss") && svg.contains("smoothed (0.6)"));
        // Without evaluation lines only the per-step panels are drawn; an empty run still renders.
        assert_eq!(TrainingCurves::from_metrics(text.lines().next().unwrap()).panels().len(), 3);
        assert!(TrainingCurves::default().svg().unwrap().contains("no step logged yet"));
    }
}
