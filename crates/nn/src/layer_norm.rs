//! LayerNorm with a backward pass.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::device_layer_norm::layer_norm_on_device;

use crate::recompute::with_backward;

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
/// affine f32/f64 inputs on the CPU, off the CPU kernels in scoring (affine, f32, no input in a
/// graph) the forward-only [`layer_norm_on_device`], and differentiable candle primitives otherwise;
/// each centres before it squares, which keeps the variance accurate for inputs with a large mean. Parameters: `weight` `[dim]`, `bias` `[dim]`.
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
    pub(crate) weight: Option<Tensor>,
    pub(crate) bias: Option<Tensor>,
    pub(crate) eps: f64,
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
            // Off the CPU kernels, in scoring (no input in a graph, f32): one launch writing the
            // output alone.
            if !kernels_run_on(x.device()) {
                if let Some(y) = layer_norm_on_device(x, None, w, b, self.eps)? {
                    return Ok(y);
                }
            }
        }
        // Composed, as one graph node with the gradient written out (see `composed_backward`): its
        // intermediates are not kept for the backward pass, and that pass makes a third of the
        // full-size temporaries that back-propagation through the composed operations did (on a
        // GPU, a TransAct LayerNorm's backward pass was a training step's peak). The inputs are
        // `x`, then whichever of weight and bias the norm has.
        let (eps, has_weight, has_bias) = (self.eps, self.weight.is_some(), self.bias.is_some());
        let inputs: Vec<&Tensor> = [Some(x), self.weight.as_ref(), self.bias.as_ref()].into_iter().flatten().collect();
        with_backward(
            &inputs,
            |t| composed(&t[0], has_weight.then(|| &t[1]), has_bias.then(|| &t[t.len() - 1]), eps),
            move |t, _, grad| composed_backward(&t[0], has_weight.then(|| &t[1]), has_bias, eps, grad),
        )
    }
}

/// LayerNorm of candle operations: `(x − mean) / √(var + eps) · weight + bias`.
///
/// Where no gradient can flow through it (inference, or inside a node with its gradient written
/// out, as [`LayerNorm`]'s own) and with both affine parameters, in f32, bf16 or f16, the centred
/// values go through candle's fused kernel: one pass writing the result where the primitives
/// write four tensors of `x`'s size (square, quotient, product, sum). That kernel takes the
/// variance as `E[c²] − E[c]²` in f32, which loses every digit for inputs whose mean is large
/// beside their spread; fed the centred values `c`, whose mean is zero up to rounding, it is the
/// two-pass variance, and its second centring even corrects the f32 mean's rounding, which the
/// primitives keep (see the test). f64 keeps the primitives (the kernel accumulates in f32).
pub(crate) fn composed(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    if let (Some(w), Some(b)) = (weight, bias) {
        let no_graph = !(x.track_op() || w.track_op() || b.track_op());
        if no_graph && x.dtype() != candle_core::DType::F64 && x.rank() > 0 {
            return candle_nn::ops::layer_norm(&centred, &w.contiguous()?, &b.contiguous()?, eps as f32);
        }
    }
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    crate::standardize::standardize(&centred, &var, eps, weight, bias)
}

/// The gradients of [`composed`]'s inputs (`x`, then `weight` and `bias` where present) for the
/// output gradient `g`, with `x̂ = (x − mean) / σ`, `σ = √(var + eps)` recomputed:
///
/// ```text
/// ∂x̂ = g ⊙ weight,  ∂x = (∂x̂ − mean(∂x̂) − x̂ ⊙ mean(∂x̂ ⊙ x̂)) / σ,
/// ∂weight = Σ_rows g ⊙ x̂,  ∂bias = Σ_rows g
/// ```
pub(crate) fn composed_backward(
    x: &Tensor,
    weight: Option<&Tensor>,
    has_bias: bool,
    eps: f64,
    g: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let d = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let (x2, g) = (x.reshape((rows, d))?, g.reshape((rows, d))?);
    let centred = x2.broadcast_sub(&x2.mean_keepdim(D::Minus1)?)?;
    let sigma = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let x_hat = centred.broadcast_div(&sigma)?;
    drop(centred);
    let dx_hat = match weight {
        Some(w) => g.broadcast_mul(w)?,
        None => g.clone(),
    };
    let mean_dx_hat = dx_hat.mean_keepdim(D::Minus1)?;
    let mean_dx_hat_x_hat = dx_hat.mul(&x_hat)?.mean_keepdim(D::Minus1)?;
    let dx = dx_hat
        .broadcast_sub(&mean_dx_hat)?
        .sub(&x_hat.broadcast_mul(&mean_dx_hat_x_hat)?)?
        .broadcast_div(&sigma)?
        .reshape(x.shape())?;
    drop(dx_hat);
    let dw = weight.map(|_| g.mul(&x_hat)?.sum(0)).transpose()?;
    let db = has_bias.then(|| g.sum(0)).transpose()?;
    Ok([Some(dx)].into_iter().chain(weight.map(|_| dw)).chain(has_bias.then_some(db)).collect())
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

    /// The composed path (what a GPU runs: one node with its gradient written out) against
    /// back-propagation through `composed`'s operations, f64, rank 2 and 3, with and without
    /// weight and bias, and a row with a large mean.
    #[test]
    fn the_written_out_gradient_is_the_composed_operations_gradient() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for dims in [vec![4, 6], vec![2, 3, 6]] {
            for (with_weight, with_bias) in [(true, true), (true, false), (false, false)] {
                let var = |seed, dims: &[usize]| {
                    Var::from_tensor(&crate::testing::seeded_randn(seed, dims, DType::F64)).unwrap()
                };
                let x = Var::from_tensor(&(crate::testing::seeded_randn(1, &dims, DType::F64) + 1e3).unwrap()).unwrap();
                let (w, b) = (var(2, &[6]), var(3, &[6]));
                let norm = LayerNorm {
                    weight: with_weight.then(|| w.as_tensor().clone()),
                    bias: with_bias.then(|| b.as_tensor().clone()),
                    eps: 1e-5,
                };
                let r = crate::testing::seeded_randn(4, &dims, DType::F64);
                let node = with_isa(Isa::Candle, || norm.forward(x.as_tensor())).unwrap();
                let plain = composed(x.as_tensor(), norm.weight.as_ref(), norm.bias.as_ref(), 1e-5).unwrap();
                assert_eq!(flat(&node), flat(&plain));
                let g1 = node.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = plain.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                let params = [(with_weight, &w), (with_bias, &b)];
                for v in [&x].into_iter().chain(params.iter().filter(|p| p.0).map(|p| p.1)) {
                    let (a, c) = (flat(g1.get(v.as_tensor()).unwrap()), flat(g2.get(v.as_tensor()).unwrap()));
                    let scale = c.iter().fold(0f64, |m, v| m.max(v.abs()));
                    for (a, c) in a.iter().zip(&c) {
                        assert!((a - c).abs() <= 1e-12 * scale, "{dims:?} {with_weight} {with_bias}: {a} vs {c}");
                    }
                }
            }
        }
    }

    /// Without a graph (inference, a node's forward pass) f32 takes candle's fused kernel on the
    /// centred values: within a few ulp of the exact norm, also for rows whose mean is 10⁴ times
    /// their spread (where the kernel on the raw values would lose every digit), and never
    /// further from it than the f32 primitives.
    #[test]
    fn without_a_graph_the_fused_kernel_on_centred_values_is_at_least_as_accurate_as_the_primitives() {
        let x = (crate::testing::seeded_randn(5, &[7, 96], DType::F64) + 1e4).unwrap();
        let spread = crate::testing::seeded_randn(6, &[7, 96], DType::F64);
        // Rows of every scale of mean: 0, 1e4, and in between.
        let x = Tensor::cat(&[&spread, &x, &(spread.clone() + 3.0).unwrap()], 0).unwrap();
        let (w, b) =
            (crate::testing::seeded_randn(7, &[96], DType::F64), crate::testing::seeded_randn(8, &[96], DType::F64));
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (x32, w32, b32) = (f32s(&x), f32s(&w), f32s(&b));
        let fused = composed(&x32, Some(&w32), Some(&b32), 1e-5).unwrap();
        // The primitives in f32 (a tracked input keeps them) and in f64, the reference.
        let tracked = Var::from_tensor(&x32).unwrap();
        let primitives = composed(tracked.as_tensor(), Some(&w32), Some(&b32), 1e-5).unwrap();
        // The exact norm of the f32 values (the rounding of the inputs to f32 is no one's error).
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let exact = composed(&f64s(&x32), Some(&f64s(&w32)), Some(&f64s(&b32)), 1e-5).unwrap();
        let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (fused, primitives, exact) = (flat(&fused), flat(&primitives), flat(&exact));
        let worst = |a: &[f64]| a.iter().zip(&exact).map(|(a, e)| (a - e).abs()).fold(0f64, f64::max);
        // Outputs are O(1) (|w|, |b| ≲ 3): within a few f32 ulp of that. The primitives do worse
        // on the rows of mean 10⁴ (their f32 mean is off by about 10⁻³ of the spread, and nothing
        // corrects it), where the kernel centres the centred values again.
        assert!(worst(&fused) <= 4e-6, "fused: {}", worst(&fused));
        assert!(worst(&fused) <= worst(&primitives), "{} vs {}", worst(&fused), worst(&primitives));
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
