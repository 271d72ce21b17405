//! Splitting projections into attention heads and merging them back, as single graph nodes.
//!
//! The composed version (`reshape → transpose → contiguous`, then `× scale`) records three or four
//! nodes per tensor, and candle's backward pass allocates, zero-fills and accumulates a full-size
//! gradient for every node, views included. In TransAct training that was several hundred MB of
//! memory traffic per layer. [`split_heads`] and [`merge_heads`] are one CPU kernel each (a
//! permutation, with the scale folded in), each the other's backward pass.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use rankstack_nn::kernel_float::contiguous;
use rankstack_nn::KernelFloat;

/// `x` `[B·S, H·dh]` → `scale · x` as `[B, H, S, dh]` (contiguous), differentiable.
pub fn split_heads(x: &Tensor, batch: usize, seq: usize, heads: usize, scale: f64) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    if rows != batch * seq || heads == 0 || width % heads != 0 {
        candle_core::bail!("split_heads: cannot split [{rows}, {width}] into [{batch}, {heads}, {seq}, _]");
    }
    let dh = width / heads;
    if fused(x) {
        return x.contiguous()?.apply_op1(Permute { batch, seq, heads, dh, scale, split: true });
    }
    let y = x.reshape((batch, seq, heads, dh))?.transpose(1, 2)?.contiguous()?;
    if scale == 1.0 {
        Ok(y)
    } else {
        y * scale
    }
}

/// `x` `[B, H, S, dh]` → `[B·S, H·dh]` (contiguous), differentiable; the inverse of
/// [`split_heads`] with scale 1.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (batch, heads, seq, dh) = x.dims4()?;
    if fused(x) {
        return x.contiguous()?.apply_op1(Permute { batch, seq, heads, dh, scale: 1.0, split: false });
    }
    x.transpose(1, 2)?.reshape((batch * seq, heads * dh))
}

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// The permutation between `[B, S, H, dh]` (row-major `[B·S, H·dh]`) and `[B, H, S, dh]`, times
/// `scale`: `split` maps the first layout to the second, otherwise the second to the first.
#[derive(Debug, Clone, Copy)]
struct Permute {
    batch: usize,
    seq: usize,
    heads: usize,
    dh: usize,
    scale: f64,
    split: bool,
}

impl Permute {
    fn run<T: KernelFloat>(&self, x: &[T], layout: &Layout, scale: T) -> Result<Vec<T>> {
        let x = contiguous(x, layout, "heads: input")?;
        let (s, h, dh) = (self.seq, self.heads, self.dh);
        if x.len() != self.batch * s * h * dh {
            candle_core::bail!("heads: {} elements for [{}, {h}, {s}, {dh}]", x.len(), self.batch);
        }
        let mut y = vec![T::ZERO; x.len()];
        let apply = |v: T| if self.scale == 1.0 { v } else { v * scale };
        // One batch element per task: [S, H, dh] ↔ [H, S, dh].
        y.par_chunks_mut(s * h * dh).zip(x.par_chunks(s * h * dh)).for_each(|(out, inp)| {
            for t in 0..s {
                for head in 0..h {
                    let (sh, hs) = ((t * h + head) * dh, (head * s + t) * dh);
                    let (from, to) = if self.split { (sh, hs) } else { (hs, sh) };
                    out[to..to + dh].iter_mut().zip(&inp[from..from + dh]).for_each(|(o, &v)| *o = apply(v));
                }
            }
        });
        Ok(y)
    }

    fn out_shape(&self) -> Shape {
        if self.split {
            Shape::from((self.batch, self.heads, self.seq, self.dh))
        } else {
            Shape::from((self.batch * self.seq, self.heads * self.dh))
        }
    }
}

impl CustomOp1 for Permute {
    fn name(&self) -> &'static str {
        if self.split {
            "rankstack-split-heads"
        } else {
            "rankstack-merge-heads"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.run(x, layout, self.scale as f32)?),
            CpuStorage::F64(x) => CpuStorage::F64(self.run(x, layout, self.scale)?),
            _ => candle_core::bail!("heads: the fused kernel takes f32 or f64"),
        };
        Ok((y, self.out_shape()))
    }

    /// The transposed map: the inverse permutation with the same scale.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        grad_y.contiguous()?.apply_op1(Permute { split: !self.split, ..*self }).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn equal_the_composed_views_in_value_and_gradient() {
        let (b, s, h, dh) = (3, 5, 2, 4);
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&rankstack_nn::testing::seeded_randn(1, &[b * s, h * dh], dtype)).unwrap();
            let w = rankstack_nn::testing::seeded_randn(2, &[b * s, h * dh], dtype);
            let scale = 0.3;
            // split then merge, weighted: exercises both kernels forward and backward.
            let run = |fused: bool| {
                let (y, back) = if fused {
                    let y = split_heads(x.as_tensor(), b, s, h, scale).unwrap();
                    let back = merge_heads(&y).unwrap();
                    (y, back)
                } else {
                    let y =
                        (x.as_tensor().reshape((b, s, h, dh)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
                            * scale)
                            .unwrap();
                    let back = y.transpose(1, 2).unwrap().reshape((b * s, h * dh)).unwrap();
                    (y, back)
                };
                let g = (&back * &w).unwrap().sum_all().unwrap().backward().unwrap();
                (y, back, g.get(x.as_tensor()).unwrap().clone())
            };
            let (y1, back1, g1) = run(true);
            let (y2, back2, g2) = run(false);
            let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(y1.dims(), &[b, h, s, dh]);
            assert_eq!(flat(&y1), flat(&y2));
            assert_eq!(flat(&back1), flat(&back2));
            assert_eq!(flat(&g1), flat(&g2));
        }
        // By hand: [B·S = 2, H·dh = 4] with B = 1, S = 2, H = 2, dh = 2.
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [5., 6., 7., 8.]], &candle_core::Device::Cpu).unwrap();
        let y = split_heads(&x, 1, 2, 2, 1.0).unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(y, vec![1., 2., 5., 6., 3., 4., 7., 8.]);
        assert!(split_heads(&x, 1, 3, 2, 1.0).is_err());
    }
}
