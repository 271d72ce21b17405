//! The multi-task training loss.

use candle_core::{DType, Result, Tensor};
use rankstack_nn::host_transfer::{move_to_device, read_input, upload_slice, Origin};
use rankstack_nn::{loss::bce_with_logits, shape::expect_dims, Error};

const LAYER: &str = "multitask_loss";

/// `L = Σ_t w_t · (Σ_b m_bt e_b ℓ(x_bt, y_bt)) / (Σ_b m_bt e_b)`, where `ℓ` is the numerically
/// stable BCE with logits, `m_bt = 0` where the label is NaN (missing) and 1 otherwise, `e_b` the
/// optional per-example weight (1 when absent) and `w_t` the task weight.
///
/// Each task contributes the weighted mean over the examples that carry its label; a task with no
/// label in the batch contributes 0 (and no gradient). Labels may be soft, in `[0, 1]`.
///
/// Errors: shapes (`logits`, `labels` `[batch, tasks]`, `example_weights` `[batch]`), labels outside
/// `[0, 1]`, negative or non-finite example weights, a task-weight count that differs from the
/// number of tasks.
pub fn multitask_loss(
    logits: &Tensor,
    labels: &Tensor,
    task_weights: &[f64],
    example_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let tasks = logits.dims2()?.1;
    if task_weights.len() != tasks {
        return Err(
            Error::input(LAYER, "task_weights", format!("{} weights for {tasks} tasks", task_weights.len())).into()
        );
    }
    let w = upload_slice(task_weights, tasks, logits.device(), "task weights", Origin::Constant)?;
    weighted_multitask_loss(logits, labels, &w, example_weights)
}

/// [`multitask_loss`] with the task weights already on the logits' device: a `[tasks]` float
/// tensor (the [`crate::Ranker`] keeps its config's there, so a step copies nothing for them).
pub(crate) fn weighted_multitask_loss(
    logits: &Tensor,
    labels: &Tensor,
    task_weights: &Tensor,
    example_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, tasks) = logits.dims2()?;
    expect_dims(LAYER, "labels", labels, &[Some(batch), Some(tasks)])?;
    expect_dims(LAYER, "task_weights", task_weights, &[Some(tasks)])?;
    let values = read_input::<f64>(&labels.to_dtype(DType::F64)?, "labels")?;
    if let Some(i) = values.iter().position(|v| !v.is_nan() && !(0.0..=1.0).contains(v)) {
        return Err(Error::input(
            LAYER,
            "labels",
            format!("label {} at row {}, task {} is outside [0, 1]", values[i], i / tasks, i % tasks),
        )
        .into());
    }
    let dtype = logits.dtype();
    // Labels and weights may come on the host (validated there above): one copy to the logits' device.
    let labels = move_to_device(labels, logits.device(), "labels", Origin::Input)?.to_dtype(dtype)?;
    let present = labels.eq(&labels)?; // NaN != NaN
    let mask = present.to_dtype(dtype)?;
    let clean = present.where_cond(&labels, &labels.zeros_like()?)?;
    let mut per = (bce_with_logits(logits, &clean)? * &mask)?;
    let mut counts = mask;
    if let Some(w) = example_weights {
        expect_dims(LAYER, "example_weights", w, &[Some(batch)])?;
        let wv = read_input::<f64>(&w.to_dtype(DType::F64)?, "example weights")?;
        if let Some(i) = wv.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(Error::input(
                LAYER,
                "example_weights",
                format!("weight {} at row {i} must be finite and >= 0", wv[i]),
            )
            .into());
        }
        let w = move_to_device(w, logits.device(), "example weights", Origin::Input)?.to_dtype(dtype)?.unsqueeze(1)?;
        per = per.broadcast_mul(&w)?;
        counts = counts.broadcast_mul(&w)?;
    }
    // A task without labels has numerator 0; the floor keeps 0 / 0 out.
    let means = per.sum(0)?.div(&counts.sum(0)?.maximum(1e-30)?)?;
    (means * task_weights.to_dtype(dtype)?)?.sum_all()
}

/// Calibrates probabilities predicted by a model trained on negatives kept at rate `r`:
/// `p' = p·r / (1 − p + p·r)`, computed as `σ(logit + ln r)` (the same value, stable in logit space).
pub fn calibrated_probability(logit: &Tensor, negative_sampling_rate: f64) -> Result<Tensor> {
    rankstack_nn::loss::sigmoid(&(logit + negative_sampling_rate.ln())?)
}
