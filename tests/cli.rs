//! The `rankstack` binary end to end: every subcommand, and errors as one line with a non-zero
//! exit code and no panic output.

mod support;

use std::process::{Command, Output};

fn rankstack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rankstack"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("run rankstack")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with the output unless the command succeeded.
fn ok(args: &[&str]) -> String {
    let o = rankstack(args);
    assert!(o.status.success(), "{args:?} failed:\n{}\n{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// The one-line error of a failing command.
fn fails(args: &[&str]) -> String {
    let o = rankstack(args);
    assert!(!o.status.success(), "{args:?} should fail:\n{}", stdout(&o));
    let err = stderr(&o);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{args:?}: panic output:\n{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line:\n{err}");
    err
}

#[test]
fn version_and_help() {
    assert_eq!(ok(&["--version"]).trim(), format!("rankstack {}", env!("CARGO_PKG_VERSION")));
    let help = ok(&["--help"]);
    for sub in ["presets", "train", "eval", "score", "serve", "inspect", "data"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[test]
fn presets_and_inspect() {
    let list = ok(&["presets"]);
    for name in rankstack::ranker_model::presets::NAMES {
        assert!(list.contains(name), "{list}");
    }
    let toml = ok(&["presets", "--show", "pinterest-baseline"]);
    assert!(rankstack::ranker_model::RankerConfig::from_toml_str(&toml).unwrap().input_skip);
    let table = ok(&["inspect", "--preset", "pinterest-homefeed", "--batch-size", "512", "--device-memory-gib", "80"]);
    assert!(table.contains("| total | 120137412 |") && table.contains("fits in 60% of 80 GiB"), "{table}");
    let tight = ok(&["inspect", "--preset", "pinterest-homefeed", "--batch-size", "4096", "--device-memory-gib", "1"]);
    assert!(tight.contains("does NOT fit"), "{tight}");
}

#[test]
fn data_train_eval_score_end_to_end() {
    let dir = support::tmpdir("cli");
    let d = |f: &str| dir.join(f).display().to_string();
    let out = ok(&["data", "synthetic", "--rows", "600", "--out", &d("train.parquet")]);
    assert!(out.contains("wrote 600 rows"), "{out}");
    ok(&["data", "synthetic", "--rows", "200", "--stream", "1", "--out", &d("eval.parquet")]);
    let summary = ok(&[
        "train",
        "--preset",
        "dcnv2",
        "--data",
        &d("train.parquet"),
        "--eval",
        &d("eval.parquet"),
        "--out",
        &d("run"),
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--quiet",
    ]);
    assert!(summary.contains("finished after 5 steps") && summary.contains("save"), "{summary}");
    assert!(dir.join("run/metrics.jsonl").exists() && dir.join("run/training_curves.svg").exists());
    let metrics = ok(&["eval", "--checkpoint", &d("run"), "--data", &d("eval.parquet")]);
    assert!(metrics.lines().count() == 6 && metrics.contains("closeup"), "{metrics}");
    ok(&["score", "--checkpoint", &d("run"), "--data", &d("eval.parquet"), "--out", &d("scores.csv")]);
    let csv = std::fs::read_to_string(dir.join("scores.csv")).unwrap();
    assert_eq!(csv.lines().next().unwrap(), "row,p_save,p_click,p_closeup,p_hide");
    assert_eq!(csv.lines().count(), 201);
    ok(&["score", "--checkpoint", &d("run"), "--data", &d("eval.parquet"), "--out", &d("scores.parquet")]);
    assert!(std::fs::metadata(dir.join("scores.parquet")).unwrap().len() > 0);

    // Errors: one line each, non-zero exit, no panic output.
    assert!(fails(&["eval", "--checkpoint", &d("nowhere"), "--data", &d("eval.parquet")]).contains("nowhere"));
    assert!(fails(&["score", "--checkpoint", &d("run"), "--data", &d("eval.parquet"), "--out", &d("s.txt")])
        .contains(".csv or .parquet"));
    assert!(fails(&["train", "--preset", "nope", "--out", &d("x")]).contains("unknown preset"));
    assert!(fails(&[
        "train",
        "--preset",
        "mlp",
        "--data",
        &d("train.parquet"),
        "--eval",
        &d("eval.parquet"),
        "--out",
        &d("run")
    ])
    .contains("already holds a training run"));
    std::fs::write(dir.join("broken.parquet"), b"not parquet").unwrap();
    assert!(fails(&["eval", "--checkpoint", &d("run"), "--data", &d("broken.parquet")]).contains("broken.parquet"));
    assert!(fails(&["--bogus"]).contains("--bogus"));
    std::fs::remove_dir_all(&dir).ok();
}
