//! The MaskBlock.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::shape::{expect_matrix, expect_same_batch};
use rankstack_nn::{linear_xavier, Activation, Dropout, LayerNorm, LayerNormConfig, Linear, Reseed};

use crate::MaskBlockConfig;

/// `out = act(LN(W_h · (mask(v_emb) ⊙ h)))`, `mask(v) = W2 · ReLU(W1 · v + b1) + b2`.
///
/// `v_emb` (`[batch, m]`) generates the instance-guided mask; `h` (`[batch, z]`) is what gets
/// masked: the embedding itself in the first block, the previous block's output in a serial stack.
///
/// Parameters (PyTorch `Linear` layout): `mask.aggregation.{weight [t, m], bias [t]}`,
/// `mask.projection.{weight [z, t], bias [z]}`, optional `input_norm.{weight, bias} [z]`,
/// `hidden.weight [q, z]` (and `hidden.bias [q]` if enabled), `output_norm.{weight, bias} [q]`.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use masknet::{MaskBlock, MaskBlockConfig};
/// # use rankstack_nn::SeededVarMap;
/// let params = SeededVarMap::new(0);
/// let block = MaskBlock::new(16, 16, &MaskBlockConfig::new(8), params.var_builder(DType::F32, &Device::Cpu))?;
/// assert_eq!(block.aggregation_dim(), 32); // round(2.0 x 16)
/// let v = Tensor::zeros((2, 16), DType::F32, &Device::Cpu)?;
/// assert_eq!(block.forward(&v, &v)?.dims(), &[2, 8]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MaskBlock {
    aggregation: Linear,
    projection: Linear,
    input_norm: Option<LayerNorm>,
    hidden: Linear,
    output_norm: LayerNorm,
    activation: Activation,
    dropout: Dropout,
    mask_input_dim: usize,
    hidden_input_dim: usize,
    aggregation_dim: usize,
    output_dim: usize,
}

impl MaskBlock {
    /// A block whose mask reads `mask_input_dim` features and masks `hidden_input_dim` features.
    pub fn new(
        mask_input_dim: usize,
        hidden_input_dim: usize,
        config: &MaskBlockConfig,
        vb: VarBuilder,
    ) -> rankstack_nn::Result<Self> {
        Self::with_name(mask_input_dim, hidden_input_dim, config, vb, "MaskBlock", "")
    }

    pub(crate) fn with_name(
        mask_input_dim: usize,
        hidden_input_dim: usize,
        config: &MaskBlockConfig,
        vb: VarBuilder,
        layer: &str,
        prefix: &str,
    ) -> rankstack_nn::Result<Self> {
        let t = config.aggregation_width(layer, prefix, mask_input_dim)?;
        if hidden_input_dim == 0 {
            return Err(rankstack_nn::Error::config(layer, "hidden_input_dim", "must be > 0"));
        }
        let (m, z, q) = (mask_input_dim, hidden_input_dim, config.output_dim);
        let ln = LayerNormConfig { eps: config.layer_norm_eps, affine: true };
        let input_norm = if config.input_layer_norm { Some(LayerNorm::new(z, ln, vb.pp("input_norm"))?) } else { None };
        Ok(Self {
            aggregation: linear_xavier(m, t, true, vb.pp("mask").pp("aggregation"))?,
            projection: linear_xavier(t, z, true, vb.pp("mask").pp("projection"))?,
            input_norm,
            hidden: linear_xavier(z, q, config.hidden_bias, vb.pp("hidden"))?,
            output_norm: LayerNorm::new(q, ln, vb.pp("output_norm"))?,
            activation: config.activation,
            // Seeded from the parameter path so that sibling blocks draw different masks.
            dropout: Dropout::new(config.dropout, rankstack_nn::rng::hash_name(&vb.prefix()))?,
            mask_input_dim: m,
            hidden_input_dim: z,
            aggregation_dim: t,
            output_dim: q,
        })
    }

    /// The dropout on the block output.
    pub fn dropout(&self) -> &Dropout {
        &self.dropout
    }

    /// Width `m` of the mask input.
    pub fn mask_input_dim(&self) -> usize {
        self.mask_input_dim
    }

    /// Width `z` of the masked (hidden) input.
    pub fn hidden_input_dim(&self) -> usize {
        self.hidden_input_dim
    }

    /// Aggregation width `t`.
    pub fn aggregation_dim(&self) -> usize {
        self.aggregation_dim
    }

    /// Output width `q`.
    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    /// The instance-guided mask `W2 · ReLU(W1 · v + b1) + b2`, `[batch, z]`.
    pub fn mask(&self, mask_input: &Tensor) -> Result<Tensor> {
        self.projection.forward(&self.aggregation.forward_activated(mask_input, Activation::Relu)?)
    }

    /// Forward pass; `train` enables dropout. Shapes are checked.
    pub fn forward_t(&self, mask_input: &Tensor, hidden_input: &Tensor, train: bool) -> Result<Tensor> {
        expect_matrix("MaskBlock", "mask_input", mask_input, self.mask_input_dim)?;
        expect_matrix("MaskBlock", "hidden_input", hidden_input, self.hidden_input_dim)?;
        expect_same_batch("MaskBlock", ("mask_input", mask_input), ("hidden_input", hidden_input))?;
        self.forward_unchecked(mask_input, hidden_input, train)
    }

    /// Evaluation-mode forward pass.
    pub fn forward(&self, mask_input: &Tensor, hidden_input: &Tensor) -> Result<Tensor> {
        self.forward_t(mask_input, hidden_input, false)
    }

    pub(crate) fn forward_unchecked(&self, mask_input: &Tensor, hidden_input: &Tensor, train: bool) -> Result<Tensor> {
        let h = match &self.input_norm {
            Some(norm) => norm.forward(hidden_input)?,
            None => hidden_input.clone(),
        };
        let masked = self.mask(mask_input)?.mul(&h)?;
        let out = self.activation.apply(&self.output_norm.forward(&self.hidden.forward(&masked)?)?)?;
        self.dropout.forward_t(&out, train)
    }
}

impl Reseed for MaskBlock {
    fn reseed(&self, seed: u64) {
        self.dropout.reseed(seed);
    }
}

impl rankstack_nn::LinearLayers for MaskBlock {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.aggregation, &mut self.projection, &mut self.hidden]
    }
}
