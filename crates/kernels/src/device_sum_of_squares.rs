//! The f64 sum of the squares of many tensors, off the CPU kernels (a GPU, or the CPU under
//! `RANKSTACK_CPU=candle`): the squared global gradient norm the trainer reads every step.
//!
//! ```text
//! Σ_tensors Σ_i x_i²     (each square and sum in f64)
//! ```
//!
//! The tensor formulation is four launches per tensor (a cast to f64, the square, the sum, the
//! running total) and writes two f64 copies of every gradient: about 200 launches and 1 GiB per
//! step of `homefeed-bench`. Here each tensor is one launch that writes a few f64 partial sums
//! (one per block) into one buffer, and one sum over the buffer gives the total: nothing of the
//! size of a gradient is written. On CUDA the partials are `cuda/sum_of_squares.cu`; on the CPU the
//! same blocks in the same order (the same bits; the final sum over the buffer is candle's on each
//! device). Deterministic: no atomics, every sum in a fixed order.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::device_sum_of_squares::sum_of_squares_on_device;
//! let a = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
//! let b = Tensor::new(&[[1f64], [2.0]], &Device::Cpu)?;
//! let total = sum_of_squares_on_device(&[&a, &b])?.expect("two tensors");
//! assert_eq!(total.to_scalar::<f64>()?, 30.0);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::float::{contiguous, contiguous_mut};

/// Threads per block of the CUDA kernel (its shared array's size; a power of two).
const THREADS: usize = 256;
/// At most this many blocks (partial sums) per tensor.
const MAX_BLOCKS: usize = 256;
/// A block is added for every this many elements per thread, up to [`MAX_BLOCKS`].
const ELEMENTS_PER_THREAD: usize = 16;

/// The blocks (partial sums) of a tensor of `n` elements.
fn blocks_for(n: usize) -> usize {
    n.div_ceil(THREADS * ELEMENTS_PER_THREAD).clamp(1, MAX_BLOCKS)
}

/// `Σ x²` over every element of every tensor of `tensors` (all on one device), as an f64 scalar
/// tensor on that device; `None` without tensors. Each element is converted to f64 before it is
/// squared (exactly: f32, bf16 and f16 values are f64 values).
pub fn sum_of_squares_on_device(tensors: &[&Tensor]) -> Result<Option<Tensor>> {
    let Some(first) = tensors.first() else { return Ok(None) };
    let device = first.device();
    let blocks: Vec<usize> = tensors.iter().map(|t| blocks_for(t.elem_count())).collect();
    let partials = Tensor::zeros(blocks.iter().sum::<usize>(), DType::F64, device)?;
    let mut offset = 0;
    for (t, &blocks) in tensors.iter().zip(&blocks) {
        if !t.device().same_device(device) {
            candle_core::bail!("sum of squares: tensors on different devices");
        }
        if t.elem_count() > 0 {
            let t = match t.dtype() {
                DType::F32 | DType::F64 => t.contiguous()?,
                _ => t.to_dtype(DType::F32)?.contiguous()?,
            };
            partials.inplace_op2(&t, &Partials { offset, blocks })?;
        }
        offset += blocks;
    }
    Ok(Some(partials.sum_all()?))
}

/// Writes the `blocks` partial sums of one tensor at `offset` of the partials buffer, in place.
struct Partials {
    offset: usize,
    blocks: usize,
}

/// Block `b` of `blocks` over `x`: what the CUDA kernel's block `b` computes, in its order. Thread
/// `t` sums the squares of `x[b·256 + t + k·stride]` over `k` (stride = `blocks · 256`); the
/// threads' sums are added pairwise, halving (`sums[t] += sums[t + s]`, `s` = 128, …, 1).
fn block_partial<T: Copy + Into<f64>>(x: &[T], b: usize, blocks: usize) -> f64 {
    let stride = blocks * THREADS;
    let mut sums = [0f64; THREADS];
    // Step k of every thread reads one contiguous run of 256 elements.
    let mut start = b * THREADS;
    while start < x.len() {
        for (sum, &v) in sums.iter_mut().zip(&x[start..(start + THREADS).min(x.len())]) {
            let v: f64 = v.into();
            *sum += v * v;
        }
        start += stride;
    }
    crate::block_sum::pairwise_block_sum(&mut sums)
}

impl InplaceOp2 for Partials {
    fn name(&self) -> &'static str {
        "sum-of-squares-partials"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let CpuStorage::F64(partials) = s1 else { candle_core::bail!("sum of squares: f64 partials") };
        let out = &mut contiguous_mut(partials, l1, "sum of squares: partials")?[self.offset..][..self.blocks];
        let blocks = self.blocks;
        match s2 {
            CpuStorage::F32(x) => {
                let x = contiguous(x, l2, "sum of squares: input")?;
                out.par_iter_mut().enumerate().for_each(|(b, p)| *p = block_partial(x, b, blocks));
            }
            CpuStorage::F64(x) => {
                let x = contiguous(x, l2, "sum of squares: input")?;
                out.par_iter_mut().enumerate().for_each(|(b, p)| *p = block_partial(x, b, blocks));
            }
            other => candle_core::bail!("sum of squares: {:?} input (f32 or f64)", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        use crate::launch_shape::LaunchShape;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        let (Some((out_start, _)), Some((x_start, x_end))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("sum of squares: partials and input must be contiguous")
        };
        let n = (x_end - x_start) as u64;
        let device = s1.device().clone();
        let mut out = s1.as_cuda_slice_mut::<f64>()?.slice_mut(out_start + self.offset..);
        let config = LaunchShape { blocks: self.blocks as u32, threads: THREADS as u32 }.config();
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let func = device.get_or_load_custom_func($kernel, "rankstack_sum_of_squares", PTX)?;
                let x = s2.as_cuda_slice::<$t>()?.slice(x_start..);
                let mut launch = func.builder();
                launch.arg(&mut out).arg(&x).arg(&n);
                // SAFETY: the arguments match the kernel's signature; block `b` writes only
                // `out[b]`, `b < blocks`, inside the partials buffer (sized by
                // `sum_of_squares_on_device` for every tensor's blocks), and threads read `x`
                // below `n`.
                unsafe { launch.launch(config) }.w()?;
            }};
        }
        match s2.dtype() {
            DType::F32 => launch!(f32, "sum_of_squares_partials_f32"),
            DType::F64 => launch!(f64, "sum_of_squares_partials_f64"),
            other => candle_core::bail!("sum of squares: {other:?} input (f32 or f64)"),
        }
        Ok(())
    }
}

/// `cuda/sum_of_squares.cu`, compiled by the build script.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sum_of_squares.ptx"));

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::oracle::values;

    #[test]
    fn equals_the_f64_sum_of_squares_of_every_tensor() {
        let dev = Device::Cpu;
        // Empty, one element, one block, a partial last run, many blocks, more than 256 blocks'
        // worth (each thread then loops), f32 and f64 and bf16.
        let sizes = [0usize, 1, 255, 4097, 70_001, THREADS * ELEMENTS_PER_THREAD * MAX_BLOCKS * 2 + 17];
        let mut tensors = Vec::new();
        let mut exact = 0f64;
        for (i, &n) in sizes.iter().enumerate() {
            let x = values(i as u64 + 1, n);
            let t = Tensor::from_slice(&x, n, &dev).unwrap();
            let t = match i % 3 {
                0 => t.to_dtype(DType::F32).unwrap(),
                1 => t,
                _ => t.to_dtype(DType::BF16).unwrap(),
            };
            let x = t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            exact += x.iter().map(|v| v * v).sum::<f64>();
            tensors.push(t);
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let got = sum_of_squares_on_device(&refs).unwrap().unwrap().to_scalar::<f64>().unwrap();
        assert!((got - exact).abs() <= 1e-12 * exact, "{got} vs {exact}");
        assert!(sum_of_squares_on_device(&[]).unwrap().is_none());
    }

    /// The CUDA kernel, run on the CPU (`cuda_on_host`) with the launch's blocks, writes the CPU
    /// mirror's partials bit for bit: one block, a partial last run, threads that loop (more than
    /// 256 blocks' worth), f32 and f64.
    #[test]
    fn the_cuda_kernel_on_the_host_writes_the_cpu_partials() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::LaunchShape;

        for n in [1usize, 4097, THREADS * ELEMENTS_PER_THREAD * MAX_BLOCKS + 4099] {
            let blocks = blocks_for(n);
            let shape = LaunchShape { blocks: blocks as u32, threads: THREADS as u32 };
            let mut x = values(n as u64, n);
            let want: Vec<u64> = (0..blocks).map(|b| block_partial(&x, b, blocks).to_bits()).collect();
            let mut out = vec![0f64; blocks];
            launch(
                "sum_of_squares_partials_f64",
                shape,
                &mut [Arg::F64s(&mut out), Arg::F64s(&mut x), Arg::U64(n as u64)],
            )
            .unwrap();
            assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "f64, {n} elements");
            let mut x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let want: Vec<u64> = (0..blocks).map(|b| block_partial(&x, b, blocks).to_bits()).collect();
            let mut out = vec![0f64; blocks];
            launch(
                "sum_of_squares_partials_f32",
                shape,
                &mut [Arg::F64s(&mut out), Arg::F32s(&mut x), Arg::U64(n as u64)],
            )
            .unwrap();
            assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "f32, {n} elements");
        }
    }

    #[test]
    fn a_block_adds_in_the_cuda_kernels_order() {
        // 3 blocks over 1000 elements: block 1 reads 256..512 only (stride 768 passes the end).
        let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let mut sums = [0f64; THREADS];
        for (t, sum) in sums.iter_mut().enumerate() {
            let v = f64::from(x[256 + t]);
            *sum = v * v;
        }
        let mut s = THREADS / 2;
        while s > 0 {
            for t in 0..s {
                sums[t] += sums[t + s];
            }
            s /= 2;
        }
        assert_eq!(block_partial(&x, 1, 3).to_bits(), sums[0].to_bits());
        // Block 0 of 3 reads 0..256 and 768..1000: element 768 + t joins thread t's sum.
        let t5 = f64::from(x[5]) * f64::from(x[5]) + f64::from(x[773]) * f64::from(x[773]);
        let only_thread_5: Vec<f32> =
            x.iter().enumerate().map(|(i, &v)| if i == 5 || i == 773 { v } else { 0.0 }).collect();
        assert_eq!(block_partial(&only_thread_5, 0, 3), t5);
    }
}
