//! Evaluation: the weighted loss and per-task metrics of a model over a data set.

use candle_core::{DType, Tensor};
use ranker_model::Ranker;
use rankstack_nn::host_transfer::{read_computed, read_input};
use rankstack_nn::{Error, Result};
use serde::Serialize;

use super::{task_metrics, BatchSource, Reliability, TaskMetrics, DECILES};
use crate::data::UploadAhead;

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

/// The error for a model output that is not a finite number (a diverged or corrupt model): it
/// names the row (0-based, file order) and the task, so the input can be found.
pub fn non_finite_score(command: &str, value: f64, row: u64, task: &str) -> Error {
    Error::input(command, "model output", format!("the probability of task `{task}` for row {row} is {value}"))
}

/// Evaluates `ranker` on every row of `data` (file order): the weighted loss and per-task AUC, log
/// loss, normalised entropy, calibration and calibration by decile of the (calibrated)
/// probabilities. A non-finite probability is an error naming its row and task
/// ([`non_finite_score`]), a non-finite loss one naming the batch's rows: a report never holds a
/// NaN or infinite loss.
pub fn evaluate(
    ranker: &Ranker,
    data: &dyn BatchSource,
    batch_size: usize,
    epoch: usize,
    step: u64,
) -> Result<EvalReport> {
    let tasks = ranker.task_names().to_vec();
    let device = ranker.device().clone();
    let mut probs: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    let mut labels: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    let (mut loss_sum, mut rows) = (0.0, 0usize);
    // On a GPU the next batch is copied while this one is evaluated.
    for item in UploadAhead::new(data.batches(batch_size, None)?, &device) {
        let b = item?;
        let logits = ranker.forward(&b.batch)?;
        let loss = ranker.loss(&logits, &b.labels, b.example_weights.as_ref())?.to_dtype(DType::F64)?.reshape(1)?;
        let p = ranker.probabilities(&logits)?.to_dtype(DType::F64)?.flatten_all()?;
        // One read per batch (on a GPU each read waits for the device): the loss, then the
        // probabilities, row by row.
        let values = read_computed::<f64>(&Tensor::cat(&[&loss, &p], 0)?, "loss and probabilities")?;
        let (loss, p) = (values[0], &values[1..]);
        if !loss.is_finite() {
            let (first, last) = (b.row_index.first().copied().unwrap_or(0), b.row_index.last().copied().unwrap_or(0));
            return Err(Error::input(
                "eval",
                "model output",
                format!("the loss over rows {first}..={last} is {loss} (the model's logits overflow)"),
            ));
        }
        loss_sum += loss * b.rows as f64;
        rows += b.rows;
        let y = read_input::<f64>(&b.labels.to_dtype(DType::F64)?, "labels")?;
        for ((pr, yr), row) in p.chunks(tasks.len()).zip(y.chunks(tasks.len())).zip(&b.row_index) {
            for t in 0..tasks.len() {
                if !pr[t].is_finite() {
                    return Err(non_finite_score("eval", pr[t], *row, &tasks[t]));
                }
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
