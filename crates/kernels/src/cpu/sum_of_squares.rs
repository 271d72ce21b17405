//! `Σ x²` of a CPU tensor in f64, in one pass over its values: the trainer's gradient norm.
//!
//! The tensor formulation, `x.to_dtype(F64).sqr().sum_all()`, writes two f64 copies of every
//! gradient and then adds the squares one after another, each addition waiting for the last. Here
//! each value is read once. A block of [`BLOCK`] values is summed in eight independent partial
//! sums (value `i` into sum `i mod 8`, which the compiler vectorises; multiply and add stay
//! separate roundings, so no ISA path changes a bit). Blocks run in parallel and their sums are
//! added in block order. The result therefore depends neither on the thread count nor on the CPU.
//! It can differ from the tensor formulation's sequential sum in the last bits; both are f64 sums
//! of f32 squares, far more precise than the f32 values they measure.

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::float::contiguous_storage;

/// Values per block: one task of the pool, and the unit whose sum is fixed.
pub const BLOCK: usize = 1 << 14;

/// `Σ x²` in f64 of an f32 or f64 tensor on the CPU, or `None` where this kernel does not apply
/// (another device, another dtype, or the CPU kernels off: `RANKSTACK_CPU=candle`), for the
/// caller to compose candle operations instead. Strided tensors are read through a contiguous copy.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let g = Tensor::new(&[[3f32, 4.], [0., 12.]], &Device::Cpu)?;
/// assert_eq!(rankstack_kernels::cpu::sum_of_squares::sum_of_squares(&g)?, Some(169.0));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn sum_of_squares(t: &Tensor) -> Result<Option<f64>> {
    if !super::kernels_run_on(t.device()) || !matches!(t.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    Ok(Some(match t.dtype() {
        DType::F32 => sum(contiguous_storage::<f32>(cpu, layout, "sum of squares: input")?),
        _ => sum(contiguous_storage::<f64>(cpu, layout, "sum of squares: input")?),
    }))
}

/// The blocks' sums, added in order.
fn sum<T: Copy + Into<f64> + Sync>(values: &[T]) -> f64 {
    if values.len() <= BLOCK {
        return block_sum(values);
    }
    let blocks: Vec<f64> = values.par_chunks(BLOCK).map(block_sum).collect();
    blocks.into_iter().fold(0.0, |total, b| total + b)
}

/// One block: eight partial sums, combined pairwise in a fixed order.
fn block_sum<T: Copy + Into<f64>>(values: &[T]) -> f64 {
    let mut partial = [0f64; 8];
    let mut lanes = values.chunks_exact(8);
    for lane in &mut lanes {
        for (p, &v) in partial.iter_mut().zip(lane) {
            let v: f64 = v.into();
            *p += v * v;
        }
    }
    for (p, &v) in partial.iter_mut().zip(lanes.remainder()) {
        let v: f64 = v.into();
        *p += v * v;
    }
    ((partial[0] + partial[4]) + (partial[1] + partial[5])) + ((partial[2] + partial[6]) + (partial[3] + partial[7]))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::cpu::{with_isa, Isa};

    /// `n` values of both signs spread over seven decades (1e-4 … 1e3), from the oracle's
    /// seeded generator.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::oracle::values(seed, n)
            .into_iter()
            .map(|u| (u.signum() * 10f64.powf(3.5 * u.abs() - 4.0)) as f32)
            .collect()
    }

    #[test]
    fn equals_the_sum_in_f64_within_rounding_for_every_size_and_layout() {
        for n in [0, 1, 7, 8, 9, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let v = values(n, n as u64 + 1);
            let exact: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let t = Tensor::from_vec(v.clone(), n, &Device::Cpu).unwrap();
            let got = sum_of_squares(&t).unwrap().unwrap();
            // Both orders of adding n positive terms round within n·ε of the sum.
            let bound = f64::EPSILON * (n as f64 + 8.0) * exact;
            assert!((got - exact).abs() <= bound, "n = {n}: {got} vs {exact}");
            // The f64 path, and a transposed (strided) view, give the same bits.
            let t64 = t.to_dtype(DType::F64).unwrap();
            assert_eq!(sum_of_squares(&t64).unwrap().unwrap().to_bits(), got.to_bits(), "n = {n}, f64");
        }
        let m = Tensor::from_vec(values(6 * 9, 3), (6, 9), &Device::Cpu).unwrap();
        let transposed = sum_of_squares(&m.t().unwrap()).unwrap().unwrap();
        let contiguous = sum_of_squares(&m.t().unwrap().contiguous().unwrap()).unwrap().unwrap();
        assert_eq!(transposed.to_bits(), contiguous.to_bits());
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let t = Tensor::from_vec(values(5 * BLOCK + 3, 9), 5 * BLOCK + 3, &Device::Cpu).unwrap();
        let reference = sum_of_squares(&t).unwrap().unwrap().to_bits();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let got = pool.install(|| sum_of_squares(&t).unwrap().unwrap().to_bits());
            assert_eq!(got, reference, "{threads} threads");
        }
    }

    #[test]
    fn other_dtypes_and_the_candle_path_are_left_to_the_caller() {
        let t = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        assert_eq!(sum_of_squares(&t.to_dtype(DType::BF16).unwrap()).unwrap(), None);
        assert_eq!(with_isa(Isa::Candle, || sum_of_squares(&t).unwrap()), None);
        assert_eq!(sum_of_squares(&t).unwrap(), Some(5.0));
    }
}
