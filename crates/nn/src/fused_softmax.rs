//! A fused last-dimension softmax with a backward pass (the hot op of attention).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::kernel_float::contiguous;
use crate::KernelFloat;

/// `softmax(x)` over the last dimension, in one fused pass per row on the CPU, with the analytic
/// backward pass `∂L/∂x = y ⊙ (g − Σ_j g_j y_j)` (`y` the output, `g = ∂L/∂y`).
///
/// Same value as [`crate::softmax()`] (max-shifted, so large logits and `−∞` mask entries are safe;
/// a row must keep at least one finite entry), but several times faster on large tensors such as
/// attention scores `[B, H, S, S]`: candle's own fused `softmax_last_dim` has no backward pass, and
/// the composed version makes five passes over memory and records four graph nodes. Other devices
/// and dtypes fall back to [`crate::softmax()`].
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let y = rankstack_nn::softmax_last_dim_fused(&Tensor::new(&[[0f32, 0.], [1., f32::NEG_INFINITY]], &Device::Cpu)?)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.5, 0.5], vec![1.0, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn softmax_last_dim_fused(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() > 0 {
        x.contiguous()?.apply_op1(FusedSoftmax)
    } else {
        crate::softmax(x, D::Minus1)
    }
}

/// `softmax(x + m)` over the last dimension, where `x` is `[B, …, N]` and the additive mask `m`
/// is `[B, N]`, broadcast over the middle dimensions (attention scores `[B, H, S, S]` with a key
/// mask `[B, S]` of `0` / `−∞`). One fused pass, no `[B, …, N]`-sized mask tensor, and the same
/// analytic backward pass as [`softmax_last_dim_fused`] (the mask gets no gradient). Each row must
/// keep at least one finite entry. Falls back to composed operations off the CPU.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let scores = Tensor::new(&[[[1f32, 2., 3.], [0., 0., 0.]]], &Device::Cpu)?; // [1, 2, 3]
/// let mask = Tensor::new(&[[0f32, 0., f32::NEG_INFINITY]], &Device::Cpu)?; // hide key 2
/// let p = rankstack_nn::fused_softmax::masked_softmax_last_dim_fused(&scores, &mask)?;
/// assert_eq!(p.to_vec3::<f32>()?[0][1], vec![0.5, 0.5, 0.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn masked_softmax_last_dim_fused(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || mask.dims() != [dims[0], dims[dims.len() - 1]] {
        candle_core::bail!(
            "masked softmax: mask must be [{}, {}], got {:?}",
            dims.first().unwrap_or(&0),
            dims.last().unwrap_or(&0),
            mask.dims()
        );
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && mask.dtype() == x.dtype() {
        x.contiguous()?.apply_op2(&mask.contiguous()?, FusedSoftmax)
    } else {
        let mut shape = vec![dims[0]];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        shape.push(dims[dims.len() - 1]);
        crate::softmax(&x.broadcast_add(&mask.reshape(shape)?)?, D::Minus1)
    }
}

struct FusedSoftmax;

fn softmax_rows<T: KernelFloat>(src: &[T], layout: &Layout, mask: Option<&[T]>) -> Result<Vec<T>> {
    let src = contiguous(src, layout, "fused softmax: input")?;
    let dims = layout.shape().dims();
    let n = dims[dims.len() - 1].max(1);
    // Rows per mask row: the product of the middle dimensions.
    let per_batch = (src.len() / n) / dims.first().copied().unwrap_or(1).max(1);
    let mut dst = vec![T::ZERO; src.len()];
    src.par_chunks(n).zip(dst.par_chunks_mut(n)).enumerate().for_each(|(row, (s, d))| {
        match mask {
            Some(m) => {
                let m = &m[(row / per_batch.max(1)) * n..][..n];
                s.iter().zip(m).zip(d.iter_mut()).for_each(|((si, mi), di)| *di = *si + *mi);
            }
            None => d.copy_from_slice(s),
        }
        let max = d.iter().copied().fold(T::NEG_INFINITY, KernelFloat::max);
        let mut sum = T::ZERO;
        for di in d.iter_mut() {
            *di = (*di - max).exp();
            sum += *di;
        }
        let inv = T::ONE / sum;
        d.iter_mut().for_each(|di| *di *= inv);
    });
    Ok(dst)
}

impl CustomOp1 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "rankstack-fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(s) => Ok((CpuStorage::F32(softmax_rows(s, layout, None)?), layout.shape().clone())),
            CpuStorage::F64(s) => Ok((CpuStorage::F64(softmax_rows(s, layout, None)?), layout.shape().clone())),
            _ => candle_core::bail!("fused softmax: only f32 and f64 are supported"),
        }
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        softmax_backward(res, grad_res).map(Some)
    }
}

impl CustomOp2 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "rankstack-fused-masked-softmax-last-dim"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, m: &CpuStorage, ml: &Layout) -> Result<(CpuStorage, Shape)> {
        const MASK: &str = "masked softmax: mask";
        match (x, m) {
            (CpuStorage::F32(x), CpuStorage::F32(m)) => {
                Ok((CpuStorage::F32(softmax_rows(x, xl, Some(contiguous(m, ml, MASK)?))?), xl.shape().clone()))
            }
            (CpuStorage::F64(x), CpuStorage::F64(m)) => {
                Ok((CpuStorage::F64(softmax_rows(x, xl, Some(contiguous(m, ml, MASK)?))?), xl.shape().clone()))
            }
            _ => candle_core::bail!("masked softmax: scores and mask must both be f32 or both f64"),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_backward(res, grad_res)?), None))
    }
}

/// `∂L/∂x = y ⊙ (g − Σ_j g_j y_j)` per last-dimension row, from the softmax output `y` and
/// `g = ∂L/∂y`: one fused pass on the CPU (f32/f64), composed operations elsewhere.
fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    if y.device().is_cpu() && y.dtype() == g.dtype() && matches!(y.dtype(), DType::F32 | DType::F64) {
        return y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBackward);
    }
    let dot = g.mul(y)?.sum_keepdim(D::Minus1)?;
    g.broadcast_sub(&dot)?.mul(y)
}

/// The kernel of [`softmax_backward`]: `(y, g)` → `∂L/∂x`.
struct SoftmaxBackward;

fn softmax_backward_rows<T: KernelFloat>(y: &[T], yl: &Layout, g: &[T], gl: &Layout) -> Result<Vec<T>> {
    let (y, g) = (contiguous(y, yl, "softmax backward: output")?, contiguous(g, gl, "softmax backward: gradient")?);
    if yl.shape() != gl.shape() {
        candle_core::bail!("softmax backward: gradient {:?} for an output {:?}", gl.shape(), yl.shape());
    }
    let n = yl.shape().dims().last().copied().unwrap_or(1).max(1);
    let mut dx = vec![T::ZERO; y.len()];
    dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).for_each(|(d, (y, g))| {
        // Same order of operations as the composed version: dot = Σ g·y, then (g − dot)·y.
        let dot = y.iter().zip(g).fold(T::ZERO, |acc, (&yi, &gi)| acc + gi * yi);
        d.iter_mut().zip(y.iter().zip(g)).for_each(|(di, (&yi, &gi))| *di = (gi - dot) * yi);
    });
    Ok(dx)
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "rankstack-fused-softmax-backward"
    }

    fn cpu_fwd(&self, y: &CpuStorage, yl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dx = match (y, g) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(softmax_backward_rows(y, yl, g, gl)?),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(softmax_backward_rows(y, yl, g, gl)?),
            _ => candle_core::bail!("softmax backward: output and gradient must both be f32 or both f64"),
        };
        Ok((dx, yl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_softmax_in_value_and_gradient() {
        let x = Var::from_tensor(&(crate::testing::seeded_randn(1, &[3, 4, 7], DType::F64) * 5.0).unwrap()).unwrap();
        let w = crate::testing::seeded_randn(2, &[3, 4, 7], DType::F64);
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&softmax_last_dim_fused);
        let (y2, g2) = run(&|t| crate::softmax(t, D::Minus1));
        crate::testing::assert_close("value", &y1, &y2, 1e-14);
        crate::testing::assert_close("gradient", &g1, &g2, 1e-13);
        // Masked (−∞) entries get probability 0 and no NaN; other dtypes fall back.
        let m = Tensor::new(&[[1f32, f32::NEG_INFINITY, 2.0]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = softmax_last_dim_fused(&m).unwrap().to_vec2().unwrap();
        assert_eq!(y[0][1], 0.0);
        assert!(softmax_last_dim_fused(&m.to_dtype(DType::BF16).unwrap()).is_ok());
    }

    #[test]
    fn masked_version_matches_adding_the_broadcast_mask() {
        let x = Var::from_tensor(&crate::testing::seeded_randn(1, &[3, 2, 4, 5], DType::F64)).unwrap();
        let w = crate::testing::seeded_randn(2, &[3, 2, 4, 5], DType::F64);
        let inf = f64::NEG_INFINITY;
        let mask = Tensor::new(
            &[[0.0, inf, 0.0, 0.0, inf], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, inf, inf, inf, inf]],
            &Device::Cpu,
        )
        .unwrap();
        let run = |y: Tensor| {
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(masked_softmax_last_dim_fused(x.as_tensor(), &mask).unwrap());
        let composed = x.as_tensor().broadcast_add(&mask.reshape((3, 1, 1, 5)).unwrap()).unwrap();
        let (y2, g2) = run(crate::softmax(&composed, D::Minus1).unwrap());
        crate::testing::assert_close("value", &y1, &y2, 1e-14);
        crate::testing::assert_close("gradient", &g1, &g2, 1e-13);
        assert!(masked_softmax_last_dim_fused(x.as_tensor(), &mask.narrow(0, 0, 2).unwrap()).is_err());
    }
}
