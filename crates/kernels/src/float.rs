//! The element types of the hand-written CPU kernels (`f32` and `f64`), how a kernel reads a
//! tensor's values from its CPU storage, and the one dispatch from an untyped storage to a kernel's
//! typed body ([`FloatKernel`], [`dispatch`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, WithDType};

/// A float type the fused CPU kernels are written over: candle's [`WithDType`] (arithmetic,
/// `from_f64`/`to_f64`, CPU storage access) plus the few float functions the kernels need.
/// Implemented for `f32` (the kernels' production type) and `f64` (their exactness tests).
pub trait KernelFloat: WithDType {
    /// `0`.
    const ZERO: Self;
    /// `1`.
    const ONE: Self;
    /// `−∞`.
    const NEG_INFINITY: Self;
    /// `eˣ` in a form the compiler can vectorise: for f32 a polynomial within 2 ulp (1 ulp
    /// typical; `0` below `e⁻⁸⁷·³³⁶⁵`, where the result would be subnormal); for f64 libm's `exp`.
    fn exp_lanes(self) -> Self;
    /// The larger of two values (the other one where one is NaN, as [`f32::max`]).
    fn max(self, other: Self) -> Self;
}

macro_rules! kernel_float {
    ($t:ty, $exp_lanes:expr) => {
        impl KernelFloat for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp_lanes(self) -> Self {
                $exp_lanes(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
kernel_float!(f32, exp_f32);
kernel_float!(f64, f64::exp);

/// `eˣ` for f32 without a call or a branch, so that loops over it vectorise: `x = n·ln 2 + r`
/// with `n = ⌊x·log₂e + ½⌋` and `ln 2` split in two (Cody and Waite; `n·ln2_hi` is exact), then
/// `eʳ ≈ 1 + r + r²·P(r)` on `|r| ≤ ln 2 / 2` with the degree-5 minimax `P` of the Cephes library's
/// `expf`, scaled by `2ⁿ` through the exponent bits. Below `−87.3365` (where `eˣ` leaves the normal
/// range) the result is `0`, above `88.3762` `+∞`; NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
    const LOW: f32 = -87.336_5;
    const HIGH: f32 = 88.376_2;
    let xc = x.clamp(LOW, HIGH);
    let n = (xc * LOG2_E + 0.5).floor();
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let poly = P.iter().skip(1).fold(P[0], |acc, &c| acc * r + c);
    let y = poly * (r * r) + r + 1.0;
    // n ∈ [−126, 128): 2ⁿ by the exponent field (n = 128 only at the clamp, overflowing below).
    let two_n = f32::from_bits(((n as i32 + 127).clamp(1, 254) as u32) << 23);
    let e = y * two_n;
    if x.is_nan() {
        x
    } else if x < LOW {
        0.0
    } else if x > HIGH {
        f32::INFINITY
    } else {
        e
    }
}

/// The elements a contiguous `layout` covers in `values` (a storage's whole buffer). A strided
/// layout is an error, "`{what}` must be contiguous": the kernels index rows directly, so their
/// callers hand them contiguous tensors.
pub fn contiguous<'a, T>(values: &'a [T], layout: &Layout, what: impl std::fmt::Display) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// As [`contiguous`], for a buffer the kernel updates in place.
pub fn contiguous_mut<'a, T>(
    values: &'a mut [T],
    layout: &Layout,
    what: impl std::fmt::Display,
) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut values[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// As [`contiguous`], for a CPU storage that must hold elements of type `T`: another dtype is an
/// error naming `what` and both dtypes.
pub fn contiguous_storage<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: impl std::fmt::Display,
) -> Result<&'a [T]> {
    match T::cpu_storage_as_slice(storage) {
        Ok(values) => contiguous(values, layout, what),
        Err(_) => candle_core::bail!("{what} must be {:?}, got {:?}", T::DTYPE, storage.dtype()),
    }
}

/// The typed body of a CPU kernel over `f32` or `f64` inputs: what a candle op's `cpu_fwd` runs
/// once it knows the element type ([`dispatch`]).
pub trait FloatKernel {
    /// What the kernel's error messages call it.
    const NAME: &'static str;

    /// The kernel on the contiguous values of its inputs, all of type `T`, in the order given to
    /// [`dispatch`].
    fn run<T: KernelFloat>(&self, inputs: &[&[T]]) -> Result<Vec<T>>;
}

/// Runs `kernel` on CPU storages that must all hold `f32` or all `f64` and be contiguous: the
/// result is a storage of the same type. Another dtype, mixed dtypes or a strided layout are
/// errors naming the kernel and the input.
pub fn dispatch<K: FloatKernel>(kernel: &K, inputs: &[(&CpuStorage, &Layout)]) -> Result<CpuStorage> {
    fn typed<T: KernelFloat, K: FloatKernel>(kernel: &K, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<T>> {
        let mut values = Vec::with_capacity(inputs.len());
        for (i, (storage, layout)) in inputs.iter().enumerate() {
            // The name is formatted only if there is an error to report.
            values.push(contiguous_storage::<T>(storage, layout, format_args!("{}: input {i}", K::NAME))?);
        }
        kernel.run(&values)
    }
    match inputs.first().map(|(s, _)| s.dtype()) {
        Some(DType::F32) => Ok(CpuStorage::F32(typed::<f32, K>(kernel, inputs)?)),
        Some(DType::F64) => Ok(CpuStorage::F64(typed::<f64, K>(kernel, inputs)?)),
        other => candle_core::bail!("{}: the kernel takes f32 or f64, got {other:?}", K::NAME),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn reads_the_covered_elements_and_rejects_strided_layouts_and_other_dtypes() {
        let t = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let row = t.narrow(0, 1, 1).unwrap();
        let (storage, layout) = row.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { unreachable!() };
        assert_eq!(contiguous_storage::<f32>(cpu, layout, "x").unwrap(), &[4., 5., 6., 7.]);
        let err = contiguous_storage::<f64>(cpu, layout, "test op: input").unwrap_err().to_string();
        assert!(err.contains("test op: input must be F64, got F32"), "{err}");

        let column = t.narrow(1, 1, 1).unwrap();
        let (storage, layout) = column.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { unreachable!() };
        let err = contiguous_storage::<f32>(cpu, layout, "test op: input").unwrap_err().to_string();
        assert!(err.contains("test op: input must be contiguous"), "{err}");

        let mut values = vec![1f32, 2., 3.];
        let layout = Layout::contiguous_with_offset((2,), 1);
        contiguous_mut(&mut values, &layout, "x").unwrap()[0] = 9.;
        assert_eq!(values, vec![1., 9., 3.]);
    }
}
