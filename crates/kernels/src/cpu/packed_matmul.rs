//! Pre-packed weights for serving on the CPU: `y = x Wᵀ + b` with `W` packed once, in f32 or
//! bf16, activations and accumulation in f32.
//!
//! candle's `Linear` hands `Wᵀ` to its GEMM on every call, which repacks the weight each time, and
//! it has no bf16 kernel that uses the AVX512-BF16 dot-product instruction (its `gemm` crate widens
//! bf16 to f32 first, so a bf16 model on candle is slower than an f32 one). A [`PackedWeight`] is
//! laid out once for an AVX-512 micro-kernel and multiplies f32 activations by it:
//!
//! - [`WeightPrecision::F32`]: the same f32 weight, FMA accumulation over `k` in order. Same values
//!   as candle's product up to f32 summation order.
//! - [`WeightPrecision::Bf16`]: the weight rounded to bf16 (round to nearest even); each activation
//!   row is rounded to bf16 on the fly (as PyTorch's autocast does); products of bf16 pairs are
//!   exact in f32 and accumulate in f32 (`vdpbf16ps`). Twice the multiply-add rate of f32 FMA,
//!   and half the weight memory, on CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake
//!   and Sapphire Rapids and later).
//!
//! Layout: `Wᵀ` is the packed operand of the crate's matrix-product engine (panels of [`NR`]
//! output columns, micro-tiles of [`MR`] rows; see the `gemm` module's source for the layout and
//! the blocking). The bias is added in the kernel, before the single store.
//!
//! The packed path is a serving path: results are plain tensors, not differentiable. Where the
//! kernel cannot run ([`packed_kernel_available`] is false: no AVX-512, or no AVX512-BF16 for
//! bf16, or not x86-64), the stored weights are widened to f32 per call and multiplied by candle:
//! the same values up to summation order, but slower than an unpacked f32 layer, so pack only
//! where the kernel runs (as `rankstack_nn::Linear::pack` does for f32).

use candle_core::{DType, Result, Tensor};

pub use super::gemm::{packed_kernel_available, WeightPrecision, MR, NR};
use super::gemm::{KernelPath, Panels};

/// A `[n, k]` weight packed (in f32 or rounded to bf16) for [`PackedWeight::matmul_t`].
///
/// ```
/// # use candle_core::{Device, Tensor};
/// use rankstack_kernels::cpu::packed_matmul::{PackedWeight, WeightPrecision};
/// let w = Tensor::new(&[[1f32, 2., 3.], [0.5, -1., 0.25]], &Device::Cpu)?; // [out 2, in 3]
/// let b = Tensor::new(&[0f32, 10.], &Device::Cpu)?;
/// let x = Tensor::new(&[[1f32, 1., 1.], [2., 0., -4.]], &Device::Cpu)?;
/// for precision in [WeightPrecision::F32, WeightPrecision::Bf16] {
///     let packed = PackedWeight::pack(&w, precision)?;
///     let y = packed.matmul_t(&x, Some(&b))?; // x Wᵀ + b; these values are exact in bf16
///     assert_eq!(y.to_vec2::<f32>()?, vec![vec![6., 9.75], vec![-10., 10.]]);
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone)]
pub struct PackedWeight {
    /// `Wᵀ` `[k, n]` as the `B` operand of the product.
    panels: Panels,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight {:?} [{}, {}]", self.precision(), self.out_dim(), self.in_dim())
    }
}

impl PackedWeight {
    /// Packs a `[n, k]` float weight (`[out, in]`, any float dtype, any device), rounding it to
    /// bf16 for [`WeightPrecision::Bf16`].
    pub fn pack(weight: &Tensor, precision: WeightPrecision) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        if out_dim == 0 || in_dim == 0 {
            candle_core::bail!("packed weight: empty weight [{out_dim}, {in_dim}]");
        }
        let w = weight.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        // Wᵀ[s, j] = W[j, s]: step stride 1, column stride k.
        Ok(Self { panels: Panels::pack_resident(&w, in_dim, out_dim, 1, in_dim, precision) })
    }

    /// How the weight is stored.
    pub fn precision(&self) -> WeightPrecision {
        self.panels.precision()
    }

    /// `n`, the number of outputs.
    pub fn out_dim(&self) -> usize {
        self.panels.n()
    }

    /// `k`, the number of inputs.
    pub fn in_dim(&self) -> usize {
        self.panels.k()
    }

    /// Bytes held by the packed weight.
    pub fn size_in_bytes(&self) -> usize {
        self.panels.size_in_bytes()
    }

    /// The stored weight (bf16-rounded for [`WeightPrecision::Bf16`]) as an f32 `[n, k]` tensor.
    pub fn to_f32(&self) -> Result<Tensor> {
        let (n, k) = (self.out_dim(), self.in_dim());
        let w: Vec<f32> = (0..n * k).map(|i| self.panels.value(i % k, i / k)).collect();
        Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)
    }

    /// `x Wᵀ (+ bias)` for `x` `[..., k]` (f32 on the CPU), giving f32 `[..., n]`. Not
    /// differentiable (a serving path). Non-finite inputs propagate as in any matrix product; on
    /// the bf16 kernel subnormal bf16 values count as zero (the instruction's rule), a difference
    /// far below the rounding to bf16 itself.
    pub fn matmul_t(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (n, k) = (self.out_dim(), self.in_dim());
        let dims = x.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("packed linear: expected input [..., {k}], got {dims:?}");
        }
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            candle_core::bail!(
                "packed linear: takes f32 inputs on the CPU, got {:?} on {:?}",
                x.dtype(),
                x.device().location()
            );
        }
        if let Some(b) = bias {
            if b.dims() != [n] {
                candle_core::bail!("packed linear: expected bias [{n}], got {:?}", b.dims());
            }
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = n;
        let rows = x.elem_count() / k;
        if rows == 0 {
            return Tensor::zeros(out_dims, DType::F32, x.device());
        }
        if !packed_kernel_available(self.precision()) {
            return self.widened(&x.reshape((rows, k))?, bias)?.reshape(out_dims);
        }
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
        // The activations straight from their storage (no copy).
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("packed linear: expected a CPU input")
        };
        let x = crate::float::contiguous_storage::<f32>(storage, layout, "packed linear: input")?;
        let path = KernelPath::for_precision(self.precision()).expect("available (checked above)");
        let y = if path.rounds_activations() {
            // The activations as bf16 pairs, row-major [rows, steps]: row r's pair s is exactly
            // the broadcast operand the kernel needs, so no further packing.
            let a = super::gemm::round_rows_to_bf16(x, k);
            self.panels.multiply(&a, rows, self.panels.steps(), 1, bias.as_deref())
        } else {
            self.panels.multiply(x, rows, k, 1, bias.as_deref())
        };
        Tensor::from_vec(y, out_dims, &candle_core::Device::Cpu)
    }

    /// The portable path: the same stored weight (and, for bf16, bf16-rounded activations),
    /// widened to f32 and multiplied by candle (`x` is `[rows, k]`).
    fn widened(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = match self.precision() {
            WeightPrecision::F32 => x.clone(),
            WeightPrecision::Bf16 => x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        };
        let y = x.matmul(&self.to_f32()?.t()?)?;
        match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Isa;
    use candle_core::Device;

    fn seeded(seed: u64, dims: &[usize]) -> Tensor {
        crate::oracle::tensor(seed, dims, DType::F32)
    }

    const BOTH: [WeightPrecision; 2] = [WeightPrecision::F32, WeightPrecision::Bf16];

    /// A tensor's values as the kernel multiplies them: as stored, or rounded to bf16.
    fn operand(t: &Tensor, rounded: bool) -> Vec<f64> {
        let t = if rounded { t.to_dtype(DType::BF16).unwrap() } else { t.clone() };
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Which operands the product of `precision` rounds to bf16 on the active path (or on the
    /// portable path, `widened`): `(activations, weights)`.
    fn rounding(precision: WeightPrecision, widened: bool) -> (bool, bool) {
        let bf16 = precision == WeightPrecision::Bf16;
        let rounds_x = match KernelPath::for_precision(precision) {
            Some(path) if !widened => path.rounds_activations(),
            _ => bf16,
        };
        (rounds_x, bf16)
    }

    /// `Σ_k x·w + b` in f64 on the operands as the kernel sees them, and the bound
    /// `Σ_k |x·w| + |b|` for the f32 accumulation error.
    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, (round_x, round_w): (bool, bool)) -> (Vec<f64>, Vec<f64>) {
        let (n, k) = w.dims2().unwrap();
        let (xs, ws) = (operand(x, round_x), operand(w, round_w));
        let bs: Vec<f64> = b.map_or(vec![0.0; n], |b| b.to_dtype(DType::F64).unwrap().to_vec1().unwrap());
        let rows = xs.len() / k;
        let (mut y, mut bound) = (vec![0.0; rows * n], vec![0.0; rows * n]);
        for r in 0..rows {
            for j in 0..n {
                for i in 0..k {
                    let t = xs[r * k + i] * ws[j * k + i];
                    y[r * n + j] += t;
                    bound[r * n + j] += t.abs();
                }
                y[r * n + j] += bs[j];
                bound[r * n + j] += bs[j].abs();
            }
        }
        (y, bound)
    }

    fn assert_matches_reference(
        what: &str,
        y: &Tensor,
        (x, w, b): (&Tensor, &Tensor, Option<&Tensor>),
        rounding: (bool, bool),
    ) {
        let (want, bound) = reference(x, w, b, rounding);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{what}: length");
        let k = w.dims2().unwrap().1 as f64;
        for (i, ((g, w), m)) in got.iter().zip(&want).zip(&bound).enumerate() {
            // f32 summation of k + 1 terms: |error| ≤ (k + 1)·2⁻²⁴·Σ|terms| (with room).
            let tol = (k + 2.0) * f64::from(f32::EPSILON) * m + 1e-30;
            assert!((f64::from(*g) - w).abs() <= tol, "{what}: element {i}: got {g}, want {w} (tolerance {tol:e})");
        }
    }

    /// Every path this CPU supports (AVX-512, AVX2, generic), both precisions, against the f64
    /// oracle on the operands the path multiplies.
    #[test]
    fn matches_an_f64_reference_on_every_edge_shape_on_every_path() {
        if !Isa::has_avx512_bf16() {
            super::super::skipped("packed bf16 AVX512-BF16 dot-product kernel", "AVX512-BF16");
        }
        super::super::for_each_supported_isa("packed matmul edge shapes", |isa| {
            // Rows around the micro-tile heights (12; 6 and 4 on AVX2), inputs odd and even
            // around the 16-wide rounding, outputs around the 16-column halves and 32-column panel.
            let mut seed = 0;
            for rows in [1, 4, 5, 6, 7, 12, 13, 25, 100] {
                for k in [1, 2, 3, 31, 33, 100] {
                    for n in [1, 8, 15, 16, 17, 31, 32, 33, 70] {
                        seed += 1;
                        let x = seeded(seed, &[rows, k]);
                        let w = seeded(seed + 1000, &[n, k]);
                        let b = seeded(seed + 2000, &[n]);
                        for precision in BOTH {
                            let packed = PackedWeight::pack(&w, precision).unwrap();
                            let what = format!("{isa:?} {precision:?} [{rows}, {k}] x [{n}, {k}]ᵀ");
                            let y = packed.matmul_t(&x, Some(&b)).unwrap();
                            assert_matches_reference(&what, &y, (&x, &w, Some(&b)), rounding(precision, false));
                            let widened = packed.widened(&x, None).unwrap();
                            let rounding = rounding(precision, true);
                            assert_matches_reference(&format!("{what} widened"), &widened, (&x, &w, None), rounding);
                        }
                    }
                }
            }
        });
    }

    /// The f32 products of the AVX-512 and AVX2 paths are bit-identical (one FMA chain per element
    /// in the same order), including k blocks that accumulate into stored values.
    #[test]
    fn f32_avx2_and_avx512_paths_agree_bit_for_bit() {
        if !(Isa::Avx512.supported() && Isa::Avx2.supported()) {
            return super::super::skipped("f32 AVX2 vs AVX-512 bit identity", "AVX-512F and AVX2");
        }
        let x = seeded(7, &[37, 5000]);
        let w = seeded(8, &[45, 5000]);
        let b = seeded(9, &[45]);
        let packed = PackedWeight::pack(&w, WeightPrecision::F32).unwrap();
        let run =
            |isa| super::super::with_isa(isa, || packed.matmul_t(&x, Some(&b)).unwrap().to_vec2::<f32>().unwrap());
        assert_eq!(run(Isa::Avx512), run(Isa::Avx2));
    }

    /// On the widened bf16 path a row's result does not depend on the batch around it: a lone row
    /// is widened in the micro-kernel, a batch's panels are widened once for the f32 kernel
    /// (`WIDEN_ONCE_ROWS`), and both run the same FMA chain, also across k blocks and an odd k.
    #[test]
    fn widened_bf16_rows_are_bit_identical_alone_and_in_a_batch() {
        if !Isa::Avx2.supported() {
            return super::super::skipped("widened bf16 batch invariance", "AVX2 and FMA");
        }
        super::super::with_isa(Isa::Avx2, || {
            // k = 9301: 4651 pairs, two k blocks, the last pair half empty.
            for (rows, k, n) in [(40, 9301, 45), (13, 33, 70), (64, 300, 33)] {
                let x = seeded(rows as u64, &[rows, k]);
                let w = seeded(k as u64, &[n, k]);
                let b = seeded(n as u64, &[n]);
                let packed = PackedWeight::pack(&w, WeightPrecision::Bf16).unwrap();
                let batch = packed.matmul_t(&x, Some(&b)).unwrap().to_vec2::<f32>().unwrap();
                for (r, row) in batch.iter().enumerate() {
                    let alone = packed.matmul_t(&x.narrow(0, r, 1).unwrap(), Some(&b)).unwrap();
                    assert_eq!(&alone.to_vec2::<f32>().unwrap()[0], row, "[{rows}, {k}] x [{n}, {k}]ᵀ row {r}");
                }
            }
        });
    }

    #[test]
    fn large_product_and_batched_input_match_the_reference() {
        // Several row chunks and panel groups, as in MaskNet; leading dimensions are flattened.
        let x = seeded(1, &[2, 150, 300]);
        let w = seeded(2, &[200, 300]);
        let exact = x.matmul(&w.t().unwrap().broadcast_left(2).unwrap()).unwrap();
        let scale = exact.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for precision in BOTH {
            let packed = PackedWeight::pack(&w, precision).unwrap();
            let y = packed.matmul_t(&x, None).unwrap();
            assert_eq!(y.dims(), &[2, 150, 200]);
            assert_matches_reference(
                &format!("{precision:?} [2, 150, 300] x [200, 300]ᵀ"),
                &y,
                (&x, &w, None),
                rounding(precision, false),
            );
            // Against candle's f32 product: summation order only (f32), or the rounding to bf16
            // (2⁻⁹ relative per operand).
            let diff = (y - &exact).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let limit = if precision == WeightPrecision::F32 { 1e-5 } else { 0.02 };
            assert!(diff < limit * scale, "{precision:?} error {diff} against output scale {scale}");
        }
    }

    #[test]
    fn stored_weight_is_the_bf16_rounding() {
        let w = seeded(3, &[33, 7]);
        let packed = PackedWeight::pack(&w, WeightPrecision::Bf16).unwrap();
        let want = w.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(packed.to_f32().unwrap().to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        assert_eq!((packed.out_dim(), packed.in_dim(), packed.precision()), (33, 7, WeightPrecision::Bf16));
        // Two panels of 4 pairs, 128 bytes per pair.
        assert_eq!(packed.size_in_bytes(), 2 * 4 * 128);
        // f32 keeps the weight exactly: two panels of 7 steps.
        let packed = PackedWeight::pack(&w, WeightPrecision::F32).unwrap();
        assert_eq!(packed.to_f32().unwrap().to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_eq!(packed.size_in_bytes(), 2 * 7 * 128);
    }

    #[test]
    fn non_finite_inputs_propagate_on_every_path() {
        let w = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[1f32, f32::NAN, 0., 0.], [1., f32::INFINITY, 0., 0.]], &Device::Cpu).unwrap();
        super::super::for_each_supported_isa("packed matmul non-finite inputs", |isa| {
            for precision in BOTH {
                let y: Vec<Vec<f32>> =
                    PackedWeight::pack(&w, precision).unwrap().matmul_t(&x, None).unwrap().to_vec2().unwrap();
                assert!(y[0].iter().all(|v| v.is_nan()), "{isa:?} {precision:?}");
                assert!(y[1].iter().all(|v| *v == f32::INFINITY), "{isa:?} {precision:?}");
            }
        });
    }

    /// An odd `k` on the widened bf16 path never reads past a row: the last row's missing value
    /// would be out of bounds, a middle row's the next row's first value (here infinite, which
    /// times the zero padding would give NaN).
    #[test]
    fn an_odd_k_reads_no_value_past_a_row() {
        let w = Tensor::ones((3, 3), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[1f32, 2., 3.], [f32::INFINITY, 0., 0.]], &Device::Cpu).unwrap();
        super::super::for_each_supported_isa("packed matmul odd k", |isa| {
            let y: Vec<Vec<f32>> =
                PackedWeight::pack(&w, WeightPrecision::Bf16).unwrap().matmul_t(&x, None).unwrap().to_vec2().unwrap();
            assert_eq!(y[0], vec![6.0; 3], "{isa:?}");
            assert_eq!(y[1], vec![f32::INFINITY; 3], "{isa:?}");
        });
    }

    #[test]
    fn bad_inputs_are_errors() {
        let packed =
            PackedWeight::pack(&Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap(), WeightPrecision::Bf16)
                .unwrap();
        let err = packed.matmul_t(&Tensor::ones((2, 5), DType::F32, &Device::Cpu).unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("[..., 4]") && err.to_string().contains("[2, 5]"), "{err}");
        let err = packed.matmul_t(&Tensor::ones((2, 4), DType::F64, &Device::Cpu).unwrap(), None).unwrap_err();
        assert!(err.to_string().contains("F64"), "{err}");
        let bias = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let err = packed.matmul_t(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap(), Some(&bias)).unwrap_err();
        assert!(err.to_string().contains("bias [3]"), "{err}");
        assert!(
            PackedWeight::pack(&Tensor::ones((0, 4), DType::F32, &Device::Cpu).unwrap(), WeightPrecision::F32).is_err()
        );
        assert!(PackedWeight::pack(&Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(), WeightPrecision::F32).is_err());
    }
}
