//! Reliability (issue #15): no silent wrong results, no lost work, no hangs. Each test pins a
//! defect that the CLI or the trainer used to have; `docs/reliability.md` lists the guarantees
//! and the counts of cases these tests run.
//!
//! Every child process is bounded: [`run_bounded`] kills a command that runs past its deadline and
//! fails the test (a hang is a defect, reported as such rather than stalling CI).

mod support;

use rankstack::device::DeviceSpec;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rankstack::data::synthetic::{self, SyntheticSpec};
use rankstack::data::{ParquetDataset, ParquetWriter};
use rankstack::nn::checkpoint::read_safetensors;
use rankstack::ranker_model::checkpoint::write_safetensors;
use rankstack::train::{latest_checkpoint, TrainOptions, Trainer};
use support::cli::{fails, ok};
use support::{small_world, tiny_config, tmpdir, write_data, ScratchDir};

/// A generous bound for one CLI command of these tests (they take seconds); only a hang reaches it.
const HANG_BOUND: Duration = Duration::from_secs(300);

/// Runs `rankstack args` with a deadline; `None` if it had to be killed (a hang).
fn run_bounded(args: &[&str]) -> Option<std::process::Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rankstack"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rankstack");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("poll rankstack").is_some() {
            return Some(child.wait_with_output().expect("collect output"));
        }
        if started.elapsed() > HANG_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A path argument.
fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// Small training and evaluation files plus the tiny architecture as a config file.
struct Fixture {
    dir: ScratchDir,
    train: PathBuf,
    eval: PathBuf,
    config: PathBuf,
}

impl Fixture {
    fn new(tag: &str, train_rows: usize) -> Self {
        let dir = tmpdir(tag);
        let (train, _) = write_data(&dir, train_rows, 100);
        let config = dir.join("tiny.toml");
        std::fs::write(&config, tiny_config(&train).to_toml_string()).unwrap();
        Self { train: dir.join("train.parquet"), eval: dir.join("eval.parquet"), config, dir }
    }

    /// `rankstack train` arguments for a run in `run` (more arguments follow).
    fn train_args(&self, run: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--config",
            &arg(&self.config),
            "--data",
            &arg(&self.train),
            "--eval",
            &arg(&self.eval),
            "--out",
            &arg(&self.dir.join(run)),
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn path(&self, name: &str) -> String {
        arg(&self.dir.join(name))
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Every float tensor of a checkpoint directory's files is finite.
fn checkpoint_is_finite(dir: &Path) -> bool {
    ["model.safetensors", "trainer_state.safetensors"].iter().all(|f| {
        let file = read_safetensors(dir.join(f)).unwrap();
        let named: Vec<(&str, &candle_core::Tensor)> = file.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        rankstack::nn::finite::first_non_finite(named).unwrap().is_none()
    })
}

fn options() -> TrainOptions {
    TrainOptions { epochs: 2, batch_size: 64, warmup_steps: 2, quiet: true, seed: 3, ..TrainOptions::default() }
}

// ---- 1. Non-finite weights ----------------------------------------------------------------------

/// An embedding row that no batch touches turns NaN: the loss and the gradients stay finite (the
/// row is never read), so only a check of the weights finds it. The run must stop at the next
/// checkpoint, naming the tensor and the step, and keep the finite checkpoint before it.
#[test]
fn non_finite_weights_stop_training_before_a_checkpoint_and_keep_the_last_good_one() {
    let dir = tmpdir("faults-nan-weights");
    let (train, _) = write_data(&dir, 400, 100);
    let config = tiny_config(&train);
    let run = dir.join("run");
    let opts = TrainOptions { checkpoint_every: Some(2), ..options() };
    let mut t = Trainer::new(&config, TrainOptions { stop_after: Some(2), ..opts.clone() }, &run).unwrap();
    t.fit(&train, None).unwrap();
    let good = latest_checkpoint(&run).unwrap().unwrap();

    let mut t = Trainer::resume(&run, opts).unwrap();
    // The reserved out-of-vocabulary row of the item-category table: the synthetic data never uses it.
    let (name, table) =
        t.store().named_vars().into_iter().find(|(n, _)| n.contains("item_category")).expect("an item_category table");
    let mut rows: Vec<Vec<f32>> = table.as_tensor().to_vec2().unwrap();
    rows.last_mut().unwrap()[0] = f32::NAN;
    table.set(&candle_core::Tensor::new(rows, table.device()).unwrap()).unwrap();

    let err = t.fit(&train, None).unwrap_err().to_string();
    assert!(
        err.contains(&format!("non-finite values in tensor `{name}` after step 4")) && err.contains("training stopped"),
        "{err}"
    );
    assert!(err.contains(&good.display().to_string()), "{err}");
    assert_eq!(latest_checkpoint(&run).unwrap().unwrap(), good, "LATEST moved off the last good checkpoint");
    assert!(checkpoint_is_finite(&good));
    let dirs = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
    assert_eq!(dirs, 1, "the finite checkpoint was pruned or a non-finite one written");
}

/// The issue's reproduction: a learning rate that makes the weights overflow. Whatever is caught
/// first (loss, gradients or weights), the run fails with one line, and every checkpoint left is
/// finite and loads.
#[test]
fn a_diverging_run_fails_and_leaves_only_finite_checkpoints() {
    let f = Fixture::new("faults-diverge", 600);
    let args = f.train_args(
        "run",
        &["--epochs", "2", "--batch-size", "64", "--checkpoint-every", "5", "--lr", "1e3", "--warmup-steps", "1"],
    );
    let err = fails(&strs(&args));
    assert!(err.contains("non-finite") && err.contains("training stopped"), "{err}");
    let run = f.dir.join("run");
    if let Some(latest) = latest_checkpoint(&run).unwrap() {
        assert!(checkpoint_is_finite(&latest), "{}", latest.display());
        ok(&["eval", "--checkpoint", &arg(&run), "--data", &arg(&f.eval)]);
    } else {
        assert!(err.contains("no checkpoint had been written yet"), "{err}");
    }
}

// ---- 2. Non-finite model outputs -----------------------------------------------------------------

/// A checkpoint whose weights hold a NaN: `eval` used to hang in the AUC's tie loop and `score`
/// wrote NaN. Both refuse the checkpoint, naming the tensor; `score` writes nothing.
#[test]
fn eval_and_score_refuse_a_checkpoint_with_non_finite_weights() {
    let f = Fixture::new("faults-nan-ckpt", 300);
    ok(&strs(&f.train_args("run", &["--epochs", "1", "--batch-size", "128"])));
    let ckpt = latest_checkpoint(&f.dir.join("run")).unwrap().unwrap();
    let weights = ckpt.join("model.safetensors");
    let file = read_safetensors(&weights).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = file.tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (victim, t) = tensors.iter_mut().find(|(n, _)| n.starts_with("mlp.")).unwrap();
    *t = (t.clone() * f64::NAN).unwrap();
    let victim = victim.clone();
    write_safetensors(&weights, &tensors, None).unwrap();

    let out = run_bounded(&["eval", "--checkpoint", &arg(&ckpt), "--data", &arg(&f.eval)]).expect("eval hung");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("`{victim}`")) && err.contains("non-finite"), "{err}");
    let scores = f.dir.join("scores.csv");
    let out = run_bounded(&["score", "--checkpoint", &arg(&ckpt), "--data", &arg(&f.eval), "--out", &arg(&scores)])
        .expect("score hung");
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!scores.exists());
}

// ---- 3. Schema of data vs. checkpoint ------------------------------------------------------------

/// Writes the synthetic rows of `spec` under a schema changed by `change` (the values stay in the
/// same positions, so the file is self-consistent but means something else to the model).
fn write_with_schema(spec: &SyntheticSpec, path: &Path, change: impl FnOnce(&mut rankstack::data::DataSchema)) {
    let (rows, _) = synthetic::examples(spec).unwrap();
    let mut schema = spec.schema();
    change(&mut schema);
    let mut w = ParquetWriter::create(path, &schema, SyntheticSpec::writer_options()).unwrap();
    w.write(&rows).unwrap();
    w.finish().unwrap();
}

#[test]
fn eval_score_and_resume_refuse_a_file_whose_schema_differs_from_the_checkpoint() {
    let f = Fixture::new("faults-schema", 300);
    ok(&strs(&f.train_args("run", &["--epochs", "1", "--batch-size", "64", "--stop-after", "2"])));
    let run = f.dir.join("run");

    let swapped = f.dir.join("swapped.parquet");
    write_with_schema(&small_world(100, 1), &swapped, |s| s.features.dense.swap(0, 2));
    let renamed = f.dir.join("renamed.parquet");
    write_with_schema(&small_world(100, 1), &renamed, |s| s.features.sparse[1].name = "segment".into());
    let longer = f.dir.join("longer.parquet");
    write_with_schema(&SyntheticSpec { max_len: 7, ..small_world(100, 1) }, &longer, |_| {});
    for (file, expected) in [
        (&swapped, "features.dense[0].name: \"user_activity\" in the model, \"item_quality\" in the data"),
        (&renamed, "features.sparse[1].name"),
        (&longer, "sequence.max_len"),
    ] {
        let err = fails(&["eval", "--checkpoint", &arg(&run), "--data", &arg(file)]);
        assert!(err.contains("schema differs") && err.contains(expected), "{err}");
        let out = f.dir.join("s.csv");
        let err = fails(&["score", "--checkpoint", &arg(&run), "--data", &arg(file), "--out", &arg(&out)]);
        assert!(err.contains(expected), "{err}");
        assert!(!out.exists());
    }
    let err = fails(&["eval", "--checkpoint", &arg(&run), "--data", &arg(&swapped)]);
    assert!(err.contains("features.dense[2].name"), "each difference is listed: {err}");

    // --resume: another schema, batch size or seed is refused; --allow-resume-changes accepts options.
    let resume = |extra: &[&str]| {
        let mut a = f.train_args("run", &["--resume", "--epochs", "1"]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut other_data = resume(&["--batch-size", "64"]);
    let at = other_data.iter().position(|a| a == "--data").unwrap();
    other_data[at + 1] = arg(&swapped);
    let at = other_data.iter().position(|a| a == "--eval").unwrap();
    other_data[at + 1] = arg(&swapped);
    assert!(fails(&strs(&other_data)).contains("features.dense[0].name"));
    let err = fails(&strs(&resume(&["--batch-size", "32"])));
    assert!(err.contains("batch size 32 (checkpoint: 64)") && err.contains("--allow-resume-changes"), "{err}");
    let err = fails(&strs(&resume(&["--batch-size", "64", "--seed", "5"])));
    assert!(err.contains("seed 5 (checkpoint: 0)"), "{err}");
    let summary = ok(&strs(&resume(&["--batch-size", "64", "--seed", "5", "--allow-resume-changes"])));
    assert!(summary.contains("finished after 5 steps"), "{summary}");
}

// ---- 4. Overwriting ------------------------------------------------------------------------------

#[test]
fn score_and_data_synthetic_never_overwrite_unasked_and_never_write_onto_an_input() {
    let f = Fixture::new("faults-overwrite", 300);
    ok(&strs(&f.train_args("run", &["--epochs", "1", "--batch-size", "128"])));
    let run = f.path("run");
    let eval_bytes = std::fs::read(&f.eval).unwrap();
    let out = f.dir.join("scores.csv");
    std::fs::write(&out, "precious").unwrap();
    let err = fails(&["score", "--checkpoint", &run, "--data", &arg(&f.eval), "--out", &arg(&out)]);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
    ok(&["score", "--checkpoint", &run, "--data", &arg(&f.eval), "--out", &arg(&out), "--force"]);
    assert!(std::fs::read_to_string(&out).unwrap().starts_with("row,p_save"));

    // The input itself, under another spelling of its path, even with --force.
    let same = f.dir.join(".").join("eval.parquet");
    let err = fails(&["score", "--checkpoint", &run, "--data", &arg(&f.eval), "--out", &arg(&same), "--force"]);
    assert!(err.contains("is also an input"), "{err}");
    assert_eq!(std::fs::read(&f.eval).unwrap(), eval_bytes);
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let err = fails(&["data", "synthetic", "--rows", "10", "--out", &arg(&f.eval)]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&f.eval).unwrap(), eval_bytes);
    ok(&["data", "synthetic", "--rows", "10", "--out", &arg(&f.eval), "--force"]);
    assert_eq!(ParquetDataset::open(&f.eval).unwrap().num_rows(), 10);
    assert!(fails(&["data", "synthetic", "--rows", "0", "--out", &f.path("none.parquet")]).contains("rows"));
    assert!(!f.dir.join("none.parquet").exists());
}

// ---- 5. A one-row remainder batch ----------------------------------------------------------------

#[test]
fn an_epoch_with_a_one_row_remainder_trains_and_resumes() {
    // 129 rows in batches of 64: the third batch of each epoch would hold one row (BatchNorm in
    // training cannot normalise one row); it is left out of the epoch.
    let f = Fixture::new("faults-remainder", 129);
    let summary = ok(&strs(&f.train_args("run", &["--epochs", "2", "--batch-size", "64"])));
    assert!(summary.contains("finished after 4 steps"), "{summary}");
    ok(&strs(&f.train_args("r", &["--epochs", "2", "--batch-size", "64", "--stop-after", "3"])));
    ok(&strs(&f.train_args("r", &["--epochs", "2", "--batch-size", "64", "--resume"])));
    assert!(support::latest_weights(&f.dir.join("r")) == support::latest_weights(&f.dir.join("run")));
}

// ---- 6. Huge batch sizes -------------------------------------------------------------------------

#[test]
fn huge_batch_sizes_never_abort() {
    let f = Fixture::new("faults-huge-batch", 200);
    for batch in ["1000000000000", &u64::MAX.to_string()] {
        let run = format!("run-{}", batch.len());
        ok(&strs(&f.train_args(&run, &["--epochs", "1", "--batch-size", batch])));
        ok(&["eval", "--checkpoint", &f.path(&run), "--data", &arg(&f.eval), "--batch-size", batch]);
        let out = f.path(&format!("s{}.csv", batch.len()));
        ok(&["score", "--checkpoint", &f.path(&run), "--data", &arg(&f.eval), "--out", &out, "--batch-size", batch]);
    }
    // Where the data has that many rows, the planner's estimate refuses the batch before allocating.
    use rankstack::commands::{check_batch_memory, Workload};
    let ckpt = latest_checkpoint(&f.dir.join("run-13")).unwrap().unwrap();
    let ranker =
        rankstack::ranker_model::checkpoint::load_for_serving(ckpt, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let err = check_batch_memory(&ranker, 1 << 40, u64::MAX, Workload::Training, "train", &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch-size") && err.contains("GiB") && err.contains("smaller --batch-size"), "{err}");
    let err = check_batch_memory(&ranker, usize::MAX, u64::MAX, Workload::Inference, "eval", &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range"), "{err}");
    assert!(check_batch_memory(&ranker, 64, 1000, Workload::Training, "train", &candle_core::Device::Cpu).is_ok());
}

// ---- 7. inspect overflow -------------------------------------------------------------------------

#[test]
fn inspect_refuses_batch_sizes_whose_memory_figures_overflow() {
    for batch in ["9223372036854775808", "10000000000000000"] {
        let err = fails(&["inspect", "--batch-size", batch, "--device-memory-gib", "80"]);
        assert!(err.contains("out of range"), "{err}");
    }
    let table = ok(&["inspect", "--batch-size", "10000000000", "--device-memory-gib", "80"]);
    assert!(table.contains("does NOT fit"), "{table}");
}

// ---- 8. Smaller items ----------------------------------------------------------------------------

#[test]
fn bad_training_options_are_refused_and_write_nothing() {
    let f = Fixture::new("faults-options", 100);
    let new = f.dir.join("new");
    for (flag, value, name) in [
        ("--grad-clip", "NaN", "grad_clip_norm"),
        ("--grad-clip", "-1", "grad_clip_norm"),
        ("--checkpoint-every", "0", "checkpoint_every"),
        ("--stop-after", "0", "stop_after"),
        ("--max-steps", "0", "max_steps"),
    ] {
        let err = fails(&strs(&f.train_args("new", &[&format!("{flag}={value}")])));
        assert!(err.contains(name), "{flag} {value}: {err}");
        assert!(!new.exists(), "{flag} {value} left a run directory");
    }
    let err = fails(&["train", "--data", &arg(&f.train), "--out", &arg(&new)]);
    assert!(err.contains("--eval"), "{err}");
    let err = fails(&["train", "--preset", "nope", "--out", &arg(&new)]);
    assert!(err.contains("unknown preset") && !new.exists(), "{err}");
}

/// Scoring reads features only: a label column of the wrong type (or absent) does not matter.
#[test]
fn score_ignores_label_columns() {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    let f = Fixture::new("faults-labels", 200);
    ok(&strs(&f.train_args("run", &["--epochs", "1", "--batch-size", "128"])));
    // Rewrite the evaluation file with `label_save` as text, keeping the schema metadata.
    let file = std::fs::File::open(&f.eval).unwrap();
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let kv = builder.metadata().file_metadata().key_value_metadata().cloned();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let at = schema.index_of("label_save").unwrap();
    let mut fields: Vec<arrow_schema::Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[at] = arrow_schema::Field::new("label_save", arrow_schema::DataType::Utf8, true);
    let new_schema = std::sync::Arc::new(arrow_schema::Schema::new(fields));
    let props = parquet::file::properties::WriterProperties::builder().set_key_value_metadata(kv).build();
    let path = f.dir.join("text_labels.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), new_schema.clone(), Some(props))
            .unwrap();
    for b in &batches {
        let mut columns: Vec<ArrayRef> = b.columns().to_vec();
        columns[at] = std::sync::Arc::new(StringArray::from(vec!["yes"; b.num_rows()]));
        w.write(&RecordBatch::try_new(new_schema.clone(), columns).unwrap()).unwrap();
    }
    w.close().unwrap();
    assert!(fails(&["eval", "--checkpoint", &f.path("run"), "--data", &arg(&path)]).contains("label_save"));
    let out = f.path("scores.csv");
    ok(&["score", "--checkpoint", &f.path("run"), "--data", &arg(&path), "--out", &out]);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 101);
}

/// A run resumed between two `train` lines of `metrics.jsonl` logs the same losses as an
/// uninterrupted run (the open window of losses travels with the checkpoint).
#[test]
fn a_resume_off_a_logging_boundary_logs_what_an_uninterrupted_run_logs() {
    let dir = tmpdir("faults-log-window");
    let (train, _) = write_data(&dir, 400, 100);
    let config = tiny_config(&train);
    let opts = TrainOptions { log_every: 4, ..options() };
    Trainer::new(&config, opts.clone(), dir.join("a")).unwrap().fit(&train, None).unwrap();
    Trainer::new(&config, TrainOptions { stop_after: Some(6), ..opts.clone() }, dir.join("b"))
        .unwrap()
        .fit(&train, None)
        .unwrap();
    Trainer::resume(dir.join("b"), opts).unwrap().fit(&train, None).unwrap();
    let losses = |run: &str| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "train")
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    let (a, b) = (losses("a"), losses("b"));
    assert_eq!(a.len(), 4, "{a:?}"); // steps 4, 8, 12 and the last (14)
    assert_eq!(a, b);
}

// ---- Fault injection: kill -9 ---------------------------------------------------------------------

/// `kill -9` at several points of a run that checkpoints every step (so kills land during
/// checkpoint writes and pruning too), each followed by `--resume`: the final weights equal an
/// uninterrupted run's bit for bit, `LATEST` always names a complete checkpoint, and no directory
/// other than complete checkpoints is left looking like one.
#[test]
fn kill_9_at_any_point_then_resume_gives_the_uninterrupted_weights() {
    let f = Fixture::new("faults-kill", 640);
    let common = ["--epochs", "2", "--batch-size", "64", "--checkpoint-every", "1"];
    ok(&strs(&f.train_args("reference", &common)));
    let reference = support::latest_weights(&f.dir.join("reference"));
    let run = f.dir.join("killed");
    let first = f.train_args("killed", &common);
    let mut resume = f.train_args("killed", &common);
    resume.push("--resume".into());
    // Kill after the k-th published checkpoint plus a varying delay, so the kill lands at
    // different phases (a step, a checkpoint write, the pruning).
    let mut kills = 0;
    for (round, delay_ms) in [0u64, 7, 23, 41, 3, 60].iter().enumerate() {
        let before = latest_checkpoint(&run).ok().flatten();
        let args = if before.is_none() { &first } else { &resume };
        let mut child = Command::new(env!("CARGO_BIN_EXE_rankstack"))
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        // Wait for one new checkpoint (or the end of the run).
        loop {
            if child.try_wait().unwrap().is_some() || started.elapsed() > HANG_BOUND {
                break;
            }
            let now = latest_checkpoint(&run).ok().flatten();
            if now.is_some() && now != before {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(*delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // After every kill: LATEST names a complete, finite checkpoint; nothing else looks like one.
        if let Some(latest) = latest_checkpoint(&run).unwrap() {
            for file in ["config.json", "model.safetensors", "trainer_state.safetensors"] {
                assert!(latest.join(file).exists(), "round {round}: {} lacks {file}", latest.display());
            }
            assert!(checkpoint_is_finite(&latest));
            for entry in std::fs::read_dir(run.join("checkpoints")).unwrap().flatten() {
                let p = entry.path();
                if p < latest && entry.file_name().to_string_lossy().starts_with("step-") {
                    // An older checkpoint whose pruning the kill prevented: complete, never half-deleted
                    // (a newer one may be partial: it was being written and was never published).
                    for file in ["config.json", "model.safetensors", "trainer_state.safetensors"] {
                        assert!(p.join(file).exists(), "round {round}: {} is half-deleted", p.display());
                    }
                }
            }
        }
    }
    println!("kill -9: {kills} of 6 rounds killed a running process");
    assert!(kills >= 3, "only {kills} kills landed");
    ok(&strs(&resume));
    assert!(support::latest_weights(&run) == reference, "resumed weights differ from the uninterrupted run");
}

// ---- Fault injection: damaged files and non-finite inputs -----------------------------------------

/// What happened to one damaged input.
#[derive(Debug, Default)]
struct Outcomes {
    cases: usize,
    /// A clear error (the command refused the input).
    refused: usize,
    /// Accepted with exactly the undamaged result (the damage hit bytes nothing reads).
    unchanged: usize,
    /// Accepted with a different result although the damage was in a checkpoint: a silent wrong result.
    silent_wrong: usize,
    /// Accepted with a different result from damaged data values (a Parquet file has no checksum:
    /// a changed value is a different, valid data set).
    different_data: usize,
    panics: usize,
}

impl Outcomes {
    fn record(&mut self, outcome: std::thread::Result<rankstack::nn::Result<bool>>, data_file: bool) {
        self.cases += 1;
        match outcome {
            Err(_) => self.panics += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().trim().is_empty());
                self.refused += 1;
            }
            Ok(Ok(true)) => self.unchanged += 1,
            Ok(Ok(false)) if data_file => self.different_data += 1,
            Ok(Ok(false)) => self.silent_wrong += 1,
        }
    }
}

/// Truncations and single-bit flips of `bytes` at positions drawn from a fixed seed.
fn damaged_copies(bytes: &[u8], rng: &mut rankstack::nn::rng::Rng, flips: usize) -> Vec<Vec<u8>> {
    let n = bytes.len();
    let mut out: Vec<Vec<u8>> =
        [0, 1, 7, 8, 9, n / 3, n / 2, n - 1].iter().map(|&len| bytes[..len.min(n)].to_vec()).collect();
    out.push(b"garbage".to_vec());
    for _ in 0..flips {
        let mut copy = bytes.to_vec();
        let at = rng.below(n as u64) as usize;
        copy[at] ^= 1 << rng.below(8);
        out.push(copy);
    }
    out
}

/// Truncated, bit-flipped and garbage checkpoint files (weights, config, optimizer state) and
/// Parquet files: never a panic or a hang; a damaged checkpoint is refused or read exactly as
/// before (checksums over every tensor, the metadata and the config), never read differently.
#[test]
fn damaged_checkpoints_and_data_files_are_refused_never_misread() {
    use rankstack::nn::packed_matmul::WeightPrecision;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let f = Fixture::new("faults-damage", 300);
    ok(&strs(&f.train_args("run", &["--epochs", "1", "--batch-size", "128"])));
    let run = f.dir.join("run");
    let ckpt = latest_checkpoint(&run).unwrap().unwrap();
    let eval = |data: &Path| rankstack::commands::eval(&ckpt, data, 1024, WeightPrecision::F32, DeviceSpec::Cpu, None);
    let baseline = eval(&f.eval).unwrap();
    let resume_opts = TrainOptions { batch_size: 128, quiet: true, ..TrainOptions::default() };
    let state_of = |path: &Path| {
        read_safetensors(path).map(|file| {
            let mut v: Vec<(String, Vec<f32>)> = file
                .tensors
                .iter()
                .map(|(n, t)| {
                    (n.clone(), t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap())
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            let mut meta: Vec<(String, String)> = file.metadata.into_iter().collect();
            meta.sort();
            (v, meta)
        })
    };
    let state_path = ckpt.join("trainer_state.safetensors");
    let baseline_state = state_of(&state_path).unwrap();
    let mut rng = rankstack::nn::rng::Rng::new(15);
    let mut checkpoints = Outcomes::default();
    for file in ["model.safetensors", "config.json", "trainer_state.safetensors"] {
        let path = ckpt.join(file);
        let original = std::fs::read(&path).unwrap();
        for bytes in damaged_copies(&original, &mut rng, 40) {
            std::fs::write(&path, &bytes).unwrap();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                if file == "trainer_state.safetensors" {
                    Trainer::resume(&run, resume_opts.clone())
                        .map(|_| state_of(&state_path).map(|s| bits_equal(&s, &baseline_state)).unwrap_or(false))
                } else {
                    eval(&f.eval).map(|text| text == baseline)
                }
            }));
            checkpoints.record(outcome, false);
        }
        std::fs::write(&path, &original).unwrap();
    }
    let mut data = Outcomes::default();
    let original = std::fs::read(&f.eval).unwrap();
    let damaged = f.dir.join("damaged.parquet");
    for bytes in damaged_copies(&original, &mut rng, 60) {
        std::fs::write(&damaged, &bytes).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| eval(&damaged).map(|text| text == baseline)));
        data.record(outcome, true);
    }
    println!("checkpoints: {checkpoints:?}\nparquet: {data:?}");
    assert_eq!((checkpoints.panics, checkpoints.silent_wrong), (0, 0), "{checkpoints:?}");
    assert_eq!(data.panics, 0, "{data:?}");
    assert!(checkpoints.refused > 100 && data.refused > 10, "{checkpoints:?} {data:?}");
}

/// A tensor file's contents: tensors (as f32 values, by name) and metadata, both sorted.
type FileState = (Vec<(String, Vec<f32>)>, Vec<(String, String)>);

fn bits_equal(a: &FileState, b: &FileState) -> bool {
    a.1 == b.1
        && a.0.len() == b.0.len()
        && a.0.iter().zip(&b.0).all(|(x, y)| {
            x.0 == y.0 && x.1.len() == y.1.len() && x.1.iter().zip(&y.1).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

/// NaN and infinities in every input kind (dense and embedding features, labels, example
/// weights): training, evaluation and scoring either handle them as documented (dense non-finite
/// → 0, NaN label = missing) or refuse the file with one line; scores are always finite.
#[test]
fn non_finite_inputs_are_handled_or_refused_never_propagated() {
    let f = Fixture::new("faults-nan-inputs", 300);
    ok(&strs(&f.train_args("run", &["--epochs", "1", "--batch-size", "128"])));
    let spec = small_world(50, 2);
    let schema = spec.schema();
    let (clean, _) = synthetic::examples(&spec).unwrap();
    let poisons = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    let mut cases: Vec<(String, Vec<rankstack::data::Example>)> = Vec::new();
    for (k, &v) in poisons.iter().enumerate() {
        let mut rows = clean.clone();
        rows[k].dense[0] = v;
        rows[k + 3].dense.iter_mut().for_each(|d| *d = v);
        cases.push((format!("dense {v}"), rows));
        let mut rows = clean.clone();
        rows[k].embedding[0][0] = v;
        cases.push((format!("embedding {v}"), rows));
        let mut rows = clean.clone();
        rows[k].labels[0] = v;
        cases.push((format!("label {v}"), rows));
    }
    let (mut handled, mut refused) = (0, 0);
    for (i, (what, rows)) in cases.iter().enumerate() {
        let path = f.dir.join(format!("poison-{i}.parquet"));
        let written = ParquetWriter::create(&path, &schema, SyntheticSpec::writer_options())
            .and_then(|mut w| w.write(rows).and_then(|_| w.finish()));
        if let Err(e) = written {
            // The writer refuses the value itself: one clear error.
            assert!(!e.to_string().contains('\n'), "{what}: {e}");
            refused += 1;
            continue;
        }
        let out = f.dir.join(format!("poison-{i}.csv"));
        let scored =
            run_bounded(&["score", "--checkpoint", &f.path("run"), "--data", &arg(&path), "--out", &arg(&out)])
                .unwrap_or_else(|| panic!("{what}: score hung"));
        let evaluated = run_bounded(&["eval", "--checkpoint", &f.path("run"), "--data", &arg(&path)])
            .unwrap_or_else(|| panic!("{what}: eval hung"));
        for o in [&scored, &evaluated] {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!err.contains("panicked") && !err.contains("internal error"), "{what}: {err}");
        }
        if scored.status.success() {
            let csv = std::fs::read_to_string(&out).unwrap();
            let finite =
                csv.lines().skip(1).flat_map(|l| l.split(',').skip(1)).all(|v| v.parse::<f32>().unwrap().is_finite());
            assert!(finite, "{what}: non-finite scores written");
            handled += 1;
        } else {
            assert_eq!(String::from_utf8_lossy(&scored.stderr).trim_end().lines().count(), 1, "{what}");
            refused += 1;
        }
    }
    println!("non-finite inputs: {} cases, {handled} handled, {refused} refused", cases.len());
    assert_eq!(handled + refused, cases.len());
}

// ---- Property tests of the parsers of untrusted input ----------------------------------------------

/// A seeded mutation of `bytes`: flips, overwrites with extreme bytes, insertions, deletions,
/// duplicated spans and truncations, one to four at a time.
fn mutate(bytes: &[u8], rng: &mut rankstack::nn::rng::Rng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..=rng.below(4) {
        let n = out.len().max(1) as u64;
        let at = rng.below(n) as usize;
        match rng.below(6) {
            0 if !out.is_empty() => out[at] ^= 1 << rng.below(8),
            1 if !out.is_empty() => out[at] = [0u8, 0xff, b'9', b'-', b'"', b'['][rng.below(6) as usize],
            2 => out.insert(at.min(out.len()), [b'9', 0, 0xff, b'{'][rng.below(4) as usize]),
            3 if !out.is_empty() => {
                out.remove(at);
            }
            4 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16) as usize).min(out.len());
                let span = out[at..end].to_vec();
                out.splice(at..at, span);
            }
            _ => out.truncate(at),
        }
    }
    out
}

/// Runs `cases` mutants of `seed_input` through `parse` on a separate thread (bounded in time:
/// a hang fails the test instead of stalling it) and returns (cases, refused, panics).
fn fuzz(
    name: &'static str,
    seed_input: Vec<u8>,
    cases: usize,
    parse: impl Fn(&[u8]) -> bool + Send + 'static,
) -> (usize, usize, usize) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rng = rankstack::nn::rng::Rng::for_name(15, name);
        let (mut refused, mut panics) = (0, 0);
        for _ in 0..cases {
            let input = mutate(&seed_input, &mut rng);
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&input))) {
                Ok(true) => {}
                Ok(false) => refused += 1,
                Err(_) => panics += 1,
            }
        }
        let _ = tx.send((cases, refused, panics));
    });
    rx.recv_timeout(HANG_BOUND).unwrap_or_else(|_| panic!("{name}: the parser hung"))
}

/// The three parsers of untrusted input — Parquet data (schema metadata, columns, batches),
/// safetensors checkpoints, TOML/JSON configs and data schemas — on seeded mutants of valid
/// inputs: never a panic, never a hang; every mutant is either read or refused with an error.
#[test]
fn parsers_of_untrusted_input_never_panic_or_hang_on_mutated_input() {
    let dir = tmpdir("faults-fuzz");
    let (train, _) = write_data(&dir, 60, 20);
    let config = tiny_config(&train);
    let mut results = Vec::new();

    let scratch = dir.to_path_buf();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    results.push((
        "parquet",
        fuzz("parquet", std::fs::read(dir.join("train.parquet")).unwrap(), 300, move |bytes| {
            let path = scratch.join(format!("m{}.parquet", counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
            std::fs::write(&path, bytes).unwrap();
            let read = ParquetDataset::open(&path)
                .and_then(|d| d.batches(16, None).and_then(|b| b.collect::<rankstack::nn::Result<Vec<_>>>()));
            let _ = std::fs::remove_file(&path);
            read.is_ok()
        }),
    ));

    let run = dir.join("run");
    Trainer::new(&config, TrainOptions { max_steps: Some(1), ..options() }, &run).unwrap().fit(&train, None).unwrap();
    let weights = std::fs::read(latest_checkpoint(&run).unwrap().unwrap().join("model.safetensors")).unwrap();
    let scratch = dir.to_path_buf();
    results.push((
        "safetensors",
        fuzz("safetensors", weights, 300, move |bytes| {
            let path = scratch.join("m.safetensors");
            std::fs::write(&path, bytes).unwrap();
            read_safetensors(&path).is_ok()
        }),
    ));

    let toml = config.to_toml_string().into_bytes();
    results.push((
        "config toml",
        fuzz("config toml", toml, 300, |bytes| {
            rankstack::ranker_model::RankerConfig::from_toml_str(&String::from_utf8_lossy(bytes)).is_ok()
        }),
    ));
    let json = serde_json::to_vec(&config).unwrap();
    results.push((
        "config json",
        fuzz("config json", json, 300, |bytes| {
            rankstack::ranker_model::RankerConfig::from_json_str(&String::from_utf8_lossy(bytes)).is_ok()
        }),
    ));
    let schema = train.schema().to_json().into_bytes();
    results.push((
        "data schema json",
        fuzz("data schema json", schema, 300, |bytes| {
            rankstack::data::DataSchema::from_json(&String::from_utf8_lossy(bytes)).is_ok()
        }),
    ));
    for (name, (cases, refused, panics)) in &results {
        println!("{name}: {cases} mutants, {refused} refused, {panics} panics");
        assert_eq!(*panics, 0, "{name}: {panics} of {cases} mutants panicked");
        assert!(*refused > 0, "{name}: no mutant was refused; the mutations do not reach the parser");
    }
}
