//! Test support: deterministic inputs for the kernels' tests, and the closeness check against their
//! scalar f64 oracles (each test writes its oracle as plain loops over the formula).

use candle_core::{DType, Device, Tensor};

/// `n` values in `[−2, 2)` from a seeded xorshift generator (tests never use candle's unseeded
/// CPU RNG).
pub fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect()
}

/// A `[dims]` CPU tensor of [`values`] in `dtype`.
pub fn tensor(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(seed, n), dims, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).expect("tensor")
}

/// A tensor's values as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1()).expect("readable tensor")
}

/// A tensor's values as the bits of their f64 values (exact for every float dtype): for tests that
/// compare two computations bit for bit.
pub fn f64_bits(t: &Tensor) -> Vec<u64> {
    f64s(t).iter().map(|v| v.to_bits()).collect()
}

/// Asserts `max|actual − expected| ≤ rtol · max(max|expected|, 1e-300)`, naming `what`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &[f64], rtol: f64) {
    let actual = f64s(actual);
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= rtol * scale, "{what}: element {i}: {a} vs {e} (bound {:e})", rtol * scale);
    }
}
