//! Pooled embedding bags off the CPU kernels (a GPU, or the CPU under `RANKSTACK_CPU=candle`),
//! for scoring:
//!
//! ```text
//! out[b] = Σ_j w[b, j] · table[rows[b, j]]      (every bag of L entries, padding with weight 0)
//! ```
//!
//! Composed of candle operations a sparse feature's bags are four launches (the weights' cast, the
//! gather of `B · L` rows, their product with the weights, the sum over `L`) and three tensors of
//! `B · L` rows; `homefeed-bench`'s sixteen sparse features make them a third of a scoring pass's
//! launches. Here each feature is one launch that writes `[B, dim]` alone: a block per bag, its
//! threads over the columns, each summing its bag's weighted entries in order. On CUDA
//! `cuda/embedding_bag.cu`; on the CPU the same sums (`pool_bag`, the same bits; tested on the host
//! by `cuda_on_host`). It computes no gradient: the caller uses it for a table outside any graph.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::device_embedding_bag::embedding_bag;
//! let table = Tensor::new(&[[1f32, 2.0], [10.0, 20.0], [100.0, 200.0]], &Device::Cpu)?;
//! // Two bags of two entries: the mean of rows 0 and 2, and row 1 with a padding entry.
//! let out = embedding_bag(&table, &[0, 2, 1, 0], &[0.5, 0.5, 1.0, 0.0], 2)?;
//! assert_eq!(out.to_vec2::<f32>()?, vec![vec![50.5, 101.0], vec![10.0, 20.0]]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::auxiliary::on_host;
use crate::float::contiguous_storage;
use crate::host_transfer::{upload_slice, Origin};

/// The bags `rows` `[bags · L]` of `table` `[n, dim]` (f32), each entry weighted by `weights`
/// `[bags · L]`, summed per bag: `[bags, dim]` on the table's device. A row out of range, a
/// length that is not a whole number of bags or a table that is not an f32 matrix is an error.
pub fn embedding_bag(table: &Tensor, rows: &[u32], weights: &[f32], bags: usize) -> Result<Tensor> {
    let mut out = embedding_bags(&[Bags { table, rows, weights, bags }])?;
    Ok(out.remove(0))
}

/// The bags of one table, as [`embedding_bag`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct Bags<'a> {
    /// `[n, dim]` f32.
    pub table: &'a Tensor,
    /// `[bags · L]`: the entries' rows of `table`.
    pub rows: &'a [u32],
    /// `[bags · L]`: the entries' weights (0 for padding).
    pub weights: &'a [f32],
    /// The number of bags.
    pub bags: usize,
}

/// [`embedding_bag`] of several tables on one device (a model's sparse features), their rows and
/// weights copied to the device together: two uploads for all of them instead of two per table
/// (on a GPU each upload from pageable host memory is a copy the host waits for). One launch per
/// table, each reading its own part of the two buffers. Errors name the table's position.
pub fn embedding_bags(lookups: &[Bags<'_>]) -> Result<Vec<Tensor>> {
    let mut parts = Vec::with_capacity(lookups.len());
    for (i, lookup) in lookups.iter().enumerate() {
        let named = |e: candle_core::Error| match lookups.len() {
            1 => e,
            n => e.context(format!("embedding bags: table {i} of {n}")),
        };
        parts.push(check(lookup).map_err(named)?);
    }
    let Some(device) = lookups.first().map(|l| l.table.device()) else { return Ok(Vec::new()) };
    if let Some(i) = lookups.iter().position(|l| !l.table.device().same_device(device)) {
        let other = lookups[i].table.device().location();
        candle_core::bail!("embedding bags: table {i} is on {other:?}, table 0 on {:?}", device.location());
    }
    // The entries of the tables that launch, back to back.
    let launching: Vec<usize> = (0..lookups.len()).filter(|&i| parts[i].is_some()).collect();
    let total: usize = launching.iter().map(|&i| lookups[i].rows.len()).sum();
    let (mut rows, mut weights) = (Vec::with_capacity(total), Vec::with_capacity(total));
    for &i in &launching {
        rows.extend_from_slice(lookups[i].rows);
        weights.extend_from_slice(lookups[i].weights);
    }
    let (all_rows, all_weights) = match launching.is_empty() {
        true => (None, None),
        false => (
            Some(upload_slice(&rows, total, device, "gathered rows", Origin::Input)?),
            Some(upload_slice(&weights, total, device, "sparse bag weights", Origin::Input)?),
        ),
    };
    let mut start = 0;
    lookups
        .iter()
        .zip(parts)
        .map(|(lookup, bag_len)| match (bag_len, &all_rows, &all_weights) {
            (Some(bag_len), Some(all_rows), Some(all_weights)) => {
                let len = lookup.rows.len();
                let op = EmbeddingBag {
                    rows: all_rows.narrow(0, start, len)?,
                    weights: all_weights.narrow(0, start, len)?,
                    bags: lookup.bags,
                    bag_len,
                };
                start += len;
                lookup.table.contiguous()?.apply_op1_no_bwd(&op)
            }
            _ => Tensor::zeros((lookup.bags, lookup.table.dim(1)?), DType::F32, lookup.table.device()),
        })
        .collect()
}

/// Checks one table's bags; its bag length `L`, or `None` where there is nothing to launch (no
/// bags, no entries or no columns: the output is zeros).
fn check(lookup: &Bags<'_>) -> Result<Option<usize>> {
    let Bags { table, rows, weights, bags } = *lookup;
    let (n, dim) = table.dims2()?;
    if table.dtype() != DType::F32 {
        candle_core::bail!("embedding bag: a {:?} table (f32)", table.dtype());
    }
    if weights.len() != rows.len() || bags == 0 && !rows.is_empty() || bags > 0 && !rows.len().is_multiple_of(bags) {
        candle_core::bail!("embedding bag: {} rows and {} weights for {bags} bags", rows.len(), weights.len());
    }
    if let Some(r) = rows.iter().find(|&&r| r as usize >= n) {
        candle_core::bail!("embedding bag: row {r} is out of range for a table of {n} rows");
    }
    let bag_len = rows.len().checked_div(bags).unwrap_or(0);
    if bags * dim == 0 || bag_len == 0 {
        return Ok(None);
    }
    if bag_len > u32::MAX as usize || dim > u32::MAX as usize {
        candle_core::bail!("embedding bag: bags of {bag_len} entries of width {dim} exceed the u32 range");
    }
    Ok(Some(bag_len))
}

/// The op: the table in, the pooled bags out; the bags' rows and weights on the device.
struct EmbeddingBag {
    /// `[bags · L]` u32.
    rows: Tensor,
    /// `[bags · L]` f32.
    weights: Tensor,
    bags: usize,
    bag_len: usize,
}

/// Bag `rows`/`weights` of `table` (`dim` columns) pooled into `out`: the CUDA block's sums.
fn pool_bag(table: &[f32], rows: &[u32], weights: &[f32], out: &mut [f32]) {
    let dim = out.len();
    for (c, out) in out.iter_mut().enumerate() {
        *out = rows.iter().zip(weights).fold(0f32, |acc, (&r, &w)| acc + w * table[r as usize * dim + c]);
    }
}

impl CustomOp1 for EmbeddingBag {
    fn name(&self) -> &'static str {
        "embedding-bag"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = layout.shape().dims2()?.1;
        let table: &[f32] = contiguous_storage(storage, layout, "embedding bag: table")?;
        let mut out = vec![0f32; self.bags * dim];
        on_host("embedding bag", (&self.rows, &self.weights), |rows: &[u32], weights: &[f32]| {
            out.par_chunks_mut(dim)
                .zip(rows.par_chunks(self.bag_len).zip(weights.par_chunks(self.bag_len)))
                .for_each(|(out, (rows, weights))| pool_bag(table, rows, weights, out));
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), Shape::from((self.bags, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        use crate::auxiliary::on_gpu;

        let dim = layout.shape().dims2()?.1;
        let device = storage.device().clone();
        let table = storage.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        let out = device.alloc_zeros::<f32>(self.bags * dim)?;
        let (bag_len, width) = (self.bag_len as u32, dim as u32);
        let func = device.get_or_load_custom_func("embedding_bag_f32", "rankstack_embedding_bag", PTX)?;
        on_gpu("embedding bag", (&self.rows, &self.weights), |rows: &CudaView<u32>, weights: &CudaView<f32>| {
            let mut launch = func.builder();
            launch.arg(&table).arg(rows).arg(weights).arg(&bag_len).arg(&width).arg(&out);
            // SAFETY: the arguments match the kernel's signature; every row is below the table's
            // (checked by `embedding_bag`), block `b` reads entries `b·L .. (b+1)·L` of the bags'
            // `bags · L` and writes row `b` of `out` `[bags, dim]`.
            unsafe { launch.launch(crate::launch_shape::one_block_per_row(self.bags, dim).config()) }.w()
        })?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, device), Shape::from((self.bags, dim))))
    }
}

/// `cuda/embedding_bag.cu`, compiled by the build script.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/embedding_bag.ptx"));

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::oracle::values;

    /// 40 bags of 7 entries from a 13-row table of width `dim`: repeats, padding (weight 0),
    /// mean-pooling weights.
    fn case(dim: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let table: Vec<f32> = values(1, 13 * dim).iter().map(|&v| v as f32).collect();
        let rows: Vec<u32> = (0..40 * 7).map(|i| (i * 5 % 13) as u32).collect();
        let weights: Vec<f32> =
            (0..40 * 7).map(|i| if i % 7 < 1 + i / 7 % 7 { 1.0 / (1 + i / 7 % 7) as f32 } else { 0.0 }).collect();
        (table, rows, weights)
    }

    #[test]
    fn equals_the_gathered_products_summed_over_each_bag() {
        let dev = Device::Cpu;
        for dim in [1, 16, 300] {
            let (table, rows, weights) = case(dim);
            let t = Tensor::from_slice(&table, (13, dim), &dev).unwrap();
            let got = embedding_bag(&t, &rows, &weights, 40).unwrap();
            let ids = Tensor::from_slice(&rows, rows.len(), &dev).unwrap();
            let w = Tensor::from_slice(&weights, (40, 7, 1), &dev).unwrap();
            let want = t
                .index_select(&ids, 0)
                .unwrap()
                .reshape((40, 7, dim))
                .unwrap()
                .broadcast_mul(&w)
                .unwrap()
                .sum(1)
                .unwrap();
            assert_eq!(crate::oracle::f64_bits(&got), crate::oracle::f64_bits(&want), "width {dim}");
        }
    }

    /// Several tables at once: each one's bits as alone, their rows and weights in two uploads,
    /// a table without entries zeros, a bad table named by its position.
    #[test]
    fn several_tables_share_two_uploads_and_give_each_ones_bits() {
        use crate::host_transfer::record_transfers;

        let dev = Device::Cpu;
        let cases: Vec<_> = [16, 1, 300].iter().map(|&dim| (dim, case(dim))).collect();
        let tables: Vec<Tensor> =
            cases.iter().map(|(dim, (table, _, _))| Tensor::from_slice(table, (13, *dim), &dev).unwrap()).collect();
        let empty = Tensor::ones((5, 3), DType::F32, &dev).unwrap();
        let mut lookups: Vec<Bags> = cases
            .iter()
            .zip(&tables)
            .map(|((_, (_, rows, weights)), table)| Bags { table, rows, weights, bags: 40 })
            .collect();
        lookups.insert(1, Bags { table: &empty, rows: &[], weights: &[], bags: 40 });
        let (together, transfers) = record_transfers(|| embedding_bags(&lookups).unwrap());
        let whats: Vec<_> = transfers.iter().map(|t| (t.what, t.elements)).collect();
        assert_eq!(whats, [("gathered rows", 3 * 280), ("sparse bag weights", 3 * 280)]);
        assert_eq!(together.len(), 4);
        for (lookup, got) in lookups.iter().zip(&together) {
            let alone = embedding_bag(lookup.table, lookup.rows, lookup.weights, lookup.bags).unwrap();
            assert_eq!(crate::oracle::f64_bits(got), crate::oracle::f64_bits(&alone));
        }
        assert_eq!(together[1].to_vec2::<f32>().unwrap(), vec![vec![0f32; 3]; 40]);
        lookups[2].rows = &[13; 280];
        let err = embedding_bags(&lookups).unwrap_err().to_string();
        assert!(err.contains("embedding bags: table 2 of 4") && err.contains("row 13 is out of range"), "{err}");
        assert!(embedding_bags(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_rows_and_shapes_are_errors() {
        let t = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let err = embedding_bag(&t, &[0, 3], &[1.0, 1.0], 1).unwrap_err().to_string();
        assert!(err.contains("row 3 is out of range for a table of 3 rows"), "{err}");
        assert!(embedding_bag(&t, &[0, 1, 2], &[1.0; 3], 2).is_err());
        assert!(embedding_bag(&t, &[0, 1], &[1.0], 1).is_err());
        assert!(embedding_bag(&t.to_dtype(DType::F64).unwrap(), &[0], &[1.0], 1).is_err());
        assert_eq!(embedding_bag(&t, &[], &[], 4).unwrap().dims(), [4, 2]);
    }

    /// The CUDA kernel, run on the CPU (`cuda_on_host`) with the launch's shape, writes the CPU
    /// mirror's bits, for rows narrower and wider than a block.
    #[test]
    fn the_cuda_kernel_on_the_host_writes_the_cpu_sums() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::one_block_per_row;

        for dim in [1, 16, 300] {
            let (table, rows, weights) = case(dim);
            let mut want = vec![0f32; 40 * dim];
            for (b, out) in want.chunks_mut(dim).enumerate() {
                pool_bag(&table, &rows[b * 7..(b + 1) * 7], &weights[b * 7..(b + 1) * 7], out);
            }
            let (mut table, mut rows, mut weights, mut out) = (table, rows, weights, vec![3f32; 40 * dim]);
            launch(
                "embedding_bag_f32",
                one_block_per_row(40, dim),
                &mut [
                    Arg::F32s(&mut table),
                    Arg::U32s(&mut rows),
                    Arg::F32s(&mut weights),
                    Arg::U32(7),
                    Arg::U32(dim as u32),
                    Arg::F32s(&mut out),
                ],
            )
            .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want), "width {dim}");
        }
    }
}
