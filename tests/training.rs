//! The trainer end to end on small synthetic data: bit-identical reproducibility, exact resume,
//! atomic checkpoints, non-finite loss handling, the metrics log and the curves.

mod support;

use rankstack::train::{latest_checkpoint, AdamWConfig, TrainOptions, Trainer};
use support::{latest_weights, tiny_config, tmpdir, write_data};

fn options() -> TrainOptions {
    TrainOptions { epochs: 2, batch_size: 128, warmup_steps: 5, quiet: true, seed: 7, ..TrainOptions::default() }
}

#[test]
fn same_seed_and_data_give_bit_identical_checkpoints_and_resume_is_exact() {
    let dir = tmpdir("repro");
    let (train, eval) = write_data(&dir, 1000, 300);
    let config = tiny_config(&train);

    let run = |name: &str, opts: TrainOptions| {
        let mut t = Trainer::new(&config, opts, dir.join(name)).unwrap();
        t.fit(&train, Some(&eval)).unwrap()
    };
    let a = run("a", options());
    let b = run("b", options());
    assert_eq!(a.steps, 16); // 2 epochs x ceil(1000 / 128)
    assert_eq!(latest_weights(&dir.join("a")), latest_weights(&dir.join("b")));
    assert_eq!(a.evaluations, b.evaluations);
    let other_seed = run("c", TrainOptions { seed: 8, ..options() });
    assert_ne!(latest_weights(&dir.join("a")), latest_weights(&dir.join("c")));
    assert_eq!(other_seed.steps, 16);

    // Stop after step 5 (mid-epoch), resume, and land on the same weights as the uninterrupted run.
    let stopped = run("r", TrainOptions { stop_after: Some(5), ..options() });
    assert!(stopped.interrupted && stopped.steps == 5);
    let mut resumed = Trainer::resume(dir.join("r"), options()).unwrap();
    assert_eq!(resumed.step(), 5);
    let finished = resumed.fit(&train, Some(&eval)).unwrap();
    assert_eq!(finished.steps, 16);
    assert_eq!(latest_weights(&dir.join("r")), latest_weights(&dir.join("a")));

    // The log reads as one run: 16 steps logged every 10 (and at the end), one eval per epoch.
    let log = std::fs::read_to_string(dir.join("r/metrics.jsonl")).unwrap();
    let kinds: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "eval").count(), 2, "{log}");
    // Every train line carries the gradient norm of its step (before clipping; none is set here).
    for line in log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
        if line["kind"] == "train" {
            let norm = line["grad_norm"].as_f64().unwrap_or(f64::NAN);
            assert!(norm.is_finite() && norm > 0.0, "{line}");
        }
    }
    let svg = std::fs::read_to_string(dir.join("r/training_curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("evaluation AUC"));
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = tmpdir("nonfinite");
    let (train, _) = write_data(&dir, 600, 100);
    let config = tiny_config(&train);
    // An absurd learning rate without clipping: the first update blows the weights up to ~1e30.
    let opts = TrainOptions {
        optimizer: AdamWConfig { lr: 1e30, ..AdamWConfig::default() },
        grad_clip_norm: None,
        warmup_steps: 1,
        checkpoint_every: Some(1),
        ..options()
    };
    let mut t = Trainer::new(&config, opts, dir.join("run")).unwrap();
    let err = t.fit(&train, None).unwrap_err().to_string();
    assert!(err.contains("non-finite loss") && err.contains("at step 2"), "{err}");
    let latest = latest_checkpoint(&dir.join("run")).unwrap().unwrap();
    assert!(latest.ends_with("step-000000001"), "{}", latest.display());
    assert!(err.contains("step-000000001"), "{err}");
}

#[test]
fn a_new_run_refuses_a_directory_that_holds_one_and_bad_options_are_errors() {
    let dir = tmpdir("refuse");
    let (train, _) = write_data(&dir, 300, 100);
    let config = tiny_config(&train);
    let mut t = Trainer::new(&config, TrainOptions { max_steps: Some(1), ..options() }, dir.join("run")).unwrap();
    t.fit(&train, None).unwrap();
    let e = Trainer::new(&config, options(), dir.join("run")).err().unwrap().to_string();
    assert!(e.contains("already holds a training run"), "{e}");
    let e =
        Trainer::new(&config, TrainOptions { batch_size: 0, ..options() }, dir.join("x")).err().unwrap().to_string();
    assert!(e.contains("batch_size"), "{e}");
    let e = Trainer::resume(dir.join("nothing"), options()).err().unwrap().to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

/// `TrainOptions::init` picks the initial weights' convention: `layers` (the default) keeps each
/// layer's own (feature tables `N(0, 1/dim)`); Xavier-normal draws a `[rows, dim]` feature table
/// with std `sqrt(2 / (rows + dim))`.
#[test]
fn the_init_option_chooses_the_initial_weights_convention() {
    use rankstack::nn::InitScheme;
    let dir = tmpdir("init");
    let (train, _) = write_data(&dir, 300, 100);
    let config = tiny_config(&train);
    assert_eq!(TrainOptions::default().init, InitScheme::Layers);
    let std_of = |init: InitScheme, name: &str| {
        let t = Trainer::new(&config, TrainOptions { init, ..options() }, dir.join(init.name())).unwrap();
        let (_, var) = t.store().named_vars().into_iter().find(|(n, _)| n == name).unwrap();
        let v: Vec<f64> =
            var.as_tensor().flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap();
        let (rows, dim) = var.as_tensor().dims2().unwrap_or((v.len(), 1));
        ((v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt(), rows, dim)
    };
    let table = config
        .features
        .sparse
        .iter()
        .max_by_key(|f| f.num_rows())
        .map(|f| format!("features.sparse.{}.weight", f.name))
        .expect("the tiny config has a sparse feature");
    let (xavier, rows, dim) = std_of(InitScheme::XavierNormal, &table);
    let (layers, _, _) = std_of(InitScheme::Layers, &table);
    let expected = (2.0 / (rows + dim) as f64).sqrt();
    assert!((xavier / expected - 1.0).abs() < 0.15, "{table}: rms {xavier:.4}, Xavier-normal std {expected:.4}");
    let per_layer = 1.0 / (dim as f64).sqrt();
    assert!((layers / per_layer - 1.0).abs() < 0.15, "{table}: rms {layers:.4}, N(0, 1/dim) std {per_layer:.4}");
}
