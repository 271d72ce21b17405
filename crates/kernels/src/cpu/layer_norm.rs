//! A fused LayerNorm kernel with an analytic backward pass (CPU, f32/f64).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::float::{dispatch, FloatKernel};
use crate::KernelFloat;

/// `y = (x − mean(x)) / sqrt(var(x) + eps) · weight + bias` over the last dimension (biased
/// variance), as one fused pass per row, with the analytic backward pass
///
/// ```text
/// x̂ = (x − μ)·r, r = 1/sqrt(σ² + eps), gw = ∂L/∂y ⊙ weight
/// ∂L/∂x = r · (gw − mean(gw) − x̂ · mean(gw ⊙ x̂)),  ∂L/∂weight = Σ_rows ∂L/∂y ⊙ x̂,  ∂L/∂bias = Σ_rows ∂L/∂y
/// ```
///
/// Used by `rankstack_nn::LayerNorm` on the CPU for f32/f64: the composed version records about nine
/// graph nodes per call, and candle's backward pass allocates and accumulates a full-size gradient
/// for each, which dominates a transformer layer's training step. Returns `None` where the fused
/// kernel does not apply (other devices or dtypes), so the caller can fall back.
pub fn layer_norm_fused(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || !super::kernels_enabled()
        || !matches!(x.dtype(), DType::F32 | DType::F64)
        || x.rank() == 0
    {
        return Ok(None);
    }
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] || weight.dtype() != x.dtype() || bias.dtype() != x.dtype() {
        return Ok(None);
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, FusedLayerNorm { eps }).map(Some)
}

struct FusedLayerNorm {
    eps: f64,
}

/// Backward kernel: from `(x, weight, grad_y)` produces `[rows + 2, d]`: `∂L/∂x`, then the
/// `∂L/∂weight` and `∂L/∂bias` rows.
struct FusedLayerNormBackward {
    eps: f64,
}

/// Row statistics in f64: `(mean, 1/sqrt(var + eps))`.
fn stats<T: KernelFloat>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn forward<T: KernelFloat>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut y = vec![T::ZERO; x.len()];
    x.par_chunks(d).zip(y.par_chunks_mut(d)).for_each(|(xr, yr)| {
        let (mean, r) = stats(xr, eps);
        for i in 0..d {
            yr[i] = T::from_f64((xr[i].to_f64() - mean) * r * w[i].to_f64() + b[i].to_f64());
        }
    });
    y
}

fn backward<T: KernelFloat>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let rows = x.len() / d;
    let mut out = vec![T::ZERO; x.len() + 2 * d];
    let (dx, _) = out.split_at_mut(rows * d);
    // Per-chunk partial sums of ∂L/∂weight and ∂L/∂bias, reduced afterwards.
    let chunk_rows = 256;
    let partials: Vec<(Vec<f64>, Vec<f64>)> = x
        .par_chunks(chunk_rows * d)
        .zip(g.par_chunks(chunk_rows * d))
        .zip(dx.par_chunks_mut(chunk_rows * d))
        .map(|((xc, gc), dxc)| {
            let mut dw = vec![0.0; d];
            let mut db = vec![0.0; d];
            let mut xhat = vec![0.0; d];
            for ((xr, gr), dxr) in xc.chunks(d).zip(gc.chunks(d)).zip(dxc.chunks_mut(d)) {
                let (mean, r) = stats(xr, eps);
                let (mut m1, mut m2) = (0.0, 0.0);
                for i in 0..d {
                    xhat[i] = (xr[i].to_f64() - mean) * r;
                    let gi = gr[i].to_f64();
                    let gw = gi * w[i].to_f64();
                    m1 += gw;
                    m2 += gw * xhat[i];
                    dw[i] += gi * xhat[i];
                    db[i] += gi;
                }
                let (m1, m2) = (m1 / d as f64, m2 / d as f64);
                for i in 0..d {
                    dxr[i] = T::from_f64(r * (gr[i].to_f64() * w[i].to_f64() - m1 - xhat[i] * m2));
                }
            }
            (dw, db)
        })
        .collect();
    for (pw, pb) in partials {
        for i in 0..d {
            out[rows * d + i] = T::from_f64(out[rows * d + i].to_f64() + pw[i]);
            out[rows * d + d + i] = T::from_f64(out[rows * d + d + i].to_f64() + pb[i]);
        }
    }
    out
}

impl FloatKernel for FusedLayerNorm {
    const NAME: &'static str = "fused layer norm";

    /// Inputs `(x, weight, bias)`.
    fn run<T: KernelFloat>(&self, inputs: &[&[T]]) -> Result<Vec<T>> {
        Ok(forward(inputs[0], inputs[1], inputs[2], self.eps))
    }
}

impl FloatKernel for FusedLayerNormBackward {
    const NAME: &'static str = "fused layer norm backward";

    /// Inputs `(x, weight, ∂L/∂y)`.
    fn run<T: KernelFloat>(&self, inputs: &[&[T]]) -> Result<Vec<T>> {
        Ok(backward(inputs[0], inputs[1], inputs[2], self.eps))
    }
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "rankstack-fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((dispatch(self, &[(x, xl), (w, wl), (b, bl)])?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = weight.dim(0)?;
        let rows = x.elem_count() / d;
        let all = x.apply_op3_no_bwd(weight, &grad.contiguous()?, &FusedLayerNormBackward { eps: self.eps })?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = all.narrow(0, rows, 1)?.reshape(d)?;
        let db = all.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for FusedLayerNormBackward {
    fn name(&self) -> &'static str {
        "rankstack-fused-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / d.max(1);
        Ok((dispatch(self, &[(x, xl), (w, wl), (g, gl)])?, Shape::from((rows + 2, d))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::oracle::{assert_close, f64s, tensor};

    /// The formula in f64, row by row: `y`, and for `L = Σ y ⊙ r` the gradients `∂x`, `∂w`, `∂b`
    /// written out from the chain rule (not from the kernel's simplified form).
    fn oracle(x: &[f64], w: &[f64], b: &[f64], r: &[f64], eps: f64) -> [Vec<f64>; 4] {
        let d = w.len();
        let (mut y, mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; d], vec![0.0; d]);
        for ((row, rr), (yr, dxr)) in x.chunks(d).zip(r.chunks(d)).zip(y.chunks_mut(d).zip(dx.chunks_mut(d))) {
            let n = d as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let s = (var + eps).sqrt();
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) / s).collect();
            for j in 0..d {
                yr[j] = xhat[j] * w[j] + b[j];
                dw[j] += rr[j] * xhat[j];
                db[j] += rr[j];
            }
            // ∂x̂_j/∂x_i = (δ_ij − 1/n − x̂_i x̂_j / n) / s.
            for i in 0..d {
                dxr[i] = (0..d)
                    .map(|j| {
                        let delta = if i == j { 1.0 } else { 0.0 };
                        rr[j] * w[j] * (delta - 1.0 / n - xhat[i] * xhat[j] / n) / s
                    })
                    .sum();
            }
        }
        [y, dx, dw, db]
    }

    #[test]
    fn matches_the_f64_oracle_in_value_and_all_gradients() {
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            let x = Var::from_tensor(&tensor(1, &[3, 40, 7], dtype).affine(3.0, 10.0).unwrap()).unwrap();
            let w = Var::from_tensor(&(tensor(2, &[7], dtype) + 1.0).unwrap()).unwrap();
            let b = Var::from_tensor(&tensor(3, &[7], dtype)).unwrap();
            let r = tensor(4, &[3, 40, 7], dtype);
            let y = layer_norm_fused(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap().unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let [ey, edx, edw, edb] =
                oracle(&f64s(x.as_tensor()), &f64s(w.as_tensor()), &f64s(b.as_tensor()), &f64s(&r), 1e-5);
            assert_close("y", &y, &ey, tol);
            assert_close("dx", g.get(x.as_tensor()).unwrap(), &edx, tol);
            assert_close("dw", g.get(w.as_tensor()).unwrap(), &edw, tol);
            assert_close("db", g.get(b.as_tensor()).unwrap(), &edb, tol);
        }
    }

    /// `x = [1, 3]`, `w = 1`, `b = 0`, eps 0: mean 2, variance 1, so `y = [−1, 1]`.
    #[test]
    fn hand_checkable_row() {
        let x = Tensor::new(&[[1f64, 3.]], &candle_core::Device::Cpu).unwrap();
        let w = Tensor::new(&[1f64, 1.], &candle_core::Device::Cpu).unwrap();
        let y = layer_norm_fused(&x, &w, &w.zeros_like().unwrap(), 0.0).unwrap().unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![-1.0, 1.0]]);
    }

    #[test]
    fn other_dtypes_fall_back() {
        let x = Tensor::zeros((2, 3), DType::BF16, &candle_core::Device::Cpu).unwrap();
        let w = Tensor::ones(3, DType::BF16, &candle_core::Device::Cpu).unwrap();
        assert!(layer_norm_fused(&x, &w, &w, 1e-5).unwrap().is_none());
    }
}
