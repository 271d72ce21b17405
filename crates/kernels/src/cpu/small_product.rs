//! Small dense products, single-threaded: the per-(sequence, head) blocks of packed attention
//! (`L × d_h` by `d_h × L` and `L × L` by `L × d_h`, with `L` up to a few hundred and `d_h` tens).
//!
//! `dst = scale · A·B`. `B` is first copied into a zero-padded row-major scratch (`k` rows of
//! `n` rounded up to the register block's width), which also turns a transposed operand into a
//! row-major one; then each block of `R` rows × `C` columns of `dst` keeps its accumulators in
//! registers for the whole sweep over `k`, broadcasting `A`'s values through their strides. The
//! copy costs `k·n` moves against `m·k·n` multiply-adds. At these sizes a general GEMM's packing
//! and blocking cost more than the product (the `gemm` crate took about half of attention's time).
//!
//! f32 on the AVX-512 and AVX2 paths runs explicit vector kernels (blocks of 4 rows × 32 or 16
//! columns; the compiler's own vectorisation of the portable blocks failed on AVX2 and ran scalar,
//! slower than the `gemm` crate). There every element is one chain `acc = fma(a, b, acc)` over
//! `p = 0..k` in order, so the two paths give the same bits. The generic path, and f64 on every
//! path (the exactness tests), run the portable blocks, which multiply and add separately (no FMA
//! instruction assumed).

use super::isa::Isa;
use crate::KernelFloat;

/// A strided matrix operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pub ptr: *const T,
    pub rs: usize,
    pub cs: usize,
}

impl<T> View<T> {
    /// Rows of stride `rs`, contiguous within a row.
    pub fn rows(ptr: *const T, rs: usize) -> Self {
        Self { ptr, rs, cs: 1 }
    }

    /// The transpose (the same memory).
    pub fn t(self) -> Self {
        Self { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }

    /// The same view of the same memory as `U` (the caller knows the element type).
    #[cfg(target_arch = "x86_64")]
    fn cast<U>(self) -> View<U> {
        View { ptr: self.ptr.cast(), rs: self.rs, cs: self.cs }
    }
}

/// `dst (m × n, row stride dst_rs) = scale · A (m × k) · B (k × n)` on the `isa` path, using
/// `scratch` for the padded copy of `B`.
///
/// # Safety
/// `a` and `b` must address `m × k` and `k × n` readable elements, `dst` `m × n` writable ones
/// (row stride `dst_rs`) that nothing else accesses meanwhile; `isa` must be supported.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product<T: KernelFloat>(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    a: View<T>,
    b: View<T>,
    scale: T,
    scratch: &mut Vec<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    let out = Out { ptr: dst, rs: dst_rs, scale };
    // Only x86 has vector kernels to pick from.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    // SAFETY: the caller's contract; each arm runs on a path the CPU has (`isa` is supported).
    // f32 takes the explicit vector kernels on x86; f64 (the exactness tests) and the generic
    // path take the portable blocks.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if T::DTYPE == candle_core::DType::F32 && matches!(isa, Isa::Avx512 | Isa::Avx2) {
            let (a, out) = (a.cast::<f32>(), out.cast::<f32>());
            if isa == Isa::Avx512 {
                let packed = pack::<f32, 32>(b.cast(), k, n, f32_scratch(scratch));
                return x86::blocks_avx512(m, n, k, a, packed, out);
            }
            let packed = pack::<f32, 16>(b.cast(), k, n, f32_scratch(scratch));
            return x86::blocks_avx2(m, n, k, a, packed, out);
        }
        let packed = pack::<T, 8>(b, k, n, scratch);
        blocks::<T, 2, 8>(m, n, k, a, packed, out)
    }
}

/// The scratch of an f32 product (`T` is f32: the same type).
#[cfg(target_arch = "x86_64")]
fn f32_scratch<T: KernelFloat>(scratch: &mut Vec<T>) -> &mut Vec<f32> {
    assert_eq!(T::DTYPE, candle_core::DType::F32, "an f32 product");
    // SAFETY: `T` is f32 (asserted), so the vector is a `Vec<f32>`.
    unsafe { &mut *(scratch as *mut Vec<T>).cast::<Vec<f32>>() }
}

impl<T: KernelFloat> Out<T> {
    /// The same destination as `U` values (`T` is `U`: checked by the caller; the scale converts
    /// exactly).
    #[cfg(target_arch = "x86_64")]
    fn cast<U: KernelFloat>(self) -> Out<U> {
        Out { ptr: self.ptr.cast(), rs: self.rs, scale: U::from_f64(self.scale.to_f64()) }
    }
}

/// Where and how a block of the product is stored: `scale · acc` at `ptr + i·rs + j`.
#[derive(Clone, Copy)]
struct Out<T> {
    ptr: *mut T,
    rs: usize,
    scale: T,
}

/// `B` copied to `k` rows of `n` rounded up to `C` (zero-padded): `(pointer, row stride)`.
///
/// # Safety
/// `b` must address `k × n` readable elements.
unsafe fn pack<T: KernelFloat, const C: usize>(
    b: View<T>,
    k: usize,
    n: usize,
    scratch: &mut Vec<T>,
) -> (*const T, usize) {
    let width = n.div_ceil(C) * C;
    scratch.clear();
    scratch.resize(k * width, T::ZERO);
    for (p, row) in scratch.chunks_exact_mut(width).enumerate() {
        for (j, x) in row[..n].iter_mut().enumerate() {
            // SAFETY: `(p, j)` is inside `b`'s `k × n` elements (caller's contract).
            *x = unsafe { *b.ptr.add(p * b.rs + j * b.cs) };
        }
    }
    (scratch.as_ptr(), width)
}

/// Blocks of `R` rows × `C` columns over the whole product, then the leftover rows one by one.
///
/// # Safety
/// As [`product`], with `b` packed by [`pack`] for this `C`.
#[inline(always)]
unsafe fn blocks<T: KernelFloat, const R: usize, const C: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: View<T>,
    b: (*const T, usize),
    out: Out<T>,
) {
    let full_rows = m / R * R;
    for j0 in (0..n).step_by(C) {
        let cols = C.min(n - j0);
        // SAFETY: the blocks lie inside the product (caller's contract) and the padded copy of B.
        unsafe {
            for i0 in (0..full_rows).step_by(R) {
                block::<T, R, C>(i0, j0, cols, k, a, b, out);
            }
            for i0 in full_rows..m {
                block::<T, 1, C>(i0, j0, cols, k, a, b, out);
            }
        }
    }
}

/// One block: rows `i0..i0 + R`, columns `j0..j0 + cols` (`cols ≤ C`; the padded columns are
/// computed and dropped).
///
/// # Safety
/// As [`blocks`], for rows and columns inside the product.
#[inline(always)]
unsafe fn block<T: KernelFloat, const R: usize, const C: usize>(
    i0: usize,
    j0: usize,
    cols: usize,
    k: usize,
    a: View<T>,
    (b, b_rs): (*const T, usize),
    out: Out<T>,
) {
    let mut acc = [[T::ZERO; C]; R];
    for p in 0..k {
        // SAFETY: row `p` of the padded copy holds columns `j0..j0 + C`; `A`'s rows `i0 + r` and
        // column `p` are inside `A` (caller's contract).
        unsafe {
            let row = &*b.add(p * b_rs + j0).cast::<[T; C]>();
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = *a.ptr.add((i0 + r) * a.rs + p * a.cs);
                for (acc, &y) in acc.iter_mut().zip(row) {
                    *acc += x * y;
                }
            }
        }
    }
    // Indexed by constants only (a `c < cols` test, not a loop to `cols`), so that the
    // accumulators stay in registers during the sweep instead of living on the stack.
    for (r, acc) in acc.iter().enumerate() {
        for (c, &v) in acc.iter().enumerate() {
            if c < cols {
                // SAFETY: row `i0 + r`, column `j0 + c < j0 + cols` of the destination (caller's
                // contract).
                unsafe { *out.ptr.add((i0 + r) * out.rs + j0 + c) = v * out.scale };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Out, View};

    /// Stores `R` rows of a block (`V` vectors of `W` values each, already scaled) to the first
    /// `cols` columns of the destination rows `i0..`.
    ///
    /// # Safety
    /// `vals[r]` holds `V · W ≥ cols` values; the destination rows and columns are writable.
    #[inline(always)]
    unsafe fn store_rows<const R: usize, const N: usize>(
        vals: &[[f32; N]; R],
        i0: usize,
        j0: usize,
        cols: usize,
        out: Out<f32>,
    ) {
        for (r, v) in vals.iter().enumerate() {
            // SAFETY: row `i0 + r`, columns `j0..j0 + cols` of the destination (caller's contract).
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out.ptr.add((i0 + r) * out.rs + j0), cols) };
        }
    }

    macro_rules! blocks_fn {
        ($(#[$doc:meta])* $name:ident, $block:ident, $feature:literal, $vec:ty, $width:literal, $zero:ident, $load:ident,
         $set1:ident, $fmadd:ident, $mul:ident, $store:ident) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// Needs the target features; `a` addresses `m × k` values, `b` is the padded copy
            /// ([`super::pack`] with `C = 2 · W`), `out` `m × n` writable values.
            #[target_feature(enable = $feature)]
            pub unsafe fn $name(m: usize, n: usize, k: usize, a: View<f32>, b: (*const f32, usize), out: Out<f32>) {
                const ROWS: usize = 4;
                let full = m / ROWS * ROWS;
                for j0 in (0..n).step_by(2 * $width) {
                    let cols = (2 * $width).min(n - j0);
                    // SAFETY: the blocks lie inside the product and the padded copy (caller's
                    // contract).
                    unsafe {
                        for i0 in (0..full).step_by(ROWS) {
                            $block::<ROWS>(i0, j0, cols, k, a, b, out);
                        }
                        for i0 in full..m {
                            $block::<1>(i0, j0, cols, k, a, b, out);
                        }
                    }
                }
            }

            /// One block of `R` rows × two vectors of columns, accumulated over `k` in registers.
            ///
            /// # Safety
            /// As the blocks function, for rows and columns inside the product.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn $block<const R: usize>(
                i0: usize,
                j0: usize,
                cols: usize,
                k: usize,
                a: View<f32>,
                (b, b_rs): (*const f32, usize),
                out: Out<f32>,
            ) {
                let mut acc: [[$vec; 2]; R] = [[$zero(); 2]; R];
                for p in 0..k {
                    // SAFETY: row `p` of the padded copy holds 2·W columns from `j0`; A's rows
                    // `i0 + r` and column `p` are inside A.
                    unsafe {
                        let row = b.add(p * b_rs + j0);
                        let (b0, b1) = ($load(row), $load(row.add($width)));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let x = $set1(*a.ptr.add((i0 + r) * a.rs + p * a.cs));
                            acc[0] = $fmadd(x, b0, acc[0]);
                            acc[1] = $fmadd(x, b1, acc[1]);
                        }
                    }
                }
                let scale = $set1(out.scale);
                let mut vals = [[0f32; 2 * $width]; R];
                for (v, acc) in vals.iter_mut().zip(&acc) {
                    // SAFETY: `v` holds 2·W values.
                    unsafe {
                        $store(v.as_mut_ptr(), $mul(acc[0], scale));
                        $store(v.as_mut_ptr().add($width), $mul(acc[1], scale));
                    }
                }
                // SAFETY: the caller's destination.
                unsafe { store_rows(&vals, i0, j0, cols, out) }
            }
        };
    }

    blocks_fn!(
        /// The f32 product on AVX-512: blocks of 4 rows × 32 columns (8 accumulator registers).
        blocks_avx512, block_avx512, "avx512f", __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps,
        _mm512_fmadd_ps, _mm512_mul_ps, _mm512_storeu_ps
    );
    blocks_fn!(
        /// The f32 product on AVX2 + FMA: blocks of 4 rows × 16 columns (8 accumulator registers).
        blocks_avx2, block_avx2, "avx2,fma", __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps,
        _mm256_fmadd_ps, _mm256_mul_ps, _mm256_storeu_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{for_each_supported_isa, with_isa};

    fn values(seed: u64, len: usize) -> Vec<f32> {
        crate::oracle::tensor(seed, &[len], candle_core::DType::F32).to_vec1().unwrap()
    }

    /// Every shape class (row and column blocks, their leftovers, transposed operands, an
    /// output row stride wider than `n`) against an f64 sum, on every path.
    #[test]
    fn matches_an_f64_sum_on_every_path() {
        for_each_supported_isa("small product", |isa| {
            let mut seed = 0;
            for (m, n, k) in [(1, 1, 1), (3, 5, 7), (4, 16, 9), (9, 33, 48), (50, 48, 50), (37, 100, 48), (5, 70, 1)] {
                for (transpose_a, transpose_b) in [(false, false), (true, false), (false, true), (true, true)] {
                    seed += 1;
                    let (xa, xb) = (values(seed, m * k), values(seed + 500, k * n));
                    let a = if transpose_a { View::rows(xa.as_ptr(), m).t() } else { View::rows(xa.as_ptr(), k) };
                    let b = if transpose_b { View::rows(xb.as_ptr(), k).t() } else { View::rows(xb.as_ptr(), n) };
                    let dst_rs = n + 3;
                    let mut dst = vec![f32::NAN; m * dst_rs];
                    let mut scratch = Vec::new();
                    // SAFETY: the views address m × k and k × n elements of xa and xb; dst has
                    // m rows of stride dst_rs ≥ n.
                    unsafe { product(isa, (m, n, k), dst.as_mut_ptr(), dst_rs, a, b, 0.5, &mut scratch) };
                    for i in 0..m {
                        for j in 0..n {
                            let (mut want, mut bound) = (0f64, 0f64);
                            for p in 0..k {
                                // SAFETY: inside the operands, as above.
                                let t = unsafe {
                                    f64::from(*a.ptr.add(i * a.rs + p * a.cs))
                                        * f64::from(*b.ptr.add(p * b.rs + j * b.cs))
                                };
                                want += t;
                                bound += t.abs();
                            }
                            let got = f64::from(dst[i * dst_rs + j]);
                            let tol = (k as f64 + 2.0) * f64::from(f32::EPSILON) * 0.5 * bound + 1e-30;
                            assert!(
                                (got - 0.5 * want).abs() <= tol,
                                "{isa:?} [{m}, {k}] x [{k}, {n}] ({transpose_a}, {transpose_b}) at ({i}, {j}): {got} vs {}",
                                0.5 * want
                            );
                        }
                        // The padding beyond n is untouched.
                        assert!(dst[i * dst_rs + n..(i + 1) * dst_rs].iter().all(|v| v.is_nan()), "{isa:?} row {i}");
                    }
                }
            }
        });
    }

    /// The AVX-512 and AVX2 paths differ only in block sizes: the same FMA chain per element.
    #[test]
    fn avx2_and_avx512_paths_agree_bit_for_bit() {
        if !(Isa::Avx512.supported() && Isa::Avx2.supported()) {
            return crate::cpu::skipped("small product AVX2 vs AVX-512 bit identity", "AVX-512F and AVX2");
        }
        let (m, n, k) = (37, 100, 48);
        let (xa, xb) = (values(1, m * k), values(2, k * n));
        let run = |isa| {
            with_isa(isa, || {
                let mut dst = vec![0f32; m * n];
                // SAFETY: as in the test above.
                unsafe {
                    product(
                        isa,
                        (m, n, k),
                        dst.as_mut_ptr(),
                        n,
                        View::rows(xa.as_ptr(), k),
                        View::rows(xb.as_ptr(), k).t(),
                        1.0,
                        &mut Vec::new(),
                    )
                };
                dst
            })
        };
        assert_eq!(run(Isa::Avx512), run(Isa::Avx2));
    }
}
