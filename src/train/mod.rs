//! Training and evaluation: AdamW with warm-up and cosine decay, gradient clipping, per-epoch
//! evaluation (AUC, log loss, normalised entropy, calibration, reliability by decile), progress
//! reporting, `metrics.jsonl` mirrored to TensorBoard event files, an SVG of the training curves,
//! atomic and resumable checkpoints.

mod adamw;
mod checkpoints;
mod curves;
mod evaluate;
pub mod plot;
mod reliability;
mod schedule;
pub mod tensorboard;
mod trainer;

pub use crate::metrics::{auc, task_metrics, TaskMetrics};
pub use adamw::{
    clip_grad_norm, clip_scale, clip_to_norm, grad_norm, squared_grad_norm, AdamW, AdamWConfig, ADAMW_ENV,
};
pub use checkpoints::{latest_checkpoint, resolve_checkpoint};
pub use curves::{TrainingCurves, SMOOTHING_WEIGHT};
pub use evaluate::{evaluate, non_finite_score, EvalReport};
pub use plot::{smooth, Series};
pub use reliability::{reliability_svg, Reliability, ReliabilityBin, DECILES, RELIABILITY_MARKER};
pub use schedule::WarmupCosine;
pub use trainer::{BatchSource, TrainOptions, TrainReport, Trainer, TRAINER_STATE_FILE};
