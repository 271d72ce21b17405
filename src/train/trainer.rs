//! The training loop.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ranker_model::checkpoint::{self, write_safetensors};
use ranker_model::{Ranker, RankerConfig};
use rankstack_nn::checkpoint::read_safetensors;
use rankstack_nn::reseed::child_seed;
use rankstack_nn::{Error, Reseed, Result, SeededVarMap};
use serde::Serialize;

use super::checkpoints::{latest_checkpoint, publish};
use super::tensorboard::EventWriter;
use super::{
    clip_grad_norm, grad_norm, task_metrics, AdamW, AdamWConfig, Reliability, TaskMetrics, TrainingCurves,
    WarmupCosine, DECILES,
};
use crate::data::LabeledBatch;

/// Where training batches come from (implemented by [`crate::data::ParquetDataset`]).
pub trait BatchSource {
    /// Rows per epoch.
    fn num_rows(&self) -> usize;
    /// One pass over the data in batches of `batch_size`; shuffled with `shuffle_seed` if given
    /// (the same seed gives the same order), in file order otherwise.
    fn batches<'a>(
        &'a self,
        batch_size: usize,
        shuffle_seed: Option<u64>,
    ) -> Result<Box<dyn Iterator<Item = Result<LabeledBatch>> + 'a>>;
}

impl BatchSource for crate::data::ParquetDataset {
    fn num_rows(&self) -> usize {
        crate::data::ParquetDataset::num_rows(self) as usize
    }

    fn batches<'a>(
        &'a self,
        batch_size: usize,
        shuffle_seed: Option<u64>,
    ) -> Result<Box<dyn Iterator<Item = Result<LabeledBatch>> + 'a>> {
        // A shuffle buffer of 64k rows: the whole file for the bundled data sets, bounded memory
        // for large ones.
        let shuffle = shuffle_seed.map(|seed| crate::data::Shuffle { seed, buffer_rows: 65_536 });
        Ok(Box::new(crate::data::ParquetDataset::batches(self, batch_size, shuffle)?))
    }
}

/// Options of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// Passes over the training data.
    pub epochs: usize,
    /// Stop after this many steps in total, if fewer than `epochs` would take.
    pub max_steps: Option<u64>,
    /// Examples per step.
    pub batch_size: usize,
    /// AdamW hyper-parameters (`lr` is the peak of the schedule).
    pub optimizer: AdamWConfig,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Final learning rate of the cosine decay, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub grad_clip_norm: Option<f64>,
    /// Seed of the parameter initialisation, the data order and all training-time randomness.
    pub seed: u64,
    /// Append a `train` line to `metrics.jsonl` every this many steps: mean loss since the last
    /// line, learning rate, the gradient norm of the step before clipping, examples per second.
    pub log_every: u64,
    /// Also checkpoint every this many steps (always at the end of each epoch).
    pub checkpoint_every: Option<u64>,
    /// Stop (with a checkpoint) after this step, as if interrupted; resume with [`Trainer::resume`].
    pub stop_after: Option<u64>,
    /// No progress bar.
    pub quiet: bool,
    /// Row-sparse embedding updates: each step updates only the table rows its batch touched, with
    /// lazy AdamW semantics (see [`AdamW`]); `false` gives every table a dense gradient and update,
    /// as PyTorch's `nn.Embedding` with `torch.optim.AdamW`. A resumed run must use the same choice
    /// to reproduce an uninterrupted one.
    pub row_sparse_embeddings: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 2,
            max_steps: None,
            batch_size: 256,
            optimizer: AdamWConfig::default(),
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            grad_clip_norm: Some(1.0),
            seed: 0,
            log_every: 10,
            checkpoint_every: None,
            stop_after: None,
            quiet: false,
            row_sparse_embeddings: true,
        }
    }
}

/// Metrics of one evaluation pass.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Epoch just finished (1-based), 0 outside training.
    pub epoch: usize,
    /// Global step.
    pub step: u64,
    /// The weighted multi-task loss over the set.
    pub loss: f64,
    /// Per-task metrics, in task order.
    pub tasks: Vec<(String, TaskMetrics)>,
    /// Per-task calibration by decile of the prediction, in task order.
    pub reliability: Vec<Reliability>,
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    /// Steps taken in total (including those before a resume).
    pub steps: u64,
    /// Whether the run stopped at `stop_after` rather than at the end.
    pub interrupted: bool,
    /// Mean training loss over the last logging window.
    pub last_loss: f64,
    /// One report per finished epoch (with an evaluation set).
    pub evaluations: Vec<EvalReport>,
    /// The checkpoint written last.
    pub checkpoint: PathBuf,
    /// Training throughput of this session, examples per second (evaluation and checkpoint time excluded).
    pub examples_per_second: f64,
}

/// A training run: model, optimizer and position, writing into a run directory.
pub struct Trainer {
    ranker: Ranker,
    store: SeededVarMap,
    optimizer: AdamW,
    options: TrainOptions,
    run_dir: PathBuf,
    step: u64,
    curves: TrainingCurves,
    tensorboard: EventWriter,
}

fn check_options(o: &TrainOptions) -> Result<()> {
    let bad = |field: &str, reason: &str| Err(Error::config("train", field, reason));
    if o.batch_size == 0 {
        return bad("batch_size", "must be > 0");
    }
    if o.epochs == 0 && o.max_steps.is_none() {
        return bad("epochs", "must be > 0 (or set max_steps)");
    }
    if o.log_every == 0 {
        return bad("log_every", "must be > 0");
    }
    if o.grad_clip_norm.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        return bad("grad_clip_norm", "must be finite and > 0");
    }
    if !(0.0..=1.0).contains(&o.min_lr_ratio) {
        return bad("min_lr_ratio", "must be in [0, 1]");
    }
    Ok(())
}

impl Trainer {
    /// A fresh run of `config` writing into `run_dir` (created if needed; an existing run there is
    /// an error — resume it instead).
    pub fn new(config: &RankerConfig, options: TrainOptions, run_dir: impl AsRef<Path>) -> Result<Self> {
        check_options(&options)?;
        let run_dir = run_dir.as_ref().to_path_buf();
        if latest_checkpoint(&run_dir)?.is_some() {
            return Err(Error::input(
                "train",
                "out",
                format!("{} already holds a training run; resume it or choose another directory", run_dir.display()),
            ));
        }
        std::fs::create_dir_all(&run_dir).map_err(Error::io_at(&run_dir))?;
        let store = SeededVarMap::new(options.seed);
        let ranker = Ranker::new(config, store.var_builder(DType::F32, &Device::Cpu))?;
        ranker.set_row_sparse_gradients(options.row_sparse_embeddings);
        let optimizer = AdamW::new(store.named_vars(), options.optimizer)?;
        // A fresh run starts a fresh log.
        let _ = std::fs::remove_file(run_dir.join("metrics.jsonl"));
        let tensorboard = EventWriter::fresh(&run_dir)?;
        let curves = TrainingCurves::default();
        Ok(Self { ranker, store, optimizer, options, run_dir, step: 0, curves, tensorboard })
    }

    /// Continues the run in `run_dir` from its latest checkpoint: weights, buffers, optimizer
    /// moments and step. With the same options and data, the final weights equal those of an
    /// uninterrupted run (every step's randomness derives from `(seed, step)`).
    pub fn resume(run_dir: impl AsRef<Path>, options: TrainOptions) -> Result<Self> {
        check_options(&options)?;
        let run_dir = run_dir.as_ref().to_path_buf();
        let Some(dir) = latest_checkpoint(&run_dir)? else {
            return Err(Error::input("train", "out", format!("{} holds no checkpoint to resume", run_dir.display())));
        };
        let (ranker, store) = checkpoint::load(&dir, DType::F32, &Device::Cpu)?;
        ranker.set_row_sparse_gradients(options.row_sparse_embeddings);
        let mut optimizer = AdamW::new(store.named_vars(), options.optimizer)?;
        let state = read_safetensors(dir.join("trainer_state.safetensors"))?;
        optimizer.load_state(&state.tensors)?;
        let step = optimizer.step_count();
        let tensorboard = EventWriter::resumed(&run_dir, step)?;
        let curves = TrainingCurves::default();
        let mut trainer = Self { ranker, store, optimizer, options, run_dir, step, curves, tensorboard };
        trainer.reload_curves();
        Ok(trainer)
    }

    /// The model.
    pub fn ranker(&self) -> &Ranker {
        &self.ranker
    }

    /// The parameter store.
    pub fn store(&self) -> &SeededVarMap {
        &self.store
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Appends `line` to `metrics.jsonl`, the TensorBoard log and the curves.
    fn log(&mut self, line: &serde_json::Value) -> Result<()> {
        let path = self.run_dir.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(Error::io_at(&path))?;
        writeln!(f, "{line}").map_err(Error::io_at(&path))?;
        self.curves.record(line);
        self.tensorboard.log_line(line)
    }

    /// Rebuilds the curves from `metrics.jsonl` after a resume (lines past the resumed step are
    /// dropped from the file, so the log reads as one run).
    fn reload_curves(&mut self) {
        let path = self.run_dir.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else { return };
        let mut kept = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let step = v["step"].as_u64().unwrap_or(0);
            if step > self.step {
                continue;
            }
            kept.push(line.to_string());
            self.curves.record(&v);
        }
        let _ = std::fs::write(&path, kept.iter().map(|l| format!("{l}\n")).collect::<String>());
    }

    fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = self.run_dir.join("checkpoints").join(format!("step-{:09}", self.step));
        checkpoint::save(&dir, &self.ranker, &self.store)?;
        let state: Vec<(String, Tensor)> = self.optimizer.state()?.into_iter().collect();
        let meta =
            HashMap::from([("options".to_string(), serde_json::to_string(&self.options).expect("options serialise"))]);
        write_safetensors(&dir.join("trainer_state.safetensors"), &state, Some(meta))?;
        publish(&self.run_dir, &dir)?;
        let svg = self.curves.svg()?;
        ranker_model::checkpoint::write_atomically(&self.run_dir.join("training_curves.svg"), svg.as_bytes())?;
        Ok(dir)
    }

    /// Trains until the configured epochs or steps are done (or `stop_after`), evaluating on
    /// `eval` after every epoch.
    pub fn fit(&mut self, train: &dyn BatchSource, eval: Option<&dyn BatchSource>) -> Result<TrainReport> {
        let o = self.options.clone();
        let rows = train.num_rows();
        if rows == 0 {
            return Err(Error::input("train", "data", "the training set is empty"));
        }
        let steps_per_epoch = rows.div_ceil(o.batch_size) as u64;
        let mut total = steps_per_epoch * o.epochs as u64;
        if let Some(max) = o.max_steps {
            total = if o.epochs == 0 { max } else { total.min(max) };
        }
        let schedule = WarmupCosine {
            peak: o.optimizer.lr,
            warmup: o.warmup_steps.min(total / 2).max(1),
            total,
            min_ratio: o.min_lr_ratio,
        };
        let params = self.store.named_vars();
        let progress = if o.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
        progress.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  {elapsed_precise}")
                .expect("valid template"),
        );
        progress.set_position(self.step);

        // Throughput counts the training loop (data reading included), not evaluation or checkpoints.
        let started = Instant::now();
        let mut paused = std::time::Duration::ZERO;
        let train_rate = |examples: usize, paused: std::time::Duration| {
            examples as f64 / started.elapsed().saturating_sub(paused).as_secs_f64().max(1e-9)
        };
        let start_step = self.step;
        let mut examples = 0usize;
        let (mut window_loss, mut window_steps) = (0.0, 0u64);
        let mut last_loss = f64::NAN;
        let mut evaluations = Vec::new();
        let mut last_checkpoint = latest_checkpoint(&self.run_dir)?.unwrap_or_default();

        while self.step < total {
            let epoch = self.step / steps_per_epoch;
            let skip = (self.step % steps_per_epoch) as usize;
            let order_seed = child_seed(o.seed, &format!("epoch-{epoch}"));
            let batches = train.batches(o.batch_size, Some(order_seed))?.skip(skip);
            for item in batches {
                if self.step >= total {
                    break;
                }
                let b = item?;
                self.ranker.reseed(child_seed(o.seed, &format!("step-{}", self.step)));
                let logits = self.ranker.forward_t(&b.batch, true)?;
                let loss = self.ranker.loss(&logits, &b.labels, b.example_weights.as_ref())?;
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !value.is_finite() {
                    progress.abandon();
                    return Err(Error::input(
                        "train",
                        "loss",
                        format!(
                            "non-finite loss ({value}) at step {}; training stopped, the last good checkpoint is kept at {}",
                            self.step + 1,
                            last_checkpoint.display()
                        ),
                    ));
                }
                let mut grads = loss.backward()?;
                let mut rows = self.ranker.take_row_gradients(&grads)?;
                // The gradient norm before clipping, computed when clipping needs it or the step
                // is logged (a pass over every gradient): a growing norm warns of divergence.
                let logged = (self.step + 1).is_multiple_of(o.log_every) || self.step + 1 == total;
                let norm = match o.grad_clip_norm {
                    Some(max) => Some(clip_grad_norm(&params, &mut grads, &mut rows, max)?),
                    None if logged => Some(grad_norm(&params, &grads, &rows)?),
                    None => None,
                };
                let lr = schedule.lr(self.step);
                self.optimizer.step(&grads, &rows, lr)?;
                self.step += 1;
                examples += b.rows;
                window_loss += value;
                window_steps += 1;
                let rate = train_rate(examples, paused);
                progress.set_position(self.step);
                progress.set_message(format!("loss {value:.4}  {rate:.0} ex/s"));
                if logged {
                    last_loss = window_loss / window_steps as f64;
                    let line = serde_json::json!({"kind": "train", "step": self.step, "epoch": epoch + 1, "loss": last_loss, "lr": lr, "grad_norm": norm, "examples_per_second": rate});
                    self.log(&line)?;
                    (window_loss, window_steps) = (0.0, 0);
                }
                let epoch_done = self.step.is_multiple_of(steps_per_epoch) || self.step == total;
                let pause_started = Instant::now();
                if epoch_done {
                    if let Some(eval) = eval {
                        let report = evaluate(&self.ranker, eval, o.batch_size, (epoch + 1) as usize, self.step)?;
                        let line = serde_json::json!({"kind": "eval", "step": self.step, "epoch": epoch + 1, "loss": report.loss, "tasks": report.tasks});
                        self.log(&line)?;
                        if !o.quiet {
                            let summary: Vec<String> =
                                report.tasks.iter().map(|(n, m)| format!("{n} AUC {:.4}", m.auc)).collect();
                            progress.println(format!(
                                "epoch {}: eval loss {:.4}; {}",
                                epoch + 1,
                                report.loss,
                                summary.join(", ")
                            ));
                        }
                        evaluations.push(report);
                    }
                }
                let interrupted = o.stop_after == Some(self.step);
                if epoch_done || interrupted || o.checkpoint_every.is_some_and(|k| self.step.is_multiple_of(k)) {
                    last_checkpoint = self.save_checkpoint()?;
                }
                paused += pause_started.elapsed();
                if interrupted {
                    progress.abandon();
                    return Ok(TrainReport {
                        steps: self.step,
                        interrupted: true,
                        last_loss,
                        evaluations,
                        checkpoint: last_checkpoint,
                        examples_per_second: train_rate(examples, paused),
                    });
                }
                if epoch_done {
                    break;
                }
            }
            if self.step == start_step && self.step < total {
                return Err(Error::input("train", "data", "the training data produced no batches"));
            }
        }
        progress.finish_and_clear();
        Ok(TrainReport {
            steps: self.step,
            interrupted: false,
            last_loss,
            evaluations,
            checkpoint: last_checkpoint,
            examples_per_second: train_rate(examples, paused),
        })
    }
}

/// Evaluates `ranker` on every row of `data` (file order): the weighted loss and per-task AUC, log
/// loss, normalised entropy, calibration and calibration by decile of the (calibrated)
/// probabilities.
pub fn evaluate(
    ranker: &Ranker,
    data: &dyn BatchSource,
    batch_size: usize,
    epoch: usize,
    step: u64,
) -> Result<EvalReport> {
    let tasks = ranker.task_names().to_vec();
    let mut probs: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    let mut labels: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    let (mut loss_sum, mut rows) = (0.0, 0usize);
    for item in data.batches(batch_size, None)? {
        let b = item?;
        let logits = ranker.forward(&b.batch)?;
        loss_sum +=
            ranker.loss(&logits, &b.labels, b.example_weights.as_ref())?.to_dtype(DType::F64)?.to_scalar::<f64>()?
                * b.rows as f64;
        rows += b.rows;
        let p: Vec<Vec<f64>> = ranker.probabilities(&logits)?.to_dtype(DType::F64)?.to_vec2()?;
        let y: Vec<Vec<f64>> = b.labels.to_dtype(DType::F64)?.to_vec2()?;
        for (pr, yr) in p.iter().zip(&y) {
            for t in 0..tasks.len() {
                probs[t].push(pr[t]);
                labels[t].push(yr[t]);
            }
        }
    }
    if rows == 0 {
        return Err(Error::input("eval", "data", "the evaluation set is empty"));
    }
    let reliability =
        tasks.iter().enumerate().map(|(t, name)| Reliability::new(name, &probs[t], &labels[t], DECILES)).collect();
    let tasks = tasks.into_iter().enumerate().map(|(t, name)| (name, task_metrics(&probs[t], &labels[t]))).collect();
    Ok(EvalReport { epoch, step, loss: loss_sum / rows as f64, tasks, reliability })
}
