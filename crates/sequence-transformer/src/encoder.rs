//! Transformer encoder layers with PyTorch `nn.TransformerEncoderLayer` semantics.

use std::sync::Arc;

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_nn::dropout::drop_with_keep_mask;
use rankstack_nn::probe::mark;
use rankstack_nn::recompute::recompute_with_params;
use rankstack_nn::{Activation, Dropout, Error, LayerNorm, LayerNormConfig, Linear};

use crate::packed::forward_dense;
use crate::src_mask::forward_dense_with_src_mask;
use crate::{AttentionMask, MultiHeadAttention, PackedSequences};

const LAYER: &str = "TransformerEncoderLayer";
const ENCODER: &str = "TransformerEncoder";

/// Options of one encoder layer (`d_model` is given separately).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderLayerConfig {
    /// Attention heads.
    pub num_heads: usize,
    /// Feed-forward width.
    pub ff_dim: usize,
    /// Dropout probability (attention weights, feed-forward, residual branches).
    pub dropout: f64,
    /// Pre-norm instead of post-norm.
    pub norm_first: bool,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Seed of the dropout streams (mixed with each parameter path).
    pub seed: u64,
    /// Feed-forward activation (PyTorch's `activation`: `relu`, or `gelu` in its erf form).
    pub activation: Activation,
    /// Biases on every projection and LayerNorm (PyTorch's `bias`; `false` removes them all).
    pub bias: bool,
}

impl Default for EncoderLayerConfig {
    /// PyTorch's defaults except the widths: 1 head, feed-forward 2048, dropout 0.1, post-norm,
    /// eps 1e-5, ReLU, biases.
    fn default() -> Self {
        Self {
            num_heads: 1,
            ff_dim: 2048,
            dropout: 0.1,
            norm_first: false,
            layer_norm_eps: 1e-5,
            seed: 0,
            activation: Activation::Relu,
            bias: true,
        }
    }
}

/// One `torch.nn.TransformerEncoderLayer` (`batch_first`):
///
/// - post-norm (default): `x ← norm1(x + drop1(MHA(x)))`, `x ← norm2(x + drop2(FF(x)))`;
/// - pre-norm: `x ← x + drop1(MHA(norm1(x)))`, `x ← x + drop2(FF(norm2(x)))`;
///
/// with `FF(x) = linear2(drop(act(linear1(x))))` (`act`: ReLU by default, or GELU). Parameters under
/// PyTorch's names: `self_attn.*` ([`MultiHeadAttention`]), `linear1.{weight,bias}` `[ff, d]`,
/// `linear2.{weight,bias}` `[d, ff]` (PyTorch's default `U(±1/√fan_in)` init), `norm1.*`,
/// `norm2.*`; with `bias: false` every `bias` is absent, as with PyTorch's `bias=False`.
///
/// ```
/// # use candle_core::{Device, DType, Tensor};
/// # use rankstack_nn::SeededVarMap;
/// # use sequence_transformer::{EncoderLayerConfig, TransformerEncoderLayer};
/// let params = SeededVarMap::new(0);
/// let cfg = EncoderLayerConfig { num_heads: 2, ff_dim: 16, ..Default::default() };
/// let layer = TransformerEncoderLayer::new(8, &cfg, params.var_builder(DType::F32, &Device::Cpu))?;
/// assert_eq!(layer.forward_t(&Tensor::zeros((2, 4, 8), DType::F32, &Device::Cpu)?, None, true)?.dims(), &[2, 4, 8]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TransformerEncoderLayer {
    self_attn: MultiHeadAttention,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    dropout: Dropout,
    dropout1: Dropout,
    dropout2: Dropout,
    norm_first: bool,
    activation: Activation,
    dim: usize,
}

fn torch_linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let a = 1.0 / (in_dim as f64).sqrt();
    let init = Init::Uniform { lo: -a, up: a };
    let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", init)?) } else { None };
    Ok(Linear::new(vb.get_with_hints((out_dim, in_dim), "weight", init)?, bias))
}

/// A LayerNorm over `dim` with PyTorch's `bias` switch.
fn layer_norm(dim: usize, eps: f64, bias: bool, vb: VarBuilder) -> rankstack_nn::Result<LayerNorm> {
    if bias {
        LayerNorm::new(dim, LayerNormConfig { eps, affine: true }, vb)
    } else {
        LayerNorm::without_bias(dim, eps, vb)
    }
}

impl TransformerEncoderLayer {
    /// A layer over width `dim`.
    pub fn new(dim: usize, config: &EncoderLayerConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        if config.ff_dim == 0 {
            return Err(Error::config(LAYER, "ff_dim", "must be > 0"));
        }
        let (eps, bias) = (config.layer_norm_eps, config.bias);
        let drop = |name: &str| {
            Dropout::new(config.dropout, config.seed ^ rankstack_nn::rng::hash_name(&format!("{}.{name}", vb.prefix())))
                .map_err(|_| Error::config(LAYER, "dropout", format!("must be in [0, 1), got {}", config.dropout)))
        };
        Ok(Self {
            self_attn: MultiHeadAttention::with_bias(
                dim,
                config.num_heads,
                config.dropout,
                config.seed,
                bias,
                vb.pp("self_attn"),
            )?,
            linear1: torch_linear(dim, config.ff_dim, bias, vb.pp("linear1"))?,
            linear2: torch_linear(config.ff_dim, dim, bias, vb.pp("linear2"))?,
            norm1: layer_norm(dim, eps, bias, vb.pp("norm1"))?,
            norm2: layer_norm(dim, eps, bias, vb.pp("norm2"))?,
            dropout: drop("dropout")?,
            dropout1: drop("dropout1")?,
            dropout2: drop("dropout2")?,
            norm_first: config.norm_first,
            activation: config.activation,
            dim,
        })
    }

    fn feed_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(out) = self.feed_forward_recomputed(x, train)? {
            return Ok(out);
        }
        let h = self.linear1.forward_activated(x, self.activation)?;
        self.linear2.forward(&self.dropout.forward_t(&h, train)?)
    }

    /// In training on the graph a GPU runs (a GPU, or the CPU with its kernels off): the
    /// feed-forward block as one node that keeps `x` and its output only
    /// ([`recompute_with_params`]); its backward pass computes the block again. The two
    /// `[rows, ff]` tensors inside (the activation and its dropout) were kept otherwise. The
    /// dropout mask is drawn before (no other draw comes between, so it is the layer's own next
    /// mask) and captured, so both computations use it. `None` elsewhere (the CPU kernels,
    /// inference, packed serving weights).
    fn feed_forward_recomputed(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        let (Some(w1), Some(w2)) = (self.linear1.weight(), self.linear2.weight()) else { return Ok(None) };
        let params: Vec<&Tensor> =
            [Some(w1), self.linear1.bias(), Some(w2), self.linear2.bias()].into_iter().flatten().collect();
        let trains = x.track_op() || params.iter().any(|p| p.track_op());
        if kernels_run_on(x.device()) || !trains || params.iter().any(|p| p.dtype() != x.dtype()) {
            return Ok(None);
        }
        let drop_p = self.dropout.p();
        let keep = if train && drop_p > 0.0 {
            let shape: Vec<usize> = x.dims()[..x.rank() - 1].iter().copied().chain([w1.dim(0)?]).collect();
            Some(self.dropout.draw_keep_mask(&shape.into(), x.device())?)
        } else {
            None
        };
        let (has_b1, has_b2) = (self.linear1.bias().is_some(), self.linear2.bias().is_some());
        let (autocast1, autocast2, activation) = (self.linear1.autocast(), self.linear2.autocast(), self.activation);
        let out = recompute_with_params(x, &params, move |x, p| {
            let mut linear1 = Linear::new(p[0].clone(), has_b1.then(|| p[1].clone()));
            linear1.set_autocast(autocast1);
            let w2 = usize::from(has_b1) + 1;
            let mut linear2 = Linear::new(p[w2].clone(), has_b2.then(|| p[w2 + 1].clone()));
            linear2.set_autocast(autocast2);
            let h = linear1.forward_activated(x, activation)?;
            let h = match &keep {
                Some(keep) => drop_with_keep_mask(&h, keep, drop_p)?,
                None => h,
            };
            linear2.forward(&h)
        })?;
        Ok(Some(out))
    }

    /// Encodes `x` `[B, S, d]`; `key_mask` is an additive `[B, S]` mask (0 keep, −∞ masked key).
    pub fn forward_t(&self, x: &Tensor, key_mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        forward_dense(LAYER, x, Some(self.dim), key_mask, |rows, seqs| self.forward_packed(rows, seqs, train))
    }

    /// Encodes the packed sequences `x` `[R, d]` (see [`PackedSequences`]). Everything but
    /// attention works row by row, so this is [`TransformerEncoderLayer::forward_t`] without the
    /// padding rows.
    pub fn forward_packed(&self, x: &Tensor, sequences: &Arc<PackedSequences>, train: bool) -> Result<Tensor> {
        rankstack_nn::shape::expect_dims(LAYER, "packed input", x, &[Some(sequences.num_rows()), Some(self.dim)])?;
        self.residual_blocks(x, |x| self.self_attn.forward_packed(x, sequences, train), train)
    }

    /// Encodes `x` `[B, S, d]` with a caller's attention mask `src_mask` (PyTorch's `src_mask`)
    /// and optionally an additive key mask `[B, S]` (0 keep, −∞ masked; `src_key_padding_mask`).
    /// Dense attention composed of candle operations (every row attends over all `S` keys).
    pub fn forward_with_src_mask(
        &self,
        x: &Tensor,
        src_mask: &AttentionMask,
        key_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let heads = self.self_attn.num_heads();
        forward_dense_with_src_mask(LAYER, x, (self.dim, heads), src_mask, key_mask, |rows, b, s, bias| {
            self.forward_rows_with_bias(rows, b, s, bias, train)
        })
    }

    /// One layer on the rows `[B·S, d]` of a dense batch, attention biased by `bias`
    /// `[B or 1, H or 1, S, S]`.
    fn forward_rows_with_bias(&self, x: &Tensor, b: usize, s: usize, bias: &Tensor, train: bool) -> Result<Tensor> {
        self.residual_blocks(x, |x| self.self_attn.forward_rows_with_bias(x, b, s, bias, train), train)
    }

    /// The residual structure around `attend` and the feed-forward block, post- or pre-norm.
    /// Probe marks ([`rankstack_nn::probe`]): `transformer.attention` after the attention block,
    /// `transformer.feed_forward` after the rest of the layer (feed-forward, norms, residuals).
    fn residual_blocks(&self, x: &Tensor, attend: impl Fn(&Tensor) -> Result<Tensor>, train: bool) -> Result<Tensor> {
        let attend = |x: &Tensor| {
            let a = attend(x)?;
            mark("transformer.attention", &a)?;
            Ok::<_, candle_core::Error>(a)
        };
        let out = if self.norm_first {
            let x = (x + self.dropout1.forward_t(&attend(&self.norm1.forward(x)?)?, train)?)?;
            (&x + self.dropout2.forward_t(&self.feed_forward(&self.norm2.forward(&x)?, train)?, train)?)?
        } else {
            // `norm(x + dropout(sublayer(x)))`, on a GPU's graph one node each that keeps
            // neither the dropped sub-layer output nor the sum (`LayerNorm::forward_residual`).
            let x = self.norm1.forward_residual(x, &attend(x)?, &self.dropout1, train)?;
            self.norm2.forward_residual(&x, &self.feed_forward(&x, train)?, &self.dropout2, train)?
        };
        mark("transformer.feed_forward", &out)?;
        Ok(out)
    }

    /// The dropout layers (attention, feed-forward, residual 1, residual 2), for RNG checkpointing.
    pub fn dropouts(&self) -> [&Dropout; 4] {
        [self.self_attn.dropout(), &self.dropout, &self.dropout1, &self.dropout2]
    }
}

/// `x ↦ norm(layer_{N−1}(… layer_0(x)))`: a stack of [`TransformerEncoderLayer`]s with parameters
/// `layers.{i}.*` and, optionally ([`TransformerEncoder::with_final_norm`]), a final LayerNorm
/// `norm.*` (PyTorch's `norm` argument; without a bias when the layers have none), as
/// `torch.nn.TransformerEncoder`, so a PyTorch encoder's `state_dict` loads directly (every layer
/// shares one additive key mask, and one `src_mask` in
/// [`TransformerEncoder::forward_with_src_mask`]).
///
/// ```
/// # use candle_core::{Device, DType, Tensor};
/// # use rankstack_nn::SeededVarMap;
/// # use sequence_transformer::{EncoderLayerConfig, TransformerEncoder};
/// let params = SeededVarMap::new(0);
/// let cfg = EncoderLayerConfig { num_heads: 2, ff_dim: 32, ..Default::default() };
/// let enc = TransformerEncoder::new(96, 2, &cfg, params.var_builder(DType::F32, &Device::Cpu).pp("encoder"))?;
/// // Key mask: 0 keeps a position, −∞ hides it from attention (here: the last of 3 positions).
/// let mask = Tensor::new(&[[0f32, 0., f32::NEG_INFINITY]], &Device::Cpu)?;
/// let h = enc.forward_t(&Tensor::ones((1, 3, 96), DType::F32, &Device::Cpu)?, Some(&mask), false)?;
/// assert_eq!(h.dims(), &[1, 3, 96]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TransformerEncoder {
    layers: Vec<TransformerEncoderLayer>,
    norm: Option<LayerNorm>,
}

impl TransformerEncoder {
    /// `num_layers` layers over width `dim`, no final norm.
    pub fn new(
        dim: usize,
        num_layers: usize,
        config: &EncoderLayerConfig,
        vb: VarBuilder,
    ) -> rankstack_nn::Result<Self> {
        Self::with_final_norm(dim, num_layers, config, false, vb)
    }

    /// `num_layers` layers over width `dim`, then a LayerNorm `norm.*` if `final_norm` (same
    /// epsilon and bias setting as the layers).
    pub fn with_final_norm(
        dim: usize,
        num_layers: usize,
        config: &EncoderLayerConfig,
        final_norm: bool,
        vb: VarBuilder,
    ) -> rankstack_nn::Result<Self> {
        if num_layers == 0 {
            return Err(Error::config(ENCODER, "num_layers", "must be > 0"));
        }
        let layers = (0..num_layers)
            .map(|i| TransformerEncoderLayer::new(dim, config, vb.pp("layers").pp(i)))
            .collect::<rankstack_nn::Result<_>>()?;
        let norm = match final_norm {
            true => Some(layer_norm(dim, config.layer_norm_eps, config.bias, vb.pp("norm"))?),
            false => None,
        };
        Ok(Self { layers, norm })
    }

    /// Runs every layer; see [`TransformerEncoderLayer::forward_t`].
    pub fn forward_t(&self, x: &Tensor, key_mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        forward_dense(ENCODER, x, None, key_mask, |rows, seqs| self.forward_packed(rows, seqs, train))
    }

    /// Runs every layer on packed sequences; see [`TransformerEncoderLayer::forward_packed`].
    pub fn forward_packed(&self, x: &Tensor, sequences: &Arc<PackedSequences>, train: bool) -> Result<Tensor> {
        let h = self.layers.iter().try_fold(x.clone(), |h, l| l.forward_packed(&h, sequences, train))?;
        self.final_norm(h)
    }

    /// Runs every layer with a caller's attention mask; see
    /// [`TransformerEncoderLayer::forward_with_src_mask`].
    ///
    /// ```
    /// # use candle_core::{Device, DType, Tensor};
    /// # use rankstack_nn::SeededVarMap;
    /// # use sequence_transformer::{AttentionMask, EncoderLayerConfig, TransformerEncoder};
    /// let params = SeededVarMap::new(0);
    /// let cfg = EncoderLayerConfig { num_heads: 2, ff_dim: 8, dropout: 0.0, ..Default::default() };
    /// let enc = TransformerEncoder::new(4, 1, &cfg, params.var_builder(DType::F32, &Device::Cpu))?;
    /// // A causal mask: position i may not look at j > i (true = not allowed, as in PyTorch).
    /// let causal = Tensor::new(&[[0u8, 1, 1], [0, 0, 1], [0, 0, 0]], &Device::Cpu)?;
    /// let x = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)?;
    /// let h = enc.forward_with_src_mask(&x, &AttentionMask::Boolean(causal), None, false)?;
    /// assert_eq!(h.dims(), &[2, 3, 4]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_with_src_mask(
        &self,
        x: &Tensor,
        src_mask: &AttentionMask,
        key_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let first = &self.layers[0];
        let shape = (first.dim, first.self_attn.num_heads());
        forward_dense_with_src_mask(ENCODER, x, shape, src_mask, key_mask, |rows, b, s, bias| {
            let h =
                self.layers.iter().try_fold(rows.clone(), |h, l| l.forward_rows_with_bias(&h, b, s, bias, train))?;
            self.final_norm(h)
        })
    }

    fn final_norm(&self, h: Tensor) -> Result<Tensor> {
        match &self.norm {
            Some(norm) => norm.forward(&h),
            None => Ok(h),
        }
    }

    /// The layers.
    pub fn layers(&self) -> &[TransformerEncoderLayer] {
        &self.layers
    }
}

impl rankstack_nn::LinearLayers for TransformerEncoderLayer {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        let mut layers = self.self_attn.linear_layers_mut();
        layers.extend([&mut self.linear1, &mut self.linear2]);
        layers
    }
}

impl rankstack_nn::LinearLayers for TransformerEncoder {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        self.layers.linear_layers_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use rankstack_kernels::cpu::{with_isa, Isa};
    use rankstack_nn::SeededVarMap;

    /// On the GPU's graph (the CPU with its kernels off) the recomputed feed-forward block equals
    /// the block it replaces bit for bit: values and the gradients of `x` and every parameter,
    /// ReLU and GELU, with and without biases, dropout on and off, f32 and bf16 autocast.
    #[test]
    fn the_recomputed_feed_forward_block_equals_the_plain_one_bit_for_bit() {
        let bits = rankstack_nn::testing::value_bits;
        for activation in [Activation::Relu, Activation::Gelu] {
            for bias in [true, false] {
                for (dropout, train) in [(0.2, true), (0.2, false), (0.0, true)] {
                    for autocast in [None, Some(DType::BF16)] {
                        let case = format!("{activation:?} bias {bias} dropout {dropout} train {train} {autocast:?}");
                        let store = SeededVarMap::new(1);
                        let config = EncoderLayerConfig {
                            num_heads: 2,
                            ff_dim: 12,
                            dropout,
                            activation,
                            bias,
                            ..Default::default()
                        };
                        let mut layer =
                            TransformerEncoderLayer::new(8, &config, store.var_builder(DType::F32, &Device::Cpu))
                                .unwrap();
                        rankstack_nn::autocast_linear_layers(&mut layer, autocast);
                        let x = candle_core::Var::from_tensor(&rankstack_nn::testing::seeded_randn(
                            2,
                            &[3, 5, 8],
                            DType::F32,
                        ))
                        .unwrap();
                        let r = rankstack_nn::testing::seeded_randn(3, &[3, 5, 8], DType::F32);
                        let state = layer.dropout.rng_state();
                        let run = |recomputed: bool| {
                            layer.dropout.set_rng_state(state);
                            let y = with_isa(Isa::Candle, || {
                                if recomputed {
                                    Ok(layer.feed_forward_recomputed(x.as_tensor(), train)?.expect("the node applies"))
                                } else {
                                    let h = layer.linear1.forward_activated(x.as_tensor(), activation)?;
                                    layer.linear2.forward(&layer.dropout.forward_t(&h, train)?)
                                }
                            })
                            .unwrap();
                            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                            let mut g = vec![bits(grads.get(x.as_tensor()).unwrap())];
                            for (name, v) in store.named_vars() {
                                if name.starts_with("linear") {
                                    g.push(bits(
                                        grads.get(v.as_tensor()).unwrap_or_else(|| panic!("∂{name} ({case})")),
                                    ));
                                }
                            }
                            (bits(&y), g)
                        };
                        let (node, plain) = (run(true), run(false));
                        assert_eq!(node.0, plain.0, "values: {case}");
                        assert_eq!(node.1, plain.1, "gradients: {case}");
                    }
                }
            }
        }
    }
}
