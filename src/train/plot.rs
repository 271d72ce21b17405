//! Chart building blocks shared by the training curves ([`super::TrainingCurves`]) and the
//! reliability diagrams ([`super::Reliability`]): round axis ticks, a panel (title, legend
//! strip, axes, lines, markers, segments) drawn with `plotters`' SVG backend, and a page that lays
//! panels out in a grid.
//!
//! Layout rules a reader can rely on: ticks are 1, 2 or 5 × 10^k apart and labelled with exactly
//! the decimals that step needs (integer axes such as epochs only get integer ticks); the tick
//! count is the largest that keeps labels apart at the panel's size; the legend sits in its own
//! strip between the title and the plot, so it never covers a curve.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use rankstack_nn::{Error, Result};

/// One named series of `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

/// The tab10 palette (matplotlib's and TensorBoard's default): series `i` of every panel of a page
/// gets colour `i`, so a task keeps its colour across panels.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// Colour of series `i`.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// TensorBoard's scalar smoothing: a debiased exponential moving average
/// `s_t = w·s_{t−1} + (1 − w)·x_t`, divided by `1 − w^n` after `n` finite points (so the first
/// values are not pulled towards 0); `w = 0` is no smoothing. Non-finite points stay as they are
/// and do not enter the average.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let (mut last, mut n) = (0.0, 0);
    points
        .iter()
        .map(|&(x, y)| {
            if !y.is_finite() {
                return (x, y);
            }
            last = weight * last + (1.0 - weight) * y;
            n += 1;
            (x, last / (1.0 - weight.powi(n)))
        })
        .collect()
}

/// The smallest step of the form 1, 2 or 5 × 10^k that is at least `raw` (> 0).
pub fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut step = magnitude;
    for m in [1.0, 2.0, 5.0, 10.0] {
        step = m * magnitude;
        // Relative slack: `raw` computed as (hi − lo) / n may sit a rounding error above a nice value.
        if step >= raw * (1.0 - 1e-9) {
            break;
        }
    }
    step
}

/// Round tick values: multiples of a 1-2-5 step.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticks {
    /// Distance between ticks.
    pub step: f64,
    /// The ticks, ascending.
    pub values: Vec<f64>,
}

impl Ticks {
    /// Ticks `k·step` for every integer `k` with `lo ≤ k·step ≤ hi` (up to rounding).
    fn between(lo: f64, hi: f64, step: f64) -> Self {
        let first = (lo / step - 1e-9).ceil() as i64;
        let last = (hi / step + 1e-9).floor() as i64;
        // Each tick is an integer times the step, so labels print without accumulated error.
        let values = (first..=last).map(|k| k as f64 * step).collect();
        Self { step, values }
    }

    /// The labels, each with the decimals the step needs.
    pub fn labels(&self) -> Vec<String> {
        self.values.iter().map(|&v| tick_label(v, self.step)).collect()
    }
}

/// The label of tick `value` on an axis with ticks `step` apart: fixed-point with as many decimals
/// as the step has (`0.25` → 2), or `2e-5`-style scientific notation for steps below 1e-4.
pub fn tick_label(value: f64, step: f64) -> String {
    let value = if value.abs() < step * 1e-6 { 0.0 } else { value };
    let step_exponent = step.log10().floor() as i32;
    if step >= 1e-4 {
        let decimals = (-step_exponent).max(0) as usize;
        return format!("{value:.decimals$}");
    }
    if value == 0.0 {
        return "0".to_string();
    }
    let digits = (value.abs().log10().floor() as i32 - step_exponent).max(0) as usize;
    format!("{value:.digits$e}")
}

/// One axis: its range and its ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// Drawn range.
    pub range: (f64, f64),
    /// Labelled ticks inside the range.
    pub ticks: Ticks,
}

/// An [`Axis`] as a plotters coordinate: linear over the range, with exactly our ticks as its key
/// points (plotters' own `WithKeyPoints` cannot take a label formatter for `f64` axes).
struct TickedRange {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl From<&Axis> for TickedRange {
    fn from(axis: &Axis) -> Self {
        Self { linear: (axis.range.0..axis.range.1).into(), ticks: axis.ticks.values.clone() }
    }
}

impl Ranged for TickedRange {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Grid lines at the labelled ticks only (no light lines in between).
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

/// How an axis fits its data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AxisKind {
    /// The range ends at the ticks just outside the data.
    Enclosing,
    /// Integer ticks only; the range is the data ± ½ (so points at the ends are not on the frame).
    Integer,
}

/// Rough width of a label in pixels at `font_px` (proportional sans-serif digits).
pub fn label_width(text: &str, font_px: f64) -> f64 {
    text.chars().count() as f64 * 0.6 * font_px
}

/// Minimum gap between two labels along an axis, pixels.
const LABEL_GAP: f64 = 10.0;

impl Axis {
    /// The axis over `[lo, hi]` with as many ticks as fit into `pixels`: horizontal axes space
    /// labels by their width, vertical ones by 2.5 line heights.
    pub fn fit(lo: f64, hi: f64, kind: AxisKind, pixels: f64, horizontal: bool, font_px: f64) -> Self {
        let (lo, hi) = widen(lo, hi, kind);
        let mut chosen = None;
        for max_ticks in (2..=10).rev() {
            let axis = Self::with_at_most(lo, hi, kind, max_ticks);
            let range = axis.range.1 - axis.range.0;
            let spacing = pixels * axis.ticks.step / range;
            let needed = if horizontal {
                axis.ticks.labels().iter().map(|l| label_width(l, font_px)).fold(0.0, f64::max) + LABEL_GAP
            } else {
                2.5 * font_px
            };
            let fits = spacing >= needed;
            chosen = Some(axis);
            if fits {
                break;
            }
        }
        chosen.expect("at least one candidate")
    }

    fn with_at_most(lo: f64, hi: f64, kind: AxisKind, max_ticks: usize) -> Self {
        let mut step = nice_step((hi - lo) / max_ticks as f64);
        match kind {
            AxisKind::Enclosing => {
                let range = ((lo / step + 1e-9).floor() * step, (hi / step - 1e-9).ceil() * step);
                Self { range, ticks: Ticks::between(range.0, range.1, step) }
            }
            AxisKind::Integer => {
                step = step.max(1.0).round();
                let range = (lo - 0.5, hi + 0.5);
                Self { range, ticks: Ticks::between(lo, hi, step) }
            }
        }
    }
}

/// A non-empty interval around `[lo, hi]` (a single value gets a neighbourhood).
fn widen(lo: f64, hi: f64, kind: AxisKind) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi > lo || kind == AxisKind::Integer {
        return (lo, hi);
    }
    let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
    (lo - pad, hi + pad)
}

/// How a line is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stroke {
    /// Thin and translucent: raw values behind their smoothed curve.
    Faint,
    /// The main curve.
    Solid,
    /// The main curve with a dot at every point (few points, e.g. one per epoch).
    Markers,
    /// Dots only.
    Dots,
    /// A thin grey reference (the diagonal of a reliability diagram, calibration = 1).
    Reference,
    /// `y = x` across the whole plot, drawn like `Reference` (the line's points only widen the
    /// axes): the ideal of a reliability diagram.
    Diagonal,
}

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend label (`None`: not in the legend).
    pub name: Option<String>,
    /// Points in x order; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// Colour.
    pub color: RGBColor,
    /// Style.
    pub stroke: Stroke,
}

/// A vertical or slanted segment in data coordinates (error bars).
#[derive(Debug, Clone)]
pub struct Segment {
    /// Start and end.
    pub ends: ((f64, f64), (f64, f64)),
    /// Colour.
    pub color: RGBColor,
}

/// One chart of a page.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the legend.
    pub title: String,
    /// X-axis caption.
    pub x_label: String,
    /// Y-axis caption (empty: none).
    pub y_label: String,
    /// How the x axis fits the data.
    pub x_kind: AxisKind,
    /// Values the axes must include besides the data (e.g. 0, or the corners of a diagonal).
    pub include: Vec<(f64, f64)>,
    /// Lines, drawn in order.
    pub lines: Vec<Line>,
    /// Extra segments (error bars).
    pub segments: Vec<Segment>,
    /// Lines of text under the legend (e.g. counts).
    pub notes: Vec<String>,
    /// Shown instead of a plot when the panel has no finite point.
    pub empty_note: String,
}

/// Pixel sizes of the text on a page (SVG `font-size`).
const TITLE_PX: f64 = 13.0;
const TICK_PX: f64 = 11.0;
const LEGEND_PX: f64 = 11.0;
const LEGEND_ROW: f64 = 15.0;
const X_LABEL_AREA: f64 = 38.0;
const MARGIN: f64 = 12.0;
/// Right margin of a plot: room for half of the last x label, which is centred on the edge.
const RIGHT_MARGIN: f64 = 24.0;

/// plotters scales text sizes by 1/1.24 in SVG: this is the size that prints as `px`.
fn font(px: f64) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", px * 1.24))
}

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::input("plot", "svg", e.to_string())
}

impl Panel {
    fn finite_points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.lines
            .iter()
            .flat_map(|l| l.points.iter().copied())
            .chain(self.segments.iter().flat_map(|s| [s.ends.0, s.ends.1]))
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    }

    fn has_data(&self) -> bool {
        let reference = |l: &&Line| matches!(l.stroke, Stroke::Reference | Stroke::Diagonal);
        self.lines.iter().filter(|l| !reference(l)).any(|l| l.points.iter().any(|p| p.1.is_finite()))
    }

    /// Legend rows: entries packed left to right, wrapping at `width`.
    fn legend_rows(&self, width: f64) -> Vec<Vec<(String, RGBColor, Stroke)>> {
        let mut rows: Vec<Vec<(String, RGBColor, Stroke)>> = Vec::new();
        let mut used = f64::INFINITY;
        for line in &self.lines {
            let Some(name) = &line.name else { continue };
            let w = legend_entry_width(name);
            if used + w > width {
                rows.push(Vec::new());
                used = 0.0;
            }
            rows.last_mut().expect("a row was pushed").push((name.clone(), line.color, line.stroke));
            used += w;
        }
        rows
    }

    /// Draws the panel into `area`.
    pub fn draw(&self, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<()> {
        let width = area.dim_in_pixel().0 as f64;
        let area = area.titled(&self.title, font(TITLE_PX)).map_err(plot_error)?;
        let rows = self.legend_rows(width - 2.0 * MARGIN);
        let legend_height = (rows.len() + self.notes.len()) as f64 * LEGEND_ROW + 4.0;
        let (legend, chart_area) = area.split_vertically(legend_height as i32);
        for (r, row) in rows.iter().enumerate() {
            let y = (r as f64 * LEGEND_ROW + LEGEND_ROW / 2.0) as i32;
            let mut x = MARGIN;
            for (name, color, stroke) in row {
                let style = match stroke {
                    Stroke::Faint => color.mix(0.45).stroke_width(1),
                    Stroke::Reference | Stroke::Diagonal => RGBColor(0x99, 0x99, 0x99).stroke_width(1),
                    _ => color.stroke_width(2),
                };
                legend.draw(&PathElement::new(vec![(x as i32, y), (x as i32 + 18, y)], style)).map_err(plot_error)?;
                let text = font(LEGEND_PX).pos(Pos::new(HPos::Left, VPos::Center));
                legend.draw(&Text::new(name.clone(), (x as i32 + 22, y), text)).map_err(plot_error)?;
                x += legend_entry_width(name);
            }
        }
        for (r, note) in self.notes.iter().enumerate() {
            let y = ((rows.len() + r) as f64 * LEGEND_ROW + LEGEND_ROW / 2.0) as i32;
            let text = font(LEGEND_PX).pos(Pos::new(HPos::Left, VPos::Center)).color(&RGBColor(0x55, 0x55, 0x55));
            legend.draw(&Text::new(note.clone(), (MARGIN as i32, y), text)).map_err(plot_error)?;
        }
        if !self.has_data() {
            let (w, h) = chart_area.dim_in_pixel();
            let text = font(LEGEND_PX).pos(Pos::new(HPos::Center, VPos::Center)).color(&RGBColor(0x66, 0x66, 0x66));
            chart_area
                .draw(&Text::new(self.empty_note.clone(), (w as i32 / 2, h as i32 / 2), text))
                .map_err(plot_error)?;
            return Ok(());
        }
        self.draw_chart(&chart_area)
    }

    fn draw_chart(&self, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<()> {
        let (width, height) = area.dim_in_pixel();
        let (width, height) = (width as f64, height as f64);
        let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) =
            (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for (x, y) in self.finite_points().chain(self.include.iter().copied()) {
            (x_lo, x_hi, y_lo, y_hi) = (x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y));
        }
        let y_desc_width = if self.y_label.is_empty() { 0.0 } else { TICK_PX + 8.0 };
        let plot_height = height - X_LABEL_AREA - MARGIN - 10.0;
        let y_axis = Axis::fit(y_lo, y_hi, AxisKind::Enclosing, plot_height, false, TICK_PX);
        let y_labels_width =
            y_axis.ticks.labels().iter().map(|l| label_width(l, TICK_PX)).fold(0.0, f64::max) + 12.0 + y_desc_width;
        let plot_width = width - y_labels_width - MARGIN - RIGHT_MARGIN;
        let x_axis = Axis::fit(x_lo, x_hi, self.x_kind, plot_width, true, TICK_PX);

        let mut chart = ChartBuilder::on(area)
            .margin_left(MARGIN as i32)
            .margin_right(RIGHT_MARGIN as i32)
            .margin_top(10)
            .x_label_area_size(X_LABEL_AREA as i32)
            .y_label_area_size(y_labels_width as i32)
            .build_cartesian_2d(TickedRange::from(&x_axis), TickedRange::from(&y_axis))
            .map_err(plot_error)?;
        let (x_step, y_step) = (x_axis.ticks.step, y_axis.ticks.step);
        let x_format = move |v: &f64| tick_label(*v, x_step);
        let y_format = move |v: &f64| tick_label(*v, y_step);
        let mut mesh = chart.configure_mesh();
        mesh.bold_line_style(RGBColor(0xe4, 0xe4, 0xe4).stroke_width(1))
            .axis_style(RGBColor(0x88, 0x88, 0x88))
            .label_style(font(TICK_PX))
            .axis_desc_style(font(TICK_PX))
            .x_label_formatter(&x_format)
            .y_label_formatter(&y_format)
            .x_desc(self.x_label.clone());
        if !self.y_label.is_empty() {
            mesh.y_desc(self.y_label.clone());
        }
        mesh.draw().map_err(plot_error)?;

        let grey = RGBColor(0x99, 0x99, 0x99).stroke_width(1);
        for line in &self.lines {
            if line.stroke == Stroke::Diagonal {
                let lo = x_axis.range.0.max(y_axis.range.0);
                let hi = x_axis.range.1.min(y_axis.range.1);
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(lo, lo), (hi, hi)], grey)))
                    .map_err(plot_error)?;
                continue;
            }
            // A non-finite value breaks the line instead of joining its neighbours.
            for run in line.points.split(|p| !(p.0.is_finite() && p.1.is_finite())).filter(|r| r.len() > 1) {
                let style = match line.stroke {
                    Stroke::Faint => line.color.mix(0.45).stroke_width(1),
                    Stroke::Reference | Stroke::Diagonal => grey,
                    Stroke::Solid | Stroke::Markers => line.color.stroke_width(2),
                    Stroke::Dots => continue,
                };
                chart.draw_series(std::iter::once(PathElement::new(run.to_vec(), style))).map_err(plot_error)?;
            }
            if matches!(line.stroke, Stroke::Markers | Stroke::Dots) {
                let dots = line.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite());
                chart.draw_series(dots.map(|&p| Circle::new(p, 3, line.color.filled()))).map_err(plot_error)?;
            }
        }
        for s in &self.segments {
            chart
                .draw_series(std::iter::once(PathElement::new(vec![s.ends.0, s.ends.1], s.color.stroke_width(1))))
                .map_err(plot_error)?;
        }
        Ok(())
    }
}

fn legend_entry_width(name: &str) -> f64 {
    22.0 + label_width(name, LEGEND_PX) + 16.0
}

/// Renders `panels` in a grid of `columns`, each `panel_size` pixels, as one SVG document. Each
/// panel is its own nested `<svg>` element, so a reader (or a test) can take one panel apart.
pub fn page(panels: &[Panel], columns: usize, panel_size: (u32, u32)) -> Result<String> {
    let columns = columns.clamp(1, panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let (w, h) = panel_size;
    let (page_w, page_h) = (w * columns as u32, h * rows as u32);
    let mut out = format!(
        r#"<svg width="{page_w}" height="{page_h}" viewBox="0 0 {page_w} {page_h}" xmlns="http://www.w3.org/2000/svg">
<rect width="{page_w}" height="{page_h}" fill="white"/>
"#
    );
    for (i, panel) in panels.iter().enumerate() {
        let mut svg = String::new();
        {
            let area = SVGBackend::with_string(&mut svg, panel_size).into_drawing_area();
            panel.draw(&area)?;
            area.present().map_err(plot_error)?;
        }
        let (x, y) = ((i % columns) as u32 * w, (i / columns) as u32 * h);
        // plotters writes `<svg width=.. height=.. viewBox=.. xmlns=..>`; placing it is an x/y.
        let placed = svg.replacen("<svg ", &format!(r#"<svg x="{x}" y="{y}" "#), 1);
        out.push_str(placed.trim_end());
        out.push('\n');
    }
    out.push_str("</svg>\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_tensorboards_debiased_ema() {
        // Constant input stays constant from the first point (debiasing).
        let s = smooth(&[(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)], 0.6);
        assert!(s.iter().all(|p| (p.1 - 2.0).abs() < 1e-12), "{s:?}");
        // By hand: x = 1, 0 with w = 0.6: s1 = 0.4·1 / 0.4 = 1; s2 = (0.6·0.4) / (1 − 0.36) = 0.375.
        let s = smooth(&[(0.0, 1.0), (1.0, 0.0)], 0.6);
        assert!((s[0].1 - 1.0).abs() < 1e-12 && (s[1].1 - 0.375).abs() < 1e-12, "{s:?}");
        // A non-finite point passes through and does not poison the average.
        let s = smooth(&[(0.0, 1.0), (1.0, f64::NAN), (2.0, 1.0)], 0.6);
        assert!(s[1].1.is_nan() && (s[2].1 - 1.0).abs() < 1e-12);
        assert_eq!(smooth(&[(0.0, 3.0), (1.0, 5.0)], 0.0), vec![(0.0, 3.0), (1.0, 5.0)]);
    }

    #[test]
    fn steps_are_one_two_five() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(1.01), 2.0);
        assert_eq!(nice_step(0.04), 0.05);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(0.6 / 3.0), 0.2); // 0.19999999999999998
    }

    #[test]
    fn labels_carry_the_decimals_of_the_step() {
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(tick_label(2.0, 0.5), "2.0");
        assert_eq!(tick_label(150.0, 50.0), "150");
        assert_eq!(tick_label(-1e-17, 0.05), "0.00");
        assert_eq!(tick_label(4e-5, 2e-5), "4e-5");
        assert_eq!(tick_label(1.2e-5, 2e-6), "1.2e-5");
        assert_eq!(tick_label(0.0, 2e-6), "0");
    }

    #[test]
    fn integer_axes_tick_integers_only_and_a_single_point_gets_a_range() {
        let a = Axis::fit(1.0, 3.0, AxisKind::Integer, 300.0, true, 11.0);
        assert_eq!(a.ticks.values, vec![1.0, 2.0, 3.0]);
        assert_eq!(a.range, (0.5, 3.5));
        let a = Axis::fit(1.0, 1.0, AxisKind::Integer, 300.0, true, 11.0);
        assert_eq!(a.ticks.values, vec![1.0]);
        let a = Axis::fit(0.7624, 0.7624, AxisKind::Enclosing, 200.0, false, 11.0);
        assert!(a.range.0 < 0.7624 && a.range.1 > 0.7624 && a.ticks.values.len() >= 2, "{a:?}");
        // A narrow axis gets fewer ticks than a wide one, never overlapping labels.
        let wide = Axis::fit(0.0, 12345.0, AxisKind::Enclosing, 600.0, true, 11.0);
        let narrow = Axis::fit(0.0, 12345.0, AxisKind::Enclosing, 120.0, true, 11.0);
        assert!(narrow.ticks.values.len() < wide.ticks.values.len(), "{narrow:?} {wide:?}");
    }
}
