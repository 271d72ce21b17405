//! Writing new values into some rows of a matrix, in place: the row-sparse optimizer's write-back.
//!
//! ```text
//! table[rows[i], :] = values[i, :]        (rows distinct, each < n; every other row unchanged)
//! ```
//!
//! The tensor formulation of this (a gather from `[table ; values]` through a map of `n` entries
//! that names, for every row of the table, itself or its new value) copies the whole table and
//! builds and copies that map on every step: work, memory and host→device traffic that grow with
//! the table, not with the rows a batch touched. candle 0.11 has no parallel in-place row write
//! (its CUDA `scatter` and `index_add` loop over the rows serially, see
//! [`distinct_rows`](crate::distinct_rows)), so here it is one in-place op: on the CPU a copy per
//! row, on CUDA one block per row (`cuda/overwrite_rows.cu`, compiled by `build.rs`). Values are
//! copied exactly, so the result equals the gather formulation bit for bit.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::overwrite_rows::OverwriteRows;
//! let table = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu)?;
//! let rows = OverwriteRows::new(&[3, 1], 4, &Device::Cpu, "example")?;
//! rows.apply(&table, &Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?)?;
//! assert_eq!(table.to_vec2::<f32>()?, [[0., 0.], [3., 4.], [0., 0.], [1., 2.]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, InplaceOp3, Layout, Result, Tensor};

use crate::float::contiguous;
use crate::host_transfer::{upload_slice, Origin};
use crate::index_stage::{IndexStage, Part, StagedIndexes};

/// Distinct rows of an `n`-row matrix, with their index tensor on the matrix's device (built once
/// for every matrix the same rows are written to: a parameter and its optimizer moments).
#[derive(Debug, Clone)]
pub struct OverwriteRows {
    /// `[m]` u32, the rows.
    index: Tensor,
    /// `n`, the rows of the matrices written to.
    n: usize,
    /// Who asks, for errors.
    op: &'static str,
}

/// [`OverwriteRows`] staged ([`OverwriteRows::stage`]): distinct rows checked, waiting for their
/// stage's upload.
#[derive(Debug, Clone)]
pub struct StagedOverwriteRows {
    rows: Part,
    n: usize,
    op: &'static str,
}

impl StagedOverwriteRows {
    /// The rows, their index a view of `staged`.
    pub fn finish(&self, staged: &StagedIndexes) -> Result<OverwriteRows> {
        Ok(OverwriteRows { index: staged.part(&self.rows)?, n: self.n, op: self.op })
    }
}

impl OverwriteRows {
    /// The rows `rows` of an `n`-row matrix on `device`; `op` names the caller in errors. Fails
    /// when a row repeats or is `≥ n`.
    pub fn new(rows: &[u32], n: usize, device: &Device, op: &'static str) -> Result<Self> {
        check_distinct_rows(rows, n, op)?;
        let index = upload_slice(rows, rows.len(), device, "overwritten rows", Origin::Input)?;
        Ok(Self { index, n, op })
    }

    /// [`OverwriteRows::new`] in two steps, so that the rows of many tables share one upload:
    /// checked and staged in `stage` here, taken from the upload by
    /// [`StagedOverwriteRows::finish`].
    pub fn stage(rows: &[u32], n: usize, stage: &mut IndexStage, op: &'static str) -> Result<StagedOverwriteRows> {
        check_distinct_rows(rows, n, op)?;
        Ok(StagedOverwriteRows { rows: stage.push(rows), n, op })
    }

    /// The rows as a `[m]` u32 tensor on the device (for gathering their current values).
    pub fn index(&self) -> &Tensor {
        &self.index
    }

    /// `n`, the rows of the matrices these rows are written to.
    pub fn matrix_rows(&self) -> usize {
        self.n
    }

    /// `table[rows[i], :] = values[i, :]`, in place. `table` `[n, d]` must be contiguous (a
    /// parameter or a moment is); `values` `[m, d]` of the same dtype and device.
    pub fn apply(&self, table: &Tensor, values: &Tensor) -> Result<()> {
        let (n, d) = table.dims2()?;
        let m = self.index.dim(0)?;
        if n != self.n || values.dims() != [m, d] {
            candle_core::bail!(
                "{}: writing values {:?} into rows of a {:?} matrix ({} rows of {} expected)",
                self.op,
                values.dims(),
                table.dims(),
                m,
                self.n
            );
        }
        if values.dtype() != table.dtype() || !values.device().same_device(table.device()) {
            candle_core::bail!(
                "{}: values of {:?} for a {:?} matrix, or on another device",
                self.op,
                values.dtype(),
                table.dtype()
            );
        }
        if !table.is_contiguous() {
            candle_core::bail!("{}: the matrix written to is not contiguous", self.op);
        }
        if m == 0 || d == 0 {
            return Ok(());
        }
        table.inplace_op3(&self.index, &values.contiguous()?, &Write { op: self.op })
    }
}

/// Fails unless `rows` are distinct and each `< n`: the rows a row-sparse update may write (`op`
/// names the caller in the error). The optimizer's rows come sorted (checked in one pass);
/// anything else is checked by sorting a copy.
pub fn check_distinct_rows(rows: &[u32], n: usize, op: &str) -> Result<()> {
    if let Some(&row) = rows.iter().find(|&&r| r as usize >= n) {
        candle_core::bail!("{op}: row {row} is out of range (a matrix of {n} rows)");
    }
    if !rows.windows(2).all(|w| w[0] < w[1]) {
        let mut sorted = rows.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            candle_core::bail!("{op}: row {} is written twice", w[0]);
        }
    }
    Ok(())
}

/// The in-place op: `s1` the table, `s2` the rows, `s3` the values (shapes checked by
/// [`OverwriteRows::apply`]).
struct Write {
    op: &'static str,
}

impl Write {
    fn dims(&self, table: &Layout, values: &Layout) -> Result<(usize, usize)> {
        match (table.dims(), values.dims()) {
            ([_, d], [m, d2]) if d == d2 => Ok((*m, *d)),
            (t, v) => candle_core::bail!("{}: values {v:?} for a table {t:?}", self.op),
        }
    }
}

fn copy_rows<T: Copy>(table: &mut [T], rows: &[u32], values: &[T], d: usize) {
    for (&row, src) in rows.iter().zip(values.chunks_exact(d)) {
        table[row as usize * d..][..d].copy_from_slice(src);
    }
}

impl InplaceOp3 for Write {
    fn name(&self) -> &'static str {
        "overwrite-rows"
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
        let (m, d) = self.dims(l1, l3)?;
        let CpuStorage::U32(rows) = s2 else { candle_core::bail!("{}: rows must be u32", self.op) };
        let rows = contiguous(rows, l2, "overwrite-rows: rows")?;
        let start = l1.start_offset();
        match (s1, s3) {
            (CpuStorage::F32(t), CpuStorage::F32(v)) => {
                copy_rows(&mut t[start..], &rows[..m], contiguous(v, l3, "overwrite-rows: values")?, d)
            }
            (CpuStorage::F64(t), CpuStorage::F64(v)) => {
                copy_rows(&mut t[start..], &rows[..m], contiguous(v, l3, "overwrite-rows: values")?, d)
            }
            (CpuStorage::BF16(t), CpuStorage::BF16(v)) => {
                copy_rows(&mut t[start..], &rows[..m], contiguous(v, l3, "overwrite-rows: values")?, d)
            }
            (s1, _) => candle_core::bail!("{}: {:?} is not supported", self.op, s1.dtype()),
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::DType;

        let (m, d) = self.dims(l1, l3)?;
        if !(l2.is_contiguous() && l3.is_contiguous()) {
            candle_core::bail!("{}: rows and values must be contiguous", self.op);
        }
        let device = s1.device().clone();
        let rows = s2.as_cuda_slice::<u32>()?.slice(l2.start_offset()..);
        let config = crate::launch_shape::one_block_per_row(m, d).config();
        let width = d as u32;
        let (table_start, values_start) = (l1.start_offset(), l3.start_offset());
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let func = device.get_or_load_custom_func($kernel, "rankstack_overwrite_rows", PTX)?;
                let values = s3.as_cuda_slice::<$t>()?.slice(values_start..);
                let table = s1.as_cuda_slice_mut::<$t>()?;
                let mut table = table.slice_mut(table_start..);
                let mut launch = func.builder();
                launch.arg(&mut table);
                launch.arg(&rows);
                launch.arg(&values);
                launch.arg(&width);
                // SAFETY: the arguments match the kernel's signature; `rows` are distinct and
                // below the table's rows (checked by `OverwriteRows::new`), so every block writes
                // its own row inside `table`, and reads `m × d` values inside `values`.
                unsafe { launch.launch(config) }.w()?;
            }};
        }
        match s3.dtype() {
            DType::F32 => launch!(f32, "overwrite_rows_f32"),
            DType::F64 => launch!(f64, "overwrite_rows_f64"),
            other => candle_core::bail!("{}: {other:?} is not supported on CUDA (f32, f64)", self.op),
        }
        Ok(())
    }
}

/// `cuda/overwrite_rows.cu`, compiled by the build script.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/overwrite_rows.ptx"));

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The gather formulation it replaces: `[table ; values]` gathered through an `n`-entry map.
    fn by_gather(table: &Tensor, rows: &[u32], values: &Tensor) -> Tensor {
        let n = table.dim(0).unwrap();
        let mut map: Vec<u32> = (0..n as u32).collect();
        for (i, &r) in rows.iter().enumerate() {
            map[r as usize] = (n + i) as u32;
        }
        let map = Tensor::from_vec(map, n, table.device()).unwrap();
        Tensor::cat(&[table, values], 0).unwrap().index_select(&map, 0).unwrap()
    }

    /// The CUDA kernels, run on the CPU (`cuda_on_host`) with the launch's shape, write what
    /// the CPU copy writes, f32 and f64, rows narrower and wider than a block.
    #[test]
    fn the_cuda_kernels_on_the_host_write_the_cpu_copy() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::one_block_per_row;

        let (n, rows) = (23usize, vec![22u32, 0, 9, 14, 3]);
        for d in [7usize, 300] {
            let table: Vec<f64> = (0..n * d).map(|i| (i as f64 * 0.3).cos()).collect();
            let values: Vec<f64> = (0..rows.len() * d).map(|i| -(i as f64) - 0.5).collect();
            let mut want = table.clone();
            copy_rows(&mut want, &rows, &values, d);
            let shape = one_block_per_row(rows.len(), d);
            let (mut got, mut ids, mut v) = (table.clone(), rows.clone(), values.clone());
            launch(
                "overwrite_rows_f64",
                shape,
                &mut [Arg::F64s(&mut got), Arg::U32s(&mut ids), Arg::F64s(&mut v), Arg::U32(d as u32)],
            )
            .unwrap();
            assert_eq!(got, want, "f64, width {d}");
            let narrow = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let (mut got, mut v) = (narrow(&table), narrow(&values));
            launch(
                "overwrite_rows_f32",
                shape,
                &mut [Arg::F32s(&mut got), Arg::U32s(&mut ids), Arg::F32s(&mut v), Arg::U32(d as u32)],
            )
            .unwrap();
            assert_eq!(got, narrow(&want), "f32, width {d}");
        }
    }

    #[test]
    fn writes_the_rows_in_place_as_the_gather_formulation_does() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let (n, d) = (7, 5);
            let initial = Tensor::arange(0f32, (n * d) as f32, &dev).unwrap().reshape((n, d)).unwrap();
            let table = initial.to_dtype(dtype).unwrap();
            // A clone shares the storage: it sees the write (as a parameter's users do).
            let alias = table.clone();
            let rows = [6u32, 0, 3];
            let values = (Tensor::ones((3, d), DType::F32, &dev).unwrap() * -1.5).unwrap().to_dtype(dtype).unwrap();
            let expected =
                by_gather(&table.to_dtype(DType::F64).unwrap(), &rows, &values.to_dtype(DType::F64).unwrap());
            let write = OverwriteRows::new(&rows, n, &dev, "test").unwrap();
            assert_eq!(write.index().to_vec1::<u32>().unwrap(), rows);
            write.apply(&table, &values).unwrap();
            let got = alias.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            assert_eq!(got, expected.to_vec2::<f64>().unwrap(), "{dtype:?}");
        }
    }

    #[test]
    fn a_view_with_an_offset_is_written_at_its_rows() {
        let dev = Device::Cpu;
        let whole = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
        // Rows 1..4 of `whole`: contiguous, starting at offset 3.
        let view = whole.narrow(0, 1, 3).unwrap();
        let write = OverwriteRows::new(&[2], 3, &dev, "test").unwrap();
        write.apply(&view, &Tensor::new(&[[1f32, 2., 3.]], &dev).unwrap()).unwrap();
        let got = whole.to_vec2::<f32>().unwrap();
        assert_eq!(got, [[0., 0., 0.], [0., 0., 0.], [0., 0., 0.], [1., 2., 3.]]);
    }

    #[test]
    fn bad_rows_and_shapes_are_errors_that_name_the_caller() {
        let dev = Device::Cpu;
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let new = |rows: &[u32]| OverwriteRows::new(rows, 4, &dev, "AdamW").map(|_| ());
        assert!(
            err(new(&[1, 4])).contains("AdamW: row 4 is out of range (a matrix of 4 rows)"),
            "{}",
            err(new(&[1, 4]))
        );
        assert!(err(new(&[2, 0, 2])).contains("AdamW: row 2 is written twice"));
        assert!(new(&[3, 0, 2]).is_ok(), "distinct rows in any order");
        assert!(new(&[]).is_ok());

        let write = OverwriteRows::new(&[0, 2], 4, &dev, "AdamW").unwrap();
        let table = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
        let wrong_width = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        assert!(err(write.apply(&table, &wrong_width)).starts_with("AdamW: writing values [2, 2]"));
        let wrong_rows = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        assert!(write.apply(&wrong_rows, &Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).is_err());
        let wrong_dtype = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
        assert!(err(write.apply(&table, &wrong_dtype)).contains("values of F64 for a F32 matrix"));
        let transposed = Tensor::zeros((3, 4), DType::F32, &dev).unwrap().t().unwrap();
        assert!(
            err(write.apply(&transposed, &Tensor::zeros((2, 3), DType::F32, &dev).unwrap())).contains("not contiguous")
        );
        // Nothing was written by the failed calls.
        assert_eq!(table.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
