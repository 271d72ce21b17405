//! `rankstack train`.

use std::path::{Path, PathBuf};

use rankstack_nn::Result;

use crate::data::{synthetic, ParquetDataset};
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
    /// Rows of synthetic training data (without `data`).
    pub synthetic_rows: usize,
    /// Training options.
    pub options: TrainOptions,
}

/// Trains and returns a printable summary.
pub fn train(args: &TrainArgs) -> Result<String> {
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
    let mut trainer = if args.resume {
        Trainer::resume(&args.out, args.options.clone())?
    } else {
        let mut config = super::architecture(&args.preset, args.config.as_deref())?;
        train.schema().apply(&mut config)?;
        Trainer::new(&config, args.options.clone(), &args.out)?
    };
    let report = trainer.fit(&train, eval.as_ref().map(|e| e as &dyn crate::train::BatchSource))?;
    Ok(summary(&report, &args.out))
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
