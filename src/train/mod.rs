//! Training and evaluation: AdamW with warm-up and cosine decay, gradient clipping, per-epoch
//! evaluation (AUC, log loss, normalised entropy, calibration), progress reporting, `metrics.jsonl`,
//! an SVG of the training curves, atomic and resumable checkpoints.

mod adamw;
mod checkpoints;
mod metrics;
mod plot;
mod schedule;
mod trainer;

pub use adamw::{clip_grad_norm, grad_norm, AdamW, AdamWConfig};
pub use checkpoints::{latest_checkpoint, resolve_checkpoint};
pub use metrics::{auc, task_metrics, TaskMetrics};
pub use plot::{smooth, training_curves, Series};
pub use schedule::WarmupCosine;
pub use trainer::{
    evaluate, non_finite_score, BatchSource, EvalReport, TrainOptions, TrainReport, Trainer, TRAINER_STATE_FILE,
};
