//! L2 normalisation of feature blocks.

use candle_core::{Result, Tensor, D};

use crate::L2_EPS;

/// `x / max(‖x‖₂, eps)` along the last dimension, as PyTorch's `F.normalize(x, dim=-1, eps=eps)`.
///
/// Computed as `x / sqrt(max(Σx², eps²))`, which has the same value and the same gradient wherever
/// `‖x‖ ≠ eps`, and unlike `max(sqrt(Σx²), eps)` has a finite gradient at `x = 0` (an empty bag):
/// `sqrt`'s derivative at 0 is infinite, and `∞ · 0` would turn the gradient of the embedding table
/// into NaN.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let y = feature_encoders::l2_normalize(&Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu)?, 1e-12)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.6, 0.8], vec![0., 0.]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let sq = x.sqr()?.sum_keepdim(D::Minus1)?.maximum(eps * eps)?;
    x.broadcast_div(&sq.sqrt()?)
}

/// The blocks of an encoder's output in column order, where consecutive blocks of one width that
/// are L2-normalised are normalised together, as one `[B, n, w]` tensor: one set of operations
/// (five) for the run instead of one per feature (sixteen sparse features of width 32 made eighty
/// operations, each a kernel launch on a GPU). Every row of every block is normalised by its own
/// norm, summed over the same values in the same order, so the values and gradients are those of
/// [`l2_normalize`] block by block, bit for bit (see the encoder's tests).
#[derive(Default)]
pub(crate) struct NormalizedBlocks {
    blocks: Vec<Tensor>,
    /// Consecutive blocks waiting to be normalised, all `[B, w]` of one width.
    run: Vec<Tensor>,
}

impl NormalizedBlocks {
    /// Appends `block` `[B, w]`, to be L2-normalised iff `normalize`.
    pub(crate) fn push(&mut self, block: Tensor, normalize: bool) -> Result<()> {
        let other_width = match self.run.first() {
            Some(first) => first.dim(D::Minus1)? != block.dim(D::Minus1)?,
            None => false,
        };
        if !normalize || other_width {
            self.flush()?;
        }
        match normalize {
            true => self.run.push(block),
            false => self.blocks.push(block),
        }
        Ok(())
    }

    /// The blocks, each normalised as asked.
    pub(crate) fn finish(mut self) -> Result<Vec<Tensor>> {
        self.flush()?;
        Ok(self.blocks)
    }

    fn flush(&mut self) -> Result<()> {
        let normalized = match self.run.len() {
            0 => return Ok(()),
            1 => l2_normalize(&self.run[0], L2_EPS)?,
            n => {
                let (b, w) = self.run[0].dims2()?;
                l2_normalize(&Tensor::cat(&self.run, 1)?.reshape((b, n, w))?, L2_EPS)?.reshape((b, n * w))?
            }
        };
        self.run.clear();
        self.blocks.push(normalized);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// Runs of normalised blocks (widths 4, 4, 4, then 3, 3), a plain block between them and an
    /// all-zero row: the same bits as normalising block by block, in value and every gradient.
    #[test]
    fn normalising_a_run_together_is_normalising_each_block() {
        let layout = [(4, true), (4, true), (4, true), (3, true), (3, true), (5, false), (4, true), (2, false)];
        let blocks: Vec<Var> = layout
            .iter()
            .enumerate()
            .map(|(i, &(w, _))| {
                let values: Vec<f32> =
                    (0..3 * w).map(|j| if j < w { 0.0 } else { ((i * 31 + j * 7) % 13) as f32 - 6.2 }).collect();
                Var::from_tensor(&Tensor::from_vec(values, (3, w), &Device::Cpu).unwrap()).unwrap()
            })
            .collect();
        let mut together = NormalizedBlocks::default();
        for (b, &(_, normalize)) in blocks.iter().zip(&layout) {
            together.push(b.as_tensor().clone(), normalize).unwrap();
        }
        let together = Tensor::cat(&together.finish().unwrap(), 1).unwrap();
        let one_by_one: Vec<Tensor> = blocks
            .iter()
            .zip(&layout)
            .map(|(b, &(_, n))| if n { l2_normalize(b.as_tensor(), L2_EPS).unwrap() } else { b.as_tensor().clone() })
            .collect();
        let one_by_one = Tensor::cat(&one_by_one, 1).unwrap();
        assert_eq!(bits(&together), bits(&one_by_one));
        let r = Tensor::from_vec((0..3 * 29).map(|i| (i % 7) as f32 - 2.5).collect::<Vec<_>>(), (3, 29), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let g1 = together.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = one_by_one.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        for b in &blocks {
            assert_eq!(bits(g1.get(b.as_tensor()).unwrap()), bits(g2.get(b.as_tensor()).unwrap()));
        }
    }
}
