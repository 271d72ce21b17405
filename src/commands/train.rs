//! `rankstack train`.

use std::path::{Path, PathBuf};

use rankstack_nn::Result;

use super::{check_batch_memory, check_config_memory, Workload};
use crate::data::{synthetic, DataSchema, ParquetDataset};
use crate::device::DeviceSpec;
use crate::train::{TrainOptions, TrainReport, Trainer};

/// Arguments of `rankstack train`.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// Architecture preset.
    pub preset: String,
    /// Architecture config file (overrides the preset).
    pub config: Option<PathBuf>,
    /// Training data; `None` trains on the built-in synthetic data.
    pub data: Option<PathBuf>,
    /// Evaluation data.
    pub eval: Option<PathBuf>,
    /// Run directory.
    pub out: PathBuf,
    /// Continue the run in `out` from its latest checkpoint.
    pub resume: bool,
    /// With `resume`: accept options or a data schema that differ from the checkpoint's.
    pub allow_resume_changes: bool,
    /// Rows of synthetic training data (without `data`).
    pub synthetic_rows: usize,
    /// `--batch-size auto`: choose `options.batch_size` as the largest batch whose planned
    /// training memory fits in this fraction of the device's memory.
    pub auto_batch: Option<f64>,
    /// Training options.
    pub options: TrainOptions,
}

/// Trains and returns a printable summary. Nothing is written before the architecture is known
/// to be valid. A resumed run must have the checkpoint's data schema and options (unless
/// `allow_resume_changes`).
pub fn train(args: &TrainArgs) -> Result<String> {
    let mut checked = args.options.clone();
    if args.auto_batch.is_some() {
        checked.batch_size = 1; // chosen below, once the architecture is known
    }
    checked.validate()?;
    let architecture =
        if args.resume { None } else { Some(super::architecture(&args.preset, args.config.as_deref())?) };
    let (train_path, eval_path) = match &args.data {
        Some(data) => (data.clone(), args.eval.clone()),
        None => {
            // The embedded default: synthetic training data and a held-out stream of the same world.
            let dir = args.out.join("data");
            std::fs::create_dir_all(&dir)
                .map_err(|source| rankstack_nn::Error::Io { path: dir.display().to_string(), source })?;
            let (tp, ep) = (dir.join("train.parquet"), dir.join("eval.parquet"));
            if !tp.exists() || !ep.exists() {
                let spec = synthetic::SyntheticSpec {
                    rows: args.synthetic_rows,
                    seed: args.options.seed,
                    ..Default::default()
                };
                synthetic::generate(&spec, &tp)?;
                synthetic::generate(
                    &synthetic::SyntheticSpec { rows: (args.synthetic_rows / 4).max(1), stream: 1, ..spec },
                    &ep,
                )?;
            }
            (tp, Some(ep))
        }
    };
    let train = ParquetDataset::open(&train_path)?;
    let eval = eval_path.as_deref().map(ParquetDataset::open).transpose()?;
    if let Some(e) = &eval {
        if e.schema() != train.schema() {
            return Err(rankstack_nn::Error::input(
                "train",
                "eval",
                "the evaluation file's schema differs from the training file's",
            ));
        }
    }
    // `--batch-size auto` picks the batch below; every other option is checked first.
    let mut options = args.options.clone();
    let mut notes = String::new();
    let plan_batch_for = |config: &ranker_model::RankerConfig, options: &mut TrainOptions| -> Result<String> {
        match args.auto_batch {
            Some(fraction) => {
                let plan = auto_batch_size(config, options.device, fraction, options.bf16_autocast)?;
                options.batch_size = plan.batch_size;
                Ok(format!("{plan}\n"))
            }
            None => Ok(String::new()),
        }
    };
    let mut trainer = match architecture {
        None => {
            if args.auto_batch.is_some() {
                let dir = crate::train::latest_checkpoint(&args.out)?.ok_or_else(|| {
                    rankstack_nn::Error::input(
                        "train",
                        "out",
                        format!("{} holds no checkpoint to resume", args.out.display()),
                    )
                })?;
                let config = ranker_model::RankerConfig::from_file(dir.join("config.json"))?;
                notes = plan_batch_for(&config, &mut options)?;
            }
            if args.allow_resume_changes {
                Trainer::resume_with_changes(&args.out, options.clone())?
            } else {
                let trainer = Trainer::resume(&args.out, options.clone())?;
                DataSchema::check_fits_model(train.schema(), trainer.ranker().config(), "train --resume", true)?;
                trainer
            }
        }
        Some(mut config) => {
            train.schema().apply(&mut config)?;
            check_config_memory(&config, "train")?;
            notes = plan_batch_for(&config, &mut options)?;
            Trainer::new(&config, options.clone(), &args.out)?
        }
    };
    let rows = train.num_rows();
    if let Err(e) = check_batch_memory(
        trainer.ranker(),
        options.batch_size,
        rows,
        Workload::Training,
        "train",
        trainer.ranker().device(),
    ) {
        // A new run's directory holds nothing yet: leave no empty directory behind (this removes
        // only an empty one).
        let _ = std::fs::remove_dir(&args.out);
        return Err(e);
    }
    let report = trainer.fit(&train, eval.as_ref().map(|e| e as &dyn crate::train::BatchSource))?;
    Ok(notes + &summary(&report, &args.out))
}

/// The batch `--batch-size auto` chose, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    /// The chosen batch size.
    pub batch_size: usize,
    /// The device's memory in bytes.
    pub device_bytes: u64,
    /// The fraction of it a step may plan to use.
    pub fraction: f64,
    /// The planner's training memory at the chosen batch, in bytes.
    pub planned_bytes: usize,
}

impl std::fmt::Display for BatchPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        write!(
            f,
            "batch size {} (auto): planned training memory {:.2} GiB of {:.0}% of {:.1} GiB",
            self.batch_size,
            gib(self.planned_bytes as f64),
            self.fraction * 100.0,
            gib(self.device_bytes as f64)
        )
    }
}

/// The largest batch whose planned training memory ([`ranker_model::CostReport::training_bytes`])
/// fits in `fraction` of `device`'s memory (on the CPU: the machine's memory), in f32 or under bf16
/// autocast.
pub fn auto_batch_size(
    config: &ranker_model::RankerConfig,
    device: DeviceSpec,
    fraction: f64,
    bf16_autocast: bool,
) -> Result<BatchPlan> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(rankstack_nn::Error::config("train", "memory-fraction", "must be in (0, 1]"));
    }
    let device = device.open()?;
    let memory = rankstack_nn::device_memory::device_memory(&device)?;
    // On a GPU the planner's activations are scaled by their measured ratio and the batch copied
    // ahead is counted (cost.rs).
    let calibration = ranker_model::TrainingCalibration::for_training(&device, bf16_autocast);
    plan_batch(config, memory.total, fraction, calibration)
}

/// [`auto_batch_size`] for a device of `device_bytes`, planned as `calibration` says for that kind
/// of device.
pub fn plan_batch(
    config: &ranker_model::RankerConfig,
    device_bytes: u64,
    fraction: f64,
    calibration: ranker_model::TrainingCalibration,
) -> Result<BatchPlan> {
    // The planner reads shapes only: a CPU model of plain zero tensors costs no initialisation.
    let ranker = ranker_model::Ranker::new(
        config,
        candle_nn::VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu),
    )?;
    let bytes = usize::try_from(device_bytes).unwrap_or(usize::MAX);
    let batch_size = ranker.cost(1).max_training_batch_calibrated(bytes, fraction, calibration);
    if batch_size == 0 {
        return Err(rankstack_nn::Error::input(
            "train",
            "batch-size",
            format!(
                "not even one example fits: the model's parameters, gradients and optimizer state alone take {} bytes, \
                 more than {:.0}% of the device's {device_bytes}",
                ranker.cost(1).training_bytes(),
                fraction * 100.0
            ),
        ));
    }
    let planned_bytes = ranker.cost(batch_size).calibrated_training_bytes(calibration);
    Ok(BatchPlan { batch_size, device_bytes, fraction, planned_bytes })
}

fn summary(report: &TrainReport, out: &Path) -> String {
    let mut s = format!(
        "{} after {} steps ({:.0} examples/s); last training loss {:.4}\ncheckpoint: {}\n",
        if report.interrupted { "stopped" } else { "finished" },
        report.steps,
        report.examples_per_second,
        report.last_loss,
        report.checkpoint.display()
    );
    if let Some(last) = report.evaluations.last() {
        s.push_str(&format!("evaluation after epoch {} (loss {:.4}):\n", last.epoch, last.loss));
        s.push_str(&crate::commands::predict::metrics_table(&last.tasks));
    }
    s.push_str(&format!(
        "metrics: {}\ncurves:  {}\nTensorBoard: tensorboard --logdir {}\n",
        out.join("metrics.jsonl").display(),
        out.join("training_curves.svg").display(),
        out.display()
    ));
    s
}
