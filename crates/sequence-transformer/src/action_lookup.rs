//! The action-type embedding's lookup: a table of a few rows read at every position of every
//! sequence.
//!
//! `index_select`'s backward pass is `index_add`, which candle 0.11 runs on CUDA with one thread
//! per column looping over every position: at batch 8192 with 100 positions per sequence that is
//! 819 200 serial additions per thread, all into a handful of rows. Off the CPU kernels (a GPU, or
//! the CPU under `RANKSTACK_CPU=candle`) the lookup is therefore
//! - for a table of at most [`ONE_HOT_MAX_ROWS`] rows, a one-hot product `y = onehot(ids) · T`,
//!   whose backward pass is one matrix product `∂T = onehot(ids)ᵀ · ∂y` (parallel in cuBLAS). The
//!   forward values are exact in f32 (each output adds one product by 1 to products by 0), unless
//!   reduced-precision (TF32) products are switched on, which round them as they round every
//!   product of the model;
//! - for a larger table, the segmented sum of [`rankstack_kernels::repeated_rows`] (one CUDA block
//!   per row).
//!
//! With the CPU kernels on it stays `index_select`, whose `index_add` is fast on the CPU and whose
//! sums the PyTorch fixtures were made with.

use candle_core::{DType, Result, Tensor};
use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::repeated_rows::gather_repeated_rows;
use rankstack_nn::host_transfer::{upload, Origin};

/// Tables up to this many rows are looked up through a one-hot product off the CPU kernels: the
/// one-hot matrix has this many columns per position.
pub const ONE_HOT_MAX_ROWS: usize = 64;

/// How one action table is looked up (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct ActionLookup {
    /// `[1, rows]` u32 `0..rows` on the table's device, for a table small enough for the one-hot
    /// product (built once, not per step).
    row_ids: Option<Tensor>,
}

impl ActionLookup {
    /// The lookup of `table` `[rows, d]`.
    pub(crate) fn new(table: &Tensor) -> Result<Self> {
        let rows = table.dim(0)?;
        let row_ids = if rows <= ONE_HOT_MAX_ROWS {
            Some(upload((0..rows as u32).collect(), (1, rows), table.device(), "action table rows", Origin::Constant)?)
        } else {
            None
        };
        Ok(Self { row_ids })
    }

    /// `table[ids]` `[ids.len(), d]`, differentiable with respect to `table`. Every id must be
    /// below the table's rows (the caller validated them).
    pub(crate) fn lookup(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let device = table.device();
        let one_hot_dtype = matches!(table.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16);
        match &self.row_ids {
            _ if kernels_run_on(device) => {
                table.embedding(&upload(ids.to_vec(), ids.len(), device, "action types", Origin::Input)?)
            }
            Some(row_ids) if one_hot_dtype => {
                let ids = upload(ids.to_vec(), (ids.len(), 1), device, "action types", Origin::Input)?;
                ids.broadcast_eq(row_ids)?.to_dtype(table.dtype())?.matmul(table)
            }
            _ if matches!(table.dtype(), DType::F32) || (device.is_cpu() && table.dtype() == DType::F64) => {
                gather_repeated_rows(table, ids)
            }
            _ => table.embedding(&upload(ids.to_vec(), ids.len(), device, "action types", Origin::Input)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rankstack_kernels::cpu::{with_isa, Isa};

    /// Values and table gradient of a lookup of `rows` rows at `positions` positions, by the path
    /// the current thread's kernels choose.
    fn run(rows: usize, positions: usize, dtype: DType) -> (Vec<f64>, Vec<f64>) {
        let d = 5;
        let table: Vec<f64> = (0..rows * d).map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0).collect();
        let table =
            Var::from_tensor(&Tensor::from_vec(table, (rows, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                .unwrap();
        let ids: Vec<u32> = (0..positions).map(|i| ((i * i + 3 * i) % rows) as u32).collect();
        let weights: Vec<f64> = (0..positions * d).map(|i| ((i * 31 % 17) as f64 - 8.0) / 16.0).collect();
        let weights = Tensor::from_vec(weights, (positions, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        let lookup = ActionLookup::new(table.as_tensor()).unwrap();
        let y = lookup.lookup(table.as_tensor(), &ids).unwrap();
        let grads = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        (flat(&y), flat(grads.get(table.as_tensor()).unwrap()))
    }

    #[test]
    fn the_gpu_graph_looks_up_the_same_values_and_sums_the_same_gradient() {
        for dtype in [DType::F32, DType::F64] {
            // 6 rows: the one-hot product; 100 rows: the segmented sum.
            for rows in [6, ONE_HOT_MAX_ROWS, ONE_HOT_MAX_ROWS + 1, 100] {
                let (values, grad) = run(rows, 700, dtype);
                let (graph_values, graph_grad) = with_isa(Isa::Candle, || run(rows, 700, dtype));
                assert_eq!(graph_values, values, "{dtype:?}, {rows} rows: the values are exact");
                let worst = grad.iter().zip(&graph_grad).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                assert!(worst <= tolerance, "{dtype:?}, {rows} rows: gradient off by {worst:e}");
                if rows > ONE_HOT_MAX_ROWS {
                    // The segmented sum adds in index_add's order: the same bits.
                    assert_eq!(graph_grad, grad, "{dtype:?}, {rows} rows");
                }
            }
        }
    }

    #[test]
    fn a_one_hot_table_copies_its_row_ids_once() {
        let table = Tensor::zeros((6, 3), DType::F32, &Device::Cpu).unwrap();
        let (lookup, at_build) = rankstack_nn::host_transfer::record_transfers(|| ActionLookup::new(&table).unwrap());
        assert_eq!(at_build.iter().map(|t| t.what).collect::<Vec<_>>(), ["action table rows"]);
        let ((), per_call) = rankstack_nn::host_transfer::record_transfers(|| {
            with_isa(Isa::Candle, || lookup.lookup(&table, &[1, 5, 0]).unwrap());
        });
        assert_eq!(per_call.iter().map(|t| t.what).collect::<Vec<_>>(), ["action types"]);
        let big = Tensor::zeros((ONE_HOT_MAX_ROWS + 1, 3), DType::F32, &Device::Cpu).unwrap();
        let (_, none) = rankstack_nn::host_transfer::record_transfers(|| ActionLookup::new(&big).unwrap());
        assert!(none.is_empty());
    }
}
