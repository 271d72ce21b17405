//! The post-norm residual connection of a Transformer layer, `LayerNorm(x + dropout(a))`, as one
//! graph node on the graph a GPU trains on.

use candle_core::{Module, Result, Tensor};

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::device_layer_norm::layer_norm_on_device;

use crate::dropout::device_multipliers;
use crate::layer_norm::{composed, composed_backward};
use crate::recompute::{with_backward, PackedParams};
use crate::{Dropout, LayerNorm};

impl LayerNorm {
    /// `y = LayerNorm(x + dropout(a))`: the residual connection after a post-norm Transformer
    /// sub-layer `a = f(x)` (PyTorch's `norm1(x + dropout1(self_attn(x)))`).
    ///
    /// In training on the graph a GPU runs (a GPU, or the CPU with its kernels off) it is one node
    /// over `x`, `a` and the norm's parameters that keeps the dropout's `u8` mask, not the dropped
    /// `a` nor the sum: on candle's graph those are two `[rows, d]` tensors per residual
    /// connection, kept until the backward pass though no gradient reads them. The backward pass
    /// forms the sum `s` again and runs LayerNorm's written-out backward pass on it:
    ///
    /// ```text
    /// s = x + a ⊙ D,  y = LayerNorm(s),  ∂x = ∂s,  ∂a = ∂s ⊙ D      (D: the dropout multipliers)
    /// ```
    ///
    /// The mask is drawn as `dropout` draws it ([`Dropout`]; nothing is drawn in evaluation or
    /// at `p = 0`), so values and gradients are those of `self.forward(&(x + dropout(a)))` bit for
    /// bit, which is what runs everywhere else.
    ///
    /// ```
    /// # use candle_core::{Device, DType, Tensor};
    /// # use rankstack_nn::{Dropout, LayerNorm, LayerNormConfig, SeededVarMap};
    /// let params = SeededVarMap::new(0);
    /// let norm = LayerNorm::new(4, LayerNormConfig::default(), params.var_builder(DType::F32, &Device::Cpu))?;
    /// let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?;
    /// let a = Tensor::new(&[[0.5f32, 0., -0.5, 1.]], &Device::Cpu)?;
    /// let y = norm.forward_residual(&x, &a, &Dropout::new(0.1, 7)?, false)?;
    /// assert_eq!(y.dims(), &[1, 4]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_residual(&self, x: &Tensor, a: &Tensor, dropout: &Dropout, train: bool) -> Result<Tensor> {
        let params = [self.weight.as_ref(), self.bias.as_ref()];
        let trains = x.track_op() || a.track_op() || params.iter().flatten().any(|p| p.track_op());
        if kernels_run_on(x.device()) || !trains || x.shape() != a.shape() {
            // Scoring off the CPU kernels (no graph, no dropout): one launch for the sum and its
            // norm, writing the output alone.
            let scoring =
                !kernels_run_on(x.device()) && !trains && (!train || dropout.p() == 0.0) && x.shape() == a.shape();
            if let (true, Some(w), Some(b)) = (scoring, &self.weight, &self.bias) {
                if let Some(y) = layer_norm_on_device(x, Some(a), w, b, self.eps)? {
                    return Ok(y);
                }
            }
            // The fused CPU ops, or nothing to keep (inference); a shape mismatch errors there.
            return self.forward(&(x + candle_core::ModuleT::forward_t(dropout, a, train)?)?);
        }
        let p = dropout.p();
        let keep = if train && p > 0.0 { Some(dropout.draw_keep_mask(a.shape(), a.device())?) } else { None };
        let kept = keep.clone();
        let (eps, has_weight, has_bias) = (self.eps, self.weight.is_some(), self.bias.is_some());
        // A node takes at most three inputs: the weight and bias go in as one packed vector.
        let params: Vec<&Tensor> = params.into_iter().flatten().collect();
        let (layout, packed) = PackedParams::pack(&params)?;
        let inputs: Vec<&Tensor> = [Some(x), Some(a), packed.as_ref()].into_iter().flatten().collect();
        let (forward_layout, backward_layout) = (layout.clone(), layout);
        with_backward(
            &inputs,
            move |t| {
                let (weight, bias) = norm_params(&forward_layout, t, has_weight, has_bias)?;
                composed(&residual_sum(&t[0], &t[1], keep.as_ref(), p)?, weight.as_ref(), bias.as_ref(), eps)
            },
            move |t, _, grad| {
                let (weight, _) = norm_params(&backward_layout, t, has_weight, has_bias)?;
                let s = residual_sum(&t[0], &t[1], kept.as_ref(), p)?;
                let mut grads = composed_backward(&s, weight.as_ref(), has_bias, eps, grad)?.into_iter();
                let ds =
                    grads.next().flatten().ok_or_else(|| candle_core::Error::Msg("residual norm: no ∂s".into()))?;
                let da = match &kept {
                    Some(keep) => ds.mul(&device_multipliers(keep, p, ds.dtype())?)?,
                    None => ds.clone(),
                };
                let dpacked = PackedParams::pack_gradients(grads.flatten())?;
                Ok([Some(ds), Some(da)].into_iter().chain(dpacked.map(Some)).collect())
            },
        )
    }
}

/// The norm's weight and bias from the node's inputs `[x, a, packed parameters]` (the packed
/// vector absent when the norm has neither).
fn norm_params(
    layout: &PackedParams,
    t: &[Tensor],
    has_weight: bool,
    has_bias: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let mut params = match t.get(2) {
        Some(packed) => layout.unpack(packed)?.into_iter(),
        None => Vec::new().into_iter(),
    };
    let weight = if has_weight { params.next() } else { None };
    Ok((weight, if has_bias { params.next() } else { None }))
}

/// `x + a ⊙ D` for the multipliers `D` of `keep` (dropout's `u8` mask), `x + a` without one: the
/// same operations as `x + drop_with_keep_mask(a)`.
fn residual_sum(x: &Tensor, a: &Tensor, keep: Option<&Tensor>, p: f64) -> Result<Tensor> {
    match keep {
        Some(keep) => x + a.mul(&device_multipliers(keep, p, a.dtype())?)?,
        None => x + a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, ModuleT, Var};
    use rankstack_kernels::cpu::{with_isa, Isa};

    /// On the GPU's graph (the CPU with its kernels off) the node equals the composition it
    /// replaces, `forward(x + dropout(a))` on the same graph, bit for bit: values and the
    /// gradients of `x`, `a`, weight and bias; f32 and f64, rank 2 and 3, with and without the
    /// norm's parameters, dropout on and off, training and evaluation.
    #[test]
    fn the_node_equals_the_norm_of_the_dropped_sum_bit_for_bit() {
        let bits = crate::testing::value_bits;
        for dtype in [DType::F32, DType::F64] {
            for dims in [vec![7, 6], vec![2, 5, 6]] {
                for (with_weight, with_bias) in [(true, true), (true, false), (false, false)] {
                    for (p, train) in [(0.3, true), (0.3, false), (0.0, true)] {
                        let case =
                            format!("{dtype:?} {dims:?} weight {with_weight} bias {with_bias} p {p} train {train}");
                        let var = |seed, dims: &[usize]| {
                            Var::from_tensor(&crate::testing::seeded_randn(seed, dims, dtype)).unwrap()
                        };
                        let (x, a, w, b) = (var(1, &dims), var(2, &dims), var(3, &[6]), var(4, &[6]));
                        let norm = LayerNorm {
                            weight: with_weight.then(|| w.as_tensor().clone()),
                            bias: with_bias.then(|| b.as_tensor().clone()),
                            eps: 1e-5,
                        };
                        let r = crate::testing::seeded_randn(5, &dims, dtype);
                        let run = |fused: bool| {
                            let dropout = Dropout::new(p, 11).unwrap();
                            let y = with_isa(Isa::Candle, || {
                                if fused {
                                    norm.forward_residual(x.as_tensor(), a.as_tensor(), &dropout, train)
                                } else {
                                    norm.forward(&(x.as_tensor() + dropout.forward_t(a.as_tensor(), train)?)?)
                                }
                            })
                            .unwrap();
                            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                            let params = [(with_weight, &w), (with_bias, &b)];
                            let vars = [&x, &a].into_iter().chain(params.iter().filter(|p| p.0).map(|p| p.1));
                            let g: Vec<Vec<u64>> = vars.map(|v| bits(grads.get(v.as_tensor()).unwrap())).collect();
                            (bits(&y), g)
                        };
                        let (node, plain) = (run(true), run(false));
                        assert_eq!(node.0, plain.0, "values: {case}");
                        assert_eq!(node.1, plain.1, "gradients: {case}");
                        // Something was dropped where dropout trains: ∂a differs from ∂x there.
                        assert_eq!(node.1[0] != node.1[1], train && p > 0.0, "{case}");
                    }
                }
            }
        }
    }

    /// Scoring on the GPU's graph (the CPU with its kernels off, no input in a graph): the norm
    /// and the residual norm are the forward-only kernel, whose values are the composed
    /// LayerNorm's to f32 rounding, also for rows with a large mean.
    #[test]
    fn scoring_off_the_cpu_kernels_is_the_forward_only_kernel() {
        let dims = [9, 96];
        for offset in [0.0, 1e3] {
            let x = (crate::testing::seeded_randn(1, &dims, DType::F32) + offset).unwrap();
            let a = crate::testing::seeded_randn(2, &dims, DType::F32);
            let w = crate::testing::seeded_randn(3, &[96], DType::F32);
            let b = crate::testing::seeded_randn(4, &[96], DType::F32);
            let norm = LayerNorm { weight: Some(w.clone()), bias: Some(b.clone()), eps: 1e-5 };
            let dropout = Dropout::new(0.1, 1).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let sum = (&x + &a).unwrap();
            let want = flat(&crate::layer_norm::composed(&sum, Some(&w), Some(&b), 1e-5).unwrap());
            let kernel = layer_norm_on_device(&x, Some(&a), &w, &b, 1e-5).unwrap().unwrap();
            let residual = with_isa(Isa::Candle, || norm.forward_residual(&x, &a, &dropout, false).unwrap());
            let plain = with_isa(Isa::Candle, || norm.forward(&sum).unwrap());
            assert_eq!(flat(&residual), flat(&kernel), "the residual norm is the kernel");
            for (name, got) in [("residual", flat(&residual)), ("plain", flat(&plain))] {
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{name}, offset {offset}: {g} vs {w}");
                }
            }
        }
    }

    /// Inputs of different shapes are an error (the composition's), not a broadcast.
    #[test]
    fn mismatched_inputs_are_an_error() {
        let m = crate::SeededVarMap::new(0);
        let norm =
            LayerNorm::new(6, crate::LayerNormConfig::default(), m.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let x = Var::from_tensor(&Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let a = Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap();
        let dropout = Dropout::new(0.1, 1).unwrap();
        let result = with_isa(Isa::Candle, || norm.forward_residual(x.as_tensor(), &a, &dropout, true));
        assert!(result.is_err());
    }
}
