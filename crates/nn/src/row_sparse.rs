//! Row-sparse gradients for embedding tables.
//!
//! An embedding lookup `y = W[rows]` differentiated by candle yields a gradient as large as the
//! whole table `W` (zeros except the rows looked up), and an optimizer then updates every row. For
//! the `homefeed-bench` model that is 51M of its 120M parameters, every step, for a batch that
//! touches a few thousand rows. [`RowGather`] instead gathers the touched rows `U` (sorted, unique)
//! into a small leaf variable `L = W[U]` and looks up `y = L[inverse]`; the backward pass then yields
//! `∂loss/∂L` `[|U|, dim]`, which [`RowGather::take`] hands out as a [`RowGradient`] for a row-sparse
//! optimizer update. The table itself is not part of the graph in this mode.
//!
//! `∂loss/∂L` equals the rows `U` of the dense gradient bit for bit: both accumulate the same
//! per-position gradients in the same order (the leaf's lookup is
//! `rankstack_kernels::repeated_rows`, whose segmented sums add each row's positions in ascending
//! order, as `index_add` does, without `index_add`'s serial loop on CUDA).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::device_embedding_bag::{embedding_bags, Bags};
use rankstack_kernels::index_stage::{IndexStage, Part, StagedIndexes};
use rankstack_kernels::repeated_rows::RepeatedRows;

use crate::host_transfer::{upload, Origin};

/// The gradient of some rows of a table: `grad[i]` belongs to row `rows[i]` of `table`.
#[derive(Debug, Clone)]
pub struct RowGradient {
    /// The table (the parameter tensor itself; it shares its storage with the parameter store).
    pub table: Tensor,
    /// Sorted, distinct row indices.
    pub rows: Vec<u32>,
    /// `[rows.len(), dim]`.
    pub grad: Tensor,
}

/// `table[rows]`, differentiable, staged: with the gradient summed per row as segments
/// (`rankstack_kernels::repeated_rows`: bit-equal to `index_select`'s `index_add`, which runs
/// serially over all positions on CUDA) where that kernel has the dtype; else `index_select`.
#[derive(Debug)]
enum StagedGather {
    IndexSelect(Part),
    Segmented(RepeatedRows),
}

impl StagedGather {
    /// Stages `rows` of a `[n, d]` table of `dtype` on `device`.
    fn stage(rows: &[u32], n: usize, dtype: DType, device: &Device, stage: &mut IndexStage) -> Result<Self> {
        let segmented = match dtype {
            DType::F32 => true,
            DType::F64 => device.is_cpu(),
            _ => false,
        };
        match segmented {
            true => Ok(Self::Segmented(RepeatedRows::stage(rows, n, stage)?)),
            false => Ok(Self::IndexSelect(stage.push(rows))),
        }
    }

    fn gather(&self, table: &Tensor, staged: &StagedIndexes) -> Result<Tensor> {
        match self {
            Self::IndexSelect(rows) => table.index_select(&staged.part(rows)?, 0),
            Self::Segmented(rows) => rows.gather(table, staged),
        }
    }
}

/// A [`RowGather::lookup`] staged: its index arrays wait in an [`IndexStage`], so that the
/// lookups of many tables go to the device in one upload ([`pooled_lookups`]).
#[derive(Debug)]
pub struct StagedLookup(StagedLookupKind);

#[derive(Debug)]
enum StagedLookupKind {
    /// No gradient: a plain `index_select`.
    Untracked(Part),
    /// Dense mode: the table's gradient, summed per row as segments.
    Dense(StagedGather),
    /// Row-sparse mode: the distinct rows gathered into a leaf, looked up by their inverse.
    RowSparse { unique: Vec<u32>, unique_rows: Part, inverse: StagedGather },
}

/// The lookups of one table since the last [`RowGather::take`], when row-sparse mode is on.
#[derive(Debug, Default)]
pub struct RowGather {
    enabled: AtomicBool,
    pending: Mutex<Vec<(Vec<u32>, Var)>>,
}

impl Clone for RowGather {
    fn clone(&self) -> Self {
        Self { enabled: AtomicBool::new(self.enabled()), pending: Mutex::new(Vec::new()) }
    }
}

impl RowGather {
    /// Switches row-sparse mode on or off (off: the table is an ordinary graph input and gets a
    /// dense gradient, which any optimizer understands).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
        if !on {
            self.pending.lock().expect("lock poisoned").clear();
        }
    }

    /// Whether row-sparse mode is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// `table[rows]` `[rows.len(), dim]`. With `track` and row-sparse mode on, the lookup goes
    /// through a leaf of the distinct rows, recorded for [`RowGather::take`]; with `track` in dense
    /// mode the table gets a dense gradient, summed per row as segments; without `track` it is a
    /// plain `index_select` of the table.
    pub fn lookup(&self, table: &Tensor, rows: &[u32], track: bool) -> Result<Tensor> {
        let mut stage = IndexStage::default();
        let staged = self.stage_lookup(table, rows, track, &mut stage)?;
        self.finish_lookup(table, staged, &stage.upload(table.device(), "gathered rows")?)
    }

    /// [`RowGather::lookup`]'s host part: its index arrays staged in `stage` (an error for a row
    /// out of range where the segments are built); [`RowGather::finish_lookup`] looks up once the
    /// stage is on the device. The mode (row-sparse or dense) is the one at staging.
    pub fn stage_lookup(
        &self,
        table: &Tensor,
        rows: &[u32],
        track: bool,
        stage: &mut IndexStage,
    ) -> Result<StagedLookup> {
        let (device, dtype, n) = (table.device(), table.dtype(), table.dim(0)?);
        let kind = match (track, self.enabled()) {
            (false, _) => StagedLookupKind::Untracked(stage.push(rows)),
            (true, false) => StagedLookupKind::Dense(StagedGather::stage(rows, n, dtype, device, stage)?),
            (true, true) => {
                let mut unique = rows.to_vec();
                unique.sort_unstable();
                unique.dedup();
                let inverse: Vec<u32> =
                    rows.iter().map(|r| unique.binary_search(r).expect("row is in the set") as u32).collect();
                let unique_rows = stage.push(&unique);
                let inverse = StagedGather::stage(&inverse, unique.len(), dtype, device, stage)?;
                StagedLookupKind::RowSparse { unique, unique_rows, inverse }
            }
        };
        Ok(StagedLookup(kind))
    }

    /// The lookup `staged` of `table` (the one it was staged for), its index arrays in `uploaded`.
    pub fn finish_lookup(&self, table: &Tensor, staged: StagedLookup, uploaded: &StagedIndexes) -> Result<Tensor> {
        match staged.0 {
            StagedLookupKind::Untracked(rows) => table.index_select(&uploaded.part(&rows)?, 0),
            StagedLookupKind::Dense(gather) => gather.gather(table, uploaded),
            StagedLookupKind::RowSparse { unique, unique_rows, inverse } => {
                let gathered = table.detach().index_select(&uploaded.part(&unique_rows)?, 0)?;
                let leaf = Var::from_tensor(&gathered)?;
                let out = inverse.gather(leaf.as_tensor(), uploaded)?;
                self.pending.lock().expect("lock poisoned").push((unique, leaf));
                Ok(out)
            }
        }
    }

    /// The weighted sums of `bags` bags of `table`'s rows: bag `b` is `rows[b·L .. (b+1)·L]` with
    /// `weights` of the same layout (`L = rows.len() / bags`; padding entries weigh 0), and
    /// `out[b] = Σ_j weights[b·L + j] · table[rows[b·L + j]]`, `[bags, dim]`. With `track`, as
    /// [`RowGather::lookup`] (its gradient as there); without, off the CPU kernels and with an f32
    /// table outside any graph (scoring on a GPU), one launch
    /// ([`rankstack_kernels::device_embedding_bag`]) where candle's operations take four.
    /// [`pooled_lookups`] of this one table.
    pub fn pooled_lookup(
        &self,
        table: &Tensor,
        rows: &[u32],
        weights: Vec<f64>,
        bags: usize,
        track: bool,
    ) -> Result<Tensor> {
        let lookup = PooledLookup { gather: self, table, rows: rows.to_vec(), weights, bags };
        Ok(pooled_lookups(vec![lookup], track)?.remove(0))
    }

    /// [`pooled_lookups`]'s composed path: the looked-up entries `gathered`
    /// `[bags · L, dim]` weighted by `weights` `[bags · L]` (f64, on their device) and summed per
    /// bag.
    fn weighted_bags(gathered: &Tensor, weights: &Tensor, bags: usize) -> Result<Tensor> {
        let (entries, dim) = gathered.dims2()?;
        let bag_len = entries.checked_div(bags).unwrap_or(0);
        let weights = weights.reshape((bags, bag_len, 1))?.to_dtype(gathered.dtype())?;
        gathered.reshape((bags, bag_len, dim))?.broadcast_mul(&weights)?.sum(1)
    }

    /// The row gradients of `table` from the lookups recorded since the last call (merged into
    /// one [`RowGradient`] if the table was looked up several times), or `None` if no recorded
    /// lookup received a gradient. Clears the record.
    pub fn take(&self, table: &Tensor, grads: &GradStore) -> Result<Option<RowGradient>> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("lock poisoned"));
        let parts: Vec<(Vec<u32>, Tensor)> = pending
            .into_iter()
            .filter_map(|(rows, leaf)| grads.get(leaf.as_tensor()).map(|g| (rows, g.clone())))
            .collect();
        match parts.len() {
            0 => Ok(None),
            1 => {
                let (rows, grad) = parts.into_iter().next().expect("one part");
                Ok(Some(RowGradient { table: table.clone(), rows, grad }))
            }
            _ => {
                // Several lookups in one step: sum their gradients per row.
                let mut rows: Vec<u32> = parts.iter().flat_map(|(r, _)| r.iter().copied()).collect();
                rows.sort_unstable();
                rows.dedup();
                let dim = table.dim(1)?;
                let mut grad = Tensor::zeros((rows.len(), dim), parts[0].1.dtype(), table.device())?;
                for (part_rows, g) in &parts {
                    let at: Vec<u32> =
                        part_rows.iter().map(|r| rows.binary_search(r).expect("row is in the union") as u32).collect();
                    // A part's rows are distinct: its scatter is a gather (see distinct_rows).
                    grad = (grad + rankstack_kernels::distinct_rows::scatter_rows(g, &at, rows.len())?)?;
                }
                Ok(Some(RowGradient { table: table.clone(), rows, grad }))
            }
        }
    }
}

/// Whether [`RowGather::pooled_lookup`] of `table` is one launch: scoring (no tracking, a table
/// outside any graph) of an f32 table off the CPU kernels.
fn is_one_launch(table: &Tensor, track: bool) -> bool {
    !track && !table.track_op() && table.dtype() == DType::F32 && !kernels_run_on(table.device())
}

/// One table's bags for [`pooled_lookups`], as [`RowGather::pooled_lookup`] takes them.
#[derive(Debug)]
pub struct PooledLookup<'a> {
    /// The table's lookup record.
    pub gather: &'a RowGather,
    /// The table `[n, dim]`.
    pub table: &'a Tensor,
    /// `[bags · L]`: the entries' rows; empty where every bag is (the output is zeros).
    pub rows: Vec<u32>,
    /// `[bags · L]`: the entries' weights (0 for padding).
    pub weights: Vec<f64>,
    /// The number of bags.
    pub bags: usize,
}

/// [`RowGather::pooled_lookup`] of several tables (a model's sparse features), in order. Where
/// each is one launch (scoring off the CPU kernels), the rows and weights of all of them go to
/// the device in two uploads instead of two per table
/// ([`rankstack_kernels::device_embedding_bag::embedding_bags`]): on a GPU each upload from
/// pageable memory is a copy the host waits for, and `homefeed-bench` has sixteen tables.
/// Lookups without entries give zeros `[bags, dim]` in the table's dtype.
pub fn pooled_lookups(lookups: Vec<PooledLookup<'_>>, track: bool) -> Result<Vec<Tensor>> {
    let zeros = |l: &PooledLookup<'_>| Tensor::zeros((l.bags, l.table.dim(1)?), l.table.dtype(), l.table.device());
    if lookups.iter().all(|l| is_one_launch(l.table, track)) {
        let weights: Vec<Vec<f32>> = lookups.iter().map(|l| l.weights.iter().map(|&w| w as f32).collect()).collect();
        let bags: Vec<Bags<'_>> = lookups
            .iter()
            .zip(&weights)
            .map(|(l, weights)| Bags { table: l.table, rows: &l.rows, weights, bags: l.bags })
            .collect();
        return embedding_bags(&bags);
    }
    // Every table's index arrays in one upload, and every table's weights in another; each
    // table's parts views of them.
    let device = match lookups.iter().find(|l| !l.rows.is_empty()) {
        Some(l) => l.table.device(),
        None => return lookups.iter().map(zeros).collect(),
    };
    if let Some(l) = lookups.iter().find(|l| !l.table.device().same_device(device)) {
        candle_core::bail!("pooled lookups: tables on {:?} and {:?}", device.location(), l.table.device().location());
    }
    let mut stage = IndexStage::default();
    let staged = lookups
        .iter()
        .map(|l| (!l.rows.is_empty()).then(|| l.gather.stage_lookup(l.table, &l.rows, track, &mut stage)).transpose())
        .collect::<Result<Vec<_>>>()?;
    let all: Vec<f64> = lookups.iter().flat_map(|l| l.weights.iter().copied()).collect();
    let n = all.len();
    let uploaded = stage.upload(device, "embedding lookups' rows")?;
    let all = upload(all, n, device, "sparse bag weights", Origin::Input)?;
    let mut start = 0;
    lookups
        .iter()
        .zip(staged)
        .map(|(l, staged)| {
            let weights = all.narrow(0, start, l.weights.len())?;
            start += l.weights.len();
            match staged {
                None => zeros(l),
                Some(staged) => {
                    let gathered = l.gather.finish_lookup(l.table, staged, &uploaded)?;
                    RowGather::weighted_bags(&gathered, &weights, l.bags)
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Scoring on the GPU's graph (the CPU with its kernels off, a table outside any graph): the
    /// one-launch bags give the composed lookup's bits; a table in a graph keeps the composed
    /// lookup and its gradient.
    #[test]
    fn pooled_bags_in_scoring_equal_the_composed_lookup() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        let t = table();
        let constant = t.as_tensor().detach();
        let rows = [4u32, 1, 1, 0, 3, 3];
        let weights = [0.5, 0.5, 1.0, 0.0, 1.0 / 3.0, 2.0 / 3.0];
        let gather = RowGather::default();
        let scoring =
            with_isa(Isa::Candle, || gather.pooled_lookup(&constant, &rows, weights.to_vec(), 3, false).unwrap());
        let composed = gather.pooled_lookup(&constant, &rows, weights.to_vec(), 3, false).unwrap();
        assert_eq!(crate::testing::value_bits(&scoring), crate::testing::value_bits(&composed));
        let trained =
            with_isa(Isa::Candle, || gather.pooled_lookup(t.as_tensor(), &rows, weights.to_vec(), 3, false).unwrap());
        assert_eq!(crate::testing::value_bits(&trained), crate::testing::value_bits(&composed));
        let grads = trained.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(t.as_tensor()).is_some(), "the table in a graph gets its gradient");
    }

    /// Several tables at once: in scoring on the GPU's graph two uploads for all of them, each
    /// table's bits as [`RowGather::pooled_lookup`]'s; a table without entries gives zeros; with
    /// the CPU kernels, or a table in a graph, each table its own lookup, the same values.
    #[test]
    fn pooled_lookups_of_several_tables_share_their_uploads_in_scoring() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        use rankstack_kernels::host_transfer::record_transfers;

        let t = table();
        let (a, b) = (t.as_tensor().detach(), (t.as_tensor().detach() * 3.0).unwrap());
        let rows = [4u32, 1, 1, 0, 3, 3];
        let weights = [0.5, 0.5, 1.0, 0.0, 1.0 / 3.0, 2.0 / 3.0];
        let gathers = [RowGather::default(), RowGather::default(), RowGather::default()];
        fn lookups<'a>(
            gathers: &'a [RowGather; 3],
            tables: [&'a Tensor; 2],
            rows: &[u32],
            weights: &[f64],
        ) -> Vec<PooledLookup<'a>> {
            let part = |n: usize| (rows[..n].to_vec(), weights[..n].to_vec());
            let ((r6, w6), (r4, w4)) = (part(6), part(4));
            vec![
                PooledLookup { gather: &gathers[0], table: tables[0], rows: r6, weights: w6, bags: 3 },
                PooledLookup { gather: &gathers[1], table: tables[1], rows: vec![], weights: vec![], bags: 3 },
                PooledLookup { gather: &gathers[2], table: tables[1], rows: r4, weights: w4, bags: 2 },
            ]
        }
        let alone = |table: &Tensor, n: usize, bags: usize| {
            RowGather::default().pooled_lookup(table, &rows[..n], weights[..n].to_vec(), bags, false).unwrap()
        };
        let want = [alone(&a, 6, 3), Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(), alone(&b, 4, 2)];
        let bits = |got: &[Tensor]| got.iter().map(crate::testing::value_bits).collect::<Vec<_>>();
        let (scoring, transfers) = with_isa(Isa::Candle, || {
            record_transfers(|| pooled_lookups(lookups(&gathers, [&a, &b], &rows, &weights), false).unwrap())
        });
        assert_eq!(transfers.iter().map(|t| t.what).collect::<Vec<_>>(), ["gathered rows", "sparse bag weights"]);
        assert_eq!(bits(&scoring), bits(&want));
        assert_eq!(bits(&pooled_lookups(lookups(&gathers, [&a, &b], &rows, &weights), false).unwrap()), bits(&want));
        let (in_graph, transfers) = with_isa(Isa::Candle, || {
            record_transfers(|| pooled_lookups(lookups(&gathers, [t.as_tensor(), &b], &rows, &weights), false).unwrap())
        });
        assert_eq!(bits(&in_graph), bits(&want));
        // Composed lookups: one upload of every table's rows, one of every table's weights.
        let whats: Vec<_> = transfers.iter().map(|t| (t.what, t.elements)).collect();
        assert_eq!(whats, [("embedding lookups' rows", 10), ("sparse bag weights", 10)]);
        // Training: tracked lookups in row-sparse mode (distinct rows, inverse, segments) of
        // both tables in one upload too; each table's row gradient as from its own lookup.
        let tables = [t.as_tensor().clone(), (t.as_tensor() * 3.0).unwrap()];
        let mut row_grads = Vec::new();
        for together in [true, false] {
            gathers.iter().for_each(|g| g.set_enabled(true));
            let (pooled, transfers) = record_transfers(|| match together {
                true => pooled_lookups(lookups(&gathers, [&tables[0], &tables[1]], &rows, &weights), true).unwrap(),
                false => lookups(&gathers, [&tables[0], &tables[1]], &rows, &weights)
                    .into_iter()
                    .map(|l| pooled_lookups(vec![l], true).unwrap().remove(0))
                    .collect(),
            });
            let uploads = transfers.iter().filter(|t| t.what == "embedding lookups' rows").count();
            assert_eq!(uploads, if together { 1 } else { 2 });
            let loss = pooled.iter().map(|p| p.sqr().unwrap().sum_all().unwrap()).reduce(|a, b| (a + b).unwrap());
            let grads = loss.unwrap().backward().unwrap();
            let taken: Vec<_> = [(0, &tables[0]), (2, &tables[1])]
                .iter()
                .map(|&(i, table)| gathers[i].take(table, &grads).unwrap().unwrap())
                .map(|r| (r.rows, crate::testing::value_bits(&r.grad)))
                .collect();
            row_grads.push(taken);
        }
        assert_eq!(row_grads[0], row_grads[1]);
    }

    fn table() -> Var {
        let values: Vec<f32> = (0..20).map(|i| i as f32 * 0.25 - 2.0).collect();
        Var::from_tensor(&Tensor::from_vec(values, (5, 4), &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn row_gradients_equal_the_dense_gradient_rows_bit_for_bit() {
        let w = table();
        let rows = [3u32, 1, 3, 0, 3];
        let weights =
            Tensor::from_vec((0..20).map(|i| (i as f32).sin()).collect::<Vec<_>>(), (5, 4), &Device::Cpu).unwrap();
        let loss = |y: &Tensor| (y * &weights).unwrap().sqr().unwrap().sum_all().unwrap();

        let dense = RowGather::default();
        let dense_grad = loss(&dense.lookup(w.as_tensor(), &rows, true).unwrap()).backward().unwrap();
        let dense_grad = dense_grad.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();

        let sparse = RowGather::default();
        sparse.set_enabled(true);
        let y = sparse.lookup(w.as_tensor(), &rows, true).unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            dense.lookup(w.as_tensor(), &rows, false).unwrap().to_vec2::<f32>().unwrap()
        );
        let grads = loss(&y).backward().unwrap();
        assert!(grads.get(w.as_tensor()).is_none(), "the table is not in the graph in row-sparse mode");
        let g = sparse.take(w.as_tensor(), &grads).unwrap().unwrap();
        assert_eq!(g.rows, [0, 1, 3]);
        let got = g.grad.to_vec2::<f32>().unwrap();
        for (i, &r) in g.rows.iter().enumerate() {
            assert_eq!(got[i], dense_grad[r as usize]);
        }
        assert!(sparse.take(w.as_tensor(), &grads).unwrap().is_none(), "taking clears the record");
    }

    #[test]
    fn several_lookups_in_one_step_are_merged() {
        let w = table();
        let sparse = RowGather::default();
        sparse.set_enabled(true);
        let a = sparse.lookup(w.as_tensor(), &[4, 2], true).unwrap();
        let b = sparse.lookup(w.as_tensor(), &[2], true).unwrap();
        let loss = (a.sum_all().unwrap() + (b.sum_all().unwrap() * 2.0).unwrap()).unwrap();
        let g = sparse.take(w.as_tensor(), &loss.backward().unwrap()).unwrap().unwrap();
        assert_eq!(g.rows, [2, 4]);
        assert_eq!(g.grad.to_vec2::<f32>().unwrap(), vec![vec![3.0f32; 4], vec![1.0; 4]]);
    }

    #[test]
    fn untracked_lookups_record_nothing() {
        let w = table();
        let sparse = RowGather::default();
        sparse.set_enabled(true);
        let y = sparse.lookup(w.as_tensor(), &[1], false).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(sparse.take(w.as_tensor(), &grads).unwrap().is_none());
        assert_eq!(y.dtype(), DType::F32);
    }
}
