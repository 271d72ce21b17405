//! The cost planner: parameters, FLOPs and memory of a ranker, computed from its shapes.
//!
//! The paper's constraints were "no latency regression" and "the same batch size within the GPU
//! memory budget". This module makes both visible before training: per module, the parameter count,
//! the FLOPs per candidate of the forward pass, and the activation memory per candidate.
//!
//! Conventions (all derived from shapes, never measured):
//! - FLOPs count `2 · m · n · k` per matrix product (multiply + add) and the attention products;
//!   element-wise work (norms, activations, masks) is excluded: it is memory-bound, and a few
//!   percent of the total for these models.
//! - Activation floats per candidate count every intermediate tensor the forward pass creates
//!   (what autograd keeps for the backward pass): linear outputs, norm intermediates, activations,
//!   products. Inference keeps only the largest module's intermediates alive at once.
//! - Memory is float32: parameters `4P` bytes; training adds gradients (`4P`) and AdamW's two
//!   moments (`8P`), plus `4 · B · Σ activations`.
//! - A batch's model inputs (the float tensors a batch brings to the device: dense features,
//!   pretrained embeddings, extra blocks, the sequence's item embeddings at its longest) are
//!   counted apart, per candidate: on a GPU the trainer holds a second batch of them, the next one,
//!   copied while the step runs ([`TrainingCalibration::inputs_ahead`]).

use std::fmt;

use dcnv2::{Combine, CrossLayerKind, CrossNetConfig};
use masknet::MaskBlockConfig;
use rankstack_nn::{MlpConfig, Normalization};
use sequence_transformer::{Fusion, MaxPool, PositionalEncoding, SequenceTransformerConfig};

use crate::{Ranker, StageConfig};

/// The cost of one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleCost {
    /// Module name (`features`, `sequence`, `backbone[0] parallel_masknet`, `mlp`, `heads`).
    pub name: String,
    /// Trainable parameters.
    pub params: usize,
    /// Forward FLOPs per candidate.
    pub flops_per_candidate: usize,
    /// Floats of intermediate tensors per candidate in the forward pass.
    pub activations_per_candidate: usize,
}

/// The cost of a whole ranker at one batch size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostReport {
    /// The batch size the memory figures are for.
    pub batch_size: usize,
    /// Per-module costs, in forward order.
    pub modules: Vec<ModuleCost>,
    /// Floats of one candidate's model inputs that a batch copies to the device (dense features,
    /// pretrained embeddings, extra blocks, the sequence's item and candidate embeddings with the
    /// sequence at `max_len`); ids stay on the host.
    pub input_floats_per_candidate: usize,
}

const F32: usize = 4;

/// The peak tensor memory per candidate of a training step on a CUDA GPU over the planner's
/// activation estimate: 0.44 (`docs/cost-planner.md`, calibration). Measured on the GPU's graph of
/// operations run on the CPU with the CPU kernels off (`RANKSTACK_CPU=candle`, counted heap:
/// `examples/gpu_bench.rs`) at batch 512, 2048 and 8192 for `homefeed-bench` in f32, since the
/// optimizer updates in place and the backward pass stores the first gradient of every node
/// instead of adding it to zeros (2026-12-07, fourteenth session): the planner's figure with this
/// factor and the batch ahead lies +2.2 … +9.1% above those peaks plus that batch (bf16 autocast
/// has its own, [`CUDA_BF16_TRAINING_ACTIVATIONS`]). Those peaks hold the step's own batch; the
/// next batch a GPU holds besides is [`TrainingCalibration::inputs_ahead`]. The GPU itself last
/// measured 2.65 (f32) and 2.7 (bf16 autocast), many changes before. `--batch-size auto` on a GPU
/// divides by this.
pub const CUDA_TRAINING_ACTIVATIONS: f64 = 0.44;

/// [`CUDA_TRAINING_ACTIVATIONS`] for training under bf16 autocast (`--precision bf16`): 0.41,
/// measured the same way (2026-12-07, fourteenth session): its graph keeps nothing rounded, and its
/// peak lies below f32's (7.72 against 8.22 GiB at batch 8192; where the difference arises was not
/// traced). With the f32 factor the plan would lie 8.7% above it at 8192; with this one it lies
/// +3.0 … +8.6% above the peaks plus the batch ahead.
pub const CUDA_BF16_TRAINING_ACTIVATIONS: f64 = 0.41;

/// What the planner's training figure adds or scales on one kind of device: the measured part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingCalibration {
    /// The device's peak activation memory over the planner's activation count (a factor that is
    /// not positive and finite counts them once).
    pub activation_factor: f64,
    /// Batches of model inputs the device holds besides the one the step reads: 1 on a GPU, where
    /// the trainer copies the next batch while the step runs (`UploadAhead` in the `rankstack`
    /// crate), 0 on the CPU, where nothing is copied.
    pub inputs_ahead: usize,
}

impl TrainingCalibration {
    /// The planner's own count: activations once, no batch ahead.
    pub const UNCALIBRATED: Self = Self { activation_factor: 1.0, inputs_ahead: 0 };

    /// A CUDA GPU's in f32: the activations [`CUDA_TRAINING_ACTIVATIONS`] times, one batch ahead.
    pub const CUDA: Self = Self { activation_factor: CUDA_TRAINING_ACTIVATIONS, inputs_ahead: 1 };

    /// A CUDA GPU's under bf16 autocast: [`CUDA_BF16_TRAINING_ACTIVATIONS`], one batch ahead.
    pub const CUDA_BF16_AUTOCAST: Self = Self { activation_factor: CUDA_BF16_TRAINING_ACTIVATIONS, inputs_ahead: 1 };

    /// The calibration of training on `device`: on a GPU [`Self::CUDA`], or
    /// [`Self::CUDA_BF16_AUTOCAST`] with `bf16_autocast`; [`Self::UNCALIBRATED`] on the CPU (where
    /// the measured figure, the process's peak RSS, is not a tensor figure).
    pub fn for_training(device: &candle_core::Device, bf16_autocast: bool) -> Self {
        match (device.is_cpu(), bf16_autocast) {
            (true, _) => Self::UNCALIBRATED,
            (false, false) => Self::CUDA,
            (false, true) => Self::CUDA_BF16_AUTOCAST,
        }
    }

    /// Planned bytes per candidate beyond the fixed part, for `report`'s model.
    fn bytes_per_candidate(&self, report: &CostReport) -> f64 {
        let activations = (F32 * report.total().activations_per_candidate) as f64 * usable(self.activation_factor);
        activations + (self.inputs_ahead * F32 * report.input_floats_per_candidate) as f64
    }
}

impl CostReport {
    /// Sums over all modules (named `total`).
    pub fn total(&self) -> ModuleCost {
        ModuleCost {
            name: "total".into(),
            params: self.modules.iter().map(|m| m.params).sum(),
            flops_per_candidate: self.modules.iter().map(|m| m.flops_per_candidate).sum(),
            activations_per_candidate: self.modules.iter().map(|m| m.activations_per_candidate).sum(),
        }
    }

    /// Bytes of the float32 parameters.
    pub fn parameter_bytes(&self) -> usize {
        F32 * self.total().params
    }

    /// Peak bytes for inference at this batch size: parameters plus the largest module's
    /// intermediates (`usize::MAX` where that overflows, see [`Self::checked_inference_bytes`]).
    pub fn inference_bytes(&self) -> usize {
        self.checked_inference_bytes().unwrap_or(usize::MAX)
    }

    /// [`Self::inference_bytes`], `None` when the figure overflows `usize` (an absurd batch size).
    pub fn checked_inference_bytes(&self) -> Option<usize> {
        let peak = self.modules.iter().map(|m| m.activations_per_candidate).max().unwrap_or(0);
        F32.checked_mul(self.batch_size)?.checked_mul(peak)?.checked_add(self.parameter_bytes())
    }

    /// Bytes for one AdamW training step: parameters, gradients, two moments, all activations
    /// (`usize::MAX` where that overflows, see [`Self::checked_training_bytes`]).
    pub fn training_bytes(&self) -> usize {
        self.checked_training_bytes().unwrap_or(usize::MAX)
    }

    /// [`Self::training_bytes`], `None` when the figure overflows `usize` (an absurd batch size).
    pub fn checked_training_bytes(&self) -> Option<usize> {
        let activations = F32.checked_mul(self.batch_size)?.checked_mul(self.total().activations_per_candidate)?;
        self.parameter_bytes().checked_mul(4)?.checked_add(activations)
    }

    /// Whether training at this batch size fits within `fraction` (e.g. 0.6) of `device_bytes`
    /// (never when the estimate overflows).
    pub fn training_fits(&self, device_bytes: usize, fraction: f64) -> bool {
        self.checked_training_bytes().is_some_and(|bytes| bytes as f64 <= fraction * device_bytes as f64)
    }

    /// The largest batch size whose training step fits within `fraction` of `device_bytes`
    /// (0 if not even the parameters and optimiser state fit).
    pub fn max_training_batch(&self, device_bytes: usize, fraction: f64) -> usize {
        self.max_training_batch_calibrated(device_bytes, fraction, TrainingCalibration::UNCALIBRATED)
    }

    /// Bytes of one batch's model inputs on the device ([`Self::input_floats_per_candidate`]
    /// for each of the batch's candidates; saturates at `usize::MAX`).
    pub fn input_bytes(&self) -> usize {
        F32.saturating_mul(self.batch_size).saturating_mul(self.input_floats_per_candidate)
    }

    /// [`CostReport::training_bytes`] as `calibration` plans it on a device: the activations
    /// counted `calibration.activation_factor` times, plus `calibration.inputs_ahead` batches of
    /// inputs ([`Self::input_bytes`]) copied ahead.
    pub fn calibrated_training_bytes(&self, calibration: TrainingCalibration) -> usize {
        let fixed = 4 * self.parameter_bytes();
        let per_candidate = calibration.bytes_per_candidate(self);
        fixed.saturating_add((per_candidate * self.batch_size as f64) as usize) // `as` saturates at usize::MAX
    }

    /// [`CostReport::max_training_batch`] as `calibration` plans it (see
    /// [`Self::calibrated_training_bytes`]).
    pub fn max_training_batch_calibrated(
        &self,
        device_bytes: usize,
        fraction: f64,
        calibration: TrainingCalibration,
    ) -> usize {
        let budget = fraction * device_bytes as f64 - (4 * self.parameter_bytes()) as f64;
        let per_candidate = calibration.bytes_per_candidate(self).max(1.0);
        if budget <= 0.0 {
            0
        } else {
            (budget / per_candidate).floor() as usize
        }
    }
}

/// `factor` where it is positive and finite, else 1.
fn usable(factor: f64) -> f64 {
    if factor.is_finite() && factor > 0.0 {
        factor
    } else {
        1.0
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

impl fmt::Display for CostReport {
    /// A Markdown table plus the memory summary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| module | parameters | MFLOP / candidate | activations / candidate |")?;
        writeln!(f, "|---|---:|---:|---:|")?;
        for m in self.modules.iter().chain(std::iter::once(&self.total())) {
            writeln!(
                f,
                "| {} | {} | {:.3} | {} |",
                m.name,
                m.params,
                m.flops_per_candidate as f64 / 1e6,
                m.activations_per_candidate
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "batch size {}: parameters {:.3} GiB; inference {:.3} GiB; training step (AdamW) {:.3} GiB",
            self.batch_size,
            gib(self.parameter_bytes()),
            gib(self.inference_bytes()),
            gib(self.training_bytes())
        )
    }
}

fn linear(inp: usize, out: usize, bias: bool) -> (usize, usize) {
    (inp * out + if bias { out } else { 0 }, 2 * inp * out)
}

/// Parameters, FLOPs and activations of an [`rankstack_nn::Mlp`].
fn mlp_cost(input: usize, cfg: &MlpConfig) -> (usize, usize, usize, usize) {
    let (mut params, mut flops, mut acts, mut width) = (0, 0, 0, input);
    for (i, &out) in cfg.dims.iter().enumerate() {
        let activated = i + 1 < cfg.dims.len() || cfg.activate_last;
        let (p, f) = linear(width, out, true);
        params += p;
        flops += f;
        acts += out;
        if activated {
            match cfg.normalization {
                Normalization::None => {}
                // centred, normalised, affine
                _ => {
                    params += 2 * out;
                    acts += 3 * out;
                }
            }
            acts += out * if cfg.dropout > 0.0 { 2 } else { 1 };
        }
        width = out;
    }
    (params, flops, acts, width)
}

fn mask_block_cost(m: usize, z: usize, cfg: &MaskBlockConfig) -> (usize, usize, usize) {
    let t = cfg.aggregation_width_unchecked(m);
    let q = cfg.output_dim;
    let (p1, f1) = linear(m, t, true);
    let (p2, f2) = linear(t, z, true);
    let (p3, f3) = linear(z, q, cfg.hidden_bias);
    let input_ln = if cfg.input_layer_norm { 2 * z } else { 0 };
    let params = p1 + p2 + p3 + 2 * q + input_ln;
    // aggregation, ReLU, mask, (input LN), mask ⊙ h, hidden, LN (3), activation
    let acts = 2 * t + 2 * z + if cfg.input_layer_norm { 3 * z } else { 0 } + 5 * q;
    (params, f1 + f2 + f3, acts)
}

fn crossnet_cost(d: usize, cfg: &CrossNetConfig) -> (usize, usize, usize) {
    let l = cfg.num_layers;
    let diag = if cfg.diag_scale != 0.0 { 2 * d } else { 0 };
    match cfg.layer {
        CrossLayerKind::FullRank => (l * (d * d + d), l * 2 * d * d, l * (4 * d + diag)),
        CrossLayerKind::LowRank { rank: r } => (l * (2 * r * d + d), l * 4 * r * d, l * (r + 4 * d + diag)),
        // xᵀw (one value per row), x0 · it, + b, + x
        CrossLayerKind::Vector => (l * 2 * d, l * 4 * d, l * (1 + 3 * d)),
        CrossLayerKind::Mixture { rank: r, num_experts: e, shared_gates, .. } => {
            let gates = if e > 1 { e * d } else { 0 };
            let per_layer_gates = if shared_gates { 0 } else { gates };
            let params = l * (e * (2 * r * d + r * r) + per_layer_gates + d) + if shared_gates { gates } else { 0 };
            let flops = l * (e * (4 * r * d + 2 * r * r) + if e > 1 { 2 * d * e } else { 0 });
            // per expert: V x, φ, C, φ, U, weighted; gates, softmax; then the 4 cross ops
            let acts = l * (e * (4 * r + 2 * d) + if e > 1 { 4 * e } else { 0 } + 4 * d + diag);
            (params, flops, acts)
        }
    }
}

fn sequence_cost(cfg: &SequenceTransformerConfig) -> (usize, usize, usize) {
    let d = cfg.model_dim();
    let n = cfg.num_tokens();
    let (h, ff) = (cfg.num_heads, cfg.ff_dim);
    let mut params = cfg.num_action_types * cfg.action_dim;
    // Per layer: in_proj, out_proj, linear1, linear2 weights, the two LayerNorms' weights, and
    // (unless `bias` is off) every bias; then the optional final norm.
    let biases = if cfg.bias { 3 * d + d + ff + d + 2 * d } else { 0 };
    params += cfg.num_layers * (3 * d * d + d * d + ff * d + d * ff + 2 * d + biases);
    if cfg.final_norm {
        params += if cfg.bias { 2 * d } else { d };
    }
    if cfg.max_pool != MaxPool::None {
        params += d * d + d; // pool projection
    }
    if cfg.positional == PositionalEncoding::Learned {
        params += n * d;
    }
    if cfg.fusion == Fusion::Append {
        params += cfg.action_dim;
    }
    let per_layer_flops = 2 * n * 3 * d * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * ff;
    let pool_flops = if cfg.max_pool != MaxPool::None { 2 * d * d } else { 0 };
    let flops = cfg.num_layers * per_layer_flops + pool_flops;
    // tokens; per layer: qkv, scores, softmax (exp, sum-normalised), attention output, out proj,
    // residual + LN (4), ff hidden + activation, ff out, residual + LN (4); then pool + output.
    let per_layer_acts = 3 * n * d + 3 * h * n * n + n * d + n * d + 4 * n * d + 2 * n * ff + n * d + 4 * n * d;
    let acts = n * d + cfg.num_layers * per_layer_acts + 2 * d + cfg.output_dim();
    (params, flops, acts)
}

/// Floats of one candidate's model inputs on the device (see [`CostReport::input_floats_per_candidate`]).
fn input_floats(config: &crate::RankerConfig) -> usize {
    let f = &config.features;
    let features =
        f.dense.len() + f.embedding.iter().map(|e| e.dim).sum::<usize>() + f.extra.iter().map(|e| e.dim).sum::<usize>();
    let sequence = match (&config.sequence, &config.item_embedding) {
        // Pretrained item vectors: `[S, E]` for the sequence and `[E]` for the candidate.
        (Some(seq), None) => (seq.max_len + 1) * seq.item_dim,
        // Item ids, or no sequence: nothing but index tensors reaches the device.
        _ => 0,
    };
    features + sequence
}

impl Ranker {
    /// The cost report of this model at `batch_size` (see the module docs for the conventions).
    pub fn cost(&self, batch_size: usize) -> CostReport {
        let config = self.config();
        let mut modules = Vec::new();

        // Features: embedding tables, dense BatchNorm, embedding projections.
        let schema = &config.features;
        let mut params: usize = schema.sparse.iter().map(|s| s.num_rows() * s.embedding_dim()).sum();
        let mut flops = 0;
        if !schema.dense.is_empty() && schema.dense_pipeline.batch_norm {
            params += 2 * schema.dense.len();
        }
        for e in &schema.embedding {
            if let Some(out) = e.projection {
                let (p, f) = linear(e.dim, out, e.projection_bias);
                params += p;
                flops += f;
            }
        }
        let encoded = self.encoder().output_dim();
        // Per feature: lookup/transform, normalisation (2), and the concatenated output.
        modules.push(ModuleCost {
            name: "features".into(),
            params,
            flops_per_candidate: flops,
            activations_per_candidate: 3 * encoded,
        });

        if let Some(seq) = &config.sequence {
            let (mut params, flops, acts) = sequence_cost(seq);
            if let Some(items) = &config.item_embedding {
                params += (items.cardinality + 1) * seq.item_dim;
            }
            modules.push(ModuleCost {
                name: "sequence".into(),
                params,
                flops_per_candidate: flops,
                activations_per_candidate: acts,
            });
        }

        let mut width = encoded;
        for (i, (stage, built)) in config.backbone.iter().zip(self.stages()).enumerate() {
            let (params, flops, acts) = match stage {
                StageConfig::ParallelMasknet { config: c, .. } => {
                    let (mut p, mut f, mut a) = (0, 0, 0);
                    for (block, _) in c.block_configs("ParallelMaskNet").unwrap_or_default() {
                        let (bp, bf, ba) = mask_block_cost(width, width, &block);
                        (p, f, a) = (p + bp, f + bf, a + ba + block.output_dim);
                    }
                    if let Some(top) = &c.top_mlp {
                        let (tp, tf, ta, _) = mlp_cost(c.concat_dim(), top);
                        (p, f, a) = (p + tp, f + tf, a + ta);
                    }
                    (p, f, a)
                }
                StageConfig::SerialMasknet { config: c, .. } => {
                    let (mut p, mut f, mut a, mut z) = (0, 0, 0, width);
                    for block in &c.blocks {
                        let (bp, bf, ba) = mask_block_cost(width, z, block);
                        (p, f, a, z) = (p + bp, f + bf, a + ba, block.output_dim);
                    }
                    (p, f, a)
                }
                StageConfig::Crossnet { config: c, .. } => crossnet_cost(width, c),
                StageConfig::ParallelCrossnet { config: c, .. } => {
                    let (p, f, a) = crossnet_cost(width, &c.tower);
                    let combine = match c.combine {
                        Combine::Concat => c.num_towers * width,
                        Combine::Mean => 2 * width,
                    };
                    (c.num_towers * p, c.num_towers * f, c.num_towers * a + combine)
                }
            };
            modules.push(ModuleCost {
                name: format!("backbone[{i}] {}", stage.type_name()),
                params,
                flops_per_candidate: flops,
                activations_per_candidate: acts,
            });
            width = built.output_dim();
        }
        let mlp_input = if config.input_skip { width + encoded } else { width };
        let (params, flops, mut acts, out) = mlp_cost(mlp_input, &config.mlp);
        if config.input_skip {
            acts += mlp_input;
        }
        modules.push(ModuleCost {
            name: "mlp".into(),
            params,
            flops_per_candidate: flops,
            activations_per_candidate: acts,
        });

        let (mut params, mut flops, mut acts) = (0, 0, 0);
        for task in &config.tasks {
            let mut w = out;
            if let Some(tower) = &task.tower {
                let (tp, tf, ta, tw) = mlp_cost(out, tower);
                (params, flops, acts, w) = (params + tp, flops + tf, acts + ta, tw);
            }
            let (p, f) = linear(w, 1, true);
            (params, flops, acts) = (params + p, flops + f, acts + 1);
        }
        modules.push(ModuleCost {
            name: "heads".into(),
            params,
            flops_per_candidate: flops,
            activations_per_candidate: acts + config.tasks.len(),
        });
        CostReport { batch_size, modules, input_floats_per_candidate: input_floats(config) }
    }
}
