//! The max-pool over every position of TransAct's public code (`tfmr_out.max(dim=1).values`).

use candle_core::{DType, Result, Tensor};
use rankstack_kernels::cpu::kernels_run_on;
use rankstack_nn::host_transfer::{read_computed, upload, Origin};

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
    MaxPoolFirst::new(h.dims3()?.1, h.device())?.forward(h)
}

/// [`max_pool_first`] for sequences of `n` positions, with the positions `0..n` that the search
/// off the CPU kernels compares against kept on the device: copied there once, when a model is
/// built, not on every forward pass.
#[derive(Debug, Clone)]
pub struct MaxPoolFirst {
    /// `[1, n, 1]` u32 `0..n`.
    positions: Tensor,
}

impl MaxPoolFirst {
    /// The pool of `n`-position sequences on `device`.
    pub fn new(n: usize, device: &candle_core::Device) -> Result<Self> {
        let positions = upload((0..n as u32).collect(), (1, n, 1), device, "sequence positions", Origin::Constant)?;
        Ok(Self { positions })
    }

    /// [`max_pool_first`] of `h` `[B, n, d]` (another `n` than the pool's works too, copying its
    /// positions for the call).
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let (_, n, _) = h.dims3()?;
        if n == 0 {
            candle_core::bail!("max-pool over all positions: the sequence is empty");
        }
        let index = if kernels_run_on(h.device()) {
            first_max_on_host(h)?
        } else if self.positions.dim(1)? == n && self.positions.device().same_device(h.device()) {
            first_max_with_tensors(h, &self.positions)?
        } else {
            first_max_with_tensors(h, &Self::new(n, h.device())?.positions)?
        };
        h.contiguous()?.gather(&index, 1)?.squeeze(1)
    }
}

/// `[B, 1, d]` u32: for each `(b, j)` the first `t` where `h[b, t, j]` is largest among the
/// non-NaN values (0 when every value is NaN), by a scan on the host.
fn first_max_on_host(h: &Tensor) -> Result<Tensor> {
    let (b, n, d) = h.dims3()?;
    let values = read_computed::<f64>(&h.to_dtype(DType::F64)?, "max-pool positions")?;
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
    upload(index, (b, 1, d), h.device(), "first maximum positions", Origin::Computed)
}

/// [`first_max_on_host`]'s indices with tensor operations on `h`'s device: NaN becomes −∞ for the
/// maximum, the first non-NaN position equal to it wins, and a column with none (all NaN) gets 0.
/// `positions` is `[1, n, 1]` u32 `0..n` on that device.
fn first_max_with_tensors(h: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let (b, n, d) = h.dims3()?;
    let h = h.detach();
    let is_nan = h.ne(&h)?;
    let clean = is_nan.where_cond(&h.zeros_like()?.affine(1.0, f64::NEG_INFINITY)?, &h)?;
    let top = clean.max_keepdim(1)?;
    let hit = is_nan.where_cond(&is_nan.zeros_like()?, &clean.broadcast_eq(&top)?)?;
    let positions = positions.broadcast_as((b, n, d))?;
    let none = positions.affine(0.0, n as f64)?;
    let first = hit.where_cond(&positions, &none)?.min_keepdim(1)?;
    first.eq(n as u32)?.where_cond(&first.zeros_like()?, &first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn by_tensors(h: &Tensor) -> Vec<u32> {
        let pool = MaxPoolFirst::new(h.dim(1).unwrap(), h.device()).unwrap();
        first_max_with_tensors(h, &pool.positions).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()
    }

    #[test]
    fn a_pool_copies_its_positions_once_and_pools_any_length() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        use rankstack_nn::host_transfer::record_transfers;
        let h = Tensor::new(&[[[1f32, 4.], [3., 4.], [2., 0.]]], &Device::Cpu).unwrap();
        let (pool, at_build) = record_transfers(|| MaxPoolFirst::new(3, &Device::Cpu).unwrap());
        assert_eq!(at_build.len(), 1);
        let (y, per_call) = record_transfers(|| with_isa(Isa::Candle, || pool.forward(&h).unwrap()));
        assert_eq!(y.to_vec2::<f32>().unwrap(), [[3., 4.]]);
        assert!(per_call.is_empty(), "{per_call:?}");
        // Another length: positions for the call, same result as the free function.
        let longer = Tensor::new(&[[[1f32], [5.], [2.], [5.]]], &Device::Cpu).unwrap();
        let y = with_isa(Isa::Candle, || pool.forward(&longer).unwrap());
        assert_eq!(y.to_vec2::<f32>().unwrap(), max_pool_first(&longer).unwrap().to_vec2::<f32>().unwrap());
    }

    #[test]
    fn the_tensor_argmax_equals_the_host_scan_with_ties_nans_and_infinities() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        // [B = 2, n = 4, d = 5]: each column a case.
        let h = Tensor::new(
            &[
                [
                    [1f32, nan, nan, -inf, 2.],
                    [3., nan, 1., -inf, 2.],
                    [3., nan, nan, nan, inf],
                    [0., nan, 4., -inf, inf],
                ],
                [[-1f32, 5., 0., 7., nan], [-1., 5., 0., 7., -inf], [-2., 6., 0., nan, -inf], [-1., 6., 0., 8., nan]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let host = first_max_on_host(&h).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let tensors = by_tensors(&h);
        assert_eq!(host, [1, 0, 3, 0, 2, 0, 2, 0, 3, 1]);
        assert_eq!(tensors, host);
        // Random data, f64 and f32, with many ties (values rounded to a few levels).
        let mut rng = rankstack_nn::rng::Rng::new(5);
        let values: Vec<f64> = (0..3 * 7 * 6).map(|_| (rng.normal() * 2.0).round()).collect();
        for dtype in [DType::F64, DType::F32] {
            let h = Tensor::from_vec(values.clone(), (3, 7, 6), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let a = first_max_on_host(&h).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
            let b = by_tensors(&h);
            assert_eq!(a, b, "{dtype:?}");
        }
    }
}
