//! `y = x Wᵀ + b` as one differentiable CPU op, on the crate's packed AVX-512 kernel, for training
//! and for unpacked f32 inference.
//!
//! candle's linear layer records a matrix product and a broadcast add. Its GEMM packs both
//! operands on every call, and its backward pass forms `∂W` as the transpose of `xᵀ g` and adds
//! that strided view into the gradient buffer: on the model's shapes at batch 512 (2 threads) it
//! ran at 115–187 GFLOP/s forward and 96–115 backward, where the three products here run at
//! 195–220 (`docs/performance.md`). This op computes, with `g = ∂L/∂y`:
//!
//! - forward `y = x Wᵀ + b`;
//! - `∂x = g W`, `∂W = gᵀ x` (already in `W`'s layout), `∂b = Σ_rows g`, each only for an
//!   argument that needs a gradient. `∂b` sums blocks of rows in parallel, in f64 (candle's
//!   `sum(0)` walks the columns on one thread: about 10% of TransAct's backward pass, whose
//!   packed rows are many and narrow).
//!
//! Every product packs one operand per call (the kernel streams the other one through strides).
//! For `y` and `∂x` it picks the cheaper of two equal products: pack `W` (`out · in` values), or
//! pack the activations and compute the transposed result, which is then transposed back (fewer
//! values at batch 512 for MaskNet's wide layers). Both sum each element over `k` in order, so the
//! choice does not change the values. Sums are deterministic (one thread per element, fixed order).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{packed_kernel_available, transpose, Panels, WeightPrecision};
use crate::float::contiguous_storage;

/// Below this many rows the product stays on candle's, which handles a few rows as
/// matrix-vector products reading `W` once; the packed kernel works on panels of 32 rows or
/// columns, and packs an operand first. Measured (2 threads, forward only): 1 row of 1536 → 1536
/// 0.14 ms on candle against 1.3 ms here, even at 8 rows, ahead from 16 rows on (2144 → 4288 at
/// 16 rows: 4.3 against 2.9 ms). The rule depends on the shape alone, so a trainable model and
/// its frozen serving copy compute the same values.
const MIN_ROWS: usize = 16;

/// Whether [`linear`] runs the fused op for these operands: f32 on the CPU, with the AVX-512
/// kernel, and at least `MIN_ROWS` (16) rows.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    let rows = x.dims().split_last().map_or(0, |(_, lead)| lead.iter().product::<usize>());
    x.device().is_cpu()
        && w.device().is_cpu()
        && super::kernels_enabled()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && rows >= MIN_ROWS
        && x.elem_count() > 0
        && packed_kernel_available(WeightPrecision::F32)
}

/// An error unless `x` is `[..., in_dim]`, the input of a linear layer whose weight is
/// `[out, in_dim]` (this op's check, and that of the layer's other paths).
pub fn expect_input_width(x: &Tensor, in_dim: usize) -> Result<()> {
    let dims = x.dims();
    if dims.last() != Some(&in_dim) {
        candle_core::bail!("linear: expected input [..., {in_dim}], got {dims:?}");
    }
    Ok(())
}

/// `x Wᵀ (+ b)` for `x` `[..., in]`, `W` `[out, in]`, `b` `[out]`; requires [`applies`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    expect_input_width(x, in_dim)?;
    let dims = x.dims();
    let bias = match b {
        Some(b) if b.dims() == [out_dim] => b.to_dtype(DType::F32)?,
        Some(b) => candle_core::bail!("linear: expected bias [{out_dim}], got {:?}", b.dims()),
        None => Tensor::zeros(out_dim, DType::F32, w.device())?,
    };
    let rows = x.elem_count() / in_dim;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank ≥ 1") = out_dim;
    let x = x.reshape((rows, in_dim))?.contiguous()?;
    x.apply_op3(&w.contiguous()?, &bias.contiguous()?, LinearOp)?.reshape(out_dims)
}

/// Whether packing the activations (`rows · k`) and transposing the result (`rows · n`, counted
/// twice: a strided pass) moves fewer values than packing the weight (`k · n`).
fn transposed_is_cheaper(rows: usize, k: usize, n: usize) -> bool {
    rows * k + 2 * rows * n < k * n
}

/// `y = x Wᵀ + b` `[rows, n]` for `x` `[rows, k]`, `W` `[n, k]`.
fn forward(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, b: &[f32]) -> Vec<f32> {
    if transposed_is_cheaper(rows, k, n) {
        // yᵀ = W xᵀ: A = W (row-major), B = xᵀ (x's rows are its columns).
        let yt = Panels::pack(x, k, rows, 1, k, WeightPrecision::F32).multiply(w, n, k, 1, None);
        transpose(&yt, n, rows, Some(b))
    } else {
        // A = x, B = Wᵀ.
        Panels::pack(w, k, n, 1, k, WeightPrecision::F32).multiply(x, rows, k, 1, Some(b))
    }
}

/// `∂x = g W` `[rows, k]` for `g` `[rows, n]`, `W` `[n, k]`.
fn input_gradient(g: &[f32], rows: usize, n: usize, w: &[f32], k: usize) -> Vec<f32> {
    if transposed_is_cheaper(rows, n, k) {
        // ∂xᵀ = Wᵀ gᵀ: A = Wᵀ (W's columns as rows: stride 1, step stride k), B = gᵀ.
        let dxt = Panels::pack(g, n, rows, 1, n, WeightPrecision::F32).multiply(w, k, 1, k, None);
        transpose(&dxt, k, rows, None)
    } else {
        // A = g, B = W ([n, k] row-major).
        Panels::pack(w, n, k, k, 1, WeightPrecision::F32).multiply(g, rows, n, 1, None)
    }
}

/// `∂W = gᵀ x` `[n, k]` for `g` `[rows, n]`, `x` `[rows, k]`.
fn weight_gradient(g: &[f32], rows: usize, n: usize, x: &[f32], k: usize) -> Vec<f32> {
    // A = gᵀ (g's columns as rows: stride 1, step stride n), B = x ([rows, k] row-major).
    Panels::pack(x, rows, k, k, 1, WeightPrecision::F32).multiply(g, n, 1, n, None)
}

/// `∂b = Σ_rows g` `[n]` for `g` `[rows, n]`: blocks of [`BIAS_BLOCK_ROWS`] rows summed in f64
/// in parallel, then the blocks in order, so the result does not depend on the thread count.
fn bias_gradient(g: &[f32], n: usize) -> Vec<f32> {
    let blocks: Vec<Vec<f64>> = g
        .par_chunks(BIAS_BLOCK_ROWS * n)
        .map(|block| {
            let mut sums = vec![0f64; n];
            for row in block.chunks_exact(n) {
                for (s, v) in sums.iter_mut().zip(row) {
                    *s += f64::from(*v);
                }
            }
            sums
        })
        .collect();
    let mut total = vec![0f64; n];
    for block in blocks {
        for (t, s) in total.iter_mut().zip(block) {
            *t += s;
        }
    }
    total.into_iter().map(|t| t as f32).collect()
}

/// Rows per parallel block of [`bias_gradient`].
const BIAS_BLOCK_ROWS: usize = 64;

// What the kernels' error messages call their operands.
const INPUT: &str = "linear: input";
const WEIGHT: &str = "linear: weight";
const BIAS: &str = "linear: bias";
const GRADIENT: &str = "linear: gradient";

/// The op: arguments `x` `[rows, k]`, `W` `[n, k]`, `b` `[n]`, all contiguous f32 on the CPU.
struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((rows, k), (n, _)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        let (x, w) = (contiguous_storage(xs, xl, INPUT)?, contiguous_storage(ws, wl, WEIGHT)?);
        let b = contiguous_storage(bs, bl, BIAS)?;
        Ok((CpuStorage::F32(forward(x, rows, k, w, n, b)), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = if x.track_op() { Some(g.apply_op2_no_bwd(w, &InputGradient)?) } else { None };
        let dw = if w.track_op() { Some(g.apply_op2_no_bwd(x, &WeightGradient)?) } else { None };
        let db = if b.track_op() { Some(g.apply_op1_no_bwd(&BiasGradient)?) } else { None };
        Ok((dx, dw, db))
    }
}

/// `g → Σ_rows g`.
struct BiasGradient;

impl CustomOp1 for BiasGradient {
    fn name(&self) -> &'static str {
        "fused-linear-bias-gradient"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n) = gl.shape().dims2()?;
        let db = if n == 0 { Vec::new() } else { bias_gradient(contiguous_storage(gs, gl, GRADIENT)?, n) };
        Ok((CpuStorage::F32(db), Shape::from(n)))
    }
}

/// `(g, W) → g W`.
struct InputGradient;

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "fused-linear-input-gradient"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((rows, n), (_, k)) = (gl.shape().dims2()?, wl.shape().dims2()?);
        let (g, w) = (contiguous_storage(gs, gl, GRADIENT)?, contiguous_storage(ws, wl, WEIGHT)?);
        let dx = input_gradient(g, rows, n, w, k);
        Ok((CpuStorage::F32(dx), Shape::from((rows, k))))
    }
}

/// `(g, x) → gᵀ x`.
struct WeightGradient;

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "fused-linear-weight-gradient"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((rows, n), (_, k)) = (gl.shape().dims2()?, xl.shape().dims2()?);
        let (g, x) = (contiguous_storage(gs, gl, GRADIENT)?, contiguous_storage(xs, xl, INPUT)?);
        let dw = weight_gradient(g, rows, n, x, k);
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn seeded(seed: u64, dims: &[usize]) -> Tensor {
        crate::oracle::tensor(seed, dims, DType::F32)
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// `A B` in f64 for `A` `[m, k]`, `B` `[k, n]` given by element functions, and `Σ_k |terms|`
    /// per element (the scale of the f32 summation error).
    fn product(
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut c, mut bound) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                for s in 0..k {
                    let t = a(i, s) * b(s, j);
                    c[i * n + j] += t;
                    bound[i * n + j] += t.abs();
                }
            }
        }
        (c, bound)
    }

    fn assert_within(what: &str, got: &Tensor, (want, bound): &(Vec<f64>, Vec<f64>), terms: usize) {
        let got = f64s(got);
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, ((g, w), m)) in got.iter().zip(want).zip(bound).enumerate() {
            // f32 summation of `terms` products: |error| ≤ terms · 2⁻²⁴ · Σ|terms| (with room).
            let tol = (terms as f64 + 2.0) * f64::from(f32::EPSILON) * m + 1e-30;
            assert!((g - w).abs() <= tol, "{what}: element {i}: got {g}, want {w} (tolerance {tol:e})");
        }
    }

    /// Value and every gradient against f64 sums, for shapes that take each product strategy
    /// (packing the weight, or packing the activations and transposing the result) and sweeps
    /// longer than one k block.
    #[test]
    fn matches_f64_sums_in_value_and_every_gradient() {
        on_simd_paths("fused linear: f64 sums", matches_f64_sums);
    }

    /// Runs `test` on every SIMD path this CPU supports (the generic path has no fused op: the
    /// layers take candle's product there).
    fn on_simd_paths(name: &str, test: impl Fn()) {
        super::super::for_each_supported_isa(name, |isa| {
            if isa != super::super::Isa::Generic {
                test()
            }
        });
    }

    fn matches_f64_sums() {
        let cases: [(usize, usize, usize); 7] =
            [(1, 1, 1), (13, 7, 33), (50, 31, 70), (3, 300, 200), (25, 40, 5000), (3, 5000, 20), (100, 96, 288)];
        for (seed, (rows, k, n)) in cases.into_iter().enumerate() {
            let seed = 10 * seed as u64;
            let x = Var::from_tensor(&seeded(seed, &[rows, k])).unwrap();
            let w = Var::from_tensor(&seeded(seed + 1, &[n, k])).unwrap();
            let b = Var::from_tensor(&seeded(seed + 2, &[n])).unwrap();
            let r = seeded(seed + 3, &[rows, n]);
            assert_eq!(applies(x.as_tensor(), w.as_tensor()), rows >= MIN_ROWS);
            let y = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let (xs, ws, bs, rs) = (f64s(x.as_tensor()), f64s(w.as_tensor()), f64s(b.as_tensor()), f64s(&r));
            let what = format!("[{rows}, {k}] x [{n}, {k}]ᵀ");

            let (mut want, mut bound) = product(rows, k, n, |i, s| xs[i * k + s], |s, j| ws[j * k + s]);
            for (i, (v, m)) in want.iter_mut().zip(&mut bound).enumerate() {
                *v += bs[i % n];
                *m += bs[i % n].abs();
            }
            assert_within(&format!("{what}: y"), &y, &(want, bound), k + 1);
            let dx = product(rows, n, k, |i, s| rs[i * n + s], |s, j| ws[s * k + j]);
            assert_within(&format!("{what}: ∂x"), grads.get(x.as_tensor()).unwrap(), &dx, n);
            let dw = product(n, rows, k, |i, s| rs[s * n + i], |s, j| xs[s * k + j]);
            assert_within(&format!("{what}: ∂W"), grads.get(w.as_tensor()).unwrap(), &dw, rows);
            let db = product(1, rows, n, |_, _| 1.0, |s, j| rs[s * n + j]);
            assert_within(&format!("{what}: ∂b"), grads.get(b.as_tensor()).unwrap(), &db, rows);
        }
    }

    /// Small enough to check by hand (calling the op directly: `Linear` leaves one row to candle): `x = [1, 2]`, `W = [[1, 0], [0, 1], [1, 1]]`, `b = ½`; with
    /// `L = Σ y`: `∂x` is the column sums of `W`, each row of `∂W` is `x`, `∂b = 1`.
    #[test]
    fn hand_checkable_case() {
        on_simd_paths("fused linear: hand-checkable case", hand_checkable);
    }

    fn hand_checkable() {
        let x = Var::new(&[[1f32, 2.]], &Device::Cpu).unwrap();
        let w = Var::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &Device::Cpu).unwrap();
        let b = Var::new(&[0.5f32; 3], &Device::Cpu).unwrap();
        let y = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1.5, 2.5, 3.5]]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(grad(&x), vec![2., 2.]);
        assert_eq!(grad(&w), vec![1., 2., 1., 2., 1., 2.]);
        assert_eq!(grad(&b), vec![1.; 3]);
    }

    /// Against candle's own product: leading dimensions flatten, a strided input works, an
    /// input without a gradient gets none, and no bias is no bias.
    #[test]
    fn agrees_with_candle_linear_on_batched_and_strided_inputs() {
        on_simd_paths("fused linear: batched and strided inputs", batched_and_strided);
    }

    fn batched_and_strided() {
        let w = Var::from_tensor(&seeded(1, &[9, 20])).unwrap();
        let x = seeded(2, &[3, 20, 4]).transpose(1, 2).unwrap(); // [3, 4, 20], not contiguous
        let ours = linear(&x, w.as_tensor(), None).unwrap();
        let theirs = x.contiguous().unwrap().broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert_eq!(ours.dims(), &[3, 4, 9]);
        let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        let grads = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let theirs_grads = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads.get(w.as_tensor()).unwrap(), theirs_grads.get(w.as_tensor()).unwrap());
        let scale = g2.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5 * scale, "{diff} against {scale}");
        assert!(grads.get(&x).is_none(), "a constant input gets no gradient");
    }

    /// `∂b` sums in f64 across blocks: 2²⁴ followed by 999 ones, where an f32 running sum would
    /// stay at 2²⁴ (each 1 rounds away), gives 2²⁴ + 999 rounded once to f32.
    #[test]
    fn bias_gradient_sums_in_f64_across_row_blocks() {
        let mut g = vec![1f32; 1000 * 2];
        g[0] = 16_777_216.0;
        g[1] = -3.0;
        let db = bias_gradient(&g, 2);
        assert_eq!(db, vec![(16_777_216.0f64 + 999.0) as f32, 996.0]);
        assert_eq!(db[0], 16_778_216.0);
    }

    #[test]
    fn wrong_shapes_are_errors_that_say_what_was_expected() {
        let w = seeded(1, &[3, 4]);
        let err = linear(&seeded(2, &[2, 5]), &w, None).unwrap_err().to_string();
        assert!(err.contains("[..., 4]") && err.contains("[2, 5]"), "{err}");
        let err = linear(&seeded(2, &[2, 4]), &w, Some(&seeded(3, &[4]))).unwrap_err().to_string();
        assert!(err.contains("bias [3]") && err.contains("[4]"), "{err}");
    }

    #[test]
    fn applies_only_to_f32_on_the_cpu_with_rows() {
        let w = seeded(1, &[3, 4]);
        let kernel = packed_kernel_available(WeightPrecision::F32);
        assert_eq!(applies(&seeded(2, &[4, 4, 4]), &w), kernel);
        // A few rows stay on candle's product, with or without a gradient.
        assert!(!applies(&seeded(2, &[2, 4]), &w));
        assert!(!applies(&seeded(2, &[15, 4]), Var::from_tensor(&w).unwrap().as_tensor()));
        assert!(!applies(&seeded(2, &[2, 4]).to_dtype(DType::F64).unwrap(), &w.to_dtype(DType::F64).unwrap()));
        assert!(!applies(&Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap(), &w));
    }
}
