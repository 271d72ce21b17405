//! A stack of cross layers.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::shape::expect_matrix;

use crate::{CrossLayer, CrossLayerKind, CrossNetConfig};

/// `L` stacked cross layers: `x₁ = c₀(x0, x0)`, `x_{l+1} = c_l(x0, x_l)`, output `x_L`, each layer
/// with its own weights under `layers.{l}.` (see the crate docs for the per-layer formulas).
///
/// Input and output are `[batch, d]`. The paper's interaction stack is four full-rank layers:
///
/// ```
/// # use candle_core::{DType, Device, Module, Tensor};
/// # use dcnv2::{CrossNet, CrossNetConfig};
/// # use rankstack_nn::SeededVarMap;
/// let params = SeededVarMap::new(0);
/// let cross = CrossNet::new(1536, &CrossNetConfig::full_rank(4), params.var_builder(DType::F32, &Device::Cpu))?;
/// assert_eq!(cross.output_dim(), 1536);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct CrossNet {
    layers: Vec<CrossLayer>,
    dim: usize,
}

impl CrossNet {
    /// A stack reading `input_dim` features. Invalid configs (zero layers, rank 0, zero experts,
    /// negative or non-finite `diag_scale`, zero width) are errors naming the field.
    pub fn new(input_dim: usize, config: &CrossNetConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        Self::with_name(input_dim, config, vb, "CrossNet", "")
    }

    pub(crate) fn with_name(
        input_dim: usize,
        config: &CrossNetConfig,
        vb: VarBuilder,
        layer: &str,
        prefix: &str,
    ) -> rankstack_nn::Result<Self> {
        config.validate(layer, prefix, input_dim)?;
        let shared_gates = match config.layer {
            CrossLayerKind::Mixture { num_experts, shared_gates: true, .. } => {
                Some(crate::cross_layer::gate_rows(input_dim, num_experts, &vb)?)
            }
            _ => None,
        };
        let layers = (0..config.num_layers)
            .map(|l| {
                CrossLayer::new(
                    input_dim,
                    config.layer,
                    config.diag_scale,
                    vb.pp("layers").pp(l),
                    shared_gates.as_deref(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, dim: input_dim })
    }

    /// Input width `d`.
    pub fn input_dim(&self) -> usize {
        self.dim
    }

    /// Output width (`d`).
    pub fn output_dim(&self) -> usize {
        self.dim
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[CrossLayer] {
        &self.layers
    }

    pub(crate) fn forward_unchecked(&self, x0: &Tensor) -> Result<Tensor> {
        let mut x = x0.clone();
        for layer in &self.layers {
            x = layer.forward(x0, &x)?;
        }
        Ok(x)
    }
}

impl Module for CrossNet {
    fn forward(&self, x0: &Tensor) -> Result<Tensor> {
        expect_matrix("CrossNet", "input", x0, self.dim)?;
        self.forward_unchecked(x0)
    }
}

impl rankstack_nn::LinearLayers for CrossNet {
    fn linear_layers_mut(&mut self) -> Vec<&mut rankstack_nn::Linear> {
        self.layers.linear_layers_mut()
    }
}
