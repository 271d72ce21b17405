//! Variable-length sequences stored back to back as the rows of one tensor.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use rankstack_kernels::device_copies::DeviceCopies;
use rankstack_nn::Error;

const WHAT: &str = "PackedSequences";

/// The layout of `B` sequences of lengths `L_0 … L_{B−1}` stored back to back as the rows of one
/// `[R, d]` tensor (`R = Σ L_b`), and the additive score bias of every row as an attention key
/// (`0` attend, `−∞` hidden).
///
/// Every row-wise part of an encoder layer (projections, LayerNorm, feed-forward, dropout) works on
/// the packed rows as on any `[R, d]` batch; only attention needs the sequence boundaries. Packing
/// lets TransAct drop the rows no output depends on ([`PackedSequences::compact`]), which is about
/// half of them on histories with padding, as PyTorch's nested-tensor fast path does at inference.
///
/// ```
/// # use sequence_transformer::PackedSequences;
/// // Two sequences of 4 positions; masked: position 3 of the first, positions 1..4 of the second.
/// let masked = [false, false, false, true, false, true, true, true];
/// let (packed, rows) = PackedSequences::compact(&masked, 2, 4, 2)?;
/// // Kept: unmasked positions and the first 2 of each sequence (read by the output).
/// assert_eq!(rows, vec![0, 1, 2, 4, 5]);
/// assert_eq!(packed.lengths().collect::<Vec<_>>(), vec![3, 2]);
/// assert_eq!(packed.key_bias()[4], f64::NEG_INFINITY); // position 1 of sequence 2 is no key
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PackedSequences {
    offsets: Vec<usize>,
    key_bias: Vec<f64>,
    /// What the attention layers derive from the layout for a device, made once for all of them
    /// (`packed_attention.rs`); never part of the comparison.
    device_copies: DeviceCopies,
}

impl PackedSequences {
    /// Sequences of the given lengths with one key bias per row (`Σ lengths` values).
    pub fn new(lengths: &[usize], key_bias: Vec<f64>) -> rankstack_nn::Result<Self> {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        for &l in lengths {
            offsets.push(offsets.last().copied().unwrap_or(0) + l);
        }
        let rows = offsets.last().copied().unwrap_or(0);
        if key_bias.len() != rows {
            return Err(Error::input(
                WHAT,
                "key_bias",
                format!("{} values for {rows} rows (lengths {lengths:?})", key_bias.len()),
            ));
        }
        if let Some(i) = key_bias.iter().position(|v| v.is_nan() || *v == f64::INFINITY) {
            return Err(Error::input(WHAT, "key_bias", format!("row {i} has bias {}", key_bias[i])));
        }
        Ok(Self { offsets, key_bias, device_copies: DeviceCopies::default() })
    }

    /// `batch` sequences of `len` rows each (every row kept), with an additive key mask
    /// `[batch · len]` (`0` attend, `−∞` hidden) or none.
    pub fn dense(batch: usize, len: usize, additive_mask: Option<Vec<f64>>) -> rankstack_nn::Result<Self> {
        Self::new(&vec![len; batch], additive_mask.unwrap_or_else(|| vec![0.0; batch * len]))
    }

    /// [`PackedSequences::dense`] from an additive key-mask tensor `[batch, len]` (any float dtype,
    /// any device; `0` attend, `−∞` hidden, other finite values added to the scores as given).
    /// A mask of the wrong shape is an error naming `layer`.
    pub fn from_key_mask(
        layer: &str,
        batch: usize,
        len: usize,
        key_mask: Option<&Tensor>,
    ) -> rankstack_nn::Result<Self> {
        let bias = match key_mask {
            Some(m) => {
                rankstack_nn::shape::expect_dims(layer, "key mask", m, &[Some(batch), Some(len)])?;
                Some(rankstack_nn::host_transfer::read_input::<f64>(&m.to_dtype(DType::F64)?, "key mask")?)
            }
            None => None,
        };
        Self::dense(batch, len, bias)
    }

    /// Keeps, of `batch` sequences of `len` positions with a key mask `masked` (`[batch · len]`,
    /// `true` = hidden), only the rows an output can depend on: the unmasked positions and the
    /// first `keep_first` positions of each sequence. Returns the layout and, per kept row, its
    /// index in the `[batch · len]` rows.
    ///
    /// This is exact for a stack of encoder layers: a masked row is never a key, so it influences
    /// no other row; only its own output — at a kept position — can be read.
    pub fn compact(
        masked: &[bool],
        batch: usize,
        len: usize,
        keep_first: usize,
    ) -> rankstack_nn::Result<(Self, Vec<u32>)> {
        if masked.len() != batch * len {
            return Err(Error::input(WHAT, "mask", format!("{} values for {batch} × {len} positions", masked.len())));
        }
        let mut offsets = vec![0];
        let (mut rows, mut key_bias) = (Vec::new(), Vec::new());
        for b in 0..batch {
            let seq = &masked[b * len..(b + 1) * len];
            for (i, &m) in seq.iter().enumerate() {
                if !m || i < keep_first {
                    rows.push((b * len + i) as u32);
                    key_bias.push(if m { f64::NEG_INFINITY } else { 0.0 });
                }
            }
            offsets.push(rows.len());
        }
        Ok((Self { offsets, key_bias, device_copies: DeviceCopies::default() }, rows))
    }

    /// The same sequences in ascending order of length (a stable sort: equal lengths keep their
    /// order), with `rows`, one value per packed row (what [`PackedSequences::compact`] returns),
    /// permuted to match. The composed attention of a GPU pads each chunk of consecutive
    /// sequences to its longest: sorted, a chunk's sequences have similar lengths, so it pads
    /// little (`packed_attention.rs`). A row-wise layer does not care about the order.
    ///
    /// ```
    /// # use sequence_transformer::PackedSequences;
    /// let packed = PackedSequences::new(&[3, 1, 2], vec![0.0; 6])?;
    /// let (sorted, rows) = packed.sorted_by_length(&[10, 11, 12, 20, 30, 31])?;
    /// assert_eq!(sorted.lengths().collect::<Vec<_>>(), [1, 2, 3]);
    /// assert_eq!(rows, [20, 30, 31, 10, 11, 12]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn sorted_by_length(&self, rows: &[u32]) -> rankstack_nn::Result<(Self, Vec<u32>)> {
        if rows.len() != self.num_rows() {
            return Err(Error::input(WHAT, "rows", format!("{} values for {} rows", rows.len(), self.num_rows())));
        }
        let mut order: Vec<usize> = (0..self.batch_size()).collect();
        order.sort_by_key(|&s| self.offsets[s + 1] - self.offsets[s]);
        let mut offsets = Vec::with_capacity(self.offsets.len());
        offsets.push(0);
        let (mut sorted_rows, mut key_bias) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
        for s in order {
            let span = self.offsets[s]..self.offsets[s + 1];
            sorted_rows.extend_from_slice(&rows[span.clone()]);
            key_bias.extend_from_slice(&self.key_bias[span]);
            offsets.push(sorted_rows.len());
        }
        Ok((Self { offsets, key_bias, device_copies: DeviceCopies::default() }, sorted_rows))
    }

    /// The number of sequences `B`.
    pub fn batch_size(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The number of rows `R`.
    pub fn num_rows(&self) -> usize {
        self.key_bias.len()
    }

    /// The first row of each sequence, then `R` (`B + 1` values).
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The length of each sequence.
    pub fn lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.offsets.windows(2).map(|w| w[1] - w[0])
    }

    /// The length every sequence has, if they are all equal.
    pub fn uniform_length(&self) -> Option<usize> {
        let mut lengths = self.lengths();
        let first = lengths.next()?;
        lengths.all(|l| l == first).then_some(first)
    }

    /// The additive score bias of every row as a key.
    pub fn key_bias(&self) -> &[f64] {
        &self.key_bias
    }

    /// Device values the attention derives from the layout, kept for every layer.
    pub(crate) fn device_copies(&self) -> &DeviceCopies {
        &self.device_copies
    }

    /// The number of attention weights over these sequences with `num_heads` heads, `Σ H·L_b²`
    /// (as many dropout multipliers as attention-weight dropout draws).
    pub fn attention_weight_count(&self, num_heads: usize) -> usize {
        self.lengths().map(|l| num_heads * l * l).sum()
    }
}

/// `packed(rows, sequences)` applied to a dense batch `x` `[B, S, d]`: its rows packed as `B`
/// sequences of `S` (all kept) with the additive `key_mask` `[B, S]`, and the result `[B·S, d']`
/// returned as `[B, S, d']`. The dense `forward_t` of the encoder modules; shape errors name
/// `layer` (`width`: the `d` it expects, if any).
pub(crate) fn forward_dense(
    layer: &str,
    x: &Tensor,
    width: Option<usize>,
    key_mask: Option<&Tensor>,
    packed: impl FnOnce(&Tensor, &Arc<PackedSequences>) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    rankstack_nn::shape::expect_dims(layer, "input", x, &[None, None, width])?;
    let (b, s, d) = x.dims3()?;
    let sequences = Arc::new(PackedSequences::from_key_mask(layer, b, s, key_mask)?);
    let out = packed(&x.reshape((b * s, d))?, &sequences)?;
    let width_out = out.dim(1)?;
    out.reshape((b, s, width_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_offsets_are_consistent() {
        let p = PackedSequences::new(&[2, 0, 3], vec![0.0; 5]).unwrap();
        assert_eq!(p.offsets(), &[0, 2, 2, 5]);
        assert_eq!(p.lengths().collect::<Vec<_>>(), vec![2, 0, 3]);
        assert_eq!((p.batch_size(), p.num_rows(), p.uniform_length()), (3, 5, None));
        assert_eq!(PackedSequences::dense(2, 3, None).unwrap().uniform_length(), Some(3));
    }

    #[test]
    fn sorting_by_length_is_stable_and_checks_the_row_count() {
        let inf = f64::NEG_INFINITY;
        let p = PackedSequences::new(&[2, 1, 2, 0], vec![0.0, inf, 0.0, inf, 0.0]).unwrap();
        let (sorted, rows) = p.sorted_by_length(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(sorted.lengths().collect::<Vec<_>>(), [0, 1, 2, 2]);
        assert_eq!(rows, [3, 1, 2, 4, 5]);
        assert_eq!(sorted.key_bias(), &[0.0, 0.0, inf, inf, 0.0]);
        let err = p.sorted_by_length(&[1, 2]).unwrap_err().to_string();
        assert!(err.contains("2 values for 5 rows"), "{err}");
    }

    #[test]
    fn bad_key_bias_is_an_error_naming_the_count_or_row() {
        let e = PackedSequences::new(&[2, 2], vec![0.0; 3]).unwrap_err().to_string();
        assert!(e.contains("3 values for 4 rows"), "{e}");
        let e = PackedSequences::new(&[2], vec![0.0, f64::NAN]).unwrap_err().to_string();
        assert!(e.contains("row 1"), "{e}");
    }

    #[test]
    fn compaction_keeps_keys_and_the_first_positions() {
        let masked = [false, true, false, true, /* seq 1 */ false, true, true, true];
        let (p, rows) = PackedSequences::compact(&masked, 2, 4, 2).unwrap();
        assert_eq!(rows, vec![0, 1, 2, 4, 5]);
        assert_eq!(p.offsets(), &[0, 3, 5]);
        let inf = f64::NEG_INFINITY;
        assert_eq!(p.key_bias(), &[0.0, inf, 0.0, 0.0, inf]);
        let e = PackedSequences::compact(&masked, 3, 4, 2).unwrap_err().to_string();
        assert!(e.contains("8 values for 3 × 4"), "{e}");
    }
}
