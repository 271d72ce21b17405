//! The max-pool over every position of TransAct's public code (`tfmr_out.max(dim=1).values`).

use candle_core::{DType, Result, Tensor};

/// `y[b, j] = max_t h[b, t, j]` over every position of `h` `[B, n, d]`, with the gradient going to
/// the *first* position attaining the maximum, as `torch.max(dim).values` does.
///
/// Why not [`crate::pooling::masked_max_pool`] with nothing masked: padded positions carry
/// identical tokens and so identical encoder outputs, and that pool (candle's rule for `max`) hands
/// the full gradient to *every* tied position, which would multiply a padded maximum's gradient by
/// the number of padded positions. The argmax is found on the host (a NaN never wins unless every
/// value is NaN); the pooling itself is a differentiable `gather`.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// let h = Tensor::new(&[[[1f64, 5.], [3., 5.], [3., 2.]]], &Device::Cpu)?;
/// let y = sequence_transformer::pool_all::max_pool_first(&h)?;
/// assert_eq!(y.to_vec2::<f64>()?, vec![vec![3., 5.]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn max_pool_first(h: &Tensor) -> Result<Tensor> {
    let (b, n, d) = h.dims3()?;
    if n == 0 {
        candle_core::bail!("max-pool over all positions: the sequence is empty");
    }
    let values = h.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut index = vec![0u32; b * d];
    for (bi, seq) in values.chunks(n * d).enumerate() {
        for j in 0..d {
            let mut best = 0;
            for t in 1..n {
                let (v, top) = (seq[t * d + j], seq[best * d + j]);
                if v > top || (top.is_nan() && !v.is_nan()) {
                    best = t;
                }
            }
            index[bi * d + j] = best as u32;
        }
    }
    let index = Tensor::from_vec(index, (b, 1, d), h.device())?;
    h.contiguous()?.gather(&index, 1)?.squeeze(1)
}
