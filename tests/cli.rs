//! The `rankstack` binary end to end: every subcommand, and errors as one line with a non-zero
//! exit code and no panic output.

mod support;

use support::cli::{fails, ok};

#[test]
fn version_and_help() {
    assert_eq!(ok(&["--version"]).trim(), format!("rankstack {}", env!("CARGO_PKG_VERSION")));
    let help = ok(&["--help"]);
    for sub in ["presets", "train", "eval", "score", "serve", "inspect", "data", "import"] {
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
    // The GPU's plans (`train --batch-size auto` on CUDA, f32 and bf16 autocast): the measured
    // activation factors, below 1, fit larger batches than the planner's own count, the batch
    // copied ahead included; bf16's smaller factor the largest.
    assert!(table.contains("one batch of inputs on the device: 0.007 GiB"), "{table}");
    let line = table.lines().find(|l| l.contains("the largest batch that fits is")).unwrap();
    let after = |marker: &str| -> usize {
        line.split(marker).nth(1).unwrap().split([' ', ',']).next().unwrap().parse().unwrap()
    };
    let (own, gpu, bf16) = (after("fits is "), after(" ("), after("GPU, "));
    assert!(own < gpu && gpu < bf16, "{table}");
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
    assert!(metrics.lines().count() == 7 && metrics.contains("closeup"), "{metrics}");
    assert!(metrics.contains("reliability") && dir.join("run/reliability-eval.svg").exists(), "{metrics}");
    assert!(dir.join("run/tensorboard").read_dir().unwrap().count() == 1);
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
}

#[test]
fn device_and_batch_size_options() {
    let dir = support::tmpdir("cli-device");
    let d = |f: &str| dir.join(f).display().to_string();
    ok(&["data", "synthetic", "--rows", "300", "--out", &d("train.parquet")]);
    ok(&["data", "synthetic", "--rows", "100", "--stream", "1", "--out", &d("eval.parquet")]);
    let train = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--preset",
            "mlp",
            "--data",
            &d("train.parquet"),
            "--eval",
            &d("eval.parquet"),
            "--out",
            &d(out),
            "--epochs",
            "1",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());
    let fail = |v: Vec<String>| fails(&v.iter().map(String::as_str).collect::<Vec<_>>());

    // --device cpu is the default and changes nothing; a bad name is a one-line error.
    assert!(run(train("cpu", &["--batch-size", "128", "--device", "cpu"])).contains("finished after 3 steps"));
    assert!(fail(train("bad", &["--device", "gpu0"])).contains("expected cpu, cuda or cuda:N"));
    // --init picks the initialisation convention (default layers); an unknown one is a one-line error.
    assert!(
        run(train("xavier", &["--batch-size", "128", "--init", "xavier-normal"])).contains("finished after 3 steps")
    );
    assert!(fail(train("badinit", &["--init", "glorot"])).contains("unknown initialisation `glorot`"));
    // CUDA in a CPU-only build says how to get it, for every command that takes --device.
    if !cfg!(feature = "cuda") {
        let msg = fail(train("cuda", &["--device", "cuda"]));
        assert!(msg.contains("built without CUDA") && msg.contains("--features cuda"), "{msg}");
        for cmd in [
            vec!["eval", "--checkpoint", &d("cpu"), "--data", &d("eval.parquet"), "--device", "cuda:1"],
            vec![
                "score",
                "--checkpoint",
                &d("cpu"),
                "--data",
                &d("eval.parquet"),
                "--out",
                &d("s.csv"),
                "--device",
                "cuda",
            ],
        ] {
            assert!(fails(&cmd).contains("built without CUDA"), "{cmd:?}");
        }
        assert!(!dir.join("cuda/checkpoints").exists() && !dir.join("s.csv").exists());
    }
    // bf16 training is GPU autocast: refused on the CPU with the alternative named.
    assert!(fail(train("bf16", &["--precision", "bf16"])).contains("--weights bf16"));
    // --batch-size auto: the planner's largest batch for the machine's memory, stated in the summary;
    // the run reports planned against measured peak memory in metrics.jsonl.
    let summary = run(train("auto", &["--batch-size", "auto", "--memory-fraction", "0.01"]));
    assert!(summary.contains("(auto): planned training memory"), "{summary}");
    let log = std::fs::read_to_string(dir.join("auto/metrics.jsonl")).unwrap();
    let memory = log.lines().find(|l| l.contains(r#""kind":"memory""#)).expect("a memory line");
    assert!(memory.contains("planned_bytes") && memory.contains("measured_peak_bytes"), "{memory}");
    assert!(fail(train("x", &["--batch-size", "lots"])).contains("`auto`"));
    assert!(fail(train("y", &["--batch-size", "auto", "--memory-fraction", "1.5"])).contains("memory-fraction"));
}
