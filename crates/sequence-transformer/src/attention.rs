//! Multi-head self-attention with PyTorch's packed in-projection.

use std::sync::Arc;

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_nn::{init::xavier_uniform, linear_xavier, Dropout, Error, Linear};

use crate::packed::forward_dense;
use crate::packed_attention::packed_self_attention_with_device_dropout;
use crate::{packed_attention, packed_attention_with_device_dropout, PackedSequences};

const LAYER: &str = "MultiHeadAttention";

/// `MHA(x) = concat_h(softmax(Q_h K_hᵀ / √d_h + M) V_h) W_oᵀ + b_o` with
/// `[Q ‖ K ‖ V] = x W_inᵀ + b_in`, as `torch.nn.MultiheadAttention` (self-attention, `batch_first`).
///
/// `M` is an additive key mask (`0` keep, `−∞` drop) broadcast over heads and queries; dropout is
/// applied to the attention weights in training. Parameters, under PyTorch's names:
/// `in_proj_weight` `[3d, d]` (Xavier uniform), `in_proj_bias` `[3d]` (0), `out_proj.weight`
/// `[d, d]` (Xavier normal), `out_proj.bias` `[d]` (0); without biases
/// ([`MultiHeadAttention::with_bias`], PyTorch's `bias=False`) there is no `in_proj_bias` and no
/// `out_proj.bias`.
///
/// ```
/// # use candle_core::{Device, DType, Tensor};
/// # use rankstack_nn::SeededVarMap;
/// # use sequence_transformer::MultiHeadAttention;
/// let params = SeededVarMap::new(0);
/// let mha = MultiHeadAttention::new(8, 2, 0.0, 0, params.var_builder(DType::F32, &Device::Cpu).pp("self_attn"))?;
/// let y = mha.forward_t(&Tensor::zeros((3, 5, 8), DType::F32, &Device::Cpu)?, None, false)?;
/// assert_eq!(y.dims(), &[3, 5, 8]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MultiHeadAttention {
    /// The `Q`, `K` and `V` projections: row blocks of `in_proj_weight` / `in_proj_bias` (views,
    /// so each parameter stays one tensor, as PyTorch stores it). Three products instead of one
    /// `[Q ‖ K ‖ V]` product that is then split: the split's backward pass would build three
    /// zero-padded gradients of the full `[B·S, 3d]` width and add them up. They are the only
    /// handle on the parameters: the GPU graph's training node, which projects by itself, gets
    /// the whole `[3d, d]` weight back from them ([`MultiHeadAttention::in_proj`]).
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    dropout: Dropout,
    dim: usize,
    num_heads: usize,
}

impl MultiHeadAttention {
    /// Self-attention over width `dim` with `num_heads` heads (`dim % num_heads == 0`).
    pub fn new(dim: usize, num_heads: usize, dropout: f64, seed: u64, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        Self::with_bias(dim, num_heads, dropout, seed, true, vb)
    }

    /// [`MultiHeadAttention::new`] with or without the projection biases.
    pub fn with_bias(
        dim: usize,
        num_heads: usize,
        dropout: f64,
        seed: u64,
        bias: bool,
        vb: VarBuilder,
    ) -> rankstack_nn::Result<Self> {
        if dim == 0 || num_heads == 0 || !dim.is_multiple_of(num_heads) {
            return Err(Error::config(LAYER, "num_heads", format!("{num_heads} heads do not divide the width {dim}")));
        }
        let dropout = Dropout::new(dropout, seed ^ rankstack_nn::rng::hash_name(&format!("{}.dropout", vb.prefix())))
            .map_err(|_| Error::config(LAYER, "dropout", format!("must be in [0, 1), got {dropout}")))?;
        let in_proj_weight = vb.get_with_hints((3 * dim, dim), "in_proj_weight", xavier_uniform(dim, 3 * dim))?;
        let in_proj_bias =
            if bias { Some(vb.get_with_hints(3 * dim, "in_proj_bias", Init::Const(0.0))?) } else { None };
        let block = |i: usize| -> candle_core::Result<Linear> {
            let b = in_proj_bias.as_ref().map(|b| b.narrow(0, i * dim, dim)).transpose()?;
            Ok(Linear::new(in_proj_weight.narrow(0, i * dim, dim)?, b))
        };
        Ok(Self {
            q_proj: block(0)?,
            k_proj: block(1)?,
            v_proj: block(2)?,
            out_proj: linear_xavier(dim, dim, bias, vb.pp("out_proj"))?,
            dropout,
            dim,
            num_heads,
        })
    }

    /// Attends `x` `[B, S, d]` to itself. `key_mask` is an additive `[B, S]` mask (`0` attend,
    /// `−∞` hidden; a NaN or `+∞` in it is an error). A query row whose keys are all hidden gets
    /// NaN, as in PyTorch.
    pub fn forward_t(&self, x: &Tensor, key_mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        forward_dense(LAYER, x, Some(self.dim), key_mask, |rows, seqs| self.forward_packed(rows, seqs, train))
    }

    /// Attends each packed sequence of `x` `[R, d]` to itself (see [`PackedSequences`]); the rows
    /// of different sequences never see each other.
    pub fn forward_packed(&self, x: &Tensor, sequences: &Arc<PackedSequences>, train: bool) -> Result<Tensor> {
        rankstack_nn::shape::expect_dims(LAYER, "packed input", x, &[Some(sequences.num_rows()), Some(self.dim)])?;
        let p = if train { self.dropout.p() } else { 0.0 };
        let on_device_graph = !kernels_run_on(x.device());
        let autocast = self.q_proj.autocast();
        let one_autocast = [&self.k_proj, &self.v_proj].iter().all(|proj| proj.autocast() == autocast);
        if on_device_graph && one_autocast {
            let trains = |w: &Tensor| (x.track_op() || w.track_op()) && w.dtype() == x.dtype();
            if let Some((w, b)) = self.in_proj()?.filter(|(w, _)| trains(w)) {
                // Training on a GPU's graph: one node that keeps nothing of the projections
                // (under autocast too: their products in its dtype, f32 master weights).
                let out = packed_self_attention_with_device_dropout(
                    x,
                    &w,
                    b.as_ref(),
                    sequences,
                    self.num_heads,
                    p,
                    autocast,
                )?;
                return self.out_proj.forward(&out);
            }
        }
        let (q, k, v) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?, self.v_proj.forward(x)?);
        let out = if p > 0.0 && on_device_graph {
            // On a GPU the mask is drawn there (see `Dropout`'s device masks); so it is on the
            // CPU with its kernels off, which runs the GPU's graph (`RANKSTACK_CPU=candle`).
            packed_attention_with_device_dropout(&q, &k, &v, sequences, self.num_heads, p)?
        } else {
            let dropout =
                (p > 0.0).then(|| Arc::new(self.dropout.multipliers(sequences.attention_weight_count(self.num_heads))));
            packed_attention(&q, &k, &v, sequences, self.num_heads, dropout)?
        };
        self.out_proj.forward(&out)
    }

    /// Attends the rows `x` `[B·S, d]` of a dense batch to the keys of their own sequence, with
    /// the additive `bias` `[B or 1, H or 1, S, S]` on the scores (a caller's `src_mask` plus the
    /// key mask; see [`crate::AttentionMask`]); composed of candle operations.
    pub(crate) fn forward_rows_with_bias(
        &self,
        x: &Tensor,
        batch: usize,
        seq: usize,
        bias: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (h, dh) = (self.num_heads, self.dim / self.num_heads);
        let heads = |t: Tensor| t.reshape((batch, seq, h, dh))?.transpose(1, 2)?.contiguous();
        let q = (heads(self.q_proj.forward(x)?)? * (1.0 / (dh as f64).sqrt()))?;
        let (k, v) = (heads(self.k_proj.forward(x)?)?, heads(self.v_proj.forward(x)?)?);
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(bias)?;
        let weights = self.dropout.forward_t(&rankstack_nn::softmax::softmax_last_dim(&scores)?, train)?;
        let context = weights.matmul(&v)?.transpose(1, 2)?.reshape((batch * seq, self.dim))?;
        self.out_proj.forward(&context)
    }

    /// PyTorch's `in_proj_weight` `[3d, d]` and `in_proj_bias` `[3d]`, put together from the three
    /// projections (which are views of them, so gradients reach the stored parameters); `None`
    /// once the projections are packed for serving.
    fn in_proj(&self) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        let Some(weights) = projections.iter().map(|p| p.weight()).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let bias = match projections.iter().map(|p| p.bias()).collect::<Option<Vec<_>>>() {
            Some(biases) => Some(Tensor::cat(&biases, 0)?),
            None => None,
        };
        Ok(Some((Tensor::cat(&weights, 0)?, bias)))
    }

    /// The number of heads.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// The attention-weight dropout's generator state (for checkpointing).
    pub fn dropout(&self) -> &Dropout {
        &self.dropout
    }
}

impl rankstack_nn::LinearLayers for MultiHeadAttention {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.out_proj]
    }
}
