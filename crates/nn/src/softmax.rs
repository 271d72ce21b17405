//! Softmax with a backward pass.

use candle_core::{Result, Tensor, D};

/// `softmax(x)_i = exp(x_i - m) / Σ_j exp(x_j - m)` along `dim`, with `m = max_j x_j`.
///
/// Where a gradient may flow through `x` it is built from differentiable primitives, because
/// candle's `ops::softmax_last_dim` records no backward pass. The shift by the (detached) maximum
/// keeps `exp` finite for large logits and does not change the value or the gradient, since
/// softmax is invariant to a per-row constant.
///
/// Where none can (`x` takes part in no graph: inference, or inside a graph node that writes its
/// own backward pass, such as the composed attention's core) and `dim` is the last, it is
/// candle's fused kernel instead: the same formula in one pass that writes only the result, where
/// the primitives write three tensors of `x`'s size (the shifted values, their exponentials, the
/// quotient) and launch five kernels on a GPU. Its sum runs in another order, so values may differ
/// from the primitives' in the last bit (both CPU and CUDA kernels compute `exp(x − max)` and
/// scale by the sum's inverse; see the test).
pub fn softmax<Dm: candle_core::shape::Dim + Copy>(x: &Tensor, dim: Dm) -> Result<Tensor> {
    if !x.track_op() && x.rank() > 0 && dim.to_index(x.shape(), "softmax")? + 1 == x.rank() {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    composed(x, dim)
}

/// [`softmax`] of differentiable primitives.
fn composed<Dm: candle_core::shape::Dim + Copy>(x: &Tensor, dim: Dm) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(dim)?;
    e.broadcast_div(&sum)
}

/// [`softmax`] over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax(x, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_closed_form_and_survives_large_logits() {
        let x = Tensor::new(&[[0f64, 0f64.ln_1p()], [1000.0, 1000.0 + 2f64.ln()]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f64>> = softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        // exp(0) : exp(ln 2) = 1 : 2 ... first row is 1 : 1 since ln(1+0) = 0.
        assert_eq!(y[0], vec![0.5, 0.5]);
        assert!((y[1][0] - 1.0 / 3.0).abs() < 1e-12 && (y[1][1] - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn without_a_graph_it_is_the_fused_kernel_within_an_ulp_of_the_primitives() {
        let x = (crate::testing::seeded_randn(3, &[64, 37], candle_core::DType::F32) * 5.0).unwrap();
        let fused: Vec<f32> = softmax_last_dim(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let primitives: Vec<f32> = composed(&x, D::Minus1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in fused.iter().zip(&primitives) {
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * b.abs().max(f32::MIN_POSITIVE), "{a} vs {b}");
        }
        // Rows sum to 1, and a non-last dimension keeps the primitives.
        let sums: Vec<f32> = softmax_last_dim(&x).unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let first = softmax(&x, 0).unwrap();
        assert_eq!(
            first.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            composed(&x, 0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // A tracked input (a gradient may flow) keeps the primitives, bit for bit.
        let v = Var::from_tensor(&x).unwrap();
        let tracked: Vec<f32> = softmax_last_dim(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(tracked, primitives);
    }

    #[test]
    fn has_a_gradient() {
        // d/dx0 of softmax(x)_0 at x = [0, 0] is p0 (1 - p0) = 1/4, and d/dx1 is -p0 p1 = -1/4.
        let x = Var::new(&[0f32, 0.0], &Device::Cpu).unwrap();
        let p0 = softmax_last_dim(x.as_tensor()).unwrap().get(0).unwrap();
        let g = p0.backward().unwrap();
        let gx: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(gx, vec![0.25, -0.25]);
    }
}
