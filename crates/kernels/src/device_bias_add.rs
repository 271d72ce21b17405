//! A linear layer's bias added to its product in place, off the CPU kernels (a GPU, or the CPU
//! under `RANKSTACK_CPU=candle`), for scoring:
//!
//! ```text
//! y[r, c] ← y[r, c] + b[c]
//! ```
//!
//! candle's `broadcast_add` writes the sum as a new tensor, so every biased layer of a forward
//! pass writes its output twice (the product, then the sum) and holds both for a moment. The
//! product is a fresh tensor no one else holds, so the sum can overwrite it: one full-size write
//! and allocation less per layer (at scoring batch 2048 about a fifth of what the GPU's graph
//! writes). The same IEEE additions as `broadcast_add`: the same bits. On CUDA
//! `cuda/bias_add.cu`, on the CPU a loop over rows.
//!
//! In place means outside candle's graph: [`add_bias_in_place`] refuses a product or bias that
//! takes part in one (a gradient would then see the sum where it expects the product).
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::device_bias_add::add_bias_in_place;
//! let y = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?.matmul(&Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu)?)?;
//! add_bias_in_place(&y, &Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?)?;
//! assert_eq!(y.to_vec2::<f32>()?, vec![vec![1.5, 1.0], vec![3.5, 3.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::float::{contiguous_mut, contiguous_storage};

/// `y ← y + b` in place for `y` `[rows, n]` and `b` `[n]` (f32 or f64, one dtype, one device,
/// both contiguous). `y` must be a tensor no one else reads (a product just computed): every
/// view of its storage sees the sum. An error, with nothing written, for a shape, dtype or device
/// that does not fit, and for a `y` or `b` that takes part in a graph.
pub fn add_bias_in_place(y: &Tensor, bias: &Tensor) -> Result<()> {
    bias_in_place(y, bias, false)
}

/// [`add_bias_in_place`] followed by candle's ReLU in the same pass (`max(y, 0)` as candle
/// computes it on each device, so NaN becomes 0): a layer's activated output written once.
pub fn add_bias_relu_in_place(y: &Tensor, bias: &Tensor) -> Result<()> {
    bias_in_place(y, bias, true)
}

fn bias_in_place(y: &Tensor, bias: &Tensor, relu: bool) -> Result<()> {
    let (rows, n) = y.dims2()?;
    if bias.dims() != [n] || bias.dtype() != y.dtype() || !y.is_contiguous() || !bias.is_contiguous() {
        candle_core::bail!(
            "bias add in place: a contiguous bias [{n}] of {:?} for a contiguous product {:?}, got {:?} {:?}",
            y.dtype(),
            y.dims(),
            bias.dims(),
            bias.dtype()
        );
    }
    if !y.device().same_device(bias.device()) {
        candle_core::bail!("bias add in place: the product and the bias are on different devices");
    }
    if y.track_op() || bias.track_op() {
        candle_core::bail!("bias add in place: the product or the bias takes part in a graph (use broadcast_add)");
    }
    if rows * n == 0 {
        return Ok(());
    }
    y.inplace_op2(bias, &BiasAdd { relu })
}

/// The op; `relu`: candle's ReLU after the sum.
struct BiasAdd {
    relu: bool,
}

/// The element types: addition, and candle's CPU ReLU (`v.max(0)`).
trait BiasFloat: Copy + std::ops::Add<Output = Self> + Send + Sync {
    fn relu(self) -> Self;
}

impl BiasFloat for f32 {
    fn relu(self) -> Self {
        self.max(0.0)
    }
}

impl BiasFloat for f64 {
    fn relu(self) -> Self {
        self.max(0.0)
    }
}

fn add_rows<T: BiasFloat>(y: &mut [T], b: &[T], relu: bool) {
    // Blocks of 256 rows per task.
    y.par_chunks_mut(b.len() * 256).for_each(|rows| {
        for row in rows.chunks_exact_mut(b.len()) {
            for (v, &c) in row.iter_mut().zip(b) {
                let s = *v + c;
                *v = if relu { s.relu() } else { s };
            }
        }
    });
}

impl InplaceOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        const WHAT: &str = "bias add in place";
        match s1 {
            CpuStorage::F32(y) => {
                add_rows(contiguous_mut(y, l1, WHAT)?, contiguous_storage::<f32>(s2, l2, WHAT)?, self.relu)
            }
            CpuStorage::F64(y) => {
                add_rows(contiguous_mut(y, l1, WHAT)?, contiguous_storage::<f64>(s2, l2, WHAT)?, self.relu)
            }
            y => candle_core::bail!("{WHAT}: {:?} is not supported (f32, f64)", y.dtype()),
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
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::DType;

        let n = l1.shape().elem_count() as u64;
        let width = l2.shape().elem_count() as u64;
        let device = s1.device().clone();
        let shape = crate::launch_shape::grid_stride(n as usize);
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let func = device.get_or_load_custom_func($kernel, "rankstack_bias_add", PTX)?;
                let b = s2.as_cuda_slice::<$t>()?.slice(l2.start_offset()..);
                let y = s1.as_cuda_slice_mut::<$t>()?;
                let mut y = y.slice_mut(l1.start_offset()..);
                let mut launch = func.builder();
                let relu = u32::from(self.relu);
                launch.arg(&mut y).arg(&b).arg(&n).arg(&width).arg(&relu);
                // SAFETY: the arguments match the kernel's signature; `y` holds `n` elements and
                // `b` `width` (both contiguous, checked by `add_bias_in_place`), and each thread
                // writes only its own elements of `y`.
                unsafe { launch.launch(shape.config()) }.w()?;
            }};
        }
        match s1.dtype() {
            DType::F32 => launch!(f32, "bias_add_f32"),
            DType::F64 => launch!(f64, "bias_add_f64"),
            other => candle_core::bail!("bias add in place: {other:?} is not supported on CUDA (f32, f64)"),
        }
        Ok(())
    }
}

/// `cuda/bias_add.cu`, compiled by the build script.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bias_add.ptx"));

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::oracle::{f64_bits as bits, values};

    #[test]
    fn equals_broadcast_add_bit_for_bit() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            for (rows, n) in [(1, 1), (7, 5), (300, 33), (1000, 257)] {
                let x = Tensor::from_vec(values(1, rows * 8), (rows, 8), &dev).unwrap().to_dtype(dtype).unwrap();
                let w = Tensor::from_vec(values(2, n * 8), (n, 8), &dev).unwrap().to_dtype(dtype).unwrap();
                let b = Tensor::from_vec(values(3, n), n, &dev).unwrap().to_dtype(dtype).unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
                let y = x.matmul(&w.t().unwrap()).unwrap();
                add_bias_in_place(&y, &b).unwrap();
                assert_eq!(bits(&y), bits(&want), "{dtype:?} [{rows}, {n}]");
                let y = x.matmul(&w.t().unwrap()).unwrap();
                add_bias_relu_in_place(&y, &b).unwrap();
                assert_eq!(bits(&y), bits(&want.relu().unwrap()), "{dtype:?} [{rows}, {n}], ReLU");
            }
        }
    }

    #[test]
    fn refuses_graphs_and_shapes_that_do_not_fit_and_writes_nothing() {
        let dev = Device::Cpu;
        let y = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        let b = Tensor::ones(4, DType::F32, &dev).unwrap();
        let err = add_bias_in_place(&y, &Tensor::ones(3, DType::F32, &dev).unwrap()).unwrap_err().to_string();
        assert!(err.contains("bias [4] of F32 for a contiguous product [3, 4], got [3] F32"), "{err}");
        assert!(add_bias_in_place(&y, &b.to_dtype(DType::F64).unwrap()).is_err());
        assert!(add_bias_in_place(&y.t().unwrap(), &Tensor::ones(3, DType::F32, &dev).unwrap()).is_err());
        let var = Var::from_tensor(&b).unwrap();
        let err = add_bias_in_place(&y, var.as_tensor()).unwrap_err().to_string();
        assert!(err.contains("takes part in a graph"), "{err}");
        let product = (var.as_tensor() * 2.0).unwrap().reshape((1, 4)).unwrap();
        assert!(add_bias_in_place(&product, &b).is_err());
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1f32; 4]; 3]);
    }

    /// The CUDA kernel, run on the CPU (`cuda_on_host`) with the launch's shape and with a grid
    /// of three blocks whose threads loop, writes the CPU sums' bits (`broadcast_add`'s), with and
    /// without the ReLU, f32 and f64.
    #[test]
    fn the_cuda_kernel_on_the_host_writes_the_cpu_sums() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::{grid_stride, LaunchShape};

        let (rows, n) = (301, 37);
        let (y, b) = (values(1, rows * n), values(2, n));
        let narrow = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let count = (rows * n) as u64;
        for relu in [false, true] {
            let (mut want, mut want32) = (y.clone(), narrow(&y));
            add_rows(&mut want, &b, relu);
            add_rows(&mut want32, &narrow(&b), relu);
            for shape in [grid_stride(rows * n), LaunchShape { blocks: 3, threads: 256 }] {
                let (mut got, mut bias) = (y.clone(), b.clone());
                let mut args = [
                    Arg::F64s(&mut got),
                    Arg::F64s(&mut bias),
                    Arg::U64(count),
                    Arg::U64(n as u64),
                    Arg::U32(relu.into()),
                ];
                launch("bias_add_f64", shape, &mut args).unwrap();
                assert_eq!(got, want, "f64, {shape:?}, ReLU {relu}");
                let (mut got, mut bias) = (narrow(&y), narrow(&b));
                let mut args = [
                    Arg::F32s(&mut got),
                    Arg::F32s(&mut bias),
                    Arg::U64(count),
                    Arg::U64(n as u64),
                    Arg::U32(relu.into()),
                ];
                launch("bias_add_f32", shape, &mut args).unwrap();
                assert_eq!(got, want32, "f32, {shape:?}, ReLU {relu}");
            }
        }
    }
}
