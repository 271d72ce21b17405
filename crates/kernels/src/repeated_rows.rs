//! Gathering rows that repeat (an embedding lookup), with a backward pass that sums each row's
//! gradients as segments instead of candle's serial `index_add`.
//!
//! ```text
//! gather_repeated_rows(x, r)   y[i] = x[r[i]]
//! backward                     ∂x[k] = Σ_{i : r[i] = k, i ascending} ∂y[i]
//! ```
//!
//! `index_select`'s backward pass is `index_add`, and candle 0.11's CUDA `index_add` runs one thread
//! per column and loops over all indices serially: an embedding lookup of 819 200 positions of
//! width 96 (the item table at batch 8192) is 96 threads doing all of it. Here the positions are
//! sorted by row once on the host (the ids are there already) and each row's gradient is summed
//! over its own positions: on CUDA one block per row (`cuda/segment_sum.cu`), on the CPU one task
//! per range of rows. Within a row the positions are added in ascending order, starting from zero,
//! exactly as `index_add` adds them, so the gradient equals `index_add`'s bit for bit on every
//! device. The forward pass is candle's `index_select`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::auxiliary::on_host;
use crate::index_stage::{IndexStage, Part, StagedIndexes};
use crate::row_gather_op::RowGatherOp;

/// `x[rows]` for a 2-D `x` `[n, d]` and `rows` (each `< n`, repeats allowed): `[rows.len(), d]`,
/// whose gradient with respect to `x` is summed per row as segments (see the module
/// documentation). f32 and f64 on the CPU, f32 on CUDA. The rows and their segments go to the
/// device in one upload ([`RepeatedRows`] shares it with other consumers).
pub fn gather_repeated_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let mut stage = IndexStage::default();
    let gather = RepeatedRows::stage(rows, x.dims2()?.0, &mut stage)?;
    gather.gather(x, &stage.upload(x.device(), "gathered rows and their segments")?)
}

/// [`gather_repeated_rows`] in two steps, so that many gathers share one upload: the rows and
/// their segments staged on the host ([`RepeatedRows::stage`]), then, once the stage is uploaded,
/// the gather ([`RepeatedRows::gather`]).
#[derive(Debug, Clone)]
pub struct RepeatedRows {
    /// `n`, the rows of the matrix gathered from.
    n: usize,
    /// `[m]`: the rows.
    rows: Part,
    /// `[m]`: the positions grouped by row.
    order: Part,
    /// `[n + 1]`: where each row's positions start (one entry per row of the matrix: on a GPU
    /// this part grows with the table).
    starts: Part,
}

impl RepeatedRows {
    /// Stages `rows` (each `< n`) of an `n`-row matrix and their segments; an error for a row
    /// out of range.
    pub fn stage(rows: &[u32], n: usize, stage: &mut IndexStage) -> Result<Self> {
        let segments = Segments::new(rows, n)?;
        Ok(Self { n, rows: stage.push(rows), order: stage.push(&segments.order), starts: stage.push(&segments.starts) })
    }

    /// `x[rows]` with the segmented backward pass, `x` `[n, d]` on the upload's device.
    pub fn gather(&self, x: &Tensor, staged: &StagedIndexes) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        if n != self.n {
            candle_core::bail!("gather_repeated_rows: a matrix of {n} rows for rows of a {}-row matrix", self.n);
        }
        let sum = SegmentSum { order: staged.part(&self.order)?, starts: staged.part(&self.starts)? };
        let op = RowGatherOp {
            name: "repeated-rows-gather",
            index: staged.part(&self.rows)?,
            backward: Box::new(move |grad: &Tensor| grad.contiguous()?.apply_op1_no_bwd(&sum)),
        };
        x.contiguous()?.apply_op1(op)
    }
}

/// The positions of `rows` grouped by row: row `k` owns `order[starts[k]..starts[k + 1]]`,
/// ascending.
struct Segments {
    order: Vec<u32>,
    starts: Vec<u32>,
}

impl Segments {
    fn new(rows: &[u32], n: usize) -> Result<Self> {
        if rows.len() > u32::MAX as usize {
            candle_core::bail!("gather_repeated_rows: {} positions exceed the u32 index range", rows.len());
        }
        // A counting sort: stable, so each row's positions stay ascending.
        let mut starts = vec![0u32; n + 1];
        for &r in rows {
            if r as usize >= n {
                candle_core::bail!("gather_repeated_rows: row {r} is out of range for {n} rows");
            }
            starts[r as usize + 1] += 1;
        }
        for k in 0..n {
            starts[k + 1] += starts[k];
        }
        let mut next = starts.clone();
        let mut order = vec![0u32; rows.len()];
        for (i, &r) in rows.iter().enumerate() {
            order[next[r as usize] as usize] = i as u32;
            next[r as usize] += 1;
        }
        Ok(Self { order, starts })
    }
}

/// `out[k] = Σ_{i ∈ starts[k]..starts[k+1]} src[order[i]]`, in that order, from zero: `[n, d]`
/// from `src` `[positions, d]`.
struct SegmentSum {
    /// `[positions]` u32.
    order: Tensor,
    /// `[n + 1]` u32.
    starts: Tensor,
}

impl SegmentSum {
    fn rows(&self) -> Result<usize> {
        Ok(self.starts.dim(0)? - 1)
    }

    fn check(&self, layout: &Layout) -> Result<(usize, usize)> {
        let (positions, d) = layout.shape().dims2()?;
        if positions != self.order.dim(0)? || !layout.is_contiguous() {
            candle_core::bail!(
                "segment-sum: expected a contiguous [{}, d] gradient, got {:?}",
                self.order.dim(0)?,
                layout.shape()
            );
        }
        Ok((self.rows()?, d))
    }
}

/// The CPU sum, for a float type.
fn segment_sum_cpu<T>(src: &[T], order: &[u32], starts: &[u32], d: usize) -> Vec<T>
where
    T: Copy + Default + std::ops::AddAssign + Send + Sync,
{
    let n = starts.len() - 1;
    let mut out = vec![T::default(); n * d];
    if d == 0 {
        return out;
    }
    out.par_chunks_mut(d).enumerate().for_each(|(k, row)| {
        for &i in &order[starts[k] as usize..starts[k + 1] as usize] {
            let from = &src[i as usize * d..][..d];
            for (o, &v) in row.iter_mut().zip(from) {
                *o += v;
            }
        }
    });
    out
}

impl CustomOp1 for SegmentSum {
    fn name(&self) -> &'static str {
        "segment-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d) = self.check(layout)?;
        let start = layout.start_offset();
        let out = on_host("segment-sum", (&self.order, &self.starts), |order: &[u32], starts: &[u32]| match storage {
            CpuStorage::F32(src) => Ok(CpuStorage::F32(segment_sum_cpu(&src[start..], order, starts, d))),
            CpuStorage::F64(src) => Ok(CpuStorage::F64(segment_sum_cpu(&src[start..], order, starts, d))),
            other => candle_core::bail!("segment-sum: {:?} is not supported (f32, f64)", other.dtype()),
        })?;
        Ok((out, Shape::from((n, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use candle_core::DType;

        use crate::auxiliary::on_gpu;

        let (n, d) = self.check(layout)?;
        if storage.dtype() != DType::F32 {
            candle_core::bail!("segment-sum: {:?} is not supported on CUDA (f32)", storage.dtype());
        }
        let device = storage.device();
        let src = storage.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        let out = device.alloc_zeros::<f32>(n * d)?;
        if n > 0 && d > 0 {
            let func = device.get_or_load_custom_func("segment_sum_rows_f32", "rankstack_segment_sum", PTX)?;
            let config = crate::launch_shape::one_block_per_row(n, d).config();
            let width = d as u32;
            on_gpu("segment-sum", (&self.order, &self.starts), |order: &CudaView<u32>, starts: &CudaView<u32>| {
                let mut launch = func.builder();
                launch.arg(&src).arg(order).arg(starts).arg(&width).arg(&out);
                // SAFETY: the arguments match the kernel's signature; every index read is within
                // `src` (order < positions) and every write within `out` (segment < n, column < d).
                unsafe { launch.launch(config) }.w()
            })?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, device.clone()), Shape::from((n, d))))
    }
}

/// `cuda/segment_sum.cu`, compiled by the build script.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/segment_sum.ptx"));

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    /// A table and a loss whose gradient differs per position, so that the order of the sums
    /// matters in the last bits.
    fn case(dtype: DType) -> (Var, Vec<u32>, Tensor) {
        let (n, d) = (7usize, 5usize);
        let values: Vec<f64> = (0..n * d).map(|i| (i as f64 * 0.37).sin()).collect();
        let table = Var::from_tensor(&Tensor::from_vec(values, (n, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
            .unwrap();
        // Repeats, a row never used (5), and positions of one row far apart.
        let rows = vec![3u32, 0, 3, 6, 1, 3, 0, 2, 4, 3, 6, 6, 0, 3];
        let weights: Vec<f64> = (0..rows.len() * d).map(|i| 1.0 + (i as f64 * 1.7).cos() * 1e3).collect();
        let weights = Tensor::from_vec(weights, (rows.len(), d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        (table, rows, weights)
    }

    #[test]
    fn values_and_gradient_equal_index_select_and_index_add_bit_for_bit() {
        for dtype in [DType::F32, DType::F64] {
            let (table, rows, weights) = case(dtype);
            let ids = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
            let loss = |y: &Tensor| (y * &weights).unwrap().sqr().unwrap().sum_all().unwrap();

            let want = table.as_tensor().index_select(&ids, 0).unwrap();
            let want_grad = loss(&want).backward().unwrap().get(table.as_tensor()).unwrap().clone();
            let got = gather_repeated_rows(table.as_tensor(), &rows).unwrap();
            let got_grad = loss(&got).backward().unwrap().get(table.as_tensor()).unwrap().clone();

            let bits = crate::oracle::f64_bits;
            assert_eq!(bits(&got), bits(&want), "{dtype:?} values");
            assert_eq!(bits(&got_grad), bits(&want_grad), "{dtype:?} gradient");
            // The unused row gets a zero gradient.
            assert!(got_grad
                .get(5)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .all(|&v| v == 0.0));
        }
    }

    /// The CUDA kernel, run on the CPU (`cuda_on_host`) with the launch's shape, writes the CPU
    /// sums bit for bit: rows that repeat, a row never used, rows narrower and wider than a block.
    #[test]
    fn the_cuda_kernel_on_the_host_writes_the_cpu_sums() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::one_block_per_row;

        let rows: Vec<u32> = (0..500u32).map(|i| (i * 7 + i / 3) % 37).filter(|&r| r != 11).collect();
        let n = 37;
        for d in [5usize, 64, 300] {
            let segments = Segments::new(&rows, n).unwrap();
            let mut src: Vec<f32> = (0..rows.len() * d).map(|i| ((i as f32) * 0.37).sin() * 1e3).collect();
            let want: Vec<u32> =
                segment_sum_cpu(&src, &segments.order, &segments.starts, d).iter().map(|v| v.to_bits()).collect();
            let (mut order, mut starts, mut out) = (segments.order.clone(), segments.starts.clone(), vec![1f32; n * d]);
            launch(
                "segment_sum_rows_f32",
                one_block_per_row(n, d),
                &mut [
                    Arg::F32s(&mut src),
                    Arg::U32s(&mut order),
                    Arg::U32s(&mut starts),
                    Arg::U32(d as u32),
                    Arg::F32s(&mut out),
                ],
            )
            .unwrap();
            assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "width {d}");
            assert!(out[11 * d..12 * d].iter().all(|&v| v == 0.0), "the unused row is zero");
        }
    }

    #[test]
    fn segments_keep_each_rows_positions_ascending() {
        let s = Segments::new(&[2, 0, 2, 2, 1, 0], 4).unwrap();
        assert_eq!(s.starts, [0, 2, 3, 6, 6]);
        assert_eq!(s.order, [1, 5, 4, 0, 2, 3]);
    }

    #[test]
    fn a_row_out_of_range_is_an_error() {
        let x = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let err = gather_repeated_rows(&x, &[0, 3]).unwrap_err().to_string();
        assert!(err.contains("row 3 is out of range for 3 rows"), "{err}");
        assert_eq!(gather_repeated_rows(&x, &[]).unwrap().dims(), [0, 2]);
    }

    #[test]
    fn unsupported_dtypes_are_refused_by_name() {
        let x = Var::from_tensor(&Tensor::zeros((3, 2), DType::BF16, &Device::Cpu).unwrap()).unwrap();
        let y = gather_repeated_rows(x.as_tensor(), &[0, 0]).unwrap();
        let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("BF16 is not supported"), "{err}");
    }
}
