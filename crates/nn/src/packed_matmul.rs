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
//! Layout: the weight `[n, k]` (PyTorch's `[out, in]`) is split into panels of [`NR`] output
//! columns; for each step `s` of the `k` sweep a panel stores the [`NR`] 32-bit words of its
//! columns `j`: `W[j, s]` (f32), or `bf16(W[j, 2s]) | bf16(W[j, 2s + 1]) << 16` (bf16 pairs; an odd
//! `k` is padded with a zero input). A partial last panel is padded with zero columns. A
//! micro-tile of up to [`MR`] rows × [`NR`] columns keeps its 2·[`MR`] accumulator registers for
//! the whole sweep, then adds the bias and stores once; threads take blocks of rows × panels,
//! with row blocks large enough that each panel, once in L2, serves up to 16 micro-tiles.
//!
//! The packed path is a serving path: results are plain tensors, not differentiable. Where the
//! kernel cannot run ([`packed_kernel_available`] is false: no AVX-512, or no AVX512-BF16 for
//! bf16, or not x86-64), the stored weights are widened to f32 per call and multiplied by candle:
//! the same values up to summation order, but slower than an unpacked f32 layer, so pack only
//! where the kernel runs (as [`crate::Linear::pack`] does for f32).

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Output columns of one packed panel: two AVX-512 registers of f32 accumulators.
pub const NR: usize = 32;
/// Rows of one micro-tile (2 · 12 = 24 accumulators of the 32 vector registers).
pub const MR: usize = 12;
/// Activation bytes of one block of rows (one task's rows). Each weight panel (k × 32 values, at
/// most about 0.5 MiB here, so it stays in L2) is read from memory once per block and then serves
/// every micro-tile of the block; the block itself streams from L3. Blocks sized for L2 instead
/// (384 KiB: 12 rows at k = 4288) re-read the weights from memory every 12–36 rows and ran the
/// MaskNet projection (4288 → 2144) at 178 instead of 222 GFLOP/s (2 threads, batch 512).
const ROW_CHUNK_BYTES: usize = 1536 * 1024;

/// How a [`PackedWeight`] stores the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightPrecision {
    /// f32 weights, f32 activations (FMA).
    F32,
    /// bf16 weights, activations rounded to bf16, f32 accumulation (AVX512-BF16 dot products).
    Bf16,
}

/// Whether this CPU runs the packed kernel of `precision` (x86-64 with AVX-512F, plus AVX512-BF16
/// for [`WeightPrecision::Bf16`]); otherwise [`PackedWeight::matmul_t`] takes the slower widening
/// path.
pub fn packed_kernel_available(precision: WeightPrecision) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && (precision == WeightPrecision::F32 || std::arch::is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = precision;
        false
    }
}

/// One 64-byte line of 16 packed words; the panels are built from these so every vector load
/// is aligned.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A `[n, k]` weight packed (in f32 or rounded to bf16) for [`PackedWeight::matmul_t`].
///
/// ```
/// # use candle_core::{Device, Tensor};
/// use rankstack_nn::packed_matmul::{PackedWeight, WeightPrecision};
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
    precision: WeightPrecision,
    out_dim: usize,
    in_dim: usize,
    /// Steps of the `k` sweep: `k` (f32) or `ceil(k / 2)` (bf16 pairs).
    steps: usize,
    /// `[panel][step]` → two lines of [`NR`] packed columns.
    panels: Vec<Line>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight {:?} [{}, {}]", self.precision, self.out_dim, self.in_dim)
    }
}

/// `f32` → `bf16` bits, round to nearest even (NaN stays NaN).
fn bf16_bits(v: f32) -> u32 {
    u32::from(half::bf16::from_f32(v).to_bits())
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
        let steps = match precision {
            WeightPrecision::F32 => in_dim,
            WeightPrecision::Bf16 => in_dim.div_ceil(2),
        };
        let mut panels = vec![Line::default(); out_dim.div_ceil(NR) * steps * 2];
        panels.par_chunks_mut(steps * 2).enumerate().for_each(|(q, panel)| {
            for c in 0..NR.min(out_dim - q * NR) {
                let row = &w[(q * NR + c) * in_dim..][..in_dim];
                for s in 0..steps {
                    panel[2 * s + c / 16].0[c % 16] = match precision {
                        WeightPrecision::F32 => row[s].to_bits(),
                        WeightPrecision::Bf16 => {
                            let hi = row.get(2 * s + 1).map_or(0, |&v| bf16_bits(v));
                            bf16_bits(row[2 * s]) | (hi << 16)
                        }
                    };
                }
            }
        });
        Ok(Self { precision, out_dim, in_dim, steps, panels })
    }

    /// How the weight is stored.
    pub fn precision(&self) -> WeightPrecision {
        self.precision
    }

    /// `n`, the number of outputs.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `k`, the number of inputs.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes held by the packed weight.
    pub fn size_in_bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<Line>()
    }

    /// The stored weight (bf16-rounded for [`WeightPrecision::Bf16`]) as an f32 `[n, k]` tensor.
    pub fn to_f32(&self) -> Result<Tensor> {
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        for (j, row) in w.chunks_mut(self.in_dim).enumerate() {
            let panel = &self.panels[(j / NR) * self.steps * 2..];
            let word = |s: usize| panel[2 * s + (j % NR) / 16].0[j % 16];
            for (i, v) in row.iter_mut().enumerate() {
                *v = match self.precision {
                    WeightPrecision::F32 => f32::from_bits(word(i)),
                    WeightPrecision::Bf16 => {
                        let pair = word(i / 2);
                        half::bf16::from_bits((if i % 2 == 0 { pair } else { pair >> 16 }) as u16).to_f32()
                    }
                };
            }
        }
        Tensor::from_vec(w, (self.out_dim, self.in_dim), &candle_core::Device::Cpu)
    }

    /// `x Wᵀ (+ bias)` for `x` `[..., k]` (f32 on the CPU), giving f32 `[..., n]`. Not
    /// differentiable (a serving path). Non-finite inputs propagate as in any matrix product; on
    /// the bf16 kernel subnormal bf16 values count as zero (the instruction's rule), a difference
    /// far below the rounding to bf16 itself.
    pub fn matmul_t(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims();
        if dims.last() != Some(&self.in_dim) {
            candle_core::bail!("packed linear: expected input [..., {}], got {:?}", self.in_dim, dims);
        }
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            candle_core::bail!(
                "packed linear: takes f32 inputs on the CPU, got {:?} on {:?}",
                x.dtype(),
                x.device().location()
            );
        }
        if let Some(b) = bias {
            if b.dims() != [self.out_dim] {
                candle_core::bail!("packed linear: expected bias [{}], got {:?}", self.out_dim, b.dims());
            }
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = self.out_dim;
        let rows = x.elem_count() / self.in_dim;
        if rows == 0 {
            return Tensor::zeros(out_dims, DType::F32, x.device());
        }
        if !packed_kernel_available(self.precision) {
            return self.widened(&x.reshape((rows, self.in_dim))?, bias)?.reshape(out_dims);
        }
        let mut padded_bias = vec![0f32; self.out_dim.div_ceil(NR) * NR];
        if let Some(b) = bias {
            padded_bias[..self.out_dim].copy_from_slice(&b.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        // The activations straight from their storage (no copy).
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("packed linear: expected contiguous f32 CPU storage")
        };
        let x = &v[start..end];
        let y = match self.precision {
            WeightPrecision::F32 => self.gemm(x, rows, &padded_bias),
            WeightPrecision::Bf16 => {
                // The activations as bf16 pairs, row-major [rows, steps]: row r's pair s is
                // exactly the broadcast operand the kernel needs, so no further packing.
                let mut a = vec![0u32; rows * self.steps];
                a.par_chunks_mut(self.steps).zip(x.par_chunks(self.in_dim)).for_each(|(dst, src)| {
                    // SAFETY: packed_kernel_available checked AVX512-BF16 support.
                    unsafe { kernel::round_row(src, dst) }
                });
                self.gemm(&a, rows, &padded_bias)
            }
        };
        Tensor::from_vec(y, out_dims, &candle_core::Device::Cpu)
    }

    /// The portable path: the same stored weight (and, for bf16, bf16-rounded activations),
    /// widened to f32 and multiplied by candle (`x` is `[rows, k]`).
    fn widened(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = match self.precision {
            WeightPrecision::F32 => x.clone(),
            WeightPrecision::Bf16 => x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
        };
        let y = x.matmul(&self.to_f32()?.t()?)?;
        match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?),
            None => Ok(y),
        }
    }

    /// The packed product for `rows` rows of `a` (row-major `[rows, steps]` words: f32 values or
    /// bf16 pairs); needs the kernel of `self.precision`.
    fn gemm<T: Copy + Sync>(&self, a: &[T], rows: usize, bias: &[f32]) -> Vec<f32> {
        debug_assert_eq!(std::mem::size_of::<T>(), 4);
        let (n, steps) = (self.out_dim, self.steps);
        let num_panels = n.div_ceil(NR);
        let chunk_rows = ((ROW_CHUNK_BYTES / (4 * steps)) / MR * MR).clamp(MR, 16 * MR);
        let row_chunks = rows.div_ceil(chunk_rows);
        // Enough tasks for every thread even at batch 1 (then the panels are split).
        let wanted = 4 * rayon::current_num_threads();
        let groups = wanted.div_ceil(row_chunks).clamp(1, num_panels);
        let panels_per_group = num_panels.div_ceil(groups);
        let groups = num_panels.div_ceil(panels_per_group);
        let mut y: Vec<f32> = Vec::with_capacity(rows * n);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..row_chunks * groups).into_par_iter().for_each(|task| {
            let y_ptr = &y_ptr;
            let (chunk, group) = (task / groups, task % groups);
            let (r0, r1) = (chunk * chunk_rows, rows.min((chunk + 1) * chunk_rows));
            for q in group * panels_per_group..num_panels.min((group + 1) * panels_per_group) {
                let panel = &self.panels[q * steps * 2..][..steps * 2];
                let cols = NR.min(n - q * NR);
                let bias = &bias[q * NR..][..NR];
                for r in (r0..r1).step_by(MR) {
                    // SAFETY: the kernel of this precision is available (checked by the caller);
                    // tasks write disjoint [rows × cols] blocks of y, whose capacity is rows · n,
                    // and every element is written exactly once before set_len below.
                    unsafe {
                        kernel::tile(
                            self.precision,
                            MR.min(r1 - r),
                            a.as_ptr().cast::<u32>().add(r * steps),
                            steps,
                            panel.as_ptr().cast(),
                            y_ptr.0.add(r * n + q * NR),
                            n,
                            bias.as_ptr(),
                            cols,
                        )
                    }
                }
            }
        });
        // SAFETY: the tasks cover every (row, panel) pair, and each tile stores all its rows and
        // valid columns.
        unsafe { y.set_len(rows * n) };
        y
    }
}

/// A raw output pointer shared by the tasks (each writes its own block).
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint regions (see `PackedWeight::gemm`).
unsafe impl Sync for SendPtr {}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{bf16_bits, WeightPrecision, MR, NR};

    /// Rounds one row of f32 to bf16 pairs (zero-padding an odd length).
    ///
    /// # Safety
    /// Needs AVX-512F and AVX512-BF16; `dst.len() == src.len().div_ceil(2)`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
        let full = src.len() / 16;
        for i in 0..full {
            let v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.as_mut_ptr().add(8 * i).cast(), h);
        }
        for p in 8 * full..dst.len() {
            let lo = bf16_bits(src[2 * p]);
            let hi = src.get(2 * p + 1).map_or(0, |&v| bf16_bits(v));
            dst[p] = lo | (hi << 16);
        }
    }

    /// One micro-tile: `rows ≤ MR` rows of `a` (words, row stride `steps`) times one packed panel,
    /// plus `bias`, stored to the first `cols ≤ NR` columns of `y` (row stride `ldy`).
    ///
    /// # Safety
    /// Needs AVX-512F (and AVX512-BF16 for bf16); the pointers must cover the ranges described.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        precision: WeightPrecision,
        rows: usize,
        a: *const u32,
        steps: usize,
        panel: *const __m512i,
        y: *mut f32,
        ldy: usize,
        bias: *const f32,
        cols: usize,
    ) {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match (precision, rows) {
                    $((WeightPrecision::F32, $r) => tile_f32::<$r>(a.cast(), steps, panel.cast(), y, ldy, bias, cols),)*
                    $((WeightPrecision::Bf16, $r) => tile_bf16::<$r>(a, steps, panel, y, ldy, bias, cols),)*
                    _ => unreachable!("a tile has 1..=MR rows"),
                }
            };
        }
        const _: () = assert!(MR == 12 && NR == 32);
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// Adds the bias and stores the accumulators (the first `cols` columns).
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const R: usize>(
        lo: &[__m512; R],
        hi: &[__m512; R],
        y: *mut f32,
        ldy: usize,
        bias: *const f32,
        cols: usize,
    ) {
        let (bias_lo, bias_hi) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)));
        let mask_lo: __mmask16 = if cols >= 16 { 0xffff } else { (1u16 << cols) - 1 };
        let mask_hi: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u16 << (cols - 16)) - 1
        } else {
            0
        };
        for r in 0..R {
            let row = y.add(r * ldy);
            _mm512_mask_storeu_ps(row, mask_lo, _mm512_add_ps(lo[r], bias_lo));
            _mm512_mask_storeu_ps(row.add(16), mask_hi, _mm512_add_ps(hi[r], bias_hi));
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile_f32<const R: usize>(
        a: *const f32,
        k: usize,
        panel: *const __m512,
        y: *mut f32,
        ldy: usize,
        bias: *const f32,
        cols: usize,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for s in 0..k {
            let b0 = _mm512_load_ps(panel.add(2 * s).cast());
            let b1 = _mm512_load_ps(panel.add(2 * s + 1).cast());
            for r in 0..R {
                let x = _mm512_set1_ps(*a.add(r * k + s));
                lo[r] = _mm512_fmadd_ps(x, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(x, b1, hi[r]);
            }
        }
        store::<R>(&lo, &hi, y, ldy, bias, cols);
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_bf16<const R: usize>(
        a: *const u32,
        pairs: usize,
        panel: *const __m512i,
        y: *mut f32,
        ldy: usize,
        bias: *const f32,
        cols: usize,
    ) {
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_load_si512(panel.add(2 * p)));
            let b1: __m512bh = std::mem::transmute(_mm512_load_si512(panel.add(2 * p + 1)));
            for r in 0..R {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * pairs + p) as i32));
                lo[r] = _mm512_dpbf16_ps(lo[r], x, b0);
                hi[r] = _mm512_dpbf16_ps(hi[r], x, b1);
            }
        }
        store::<R>(&lo, &hi, y, ldy, bias, cols);
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::WeightPrecision;

    pub unsafe fn round_row(_: &[f32], _: &mut [u32]) {
        unreachable!("the packed kernels need x86-64 with AVX-512")
    }

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        _: WeightPrecision,
        _: usize,
        _: *const u32,
        _: usize,
        _: *const u32,
        _: *mut f32,
        _: usize,
        _: *const f32,
        _: usize,
    ) {
        unreachable!("the packed kernels need x86-64 with AVX-512")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn seeded(seed: u64, dims: &[usize]) -> Tensor {
        crate::testing::seeded_randn(seed, dims, DType::F32)
    }

    const BOTH: [WeightPrecision; 2] = [WeightPrecision::F32, WeightPrecision::Bf16];

    /// The values the kernel multiplies: as stored (f32), or rounded to bf16.
    fn operand(t: &Tensor, precision: WeightPrecision) -> Vec<f64> {
        let t = match precision {
            WeightPrecision::F32 => t.clone(),
            WeightPrecision::Bf16 => t.to_dtype(DType::BF16).unwrap(),
        };
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// `Σ_k x·w + b` in f64 on the operands of `precision`, and the bound `Σ_k |x·w| + |b|` for
    /// the f32 accumulation error.
    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, precision: WeightPrecision) -> (Vec<f64>, Vec<f64>) {
        let (n, k) = w.dims2().unwrap();
        let (xs, ws) = (operand(x, precision), operand(w, precision));
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
        precision: WeightPrecision,
    ) {
        let (want, bound) = reference(x, w, b, precision);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{what}: length");
        let k = w.dims2().unwrap().1 as f64;
        for (i, ((g, w), m)) in got.iter().zip(&want).zip(&bound).enumerate() {
            // f32 summation of k + 1 terms: |error| ≤ (k + 1)·2⁻²⁴·Σ|terms| (with room).
            let tol = (k + 2.0) * f64::from(f32::EPSILON) * m + 1e-30;
            assert!((f64::from(*g) - w).abs() <= tol, "{what}: element {i}: got {g}, want {w} (tolerance {tol:e})");
        }
    }

    #[test]
    fn matches_an_f64_reference_on_every_edge_shape() {
        // Rows around the micro-tile height, inputs odd and even around the 16-wide rounding,
        // outputs around the 32-column panel.
        let mut seed = 0;
        for rows in [1, 5, 12, 13, 25, 100] {
            for k in [1, 2, 3, 31, 33, 100] {
                for n in [1, 31, 32, 33, 70] {
                    seed += 1;
                    let x = seeded(seed, &[rows, k]);
                    let w = seeded(seed + 1000, &[n, k]);
                    let b = seeded(seed + 2000, &[n]);
                    for precision in BOTH {
                        let packed = PackedWeight::pack(&w, precision).unwrap();
                        let what = format!("{precision:?} [{rows}, {k}] x [{n}, {k}]ᵀ");
                        let y = packed.matmul_t(&x, Some(&b)).unwrap();
                        assert_matches_reference(&what, &y, (&x, &w, Some(&b)), precision);
                        let widened = packed.widened(&x, None).unwrap();
                        assert_matches_reference(&format!("{what} widened"), &widened, (&x, &w, None), precision);
                    }
                }
            }
        }
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
                precision,
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
    fn non_finite_inputs_propagate() {
        let w = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[1f32, f32::NAN, 0., 0.], [1., f32::INFINITY, 0., 0.]], &Device::Cpu).unwrap();
        for precision in BOTH {
            let y: Vec<Vec<f32>> =
                PackedWeight::pack(&w, precision).unwrap().matmul_t(&x, None).unwrap().to_vec2().unwrap();
            assert!(y[0].iter().all(|v| v.is_nan()), "{precision:?}");
            assert!(y[1].iter().all(|v| *v == f32::INFINITY), "{precision:?}");
        }
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
