//! The trainer: options, a run directory's model, optimizer and position, checkpoints and resume
//! (the step loop itself is in `fit.rs`).

mod fit;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ranker_model::checkpoint::{self, write_safetensors};
use ranker_model::{Ranker, RankerConfig};
use rankstack_nn::checkpoint::read_safetensors;
use rankstack_nn::finite::first_non_finite;
use rankstack_nn::{Error, InitScheme, Result, SeededVarMap};
use serde::Serialize;

use super::checkpoints::{latest_checkpoint, publish};
use super::tensorboard::EventWriter;
use super::{AdamW, AdamWConfig, EvalReport, TrainingCurves};
use crate::data::LabeledBatch;
use crate::device::DeviceSpec;

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
        // Decoded on a thread of its own, two batches ahead of the step that consumes them.
        let stream = crate::data::ParquetDataset::batches(self, batch_size, shuffle)?;
        Ok(Box::new(crate::data::Prefetch::new(stream, 2)))
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
    /// The device to train on. Not part of a run's saved options: a run may be resumed on another
    /// device (the same seed gives the same weights on one device; the CPU and a GPU draw different
    /// dropout masks and sum in different orders).
    #[serde(skip)]
    pub device: DeviceSpec,
    /// bf16 autocast on a GPU: every linear layer's product in bf16 (inputs and weights rounded,
    /// f32 accumulation in cuBLAS, output widened), with f32 master weights, optimizer, loss and
    /// everything else ([`rankstack_nn::Linear::set_autocast`]).
    pub bf16_autocast: bool,
    /// How a fresh run draws its initial weights ([`InitScheme`]; a resumed run loads them).
    /// Default: each layer's own initialisation ([`InitScheme::Layers`]; feature tables
    /// `N(0, 1/dim)`), which the PyTorch reference trainer also draws by default; on MovieLens it
    /// is as good as Xavier-normal without TransAct's time window and much better with it
    /// (docs/trajectory.md has the measurements).
    pub init: InitScheme,
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
            device: DeviceSpec::Cpu,
            bf16_autocast: false,
            init: InitScheme::Layers,
        }
    }
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
    device: Device,
    store: SeededVarMap,
    optimizer: AdamW,
    options: TrainOptions,
    run_dir: PathBuf,
    step: u64,
    /// Training losses since the last `train` line of `metrics.jsonl` (saved with checkpoints, so
    /// a resumed run's first line averages the same steps as an uninterrupted run's).
    window: LossWindow,
    curves: TrainingCurves,
    tensorboard: EventWriter,
}

impl TrainOptions {
    /// Checks every option (positive sizes and intervals, a finite positive clipping norm, a
    /// learning-rate floor in `[0, 1]`); [`Trainer::new`] and [`Trainer::resume`] call it, and the
    /// CLI calls it before writing anything.
    pub fn validate(&self) -> Result<()> {
        check_options(self)?;
        AdamW::new(Vec::new(), self.optimizer).map(|_| ())
    }
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
    if o.max_steps == Some(0) {
        return bad("max_steps", "must be > 0");
    }
    if o.checkpoint_every == Some(0) {
        return bad("checkpoint_every", "must be > 0");
    }
    if o.stop_after == Some(0) {
        return bad("stop_after", "must be > 0");
    }
    if o.bf16_autocast && o.device.is_cpu() {
        return bad(
            "precision",
            "bf16 training is autocast on a GPU (--device cuda); on the CPU train in f32 and score with --weights bf16",
        );
    }
    Ok(())
}

fn set_precision(ranker: &mut Ranker, options: &TrainOptions) {
    rankstack_nn::autocast_linear_layers(ranker, options.bf16_autocast.then_some(DType::BF16));
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
        let device = options.device.open()?;
        let store = SeededVarMap::new(options.seed).with_scheme(options.init);
        let mut ranker = Ranker::new(config, store.var_builder(DType::F32, &device))?;
        // Only a valid config creates the run directory.
        std::fs::create_dir_all(&run_dir).map_err(Error::io_at(&run_dir))?;
        ranker.set_row_sparse_gradients(options.row_sparse_embeddings);
        set_precision(&mut ranker, &options);
        let optimizer = AdamW::new(store.named_vars(), options.optimizer)?;
        // A fresh run starts a fresh log.
        let _ = std::fs::remove_file(run_dir.join("metrics.jsonl"));
        let tensorboard = EventWriter::fresh(&run_dir)?;
        let curves = TrainingCurves::default();
        Ok(Self {
            ranker,
            device,
            store,
            optimizer,
            options,
            run_dir,
            step: 0,
            window: LossWindow::default(),
            curves,
            tensorboard,
        })
    }

    /// Continues the run in `run_dir` from its latest checkpoint: weights, buffers, optimizer
    /// moments, step and the open logging window. With the same options and data, the final
    /// weights equal those of an uninterrupted run (every step's randomness derives from
    /// `(seed, step)`). Options that would make the resumed run differ from an uninterrupted one
    /// (batch size, seed, row-sparse embeddings) must equal the checkpoint's: a difference is an
    /// error listing each one ([`Trainer::resume_with_changes`] accepts them).
    pub fn resume(run_dir: impl AsRef<Path>, options: TrainOptions) -> Result<Self> {
        Self::resume_impl(run_dir.as_ref(), options, true)
    }

    /// [`Trainer::resume`], accepting a batch size, seed or embedding-update mode that differs from
    /// the checkpoint's (the run then no longer reproduces an uninterrupted one).
    pub fn resume_with_changes(run_dir: impl AsRef<Path>, options: TrainOptions) -> Result<Self> {
        Self::resume_impl(run_dir.as_ref(), options, false)
    }

    fn resume_impl(run_dir: &Path, options: TrainOptions, strict: bool) -> Result<Self> {
        check_options(&options)?;
        let run_dir = run_dir.to_path_buf();
        let Some(dir) = latest_checkpoint(&run_dir)? else {
            return Err(Error::input("train", "out", format!("{} holds no checkpoint to resume", run_dir.display())));
        };
        let device = options.device.open()?;
        let (mut ranker, store) = checkpoint::load(&dir, DType::F32, &device)?;
        ranker.set_row_sparse_gradients(options.row_sparse_embeddings);
        set_precision(&mut ranker, &options);
        let mut optimizer = AdamW::new(store.named_vars(), options.optimizer)?;
        let state = read_safetensors(dir.join(TRAINER_STATE_FILE))?;
        if strict {
            check_resumed_options(&state.metadata, &options)?;
        }
        optimizer.load_state(&state.tensors)?;
        let step = optimizer.step_count();
        let window = LossWindow::from_metadata(&state.metadata);
        let tensorboard = EventWriter::resumed(&run_dir, step)?;
        let curves = TrainingCurves::default();
        let mut trainer =
            Self { ranker, device, store, optimizer, options, run_dir, step, window, curves, tensorboard };
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
        let mut meta =
            HashMap::from([("options".to_string(), serde_json::to_string(&self.options).expect("options serialise"))]);
        self.window.to_metadata(&mut meta);
        write_safetensors(&dir.join(TRAINER_STATE_FILE), &state, Some(meta))?;
        publish(&self.run_dir, &dir)?;
        let svg = self.curves.svg()?;
        ranker_model::checkpoint::write_atomically(&self.run_dir.join("training_curves.svg"), svg.as_bytes())?;
        Ok(dir)
    }

    /// Checks every parameter, buffer and optimizer moment for infinities and NaNs (on their
    /// device; see [`rankstack_nn::finite`]): a non-finite state is an error naming the first
    /// such tensor and the step, and is never evaluated, checkpointed or named "last good".
    fn check_finite_state(&self, last_good: Option<&Path>) -> Result<()> {
        let state = checkpoint::state(&self.ranker, &self.store);
        let found = match first_non_finite(state.iter().map(|(n, v)| (n.as_str(), v.as_tensor())))? {
            Some(name) => Some(format!("tensor `{name}`")),
            None => self.optimizer.first_non_finite_state()?.map(|name| format!("optimizer state `{name}`")),
        };
        match found {
            None => Ok(()),
            Some(what) => {
                Err(stopped("model", format!("non-finite values in {what} after step {}", self.step), last_good))
            }
        }
    }

    /// An out-of-memory error with what the planner expected and what would fit; other errors as
    /// they are.
    fn explain_out_of_memory(&self, e: Error) -> Error {
        if !crate::device::is_out_of_memory(&e) {
            return e;
        }
        let b = self.options.batch_size;
        let plan = self.ranker.cost(b);
        let calibration = ranker_model::TrainingCalibration::for_training(&self.device, self.options.bf16_autocast);
        let gib = |x: f64| x / (1u64 << 30) as f64;
        let fits = match rankstack_nn::device_memory::device_memory(&self.device) {
            Ok(m) => format!(
                "; the largest batch the planner fits in 60% of this device's {:.1} GiB is {} (or use --batch-size auto)",
                gib(m.total as f64),
                plan.max_training_batch_calibrated(usize::try_from(m.total).unwrap_or(usize::MAX), 0.6, calibration)
            ),
            Err(_) => String::new(),
        };
        Error::input(
            "train",
            "batch-size",
            format!(
                "the device ran out of memory at batch {b} (the cost planner puts one training step at {:.2} GiB){fits}; device error: {}",
                gib(plan.calibrated_training_bytes(calibration) as f64),
                e.to_string().lines().next().unwrap_or("")
            ),
        )
    }

    /// Planned (cost planner, calibrated on a GPU) against measured peak memory of a training step of
    /// `rows` rows,
    /// as a `metrics.jsonl` line; on a GPU a difference of more than 10% is also printed as a warning.
    fn memory_report(&self, rows: usize, progress: &indicatif::ProgressBar) -> Result<serde_json::Value> {
        // On a GPU the planner's activations count with their measured factor, and the next batch,
        // copied while this step ran, is on the device too (docs/cost-planner.md).
        let calibration = ranker_model::TrainingCalibration::for_training(&self.device, self.options.bf16_autocast);
        let planned = self.ranker.cost(rows).calibrated_training_bytes(calibration) as f64;
        let measured = rankstack_nn::device_memory::peak_tensor_bytes(&self.device)? as f64;
        let total = rankstack_nn::device_memory::device_memory(&self.device)?.total;
        let ratio = measured / planned.max(1.0);
        if !self.device.is_cpu() && !(0.9..=1.1).contains(&ratio) {
            progress.println(format!(
                "warning: the cost planner put a training step at {:.2} GiB; the device's peak was {:.2} GiB ({:+.0}%)",
                planned / (1u64 << 30) as f64,
                measured / (1u64 << 30) as f64,
                (ratio - 1.0) * 100.0
            ));
        }
        Ok(serde_json::json!({
            "kind": "memory", "step": self.step, "device": self.options.device.to_string(),
            "batch_size": rows, "planned_bytes": planned as u64,
            "measured_peak_bytes": measured as u64, "device_bytes": total,
            "measured": if self.device.is_cpu() { "peak resident memory of the process" } else { "peak tensor memory (CUDA memory pool high-water mark)" },
        }))
    }
}

/// The file of a checkpoint that holds the optimizer state and the trainer's position.
pub const TRAINER_STATE_FILE: &str = "trainer_state.safetensors";

/// The error that stops training: `reason`, and where the last good checkpoint is (if any).
fn stopped(what: &str, reason: String, last_good: Option<&Path>) -> Error {
    let kept = match last_good {
        Some(dir) => format!("the last good checkpoint is kept at {}", dir.display()),
        None => "no checkpoint had been written yet".to_string(),
    };
    Error::input("train", what, format!("{reason}; training stopped, {kept}"))
}

/// The first parameter (in `params` order) whose dense or row gradient holds a non-finite value.
fn first_non_finite_gradient(
    params: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
    rows: &[rankstack_nn::RowGradient],
) -> Result<Option<String>> {
    let mut named = Vec::new();
    for (name, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            named.push((name.as_str(), g));
        }
        for r in rows.iter().filter(|r| r.table.id() == var.as_tensor().id()) {
            named.push((name.as_str(), &r.grad));
        }
    }
    first_non_finite(named)
}

/// Options whose change makes a resumed run differ from an uninterrupted one: each difference
/// between the checkpoint's options (its trainer-state metadata) and `options`, as one error.
fn check_resumed_options(metadata: &HashMap<String, String>, options: &TrainOptions) -> Result<()> {
    let Some(saved) = metadata.get("options").and_then(|json| serde_json::from_str::<TrainOptions>(json).ok()) else {
        return Ok(()); // a checkpoint without options (written by another tool): nothing to compare
    };
    let mut changes = Vec::new();
    if saved.batch_size != options.batch_size {
        changes.push(format!("batch size {} (checkpoint: {})", options.batch_size, saved.batch_size));
    }
    if saved.seed != options.seed {
        changes.push(format!("seed {} (checkpoint: {})", options.seed, saved.seed));
    }
    if saved.row_sparse_embeddings != options.row_sparse_embeddings {
        let mode = |sparse: bool| if sparse { "row-sparse" } else { "dense" };
        changes.push(format!(
            "{} embedding gradients (checkpoint: {})",
            mode(options.row_sparse_embeddings),
            mode(saved.row_sparse_embeddings)
        ));
    }
    if changes.is_empty() {
        return Ok(());
    }
    Err(Error::input(
        "train",
        "resume",
        format!(
            "the options differ from the checkpoint's, so the run would not continue as it started: {}; \
             use the checkpoint's values, or accept the change explicitly (--allow-resume-changes)",
            changes.join(", ")
        ),
    ))
}

/// The training losses since the last logged line: their sum and count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct LossWindow {
    sum: f64,
    steps: u64,
}

impl LossWindow {
    const METADATA_KEY: &'static str = "loss_window";

    fn add(&mut self, loss: f64) {
        self.sum += loss;
        self.steps += 1;
    }

    fn mean(&self) -> f64 {
        self.sum / self.steps as f64
    }

    /// Stored as the sum's bits and the count, so a resume restores the exact sum.
    fn to_metadata(self, meta: &mut HashMap<String, String>) {
        meta.insert(Self::METADATA_KEY.into(), format!("{:016x} {}", self.sum.to_bits(), self.steps));
    }

    /// The window saved in a checkpoint's metadata; empty for checkpoints written before it was saved.
    fn from_metadata(meta: &HashMap<String, String>) -> Self {
        let parse = |text: &str| -> Option<Self> {
            let (bits, steps) = text.split_once(' ')?;
            Some(Self { sum: f64::from_bits(u64::from_str_radix(bits, 16).ok()?), steps: steps.parse().ok()? })
        };
        meta.get(Self::METADATA_KEY).and_then(|t| parse(t)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_non_finite_gradient_is_named_dense_or_row_sparse() {
        let d = Device::Cpu;
        let a = candle_core::Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &d).unwrap()).unwrap();
        let b = candle_core::Var::from_tensor(&Tensor::new(&[[1.0f32], [2.0]], &d).unwrap()).unwrap();
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        // ∂/∂a of Σ a ⊙ [1, ∞] is [1, ∞]; b gets a finite gradient.
        let scale = Tensor::new(&[1.0f32, f32::INFINITY], &d).unwrap();
        let loss = ((a.as_tensor() * &scale).unwrap().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(first_non_finite_gradient(&params, &grads, &[]).unwrap().as_deref(), Some("a"));
        let finite = (a.as_tensor().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap().backward().unwrap();
        assert_eq!(first_non_finite_gradient(&params, &finite, &[]).unwrap(), None);
        let rows = vec![rankstack_nn::RowGradient {
            table: b.as_tensor().clone(),
            rows: vec![1],
            grad: Tensor::new(&[[f32::NAN]], &d).unwrap(),
        }];
        assert_eq!(first_non_finite_gradient(&params, &finite, &rows).unwrap().as_deref(), Some("b"));
    }
}
