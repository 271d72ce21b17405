//! Moving *distinct* rows of a matrix: a gather whose backward pass is a gather too.
//!
//! `index_select` along dim 0 is differentiable in candle, but its backward pass is `index_add`,
//! and so is the usual way of putting rows back (`zeros.index_add(rows, src)`). candle 0.11's CUDA
//! `index_add` (and `scatter`) kernel runs one thread per column and loops over the rows serially:
//! for TransAct's packed rows (1.6 million rows of width 96 at batch 32 768) that is 96 threads
//! doing all the work, and it made GPU scoring 30 times slower than PyTorch. When the rows are
//! distinct, scattering them is a gather with the inverse map, so both directions here are
//! gathers (`index_select`, parallel over every element on every device):
//!
//! ```text
//! gather_rows(x, r)        y[i] = x[r[i]]                      (r distinct)
//! scatter_rows(s, r, n)    y[r[i]] = s[i], y[j] = 0 elsewhere   (r distinct, r[i] < n)
//! ```
//!
//! Values are exact copies, so results equal `index_select` / `zeros.index_add` (up to the sign
//! of zeros) on every device.

//!
//! Where the same rows move several times (TransAct's attention scatters its query, key and value
//! rows into the padded layout and gathers the output back, in the forward pass and again when the
//! backward pass recomputes it), [`DistinctRows`] builds the index tensors once.

use candle_core::{Device, Result, Tensor};

use crate::index_stage::{IndexStage, Part, StagedIndexes};
use crate::row_gather_op::RowGatherOp;

/// `x[rows]` for a 2-D `x` `[n, d]` and distinct `rows` (each `< n`): `[rows.len(), d]`.
pub fn gather_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    DistinctRows::new(rows, n, x.device(), "gather_rows")?.gather(x)
}

/// `[n, d]` zeros with row `rows[i]` set to `src[i]`, for a 2-D `src` `[rows.len(), d]` and
/// distinct `rows` (each `< n`).
pub fn scatter_rows(src: &Tensor, rows: &[u32], n: usize) -> Result<Tensor> {
    DistinctRows::new(rows, n, src.device(), "scatter_rows")?.scatter(src)
}

/// `m` distinct rows of an `n`-row matrix, with the index tensors of both directions on a device,
/// for gathering and scattering the same rows several times ([`DistinctRows::gather`] is
/// [`gather_rows`], [`DistinctRows::scatter`] is [`scatter_rows`]).
///
/// ```
/// # use candle_core::{Device, Tensor};
/// use rankstack_kernels::distinct_rows::DistinctRows;
/// let rows = DistinctRows::new(&[2, 0], 3, &Device::Cpu, "example")?;
/// let x = Tensor::new(&[[1f32], [2.], [3.]], &Device::Cpu)?;
/// let picked = rows.gather(&x)?;
/// assert_eq!(picked.to_vec2::<f32>()?, [[3.], [1.]]);
/// assert_eq!(rows.scatter(&picked)?.to_vec2::<f32>()?, [[1.], [0.], [3.]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DistinctRows {
    /// `n`, the rows of the full matrix.
    n: usize,
    /// `[m + 1]` u32: the rows, then `n` (a sentinel: the extra row of a scatter's source).
    rows_then_n: Tensor,
    /// `[n]` u32: where each row of the full matrix is among the rows, `m` where it is not.
    inverse: Tensor,
    /// `[n]` u32: the source row each row of the full matrix repeats in a
    /// [`DistinctRows::spread`] (its own where it is among the rows); `None` without fill rows.
    spread_sources: Option<Tensor>,
}

impl DistinctRows {
    /// The rows `rows` (distinct, each `< n`) on `device`; `op` names the caller in errors.
    pub fn new(rows: &[u32], n: usize, device: &Device, op: &str) -> Result<Self> {
        let mut stage = IndexStage::default();
        let staged = StagedDistinctRows::stage(rows, n, None, &mut stage, op)?;
        staged.finish(&stage.upload(device, "distinct rows")?)
    }

    /// [`DistinctRows::new`] that can also [`DistinctRows::spread`]: row `j` of the full matrix
    /// that is not among `rows` repeats source row `fill(j)` (which must be `< rows.len()`).
    pub fn with_fill(rows: &[u32], n: usize, fill: impl Fn(usize) -> u32, device: &Device, op: &str) -> Result<Self> {
        let mut stage = IndexStage::default();
        let staged = StagedDistinctRows::stage(rows, n, Some(&fill), &mut stage, op)?;
        staged.finish(&stage.upload(device, "distinct rows")?)
    }

    /// The number of rows `m`.
    pub fn len(&self) -> usize {
        self.rows_then_n.dim(0).map_or(0, |len| len - 1)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `x[rows]` for `x` `[n, d]`: `[m, d]`; its gradient goes back by a gather with the inverse.
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        if n != self.n {
            candle_core::bail!("gather_rows: a matrix of {n} rows for rows of a {}-row matrix", self.n);
        }
        apply(&x.contiguous()?, &self.rows_then_n.narrow(0, 0, self.len())?, &self.inverse)
    }

    /// `[n, d]` zeros with row `rows[i]` set to `src[i]`, for `src` `[m, d]`.
    pub fn scatter(&self, src: &Tensor) -> Result<Tensor> {
        let (m, d) = src.dims2()?;
        if m != self.len() {
            candle_core::bail!("scatter_rows: {} rows for a source of {m}", self.len());
        }
        // Output row j reads source row inverse[j]; rows not written read an appended zero row (m).
        let extended = Tensor::cat(&[&src.contiguous()?, &Tensor::zeros((1, d), src.dtype(), src.device())?], 0)?;
        // The zero row's gradient is discarded: it reads the sentinel row n of the extended gradient.
        apply(&extended, &self.inverse, &self.rows_then_n)?.narrow(0, 0, self.n)
    }

    /// `[n, d]` with row `rows[i]` set to `src[i]` and every other row `j` to `src[fill(j)]`
    /// ([`DistinctRows::with_fill`]): [`DistinctRows::scatter`] in one gather, without appending a
    /// zero row to the source (a copy of it) first.
    ///
    /// Its backward pass takes the gradient of row `rows[i]` back to `src[i]` and drops that of
    /// the filled rows. That is the exact gradient only where the filled rows' gradient is zero,
    /// which the caller guarantees: the padding of a masked attention, whose keys get no weight
    /// and whose queries' outputs are never read.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// use rankstack_kernels::distinct_rows::DistinctRows;
    /// // Rows 0 and 2 of 4 are the source's; rows 1 and 3 repeat source row 0.
    /// let rows = DistinctRows::with_fill(&[0, 2], 4, |_| 0, &Device::Cpu, "example")?;
    /// let src = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
    /// assert_eq!(rows.spread(&src)?.to_vec2::<f32>()?, [[1.], [1.], [2.], [1.]]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn spread(&self, src: &Tensor) -> Result<Tensor> {
        let Some(sources) = &self.spread_sources else {
            candle_core::bail!("spread_rows: rows built without fill rows (DistinctRows::with_fill)")
        };
        let (m, _) = src.dims2()?;
        if m != self.len() {
            candle_core::bail!("spread_rows: {} rows for a source of {m}", self.len());
        }
        apply(&src.contiguous()?, sources, &self.rows_then_n.narrow(0, 0, m)?)
    }
}

/// For `rows` distinct and `< n`: `inv[rows[i]] = i`, and `rows.len()` (a sentinel) elsewhere.
/// [`DistinctRows`] in two steps, so that many share one upload: its index arrays staged on the
/// host ([`StagedDistinctRows::stage`], which checks the rows), then taken from the upload
/// ([`StagedDistinctRows::finish`]).
#[derive(Debug, Clone)]
pub struct StagedDistinctRows {
    n: usize,
    rows_then_n: Part,
    inverse: Part,
    spread_sources: Option<Part>,
}

impl StagedDistinctRows {
    /// Stages the rows `rows` (distinct, each `< n`), with `fill` as in
    /// [`DistinctRows::with_fill`] (`None`: as [`DistinctRows::new`]); `op` names the caller in
    /// errors.
    pub fn stage(
        rows: &[u32],
        n: usize,
        fill: Option<&dyn Fn(usize) -> u32>,
        stage: &mut IndexStage,
        op: &str,
    ) -> Result<Self> {
        let m = rows.len() as u32;
        let inverse = inverse(rows, n, op)?;
        let spread_sources = match fill {
            None => None,
            Some(fill) => {
                let mut sources = inverse.clone();
                for (j, source) in sources.iter_mut().enumerate().filter(|(_, s)| **s == m) {
                    *source = fill(j);
                    if *source >= m {
                        candle_core::bail!("{op}: row {j} is filled from source row {source} of {m}");
                    }
                }
                Some(sources)
            }
        };
        Ok(Self {
            n,
            rows_then_n: stage.extend(rows.iter().copied().chain([n as u32])),
            // One entry per row of the full matrix: on a GPU this part grows with `n`.
            inverse: stage.push(&inverse),
            spread_sources: spread_sources.map(|s| stage.push(&s)),
        })
    }

    /// The rows, their arrays views of `staged`.
    pub fn finish(&self, staged: &StagedIndexes) -> Result<DistinctRows> {
        Ok(DistinctRows {
            n: self.n,
            rows_then_n: staged.part(&self.rows_then_n)?,
            inverse: staged.part(&self.inverse)?,
            spread_sources: self.spread_sources.as_ref().map(|p| staged.part(p)).transpose()?,
        })
    }
}

fn inverse(rows: &[u32], n: usize, op: &str) -> Result<Vec<u32>> {
    let sentinel = rows.len() as u32;
    let mut inv = vec![sentinel; n];
    for (i, &r) in rows.iter().enumerate() {
        match inv.get_mut(r as usize) {
            Some(slot) if *slot == sentinel => *slot = i as u32,
            Some(_) => candle_core::bail!("{op}: row {r} appears twice"),
            None => candle_core::bail!("{op}: row {r} is out of range for {n} rows"),
        }
    }
    Ok(inv)
}

/// `y = x[forward]` with `∂x = [∂y ; 0][back]`: exact when every row of `x` that `forward`
/// reads more than once is constant (the zero row of a scatter). `back` `[in_rows]` u32: the
/// output row each input row's gradient comes from (`out_rows`: none).
fn apply(x: &Tensor, forward: &Tensor, back: &Tensor) -> Result<Tensor> {
    let back = back.clone();
    let op = RowGatherOp {
        name: "distinct-rows-gather",
        index: forward.clone(),
        backward: Box::new(move |grad: &Tensor| {
            let (_, d) = grad.dims2()?;
            let zero = Tensor::zeros((1, d), grad.dtype(), grad.device())?;
            Tensor::cat(&[grad, &zero], 0)?.index_select(&back, 0)
        }),
    };
    x.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    fn grid(rows: usize, cols: usize) -> Var {
        let values: Vec<f64> = (0..rows * cols).map(|i| i as f64 + 1.0).collect();
        Var::from_tensor(&Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn gathers_and_scatters_like_index_select_and_index_add_in_value_and_gradient() {
        let x = grid(5, 3);
        let rows = [4u32, 0, 2];
        let weights =
            Tensor::from_vec((0..9).map(|i| i as f64 - 3.5).collect::<Vec<_>>(), (3, 3), &Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&rows, 3, &Device::Cpu).unwrap();

        let y = gather_rows(x.as_tensor(), &rows).unwrap();
        let want = x.as_tensor().index_select(&ids, 0).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
        let g = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g_want = (&want * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap(),
            g_want.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap()
        );

        let s = grid(3, 3);
        let y = scatter_rows(s.as_tensor(), &rows, 6).unwrap();
        let want = Tensor::zeros((6, 3), DType::F64, &Device::Cpu).unwrap().index_add(&ids, s.as_tensor(), 0).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
        let w6 = Tensor::from_vec((0..18).map(|i| (i as f64).sin()).collect::<Vec<_>>(), (6, 3), &Device::Cpu).unwrap();
        let g = (&y * &w6).unwrap().sum_all().unwrap().backward().unwrap();
        let g_want = (&want * &w6).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(s.as_tensor()).unwrap().to_vec2::<f64>().unwrap(),
            g_want.get(s.as_tensor()).unwrap().to_vec2::<f64>().unwrap()
        );
    }

    #[test]
    fn one_set_of_rows_moves_many_matrices_and_checks_their_sizes() {
        let rows = DistinctRows::new(&[3, 1], 4, &Device::Cpu, "test").unwrap();
        assert_eq!((rows.len(), rows.is_empty()), (2, false));
        for seed in 0..3 {
            let x = Tensor::from_vec((0..8).map(|i| (i * (seed + 1)) as f32).collect::<Vec<_>>(), (4, 2), &Device::Cpu)
                .unwrap();
            let y = rows.gather(&x).unwrap();
            assert_eq!(y.to_vec2::<f32>().unwrap(), gather_rows(&x, &[3, 1]).unwrap().to_vec2::<f32>().unwrap());
            let back = rows.scatter(&y).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), scatter_rows(&y, &[3, 1], 4).unwrap().to_vec2::<f32>().unwrap());
        }
        let wrong = Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(rows.gather(&wrong).unwrap_err().to_string().contains("5 rows for rows of a 4-row matrix"));
        assert!(rows.scatter(&wrong).unwrap_err().to_string().contains("2 rows for a source of 5"));
        assert!(DistinctRows::new(&[], 0, &Device::Cpu, "test").unwrap().is_empty());
    }

    #[test]
    fn a_spread_fills_the_other_rows_from_the_source_and_takes_back_only_the_placed_rows_gradients() {
        let src = grid(3, 2);
        // Rows 4, 0 and 2 of 6 are the source's; rows 1, 3, 5 repeat source rows 1, 2, 0.
        let rows = DistinctRows::with_fill(&[4, 0, 2], 6, |j| [9, 1, 9, 2, 9, 0][j], &Device::Cpu, "test").unwrap();
        let y = rows.spread(src.as_tensor()).unwrap();
        let s = src.as_tensor().to_vec2::<f64>().unwrap();
        let want: Vec<Vec<f64>> = [1, 1, 2, 2, 0, 0].iter().map(|&i| s[i].clone()).collect();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want);
        // The same values as the zero-filled scatter on the placed rows; the gradient of row
        // rows[i] returns to source row i, the filled rows' gradients are dropped.
        let scattered = rows.scatter(src.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        for r in [4, 0, 2] {
            assert_eq!(y.to_vec2::<f64>().unwrap()[r], scattered[r]);
        }
        let weights = Tensor::from_vec((1..=12).map(|i| i as f64).collect::<Vec<_>>(), (6, 2), &Device::Cpu).unwrap();
        let grad = y.mul(&weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grad.get(src.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(g, [[9., 10.], [1., 2.], [5., 6.]]);
        // Sizes and fill rows are checked; plain rows cannot spread.
        let wrong = Tensor::zeros((5, 2), DType::F64, &Device::Cpu).unwrap();
        assert!(rows.spread(&wrong).unwrap_err().to_string().contains("3 rows for a source of 5"));
        let bad_fill = DistinctRows::with_fill(&[0], 2, |_| 1, &Device::Cpu, "test").unwrap_err().to_string();
        assert!(bad_fill.contains("row 1 is filled from source row 1 of 1"), "{bad_fill}");
        let plain = DistinctRows::new(&[0], 2, &Device::Cpu, "test").unwrap();
        assert!(plain.spread(&wrong.narrow(0, 0, 1).unwrap()).unwrap_err().to_string().contains("without fill rows"));
    }

    #[test]
    fn repeated_or_out_of_range_rows_are_errors() {
        let x = grid(4, 2);
        assert!(gather_rows(x.as_tensor(), &[1, 1]).unwrap_err().to_string().contains("appears twice"));
        assert!(gather_rows(x.as_tensor(), &[4]).unwrap_err().to_string().contains("out of range"));
        assert!(scatter_rows(x.as_tensor(), &[0, 1], 5).unwrap_err().to_string().contains("2 rows for a source of 4"));
        assert_eq!(gather_rows(x.as_tensor(), &[]).unwrap().dims(), &[0, 2]);
    }
}
