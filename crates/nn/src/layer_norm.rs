//! LayerNorm with a backward pass.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::recompute::recompute_in_backward;

/// LayerNorm options (PyTorch defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayerNormConfig {
    /// Added to the variance before the square root.
    pub eps: f64,
    /// Learnable per-feature scale `weight` (init 1) and shift `bias` (init 0).
    pub affine: bool,
}

impl Default for LayerNormConfig {
    fn default() -> Self {
        Self { eps: 1e-5, affine: true }
    }
}

/// `y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias` over the last dimension, with the
/// biased (population) variance, as `torch.nn.LayerNorm`.
///
/// Candle's fused `ops::layer_norm` (behind `candle_nn::LayerNorm`) records no backward pass, so
/// every parameter before it would silently get no gradient. This layer uses
/// [`rankstack_kernels::cpu::layer_norm::layer_norm_fused`] (a CPU kernel with an analytic backward pass) for
/// affine f32/f64 inputs on the CPU, and differentiable candle primitives otherwise; both take two
/// passes (centre, then square), which keeps the variance accurate for inputs with a large mean. Parameters: `weight` `[dim]`, `bias` `[dim]`.
///
/// ```
/// # use candle_core::{Device, DType, Module, Tensor};
/// # use rankstack_nn::{LayerNorm, LayerNormConfig, SeededVarMap};
/// let params = SeededVarMap::new(0);
/// let ln = LayerNorm::new(4, LayerNormConfig::default(), params.var_builder(DType::F32, &Device::Cpu).pp("norm"))?;
/// let y = ln.forward(&Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[1, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// A LayerNorm over `dim` features.
    pub fn new(dim: usize, config: LayerNormConfig, vb: VarBuilder) -> crate::Result<Self> {
        if !(config.eps.is_finite() && config.eps > 0.0) {
            return Err(crate::Error::config(
                "LayerNorm",
                "eps",
                format!("must be finite and > 0, got {}", config.eps),
            ));
        }
        let (weight, bias) = if config.affine {
            (
                Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?),
                Some(vb.get_with_hints(dim, "bias", Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps: config.eps })
    }

    /// A LayerNorm over `dim` features with a scale `weight` but no `bias`, as
    /// `torch.nn.LayerNorm(dim, bias=False)` (what `torch.nn.TransformerEncoderLayer(bias=False)`
    /// uses).
    pub fn without_bias(dim: usize, eps: f64, vb: VarBuilder) -> crate::Result<Self> {
        let mut norm = Self::new(dim, LayerNormConfig { eps, affine: false }, vb.clone())?;
        norm.weight = Some(vb.get_with_hints(dim, "weight", Init::Const(1.0))?);
        Ok(norm)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // CPU f32/f64 with affine parameters: one fused kernel with an analytic backward pass
        // (same value and gradients; far fewer graph nodes). Otherwise the composed version below.
        if let (Some(w), Some(b)) = (&self.weight, &self.bias) {
            if let Some(y) = rankstack_kernels::cpu::layer_norm::layer_norm_fused(x, w, b, self.eps)? {
                return Ok(y);
            }
        }
        // Composed, its four full-size intermediates recomputed in the backward pass rather than
        // kept: on a GPU they were a large share of a training step's memory.
        // The inputs are `x`, then whichever of weight and bias the norm has.
        let (eps, has_weight, has_bias) = (self.eps, self.weight.is_some(), self.bias.is_some());
        let inputs: Vec<&Tensor> = [Some(x), self.weight.as_ref(), self.bias.as_ref()].into_iter().flatten().collect();
        recompute_in_backward(&inputs, move |t| {
            let weight = has_weight.then(|| &t[1]);
            let bias = has_bias.then(|| &t[t.len() - 1]);
            composed(&t[0], weight, bias, eps)
        })
    }
}

/// LayerNorm of differentiable primitives: `(x − mean) / √(var + eps) · weight + bias`.
fn composed(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    crate::standardize::standardize(&centred, &var, eps, weight, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeededVarMap;
    use candle_core::{DType, Device, Var};

    #[test]
    fn normalises_by_hand() {
        // Row [1, 3]: mean 2, variance 1, so with eps = 0+ the output is [-1, 1] (up to eps).
        let m = SeededVarMap::new(0);
        let ln =
            LayerNorm::new(2, LayerNormConfig { eps: 1e-12, affine: true }, m.var_builder(DType::F64, &Device::Cpu))
                .unwrap();
        let y: Vec<Vec<f64>> =
            ln.forward(&Tensor::new(&[[1f64, 3.0]], &Device::Cpu).unwrap()).unwrap().to_vec2().unwrap();
        assert!((y[0][0] + 1.0).abs() < 1e-10 && (y[0][1] - 1.0).abs() < 1e-10);
    }

    #[test]
    fn gradient_reaches_the_input_and_parameters() {
        let m = SeededVarMap::new(0);
        let ln = LayerNorm::new(3, LayerNormConfig::default(), m.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let x = Var::new(&[[1f32, 2.0, 4.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[1f32, -2.0, 0.5]], &Device::Cpu).unwrap();
        let loss = (ln.forward(x.as_tensor()).unwrap() * w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gx: Vec<Vec<f32>> = g.get(x.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(gx[0].iter().all(|v| v.is_finite()) && gx[0].iter().any(|v| *v != 0.0));
        // The gradient of a LayerNorm output with respect to its input sums to zero.
        assert!(gx[0].iter().sum::<f32>().abs() < 1e-5);
        for (_, v) in m.named_vars() {
            let gv = g.get(v.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(gv > 0.0);
        }
    }
}
