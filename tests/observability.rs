//! Watching a run: the training curves' axes, the TensorBoard event files (read back by the real
//! `tensorboard` package and compared with `metrics.jsonl`, across an interrupted and resumed run),
//! and `eval`'s reliability diagrams.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rankstack::nn::packed_matmul::WeightPrecision;
use rankstack::train::{TrainOptions, Trainer, RELIABILITY_MARKER};
use serde_json::Value;
use support::{tiny_config, tmpdir, write_data};

fn options() -> TrainOptions {
    TrainOptions {
        epochs: 3,
        batch_size: 128,
        warmup_steps: 4,
        log_every: 2,
        quiet: true,
        seed: 3,
        ..Default::default()
    }
}

/// One `<text>` element of an SVG: its attributes and its content.
#[derive(Debug)]
struct Text {
    x: f64,
    y: f64,
    anchor: String,
    font_size: f64,
    rotated: bool,
    content: String,
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(tag[start..start + tag[start..].find('"')?].to_string())
}

fn texts(svg: &str) -> Vec<Text> {
    svg.split("<text")
        .skip(1)
        .map(|rest| {
            let (tag, after) = rest.split_once('>').unwrap();
            let content = after.split_once("</text>").unwrap().0.trim().to_string();
            let num = |n: &str| attribute(tag, n).unwrap().parse::<f64>().unwrap();
            Text {
                x: num("x"),
                y: num("y"),
                anchor: attribute(tag, "text-anchor").unwrap(),
                font_size: num("font-size"),
                rotated: tag.contains("transform="),
                content,
            }
        })
        .collect()
}

/// Checks one axis's tick labels: unique, evenly spaced by 1, 2 or 5 × 10^k, each a multiple of the
/// step (integers where `integer`), printed without excess digits; returns the values.
fn check_ticks(labels: &[&Text], integer: bool, what: &str) -> Vec<f64> {
    let values: Vec<f64> = labels.iter().map(|t| t.content.parse().unwrap()).collect();
    let mut unique: Vec<&str> = labels.iter().map(|t| t.content.as_str()).collect();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), labels.len(), "{what}: duplicated tick labels {values:?}");
    if integer {
        assert!(values.iter().all(|v| v.fract() == 0.0), "{what}: non-integer ticks {values:?}");
    }
    if values.len() < 2 {
        return values;
    }
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    let step = sorted[1] - sorted[0];
    let mantissa = step / 10f64.powf(step.log10().floor());
    assert!(
        [1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-6),
        "{what}: step {step} is not 1, 2 or 5 x 10^k ({values:?})"
    );
    for pair in sorted.windows(2) {
        assert!(((pair[1] - pair[0]) / step - 1.0).abs() < 1e-6, "{what}: uneven ticks {values:?}");
    }
    for (label, v) in labels.iter().zip(&values) {
        assert!(((v / step).round() - v / step).abs() < 1e-6, "{what}: {v} is not a multiple of {step}");
        // No more decimals than the step needs ("0.7624" on a 0.05 grid would fail here).
        let decimals = label.content.split_once('.').map_or(0, |(_, d)| d.len());
        let needed = (-step.log10().floor()).max(0.0) as usize;
        assert!(decimals <= needed, "{what}: label {} for step {step}", label.content);
    }
    values
}

/// Every panel's tick labels are unique and round, horizontal labels do not overlap, and the
/// legend sits above the plot.
fn check_axes(svg: &str) -> usize {
    let panels: Vec<&str> = svg.split("<svg x=").skip(1).collect();
    for panel in &panels {
        let texts = texts(panel);
        let title = texts.first().map(|t| t.content.clone()).unwrap_or_default();
        let numeric = |t: &&Text| t.content.parse::<f64>().is_ok() && !t.rotated;
        let x_ticks: Vec<&Text> = texts.iter().filter(|t| t.anchor == "middle").filter(numeric).collect();
        let y_ticks: Vec<&Text> = texts.iter().filter(|t| t.anchor == "end").filter(numeric).collect();
        if x_ticks.is_empty() {
            assert!(panel.contains("no "), "{title}: no ticks and no note");
            continue;
        }
        let integer = panel.contains(">epoch</text>");
        check_ticks(&x_ticks, integer, &format!("{title} x"));
        check_ticks(&y_ticks, false, &format!("{title} y"));
        assert!(x_ticks.windows(2).all(|w| w[0].y == w[1].y), "{title}: x labels on one line");
        let mut by_x: Vec<&&Text> = x_ticks.iter().collect();
        by_x.sort_by(|a, b| a.x.total_cmp(&b.x));
        for w in by_x.windows(2) {
            let half_widths = 0.55 * w[0].font_size * (w[0].content.len() + w[1].content.len()) as f64 / 2.0;
            assert!(w[1].x - w[0].x > half_widths, "{title}: labels {} and {} overlap", w[0].content, w[1].content);
        }
        let plot_top = y_ticks.iter().map(|t| t.y).fold(f64::INFINITY, f64::min);
        for legend in texts.iter().filter(|t| t.anchor == "start") {
            assert!(legend.y + 6.0 < plot_top, "{title}: legend `{}` inside the plot", legend.content);
        }
    }
    panels.len()
}

fn metrics_lines(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn training_curves_have_unique_round_ticks_and_eval_writes_reliability_diagrams() {
    let dir = tmpdir("curves");
    let (train, eval) = write_data(&dir, 1000, 300);
    let run = dir.join("run");
    let mut trainer = Trainer::new(&tiny_config(&train), options(), &run).unwrap();
    trainer.fit(&train, Some(&eval)).unwrap();

    let svg = std::fs::read_to_string(run.join("training_curves.svg")).unwrap();
    assert_eq!(check_axes(&svg), 6, "{svg}");
    for title in ["training loss", "learning rate", "gradient norm", "evaluation AUC", "evaluation log loss"] {
        assert!(svg.contains(title), "{title}");
    }
    assert!(svg.contains("smoothed (0.6)") && svg.contains("\nraw\n</text>"));

    // `eval` writes one diagram per task beside the checkpoint, replaces its own file, and never a
    // user's.
    let tasks = ["save", "click", "closeup", "hide"];
    let eval_path = dir.join("eval.parquet");
    let out = rankstack::commands::eval(
        &run,
        &eval_path,
        256,
        WeightPrecision::F32,
        rankstack::device::DeviceSpec::Cpu,
        None,
    )
    .unwrap();
    let plot = run.join("reliability-eval.svg");
    assert!(out.contains(&plot.display().to_string()), "{out}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with(RELIABILITY_MARKER));
    assert_eq!(check_axes(&svg), tasks.len());
    for task in tasks {
        assert!(svg.contains(&format!("{task}: calibration by decile")), "{task}");
    }
    assert!(svg.contains("300 labelled rows") && svg.contains("in 10 bins of 30 rows"), "{svg}");
    rankstack::commands::eval(&run, &eval_path, 256, WeightPrecision::F32, rankstack::device::DeviceSpec::Cpu, None)
        .unwrap();
    let elsewhere = dir.join("plots");
    rankstack::commands::eval(
        &run,
        &eval_path,
        256,
        WeightPrecision::F32,
        rankstack::device::DeviceSpec::Cpu,
        Some(&elsewhere),
    )
    .unwrap();
    assert!(elsewhere.join("reliability-eval.svg").exists());
    std::fs::write(&plot, "my notes").unwrap();
    let err = rankstack::commands::eval(
        &run,
        &eval_path,
        256,
        WeightPrecision::F32,
        rankstack::device::DeviceSpec::Cpu,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("reliability-eval.svg") && err.contains("not written by rankstack eval"), "{err}");
    assert_eq!(std::fs::read_to_string(&plot).unwrap(), "my notes");
}

/// The venv with the pinned `tensorboard` package that `cargo xtask verify` creates
/// (`cargo xtask tensorboard-venv` creates only it). Under CI a missing venv fails the test.
fn tensorboard_python() -> Option<PathBuf> {
    let python = match std::env::var_os("RANKSTACK_TENSORBOARD_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tensorboard-venv/bin/python"),
    };
    if python.exists() {
        return Some(python);
    }
    let why = format!("no TensorBoard venv at {} (create it: cargo xtask tensorboard-venv)", python.display());
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{why}; CI must run this test");
    eprintln!("skipping the TensorBoard read-back: {why}");
    None
}

/// Every scalar of the run's event files as TensorBoard's `EventAccumulator` reads them:
/// tag → [(step, value)] (the stored f32, which Python prints exactly as a double).
fn read_with_tensorboard(python: &Path, logdir: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator
acc = event_accumulator.EventAccumulator(sys.argv[1], size_guidance={event_accumulator.SCALARS: 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = std::process::Command::new(python).arg("-c").arg(script).arg(logdir).output().unwrap();
    assert!(out.status.success(), "tensorboard: {}", String::from_utf8_lossy(&out.stderr));
    let read: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&out.stdout).unwrap();
    // serde_json may parse a double one unit in the last place off; the f32 it rounds to is exact.
    read.into_iter().map(|(tag, points)| (tag, points.into_iter().map(|(s, v)| (s, v as f32)).collect())).collect()
}

/// What `metrics.jsonl` says each TensorBoard tag must hold (values as the f32 the format stores).
fn expected_scalars(lines: &[Value]) -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut expected: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    let mut put = |tag: String, step: u64, v: &Value| {
        if let Some(v) = v.as_f64() {
            expected.entry(tag).or_default().push((step, v as f32));
        }
    };
    for line in lines {
        let step = line["step"].as_u64().unwrap();
        if line["kind"] == "train" {
            for field in ["loss", "lr", "grad_norm", "examples_per_second", "input_wait_fraction"] {
                put(format!("train/{field}"), step, &line[field]);
            }
        } else if line["kind"] == "memory" {
            for field in ["planned_bytes", "measured_peak_bytes"] {
                put(format!("memory/{field}"), step, &line[field]);
            }
        } else {
            put("eval/loss".into(), step, &line["loss"]);
            for task in line["tasks"].as_array().unwrap() {
                for metric in ["auc", "log_loss", "normalized_entropy", "calibration"] {
                    put(format!("eval/{}/{metric}", task[0].as_str().unwrap()), step, &task[1][metric]);
                }
            }
        }
    }
    expected
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn tensorboard_reads_back_every_scalar_of_metrics_jsonl_across_a_crash_and_resume() {
    let Some(python) = tensorboard_python() else { return };
    let dir = tmpdir("tensorboard");
    let (train, eval) = write_data(&dir, 1000, 300);
    let run = dir.join("run");
    let config = tiny_config(&train);

    // Checkpoint at step 5 and keep a copy of it; go on to step 12 (logging 6..12 and the first
    // evaluation); then "crash" back to the step-5 checkpoint, as if the later checkpoints were
    // lost, and resume to the end. TensorBoard must show one run: the points the lost session
    // logged after step 5 retracted, exactly as metrics.jsonl is truncated.
    let mut t = Trainer::new(&config, TrainOptions { stop_after: Some(5), ..options() }, &run).unwrap();
    assert!(t.fit(&train, Some(&eval)).unwrap().interrupted);
    let latest = std::fs::read_to_string(run.join("LATEST")).unwrap();
    copy_dir(&run.join(latest.trim()), &dir.join("saved"));
    let mut t = Trainer::resume(&run, TrainOptions { stop_after: Some(12), ..options() }).unwrap();
    assert_eq!(t.fit(&train, Some(&eval)).unwrap().steps, 12);
    let before_crash = metrics_lines(&run);
    assert!(before_crash.iter().any(|l| l["kind"] == "eval" && l["step"] == 8), "an evaluation after step 5");
    copy_dir(&dir.join("saved"), &run.join(latest.trim()));
    std::fs::write(run.join("LATEST"), &latest).unwrap();
    let mut t = Trainer::resume(&run, options()).unwrap();
    assert_eq!(t.step(), 5);
    assert_eq!(t.fit(&train, Some(&eval)).unwrap().steps, 24);

    let lines = metrics_lines(&run);
    let expected = expected_scalars(&lines);
    let logged = read_with_tensorboard(&python, &run.join("tensorboard"));
    assert_eq!(logged.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (tag, points) in &expected {
        assert_eq!(&logged[tag], points, "{tag}");
    }
    // Three sessions, three files; the training steps read 2, 4, ..., 24 once each; three evaluations.
    assert_eq!(std::fs::read_dir(run.join("tensorboard")).unwrap().count(), 3);
    let steps: Vec<u64> = logged["train/loss"].iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=12).map(|k| 2 * k).collect::<Vec<_>>());
    assert_eq!(logged["eval/save/auc"].len(), 3);
    // `tensorboard --logdir OUT` finds the run there (the directory holds event files only).
    assert!(logged["train/grad_norm"].iter().all(|p| p.1.is_finite() && p.1 > 0.0));

    // A fresh run in the same directory (after removing the checkpoints) starts a fresh log.
    std::fs::remove_file(run.join("LATEST")).unwrap();
    let mut t = Trainer::new(&config, TrainOptions { stop_after: Some(2), ..options() }, &run).unwrap();
    t.fit(&train, Some(&eval)).unwrap();
    let logged = read_with_tensorboard(&python, &run.join("tensorboard"));
    assert_eq!(logged["train/loss"].iter().map(|p| p.0).collect::<Vec<_>>(), vec![2]);
}
