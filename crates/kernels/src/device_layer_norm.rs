//! LayerNorm of rows off the CPU kernels (a GPU, or the CPU under `RANKSTACK_CPU=candle`), for
//! scoring, with an optional residual input:
//!
//! ```text
//! s = x (+ a),   y = (s − mean(s)) / √(var(s) + eps) · w + b      over the last dimension
//! ```
//!
//! Without a graph the layer's composed LayerNorm writes the centred rows and then candle's fused
//! normalisation of them (two full-size tensors), and a post-norm residual block writes the sum
//! `x + a` first (three). Here it is one launch that writes `y` alone: a block per row sums the row
//! (the residual sum recomputed on the fly), centres it by that mean and then by the mean of the
//! centred values (the f32 mean's rounding, as the composed version's second centring does), sums
//! the centred squares (so a row with a large mean keeps its digits) and writes the normalised row. Values are the
//! composed LayerNorm's to f32 rounding. On CUDA `cuda/layer_norm.cu`; on the CPU the same blocks'
//! arithmetic in the same order (`normalize_row`, the same bits; tested on the host by
//! `cuda_on_host`).
//!
//! It computes no gradient: [`layer_norm_on_device`] returns `None` where an input takes part in a
//! graph, where the dtype is not `f32`, or where `w` or `b` is missing, and the caller composes.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::device_layer_norm::layer_norm_on_device;
//! let x = Tensor::new(&[[1f32, 3.0]], &Device::Cpu)?;
//! let (w, b) = (Tensor::new(&[1f32, 1.0], &Device::Cpu)?, Tensor::new(&[0f32, 10.0], &Device::Cpu)?);
//! let y = layer_norm_on_device(&x, None, &w, &b, 1e-5)?.expect("f32, no graph");
//! let y = y.to_vec2::<f32>()?;
//! assert!((y[0][0] + 1.0).abs() < 1e-4 && (y[0][1] - 11.0).abs() < 1e-4);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::float::contiguous_storage;

/// The CUDA blocks' threads (a power of two, its shared array's size at most).
const MAX_THREADS: usize = 256;

/// `y = LayerNorm(x (+ a))` with weight `w` and bias `b` over the last dimension of `x`, on its
/// device; `None` where it does not apply (see the module docs). Shapes that do not fit are
/// errors naming them.
pub fn layer_norm_on_device(
    x: &Tensor,
    a: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let width = x.dims().last().copied().unwrap_or(0);
    if a.is_some_and(|a| a.dims() != x.dims()) || w.dims() != [width] || b.dims() != [width] {
        candle_core::bail!(
            "layer norm: x {:?}, residual {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            a.map(Tensor::dims),
            w.dims(),
            b.dims()
        );
    }
    let tensors: Vec<&Tensor> = [Some(x), a, Some(w), Some(b)].into_iter().flatten().collect();
    if tensors.iter().any(|t| t.track_op() || t.dtype() != DType::F32) || x.rank() == 0 || width > u32::MAX as usize {
        return Ok(None);
    }
    let rows = x.elem_count() / width.max(1);
    if rows * width == 0 {
        return Ok(Some(x.zeros_like()?));
    }
    let x2 = x.contiguous()?.reshape((rows, width))?;
    let residual = a.map(|a| a.contiguous()?.reshape((rows, width))).transpose()?;
    let op = LayerNormOp { rows: LayerNormRows { width, eps: eps as f32 }, residual };
    x2.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)?.reshape(x.shape()).map(Some)
}

/// The normalisation's constants.
#[derive(Clone, Copy)]
struct LayerNormRows {
    width: usize,
    eps: f32,
}

impl LayerNormRows {
    /// The CUDA block's threads for this width: the next power of two, 32 to 256.
    fn threads(&self) -> usize {
        self.width.next_power_of_two().clamp(32, MAX_THREADS)
    }

    /// Row `x` (+ `a`) normalised into `y`: the CUDA block's arithmetic, thread sums and pairwise
    /// block sum included.
    fn normalize_row(&self, x: &[f32], a: Option<&[f32]>, w: &[f32], b: &[f32], y: &mut [f32]) {
        let threads = self.threads();
        let n = self.width as f32;
        let input = |c: usize| match a {
            Some(a) => x[c] + a[c],
            None => x[c],
        };
        let block_sum = |term: &dyn Fn(usize) -> f32| -> f32 {
            let mut sums = [0f32; MAX_THREADS];
            for (t, sum) in sums.iter_mut().enumerate().take(threads) {
                *sum = (t..self.width).step_by(threads).fold(0f32, |acc, c| acc + term(c));
            }
            crate::block_sum::pairwise_block_sum(&mut sums[..threads])
        };
        let mean = block_sum(&input) / n;
        let shift = block_sum(&|c| input(c) - mean) / n;
        let centred = |c: usize| input(c) - mean - shift;
        let sigma = (block_sum(&|c| centred(c) * centred(c)) / n + self.eps).sqrt();
        for (c, out) in y.iter_mut().enumerate() {
            *out = centred(c) / sigma * w[c] + b[c];
        }
    }
}

/// The op: `x` `[rows, width]`, `w` and `b` in, `y` out; the residual `a`, if any, beside them
/// (an op takes at most three inputs).
struct LayerNormOp {
    rows: LayerNormRows,
    /// `[rows, width]`, contiguous.
    residual: Option<Tensor>,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        const WHAT: &str = "layer norm";
        let d = self.rows.width;
        let x: &[f32] = contiguous_storage(s1, l1, WHAT)?;
        let (w, b): (&[f32], &[f32]) = (contiguous_storage(s2, l2, WHAT)?, contiguous_storage(s3, l3, WHAT)?);
        let residual = self.residual.as_ref().map(Tensor::storage_and_layout);
        let a: Option<&[f32]> = match &residual {
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(storage) => Some(contiguous_storage(storage, layout, WHAT)?),
                _ => candle_core::bail!("{WHAT}: the residual is not on the CPU"),
            },
            None => None,
        };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(r, (y, x))| {
            self.rows.normalize_row(x, a.map(|a| &a[r * d..(r + 1) * d]), w, b, y);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;

        let d = self.rows.width;
        let rows = l1.shape().elem_count() / d;
        let device = s1.device().clone();
        let x = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let w = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let b = s3.as_cuda_slice::<f32>()?.slice(l3.start_offset()..);
        let residual = self.residual.as_ref().map(Tensor::storage_and_layout);
        let a = match &residual {
            Some((storage, layout)) => match &**storage {
                Storage::Cuda(storage) => Some(storage.as_cuda_slice::<f32>()?.slice(layout.start_offset()..)),
                _ => candle_core::bail!("layer norm: the residual is not on the GPU"),
            },
            None => None,
        };
        let y = device.alloc_zeros::<f32>(rows * d)?;
        let width = d as u32;
        let shape = crate::launch_shape::LaunchShape { blocks: rows as u32, threads: self.rows.threads() as u32 };
        let kernel = if a.is_some() { "residual_layer_norm_f32" } else { "layer_norm_f32" };
        let func = device.get_or_load_custom_func(kernel, "rankstack_layer_norm", PTX)?;
        let mut launch = func.builder();
        launch.arg(&x);
        if let Some(a) = &a {
            launch.arg(a);
        }
        launch.arg(&w).arg(&b).arg(&width).arg(&self.rows.eps).arg(&y);
        // SAFETY: the arguments match the kernel's signature (the residual only for its residual
        // twin); `x`, `a` and `y` hold `rows × width` elements (contiguous, shapes checked by
        // `layer_norm_on_device`), `w` and `b` `width` each, and block `r` reads and writes row
        // `r` alone; the block's threads are a power of two of at most 256, the kernel's shared
        // array.
        unsafe { launch.launch(shape.config()) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(y, device), l1.shape().clone()))
    }
}

/// `cuda/layer_norm.cu`, compiled by the build script.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layer_norm.ptx"));

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::oracle::values;

    fn f32s(seed: u64, n: usize, offset: f64) -> Vec<f32> {
        values(seed, n).iter().map(|v| (v + offset) as f32).collect()
    }

    /// LayerNorm in f64 from the formula (two-pass variance).
    fn oracle(s: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        let d = w.len();
        s.chunks(d)
            .flat_map(|row| {
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                let sigma = (var + 1e-5).sqrt();
                row.iter().enumerate().map(move |(c, v)| (v - mean) / sigma * w[c] + b[c]).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn equals_the_formula_with_and_without_a_residual_and_keeps_digits_of_a_large_mean() {
        let dev = Device::Cpu;
        for (rows, d, offset) in [(5, 1, 0.0), (7, 96, 0.0), (3, 300, 1e4), (2, 4288, 3.0)] {
            let (x, a) = (f32s(1, rows * d, offset), f32s(2, rows * d, 0.0));
            let (w, b) = (f32s(3, d, 1.0), f32s(4, d, 0.0));
            let t = |v: &[f32], dims: &[usize]| Tensor::from_slice(v, dims, &dev).unwrap();
            let (wt, bt) = (t(&w, &[d]), t(&b, &[d]));
            let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            for residual in [false, true] {
                let s: Vec<f64> = match residual {
                    true => x.iter().zip(&a).map(|(&x, &a)| (x + a) as f64).collect(),
                    false => wide(&x),
                };
                let want = oracle(&s, &wide(&w), &wide(&b));
                let at = t(&a, &[rows, 1, d]);
                let y = layer_norm_on_device(&t(&x, &[rows, 1, d]), residual.then_some(&at), &wt, &bt, 1e-5)
                    .unwrap()
                    .unwrap();
                assert_eq!(y.dims(), [rows, 1, d]);
                let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
                        "[{rows}, {d}] +{offset} {residual}, {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn does_not_apply_in_a_graph_or_to_other_dtypes_and_checks_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones(4, DType::F32, &dev).unwrap();
        let var = Var::from_tensor(&w).unwrap();
        assert!(layer_norm_on_device(&x, None, var.as_tensor(), &w, 1e-5).unwrap().is_none());
        let x64 = x.to_dtype(DType::F64).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        assert!(layer_norm_on_device(&x64, None, &w64, &w64, 1e-5).unwrap().is_none());
        let err = layer_norm_on_device(&x, Some(&x.t().unwrap()), &w, &w, 1e-5).unwrap_err().to_string();
        assert!(err.contains("residual Some([4, 2])"), "{err}");
        assert!(layer_norm_on_device(&x, None, &Tensor::ones(3, DType::F32, &dev).unwrap(), &w, 1e-5).is_err());
    }

    /// The CUDA kernels, run on the CPU (`cuda_on_host`) with the launch's shape, write the CPU
    /// mirror's bits: widths below, at and above a block's threads, with and without a residual.
    #[test]
    fn the_cuda_kernels_on_the_host_write_the_cpu_mirrors_bits() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::LaunchShape;

        for (rows, d) in [(3, 1), (4, 48), (5, 96), (3, 256), (2, 600)] {
            let norm = LayerNormRows { width: d, eps: 1e-5 };
            let (x, a) = (f32s(1, rows * d, 2.0), f32s(2, rows * d, 0.0));
            let (w, b) = (f32s(3, d, 1.0), f32s(4, d, 0.0));
            for residual in [false, true] {
                let mut want = vec![0f32; rows * d];
                for r in 0..rows {
                    let row = |v: &[f32]| v[r * d..(r + 1) * d].to_vec();
                    let a_row = row(&a);
                    norm.normalize_row(&row(&x), residual.then_some(&a_row[..]), &w, &b, &mut want[r * d..(r + 1) * d]);
                }
                let shape = LaunchShape { blocks: rows as u32, threads: norm.threads() as u32 };
                let (mut x, mut a, mut w, mut b, mut y) =
                    (x.clone(), a.clone(), w.clone(), b.clone(), vec![9f32; rows * d]);
                let mut args = vec![Arg::F32s(&mut x)];
                if residual {
                    args.push(Arg::F32s(&mut a));
                }
                args.extend([
                    Arg::F32s(&mut w),
                    Arg::F32s(&mut b),
                    Arg::U32(d as u32),
                    Arg::F32(1e-5),
                    Arg::F32s(&mut y),
                ]);
                let kernel = if residual { "residual_layer_norm_f32" } else { "layer_norm_f32" };
                launch(kernel, shape, &mut args).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "[{rows}, {d}], residual {residual}");
            }
        }
    }
}
