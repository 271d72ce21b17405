//! Row-wise softmax with an additive bias, `p = softmax(s + b)` per row, vectorised on every
//! path: the attention weights of one (sequence, head) task of packed attention.
//!
//! The maximum and the sum use 16 interleaved partial results (then combined in a fixed order),
//! so the compiler can keep them in vector registers; the exponential is [`KernelFloat::exp_lanes`]:
//! for f32 a polynomial of about 1 ulp that vectorises (libm's `expf` is a scalar call), for f64
//! libm's. The result does not depend on the [`Isa`] path: the same operations in the same order,
//! only the compiled vector width differs.

use super::isa::Isa;
use crate::KernelFloat;

/// Partial results per reduction.
const LANES: usize = 16;

/// Each `row` of `p` (rows of `bias.len()` values) ← `softmax(row + bias)`. A row whose values are
/// all `−∞` (every key hidden) becomes NaN, as PyTorch's softmax gives; a NaN anywhere in a row
/// makes the whole row NaN.
pub(crate) fn softmax_rows<T: KernelFloat>(isa: Isa, p: &mut [T], bias: &[T]) {
    if bias.is_empty() {
        return;
    }
    match isa {
        // SAFETY: `isa` is the active path, which the CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.supported() => unsafe { x86::rows_avx512(p, bias) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.supported() => unsafe { x86::rows_avx2(p, bias) },
        _ => rows(p, bias),
    }
}

#[inline(always)]
fn rows<T: KernelFloat>(p: &mut [T], bias: &[T]) {
    for row in p.chunks_exact_mut(bias.len()) {
        softmax(row, bias);
    }
}

#[inline(always)]
fn softmax<T: KernelFloat>(row: &mut [T], bias: &[T]) {
    for (s, &b) in row.iter_mut().zip(bias) {
        *s += b;
    }
    let max = reduce(row, T::NEG_INFINITY, KernelFloat::max);
    for s in row.iter_mut() {
        *s = (*s - max).exp_lanes();
    }
    let inv = T::ONE / reduce(row, T::ZERO, |a, b| a + b);
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// `f` over `values` in [`LANES`] interleaved partial results, combined in index order.
#[inline(always)]
fn reduce<T: KernelFloat>(values: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut lanes = [init; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = f(*lane, v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(tail) {
        *lane = f(*lane, v);
    }
    lanes.into_iter().fold(init, f)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::KernelFloat;

    /// [`super::rows`] compiled for AVX-512.
    ///
    /// # Safety
    /// Needs AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_avx512<T: KernelFloat>(p: &mut [T], bias: &[T]) {
        super::rows(p, bias)
    }

    /// [`super::rows`] compiled for AVX2 + FMA.
    ///
    /// # Safety
    /// Needs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_avx2<T: KernelFloat>(p: &mut [T], bias: &[T]) {
        super::rows(p, bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::for_each_supported_isa;

    /// Against an f64 softmax: rows longer and shorter than the lanes, hidden keys, a fully
    /// hidden row, a NaN; and the same bits on every path.
    #[test]
    fn matches_an_f64_softmax_on_every_path() {
        let mut results = Vec::new();
        for_each_supported_isa("softmax rows", |isa| {
            for l in [1, 3, 16, 17, 50, 100] {
                let s: Vec<f32> = crate::oracle::tensor(l as u64, &[l * l], candle_core::DType::F32)
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| 8.0 * v)
                    .collect();
                let bias: Vec<f32> =
                    (0..l).map(|j| if j % 4 == 3 { f32::NEG_INFINITY } else { 0.25 * j as f32 }).collect();
                let mut p = s.clone();
                softmax_rows(isa, &mut p, &bias);
                for (i, row) in p.chunks(l).enumerate() {
                    // The biased scores as the kernel rounds them (f32), then exactly.
                    let z: Vec<f64> = (0..l).map(|j| f64::from(s[i * l + j] + bias[j])).collect();
                    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                    for (j, &got) in row.iter().enumerate() {
                        let want = (z[j] - max).exp() / sum;
                        if z[j] == f64::NEG_INFINITY {
                            assert_eq!(got, 0.0, "{isa:?} l = {l} ({i}, {j}): a hidden key's weight");
                            continue;
                        }
                        // exp within 2 ulp, the sum and the division a few more; `z − max` is
                        // rounded to f32, an error of |z − max|·2⁻²⁴ in the exponent.
                        let tol = want * (6.0 * f64::from(f32::EPSILON) + (z[j] - max).abs() * 6e-8) + 1e-30;
                        assert!((f64::from(got) - want).abs() <= tol, "{isa:?} l = {l} ({i}, {j}): {got} vs {want}");
                    }
                }
                results.push(p);
            }
            let mut rows = vec![1f32, 2.0, f32::NAN, 0.0, 5.0, 6.0];
            softmax_rows(isa, &mut rows, &[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0]);
            assert!(rows[..3].iter().all(|v| v.is_nan()), "{isa:?}: {rows:?}");
            assert_eq!(rows[3..], [0.0, 0.0, 1.0], "{isa:?}");
            let mut hidden = vec![1f32, 2.0];
            softmax_rows(isa, &mut hidden, &[f32::NEG_INFINITY; 2]);
            assert!(hidden.iter().all(|v| v.is_nan()), "{isa:?}: {hidden:?}");
        });
        let paths = results.len() / 6;
        for path in 1..paths {
            assert_eq!(results[..6], results[6 * path..6 * (path + 1)], "path {path} differs from the first");
        }
    }

    /// The f32 exponential against f64's over the range that matters (and its edges).
    #[test]
    fn the_f32_exponential_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (f64::from(x.exp_lanes()), f64::from(x).exp());
            assert!((got - want).abs() <= 2.0 * f64::from(f32::EPSILON) * want, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(f32::NEG_INFINITY.exp_lanes(), 0.0);
        assert_eq!((-100f32).exp_lanes(), 0.0);
        assert_eq!(0f32.exp_lanes(), 1.0);
        assert_eq!(f32::INFINITY.exp_lanes(), f32::INFINITY);
        assert_eq!(100f32.exp_lanes(), f32::INFINITY);
        assert!(f32::NAN.exp_lanes().is_nan());
    }
}
