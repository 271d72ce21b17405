//! Scaled dot-product attention over packed variable-length sequences: the fused CPU kernel
//! ([`rankstack_kernels::cpu::packed_attention`]) or, on other devices and dtypes, the same
//! attention composed of candle operations on a dense, padded batch.

use std::sync::Arc;

use candle_core::{Result, Tensor, D};

use rankstack_kernels::cpu::packed_attention::{check, head_blocks, packed_attention_fused, SequenceLayout};
use rankstack_kernels::distinct_rows::{gather_rows, scatter_rows};

use crate::PackedSequences;

impl SequenceLayout for PackedSequences {
    fn row_offsets(&self) -> &[usize] {
        self.offsets()
    }

    fn key_bias(&self) -> &[f64] {
        PackedSequences::key_bias(self)
    }
}

/// `O_h = drop(softmax(Q_h K_hᵀ / √d_h + M)) V_h` for every sequence and head `h`, with `Q`, `K`,
/// `V` and `O` the packed rows `[R, d]` of [`PackedSequences`] (heads are column blocks of width
/// `d_h = d / num_heads`) and `M` the key bias of each row (`0` or `−∞`).
///
/// `dropout` holds the multipliers of the attention weights (`0` or `1 / (1 − p)`), sequence by
/// sequence, head by head, row-major `L_b × L_b` each — the order in which a dense
/// `[B, H, L, L]` dropout would draw them.
///
/// On the CPU (f32/f64) this is one graph node, the fused kernel: each (sequence, head) task
/// computes its scores, softmax and context while they are in cache, and the backward pass
/// recomputes the weights rather than keeping `Σ H·L_b²` values per layer alive until then.
/// Elsewhere (other devices and dtypes) it is the composed attention on a dense, padded batch.
///
/// ```
/// # use std::sync::Arc;
/// # use candle_core::{Device, DType, Tensor};
/// # use sequence_transformer::{packed_attention, PackedSequences};
/// // Two sequences of 3 and 2 rows, width 4, 2 heads; the last row of the first is no key.
/// let seqs = Arc::new(PackedSequences::new(&[3, 2], vec![0.0, 0.0, f64::NEG_INFINITY, 0.0, 0.0])?);
/// let x = Tensor::randn(0f32, 1., (5, 4), &Device::Cpu)?;
/// let out = packed_attention(&x, &x, &x, &seqs, 2, None)?;
/// assert_eq!(out.dims(), &[5, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &Arc<PackedSequences>,
    num_heads: usize,
    dropout: Option<Arc<Vec<f32>>>,
) -> Result<Tensor> {
    if let Some(out) = packed_attention_fused(q, k, v, sequences, num_heads, dropout.clone())? {
        return Ok(out);
    }
    Composed { sequences: sequences.clone(), num_heads, dropout, device_dropout: 0.0 }.composed(q, k, v)
}

/// [`packed_attention`] with dropout of probability `p` on the attention weights, its mask drawn
/// on the inputs' device by the device's random generator ([`rankstack_nn::dropout::device_mask`])
/// instead of from host multipliers: for GPUs, where drawing `B·H·ΣL²` values on the host and
/// copying them over would cost more than the attention itself. Always the composed path.
pub fn packed_attention_with_device_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &Arc<PackedSequences>,
    num_heads: usize,
    p: f64,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("packed attention: dropout {p} is outside [0, 1)");
    }
    check(q, k, v, sequences.as_ref(), num_heads)?;
    Composed { sequences: sequences.clone(), num_heads, dropout: None, device_dropout: p }.composed(q, k, v)
}

/// The attention composed of candle operations on a dense, padded `[B, H, L, L]` batch.
struct Composed {
    sequences: Arc<PackedSequences>,
    num_heads: usize,
    /// Host multipliers, as [`packed_attention`] takes them.
    dropout: Option<Arc<Vec<f32>>>,
    /// Dropout drawn on the device; 0: none.
    device_dropout: f64,
}

impl Composed {
    /// The same attention composed of candle operations on a dense, padded `[B, H, L, L]` batch
    /// (devices and dtypes the fused kernel does not cover).
    fn composed(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let seqs = &self.sequences;
        let (b, d, h) = (seqs.batch_size(), q.dim(1)?, self.num_heads);
        let dh = d / h;
        let l = seqs.lengths().max().unwrap_or(0);
        // Row r of sequence s goes to dense row s·L + (r − start); padding rows are hidden keys.
        let mut index = Vec::with_capacity(seqs.num_rows());
        let mut bias = vec![f64::NEG_INFINITY; b * l];
        for (s, (start, len)) in seqs.offsets().iter().copied().zip(seqs.lengths()).enumerate() {
            for i in 0..len {
                index.push((s * l + i) as u32);
                bias[s * l + i] = seqs.key_bias()[start + i];
            }
        }
        let dev = q.device();
        let uniform = seqs.uniform_length().is_some();
        // Distinct rows both ways: gathers, not candle's serial CUDA index_add (see distinct_rows).
        let dense = |x: &Tensor| -> Result<Tensor> {
            match uniform {
                true => x.reshape((b, l, d)),
                false => scatter_rows(x, &index, b * l)?.reshape((b, l, d)),
            }
        };
        let (qd, kd, vd) = (dense(q)?, dense(k)?, dense(v)?);
        // [B, L, d] → [B, H, L, dh].
        let heads = |x: &Tensor| x.reshape((b, l, h, dh))?.transpose(1, 2)?.contiguous();
        let q = (heads(&qd)? * (1.0 / (dh as f64).sqrt()))?;
        let (k, v) = (heads(&kd)?, heads(&vd)?);
        let bias = Tensor::from_vec(bias, (b, 1, 1, l), dev)?.to_dtype(q.dtype())?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
        let mut weights = rankstack_nn::softmax(&scores, D::Minus1)?;
        if let Some(m) = &self.dropout {
            // Sequence s's multipliers fill the top-left L_s × L_s block of each of its heads.
            let mut dense = vec![0f32; b * h * l * l];
            for t in head_blocks(self.sequences.as_ref(), h) {
                let base = (t.sequence * h + t.head) * l * l;
                for (i, row) in m[t.mask_offset..t.mask_offset + t.len * t.len].chunks(t.len.max(1)).enumerate() {
                    dense[base + i * l..base + i * l + t.len].copy_from_slice(row);
                }
            }
            weights = weights.mul(&Tensor::from_vec(dense, (b, h, l, l), dev)?.to_dtype(weights.dtype())?)?;
        }
        if self.device_dropout > 0.0 {
            weights = weights.mul(&rankstack_nn::dropout::device_mask(self.device_dropout, &weights)?)?;
        }
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b * l, d))?;
        if uniform {
            Ok(out)
        } else {
            gather_rows(&out, &index)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Var};
    use rankstack_nn::testing::seeded_randn;

    use super::*;

    const INF: f64 = f64::NEG_INFINITY;

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The composed path (what GPUs run) against the fused CPU kernel (itself checked against the
    /// formula in `rankstack-kernels`), in value and every gradient, with and without dropout, on
    /// sequences of lengths 3, 0, 5, 1 with some hidden keys.
    #[test]
    fn the_composed_path_matches_the_fused_kernel_in_value_and_gradient() {
        let bias = vec![0.0, INF, 0.0, /* */ 0.0, 0.0, INF, INF, 0.0, /* */ 0.0];
        let seqs = Arc::new(PackedSequences::new(&[3, 0, 5, 1], bias).unwrap());
        let (h, d) = (2, 6);
        let n = seqs.attention_weight_count(h);
        let multipliers = Arc::new((0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.5 }).collect::<Vec<f32>>());
        for dropout in [None, Some(multipliers)] {
            let x = [1, 2, 3].map(|s| Var::from_tensor(&seeded_randn(s, &[9, d], DType::F64)).unwrap());
            let [q, k, v] = [0, 1, 2].map(|i| x[i].as_tensor());
            let fused = packed_attention(q, k, v, &seqs, h, dropout.clone()).unwrap();
            let op = Composed { sequences: seqs.clone(), num_heads: h, dropout: dropout.clone(), device_dropout: 0.0 };
            let composed = op.composed(q, k, v).unwrap();
            for (a, b) in flat(&fused).iter().zip(flat(&composed)) {
                assert!((a - b).abs() <= 1e-13, "dropout {}: {a} vs {b}", dropout.is_some());
            }
            let r = seeded_randn(4, &[9, d], DType::F64);
            let g1 = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (i, name) in ["q", "k", "v"].iter().enumerate() {
                let (a, b) = (flat(g1.get(x[i].as_tensor()).unwrap()), flat(g2.get(x[i].as_tensor()).unwrap()));
                assert!(a.iter().any(|v| *v != 0.0), "∂{name} is zero");
                for (a, b) in a.iter().zip(&b) {
                    assert!((a - b).abs() <= 1e-13, "∂{name}, dropout {}: {a} vs {b}", dropout.is_some());
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let seqs = Arc::new(PackedSequences::new(&[3], vec![0.0; 3]).unwrap());
        let t = |r: usize| Tensor::zeros((r, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = packed_attention(&t(2), &t(2), &t(2), &seqs, 2, None).unwrap_err().to_string();
        assert!(e.contains("2 rows"), "{e}");
        let e = packed_attention_with_device_dropout(&t(3), &t(3), &t(3), &seqs, 2, 1.5).unwrap_err().to_string();
        assert!(e.contains("dropout 1.5"), "{e}");
    }
}
