//! The element types of the hand-written CPU kernels (`f32` and `f64`).

use candle_core::WithDType;

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
    /// `eˣ`.
    fn exp(self) -> Self;
    /// The larger of two values (the other one where one is NaN, as [`f32::max`]).
    fn max(self, other: Self) -> Self;
}

macro_rules! kernel_float {
    ($t:ty) => {
        impl KernelFloat for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
kernel_float!(f32);
kernel_float!(f64);
