//! AdamW's update of an `f32` parameter off the CPU kernels (a GPU, or the CPU under
//! `RANKSTACK_CPU=candle`), in two in-place passes:
//!
//! ```text
//! pass 1 (moments):    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
//! pass 2 (parameter):  θ ← (1 − lr·λ) θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```
//!
//! The tensor formulation of the update is sixteen full-size operations per parameter (sixteen
//! kernel launches on a GPU, each writing a new tensor): about 800 launches and 4 GiB written per
//! step of `homefeed-bench`. Here the moments of a parameter are one `[2, n]` tensor (`m` then
//! `v`) on its device, and a step is two launches that write `m`, `v` and `θ` once each: one
//! in-place op can write only one tensor, so the moments and the parameter are two ops, the second
//! reading the moments the first wrote. Each element goes through the same operations in the same
//! order as the tensor formulation and the CPU's fused kernel ([`crate::cpu::adamw`]): the three
//! give the same bits. On CUDA both passes are `cuda/adamw.cu` (explicitly rounded IEEE
//! operations, no fused multiply-adds), on the CPU the CPU kernel's arithmetic element by element.
//!
//! A row-sparse step ([`OverwriteRows`]: the rows of an embedding table a batch touched) updates
//! only those rows of the parameter and of its moments; the gradient holds them in order.
//!
//! ```
//! # use candle_core::{Device, Tensor, Var};
//! use rankstack_kernels::cpu::adamw::AdamWCoefficients;
//! use rankstack_kernels::device_adamw::AdamWMoments;
//! let theta = Var::from_tensor(&Tensor::new(&[[1f32, -2.0]], &Device::Cpu)?)?;
//! let moments = AdamWMoments::zeros(theta.as_tensor())?;
//! let k = AdamWCoefficients::new(0.9, 0.999, 1e-8, 0.0, 0.1, 1);
//! moments.step(theta.as_tensor(), &Tensor::new(&[[0.5f32, -0.5]], &Device::Cpu)?, None, k)?;
//! // The first step moves every element by lr against the gradient's sign.
//! let after = theta.as_tensor().to_vec2::<f32>()?;
//! assert!((after[0][0] - 0.9).abs() < 1e-6 && (after[0][1] + 1.9).abs() < 1e-6);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::cpu::adamw::AdamWCoefficients;
use crate::float::{contiguous_mut, contiguous_storage};
use crate::overwrite_rows::OverwriteRows;

/// The first and second moments of one `f32` parameter, as one `[2, n]` tensor on the parameter's
/// device, and the parameter's shape.
#[derive(Debug, Clone)]
pub struct AdamWMoments {
    /// `[2, n]` f32: row 0 is `m`, row 1 is `v`.
    mv: Tensor,
    /// The parameter's shape (of [`Self::m`] and [`Self::v`]).
    dims: Vec<usize>,
}

impl AdamWMoments {
    /// Zero moments for the `f32` parameter `param`, on its device.
    pub fn zeros(param: &Tensor) -> Result<Self> {
        if param.dtype() != DType::F32 {
            candle_core::bail!("AdamW moments: {:?} parameter (f32 only)", param.dtype());
        }
        let mv = Tensor::zeros((2, param.elem_count()), DType::F32, param.device())?;
        Ok(Self { mv, dims: param.dims().to_vec() })
    }

    /// Moments holding copies of `m` and `v` (of one shape, `f32`, on one device): a restored
    /// checkpoint's.
    pub fn from_moments(m: &Tensor, v: &Tensor) -> Result<Self> {
        if m.dims() != v.dims() || m.dtype() != DType::F32 || v.dtype() != DType::F32 {
            candle_core::bail!(
                "AdamW moments: m {:?} {:?} and v {:?} {:?} (one shape, f32)",
                m.dims(),
                m.dtype(),
                v.dims(),
                v.dtype()
            );
        }
        let n = m.elem_count();
        let mv = Tensor::stack(&[m.reshape(n)?, v.reshape(n)?], 0)?;
        Ok(Self { mv, dims: m.dims().to_vec() })
    }

    /// The first moment `m`, in the parameter's shape: a view of the moments (a later step
    /// updates it in place).
    pub fn m(&self) -> Result<Tensor> {
        self.mv.get(0)?.reshape(self.dims.as_slice())
    }

    /// The second moment `v`, in the parameter's shape: a view as [`Self::m`].
    pub fn v(&self) -> Result<Tensor> {
        self.mv.get(1)?.reshape(self.dims.as_slice())
    }

    /// One AdamW step of the parameter `theta` with gradient `grad` and the step's constants `k`,
    /// in place (the moments first, then `theta`). With `rows`, `grad` `[rows, width]` holds
    /// those rows of `theta` `[n, width]` in order and only they change. `theta` must be the `f32`
    /// contiguous parameter of these moments, on their device; a shape that does not fit is an
    /// error, and nothing is written.
    pub fn step(
        &self,
        theta: &Tensor,
        grad: &Tensor,
        rows: Option<&OverwriteRows>,
        k: AdamWCoefficients,
    ) -> Result<()> {
        let n = self.mv.dim(1)?;
        if theta.dims() != self.dims.as_slice() || theta.dtype() != DType::F32 || !theta.is_contiguous() {
            candle_core::bail!(
                "AdamW step: parameter {:?} {:?} for moments of {:?} (f32, contiguous)",
                theta.dims(),
                theta.dtype(),
                self.dims
            );
        }
        if !theta.device().same_device(self.mv.device()) || !grad.device().same_device(self.mv.device()) {
            candle_core::bail!("AdamW step: the parameter, its gradient and its moments are on different devices");
        }
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        match rows {
            None => {
                if grad.elem_count() != n {
                    candle_core::bail!("AdamW step: gradient {:?} for a parameter {:?}", grad.dims(), self.dims);
                }
                if n == 0 {
                    return Ok(());
                }
                let pass = Pass { k, width: 1 };
                self.mv.inplace_op2(&grad, &Moments(pass))?;
                theta.inplace_op2(&self.mv, &Parameter(pass))
            }
            Some(rows) => {
                let table_rows = self.dims.first().copied().unwrap_or(1);
                let width = n.checked_div(table_rows).unwrap_or(0);
                let count = rows.index().dim(0)?;
                if rows.matrix_rows() != table_rows || grad.elem_count() != count * width {
                    candle_core::bail!(
                        "AdamW step: a gradient {:?} of {count} rows of a {}-row matrix, for a parameter {:?}",
                        grad.dims(),
                        rows.matrix_rows(),
                        self.dims
                    );
                }
                if count * width == 0 {
                    return Ok(());
                }
                let pass = Pass { k, width };
                self.mv.inplace_op3(&grad, rows.index(), &Moments(pass))?;
                theta.inplace_op3(&self.mv, rows.index(), &Parameter(pass))
            }
        }
    }
}

/// What both passes need: the step's constants and, for a row-sparse step, the row width.
#[derive(Debug, Clone, Copy)]
struct Pass {
    k: AdamWCoefficients,
    width: usize,
}

impl Pass {
    /// The scalar arguments of the moments kernels (`adamw_moments_f32` and its `_rows` twin),
    /// after `mv`, `grad` and `n`, in their order: the CUDA launch and the kernels' host test
    /// take them from here.
    #[cfg(any(test, feature = "cuda"))]
    fn moments_scalars(&self) -> [f32; 5] {
        let k = self.k;
        [k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2, k.grad_scale]
    }

    /// The scalar arguments of the parameter kernels, after `theta`, `mv` and `n`, in their order.
    #[cfg(any(test, feature = "cuda"))]
    fn parameter_scalars(&self) -> [f32; 5] {
        let k = self.k;
        [k.inv_bc1, k.inv_bc2, k.eps, k.decay, k.lr]
    }
}

/// The kernel of a pass (`adamw_moments` or `adamw_parameter`), or its `_rows` twin for a
/// row-sparse step.
#[cfg(any(test, feature = "cuda"))]
fn kernel_name(pass: &str, by_rows: bool) -> String {
    if by_rows {
        format!("{pass}_rows_f32")
    } else {
        format!("{pass}_f32")
    }
}

/// Pass 1 in place on the moments `[2, n]`: with the gradient (`InplaceOp2`), or the gradient of
/// some rows and the rows (`InplaceOp3`). Both passes run only from [`AdamWMoments::step`], which
/// has checked every size and row.
struct Moments(Pass);

/// Pass 2 in place on the parameter: with the moments (`InplaceOp2`), or the moments and the
/// rows (`InplaceOp3`).
struct Parameter(Pass);

/// The flat index of every element a row-sparse step updates, in gradient order.
fn row_elements(rows: &[u32], width: usize) -> impl Iterator<Item = usize> + '_ {
    rows.iter().flat_map(move |&r| r as usize * width..(r as usize + 1) * width)
}

const CPU_CHUNK: usize = 1 << 16;

impl Moments {
    fn cpu(&self, mv: &mut [f32], grad: &[f32], rows: Option<&[u32]>) {
        let (m, v) = mv.split_at_mut(mv.len() / 2);
        let k = self.0.k;
        match rows {
            None => {
                m.par_chunks_mut(CPU_CHUNK).zip(v.par_chunks_mut(CPU_CHUNK)).zip(grad.par_chunks(CPU_CHUNK)).for_each(
                    |((m, v), g)| {
                        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                            (*m, *v) = k.moments(*m, *v, g);
                        }
                    },
                );
            }
            Some(rows) => {
                for (i, &g) in row_elements(rows, self.0.width).zip(grad) {
                    (m[i], v[i]) = k.moments(m[i], v[i], g);
                }
            }
        }
    }
}

impl Parameter {
    fn cpu(&self, theta: &mut [f32], mv: &[f32], rows: Option<&[u32]>) {
        let (m, v) = mv.split_at(theta.len());
        let k = self.0.k;
        match rows {
            None => theta.par_chunks_mut(CPU_CHUNK).zip(m.par_chunks(CPU_CHUNK)).zip(v.par_chunks(CPU_CHUNK)).for_each(
                |((t, m), v)| {
                    for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                        *t = k.parameter(*t, m, v);
                    }
                },
            ),
            Some(rows) => {
                for i in row_elements(rows, self.0.width) {
                    theta[i] = k.parameter(theta[i], m[i], v[i]);
                }
            }
        }
    }
}

/// The `f32` elements of a contiguous CPU storage updated in place.
fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match s {
        CpuStorage::F32(values) => contiguous_mut(values, l, what),
        other => candle_core::bail!("{what}: {:?} (f32 only)", other.dtype()),
    }
}

/// The in-place ops of one pass: `InplaceOp2` (the whole tensor: the updated tensor and its
/// source) and `InplaceOp3` (the rows: also their ids), on the CPU through the pass's `cpu`, on
/// CUDA through `cuda::$cuda`. `$dst` and `$src` name the two tensors in errors.
macro_rules! inplace_pass {
    ($pass:ident, $name:literal, $rows_name:literal, $dst:literal, $src:literal, $cuda:ident) => {
        impl InplaceOp2 for $pass {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
                self.cpu(f32s_mut(s1, l1, $dst)?, contiguous_storage(s2, l2, $src)?, None);
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
                cuda::$cuda(self.0, s1, l1, s2, l2, None)
            }
        }

        impl InplaceOp3 for $pass {
            fn name(&self) -> &'static str {
                $rows_name
            }

            fn cpu_fwd(
                &self,
                s1: &mut CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> Result<()> {
                let rows = contiguous_storage(s3, l3, "AdamW step: rows")?;
                self.cpu(f32s_mut(s1, l1, $dst)?, contiguous_storage(s2, l2, $src)?, Some(rows));
                Ok(())
            }

            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                s1: &mut candle_core::CudaStorage,
                l1: &Layout,
                s2: &candle_core::CudaStorage,
                l2: &Layout,
                s3: &candle_core::CudaStorage,
                l3: &Layout,
            ) -> Result<()> {
                cuda::$cuda(self.0, s1, l1, s2, l2, Some((s3, l3)))
            }
        }
    };
}

inplace_pass!(Moments, "adamw-moments", "adamw-moments-rows", "AdamW moments", "AdamW gradient", moments);
inplace_pass!(Parameter, "adamw-parameter", "adamw-parameter-rows", "AdamW parameter", "AdamW moments", parameter);

/// The launches of `cuda/adamw.cu`. Each pass is one kernel over the whole parameter or, with
/// rows, its `_rows` twin, which takes the same arguments followed by the rows, their element
/// count and the row width.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchArgs, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result};

    use super::{kernel_name, Pass};
    use crate::launch_shape::grid_stride;

    /// `cuda/adamw.cu`, compiled by the build script.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    const MODULE: &str = "rankstack_adamw";

    fn contiguous_start(l: &Layout, what: &str) -> Result<usize> {
        match l.contiguous_offsets() {
            Some((start, _)) => Ok(start),
            None => candle_core::bail!("AdamW step: {what} must be contiguous"),
        }
    }

    /// The rows of a row-sparse step on the device, the elements they cover and their width.
    struct Rows<'a> {
        ids: CudaView<'a, u32>,
        count: u64,
        width: u64,
    }

    impl<'a> Rows<'a> {
        fn new(rows: Option<(&'a CudaStorage, &Layout)>, width: usize) -> Result<Option<Self>> {
            let Some((rows, layout)) = rows else { return Ok(None) };
            let ids = rows.as_cuda_slice::<u32>()?.slice(contiguous_start(layout, "the rows")?..);
            let count = (layout.shape().elem_count() * width) as u64;
            Ok(Some(Self { ids, count, width: width as u64 }))
        }

        /// The `_rows` kernel's extra arguments.
        fn push<'b>(&'b self, launch: &mut LaunchArgs<'b>) {
            launch.arg(&self.ids).arg(&self.count).arg(&self.width);
        }
    }

    /// Pass 1: `mv` `[2, n]` in place from the gradient (`grad`, of `n` elements or of the rows).
    pub(super) fn moments(
        pass: Pass,
        mv: &mut CudaStorage,
        mv_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
        rows: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        let n = (mv_layout.shape().elem_count() / 2) as u64;
        let count = grad_layout.shape().elem_count();
        let device = mv.device().clone();
        let rows = Rows::new(rows, pass.width)?;
        let grad = grad.as_cuda_slice::<f32>()?.slice(contiguous_start(grad_layout, "the gradient")?..);
        let mv_start = contiguous_start(mv_layout, "the moments")?;
        let mut mv = mv.as_cuda_slice_mut::<f32>()?.slice_mut(mv_start..);
        let scalars = pass.moments_scalars();
        let func = device.get_or_load_custom_func(&kernel_name("adamw_moments", rows.is_some()), MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&mut mv).arg(&grad).arg(&n);
        for scalar in &scalars {
            launch.arg(scalar);
        }
        if let Some(rows) = &rows {
            rows.push(&mut launch);
        }
        // SAFETY: the arguments match the kernel's signature; `mv` holds 2n elements and `grad`
        // n, or `count` for the rows, which are distinct and below the parameter's `n / width`
        // rows (checked by `OverwriteRows::new` and `AdamWMoments::step`), so each thread writes
        // only its own elements inside `mv`.
        unsafe { launch.launch(grid_stride(count).config()) }.w()?;
        Ok(())
    }

    /// Pass 2: the parameter `theta` in place from the moments `mv` `[2, n]`.
    pub(super) fn parameter(
        pass: Pass,
        theta: &mut CudaStorage,
        theta_layout: &Layout,
        mv: &CudaStorage,
        mv_layout: &Layout,
        rows: Option<(&CudaStorage, &Layout)>,
    ) -> Result<()> {
        let n = theta_layout.shape().elem_count();
        let device = theta.device().clone();
        let rows = Rows::new(rows, pass.width)?;
        let count = rows.as_ref().map_or(n, |r| r.count as usize);
        let mv = mv.as_cuda_slice::<f32>()?.slice(contiguous_start(mv_layout, "the moments")?..);
        let theta_start = contiguous_start(theta_layout, "the parameter")?;
        let mut theta = theta.as_cuda_slice_mut::<f32>()?.slice_mut(theta_start..);
        let scalars = pass.parameter_scalars();
        let n64 = n as u64;
        let func = device.get_or_load_custom_func(&kernel_name("adamw_parameter", rows.is_some()), MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&mut theta).arg(&mv).arg(&n64);
        for scalar in &scalars {
            launch.arg(scalar);
        }
        if let Some(rows) = &rows {
            rows.push(&mut launch);
        }
        // SAFETY: the arguments match the kernel's signature; `theta` holds n elements and `mv`
        // 2n (`AdamWMoments::step` checks the parameter's shape against its moments'), and the
        // rows are distinct and inside the parameter, so each thread writes only its own element.
        unsafe { launch.launch(grid_stride(count).config()) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::cpu::adamw::adamw_update_in_place;
    use crate::oracle::values;

    fn f32s_of(seed: u64, n: usize) -> Vec<f32> {
        values(seed, n).iter().map(|&x| x as f32).collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    /// Four steps (dense, rows, dense, rows) of the two passes against the CPU's fused kernel,
    /// which equals the tensor formulation bit for bit (tested in the top crate): parameter and
    /// both moments the same bits after every step.
    #[test]
    fn two_passes_give_the_fused_kernels_bits_dense_and_by_rows() {
        let (rows_n, width) = (9, 70_000 / 9 + 1); // more than one parallel chunk
        let n = rows_n * width;
        let init = f32s_of(1, n);
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::from_slice(&init, (rows_n, width), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::from_slice(&init, (rows_n, width), &dev).unwrap()).unwrap();
        let moments = AdamWMoments::zeros(a.as_tensor()).unwrap();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for t in 1..=4 {
            let k = AdamWCoefficients::new(0.9, 0.999, 1e-8, 0.01, 1e-2 / t as f64, t);
            let rows: Option<Vec<u32>> = (t % 2 == 0).then(|| vec![7, 2, 5]);
            let count = rows.as_ref().map_or(n, |r| r.len() * width);
            let g = f32s_of(10 + t as u64, count);
            let dims = rows.as_ref().map_or((rows_n, width), |r| (r.len(), width));
            let grad = Tensor::from_slice(&g, dims, &dev).unwrap();
            let overwrite = rows.as_ref().map(|r| OverwriteRows::new(r, rows_n, &dev, "test").unwrap());
            moments.step(a.as_tensor(), &grad, overwrite.as_ref(), k).unwrap();
            adamw_update_in_place(b.as_tensor(), &grad, &mut m, &mut v, rows.as_deref().map(|r| (r, width)), k)
                .unwrap();
            assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "step {t}: parameter");
            assert_eq!(bits(&moments.m().unwrap()), m.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "step {t}: m");
            assert_eq!(bits(&moments.v().unwrap()), v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "step {t}: v");
        }
        assert_eq!(moments.m().unwrap().dims(), [rows_n, width]);
    }

    /// The `_rows` kernels' last arguments: the rows, their element count and the row width.
    fn rows_args(rows: &mut Option<Vec<u32>>, count: usize, width: usize) -> Vec<crate::cuda_on_host::Arg<'_>> {
        use crate::cuda_on_host::Arg;
        rows.as_mut().map_or(Vec::new(), |r| vec![Arg::U32s(r), Arg::U64(count as u64), Arg::U64(width as u64)])
    }

    /// Both passes' CUDA kernels, run on the CPU (`cuda_on_host`) with the CUDA launch's shape and
    /// scalars, write the CPU passes' bits: a dense and a row-sparse step with a clipping factor,
    /// with the launch's grid and with a grid of three blocks whose threads loop.
    #[test]
    fn the_cuda_kernels_on_the_host_write_the_cpu_passes_bits() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::{grid_stride, LaunchShape};

        let (rows_n, width) = (40, 97);
        let n = rows_n * width;
        let theta0 = f32s_of(1, n);
        let mut mv0 = f32s_of(2, n);
        mv0.extend(f32s_of(3, n).iter().map(|v| v.abs()));
        for (t, rows) in [(1, None), (2, Some(vec![31u32, 0, 17, 39, 5]))] {
            let k = AdamWCoefficients::new(0.9, 0.999, 1e-8, 0.01, 1e-3, t).with_gradient_scale(0.7);
            let pass = Pass { k, width: if rows.is_some() { width } else { 1 } };
            let count = rows.as_ref().map_or(n, |r| r.len() * width);
            let grad = f32s_of(10 + t as u64, count);
            let (mut mv_cpu, mut theta_cpu) = (mv0.clone(), theta0.clone());
            Moments(pass).cpu(&mut mv_cpu, &grad, rows.as_deref());
            Parameter(pass).cpu(&mut theta_cpu, &mv_cpu, rows.as_deref());
            for shape in [grid_stride(count), LaunchShape { blocks: 3, threads: 256 }] {
                let (mut mv, mut theta, mut g) = (mv0.clone(), theta0.clone(), grad.clone());
                let (mut rows_a, mut rows_b) = (rows.clone(), rows.clone());
                let mut args = vec![Arg::F32s(&mut mv), Arg::F32s(&mut g), Arg::U64(n as u64)];
                args.extend(pass.moments_scalars().map(Arg::F32));
                args.extend(rows_args(&mut rows_a, count, width));
                launch(&kernel_name("adamw_moments", rows.is_some()), shape, &mut args).unwrap();
                let mut args = vec![Arg::F32s(&mut theta), Arg::F32s(&mut mv), Arg::U64(n as u64)];
                args.extend(pass.parameter_scalars().map(Arg::F32));
                args.extend(rows_args(&mut rows_b, count, width));
                launch(&kernel_name("adamw_parameter", rows.is_some()), shape, &mut args).unwrap();
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&mv), bits(&mv_cpu), "step {t}, {shape:?}: moments");
                assert_eq!(bits(&theta), bits(&theta_cpu), "step {t}, {shape:?}: parameter");
                assert_ne!(bits(&theta), bits(&theta0), "step {t}: the step moved the parameter");
            }
        }
    }

    #[test]
    fn restored_moments_are_copies_in_the_parameters_shape() {
        let dev = Device::Cpu;
        let m = Tensor::from_slice(&f32s_of(1, 6), (2, 3), &dev).unwrap();
        let v = Tensor::from_slice(&f32s_of(2, 6), (2, 3), &dev).unwrap().abs().unwrap();
        let moments = AdamWMoments::from_moments(&m, &v).unwrap();
        assert_eq!(bits(&moments.m().unwrap()), bits(&m));
        assert_eq!(bits(&moments.v().unwrap()), bits(&v));
        let theta = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).unwrap();
        let k = AdamWCoefficients::new(0.9, 0.999, 1e-8, 0.0, 0.1, 2);
        moments.step(theta.as_tensor(), &Tensor::ones((2, 3), DType::F32, &dev).unwrap(), None, k).unwrap();
        assert_ne!(bits(&moments.m().unwrap()), bits(&m), "the step moved the moments");
        assert_eq!(bits(&m), bits(&Tensor::from_slice(&f32s_of(1, 6), (2, 3), &dev).unwrap()), "not their source");
        let err = AdamWMoments::from_moments(&m, &v.reshape(6).unwrap()).unwrap_err().to_string();
        assert!(err.contains("one shape"), "{err}");
    }

    #[test]
    fn a_gradient_or_parameter_that_does_not_fit_is_an_error_and_writes_nothing() {
        let dev = Device::Cpu;
        let theta = Var::from_tensor(&Tensor::from_slice(&f32s_of(1, 12), (4, 3), &dev).unwrap()).unwrap();
        let before = bits(theta.as_tensor());
        let moments = AdamWMoments::zeros(theta.as_tensor()).unwrap();
        let k = AdamWCoefficients::new(0.9, 0.999, 1e-8, 0.01, 0.1, 1);
        let g = |rows: usize| Tensor::ones((rows, 3), DType::F32, &dev).unwrap();
        let err = moments.step(theta.as_tensor(), &g(3), None, k).unwrap_err().to_string();
        assert!(err.contains("gradient [3, 3] for a parameter [4, 3]"), "{err}");
        let rows = OverwriteRows::new(&[0, 2], 4, &dev, "test").unwrap();
        let err = moments.step(theta.as_tensor(), &g(3), Some(&rows), k).unwrap_err().to_string();
        assert!(err.contains("of 2 rows of a 4-row matrix"), "{err}");
        let other_rows = OverwriteRows::new(&[0], 5, &dev, "test").unwrap();
        assert!(moments.step(theta.as_tensor(), &g(1), Some(&other_rows), k).is_err());
        let other = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let err = moments.step(&other, &g(4), None, k).unwrap_err().to_string();
        assert!(err.contains("parameter [3, 4] F32 for moments of [4, 3]"), "{err}");
        assert!(AdamWMoments::zeros(&other.to_dtype(DType::F64).unwrap()).is_err());
        assert_eq!(bits(theta.as_tensor()), before);
        assert_eq!(bits(&moments.m().unwrap()), vec![0; 12]);
    }
}
