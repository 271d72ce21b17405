//! Max-pooling over the unmasked positions of a sequence (TransAct's output compression).

use candle_core::{Result, Tensor};

/// `y[b, j] = max_{t : ¬masked[b, t]} h[b, t, j]` for `h` `[B, n, d]` and `masked` row-major
/// `[B, n]` (`true` = masked). Every row must keep at least one position (TransAct never masks
/// position 0). The gradient goes to every unmasked position that attains the maximum (candle's
/// rule for `max`).
///
/// On the CPU one fused op ([`rankstack_kernels::cpu::masked_max`]); elsewhere `where_cond` with
/// a `−∞` tensor, then `max`.
pub fn masked_max_pool(h: &Tensor, masked: &[bool]) -> Result<Tensor> {
    let (b, n, d) = h.dims3()?;
    if masked.len() != b * n {
        candle_core::bail!("masked max-pool: {} mask entries for [{b}, {n}]", masked.len());
    }
    if masked.chunks(n.max(1)).any(|row| row.iter().all(|&m| m)) {
        candle_core::bail!("masked max-pool: a row has every position masked");
    }
    if let Some(y) = rankstack_kernels::cpu::masked_max::masked_max_pool_fused(h, masked)? {
        return Ok(y);
    }
    let mask = Tensor::from_vec(masked.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(), (b, n, 1), h.device())?
        .broadcast_as((b, n, d))?
        .contiguous()?;
    let neg_inf = Tensor::full(f64::NEG_INFINITY, (b, n, d), h.device())?.to_dtype(h.dtype())?;
    mask.where_cond(&neg_inf, h)?.max(1)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    /// The fused CPU op against the composed fallback (what other devices run), in value and
    /// gradient, and the errors for bad masks.
    #[test]
    fn the_fused_op_matches_the_composed_fallback() {
        let (b, n, d) = (3, 5, 4);
        let masked: Vec<bool> = (0..b * n).map(|i| i % n != 0 && (i * 7) % 3 == 0).collect();
        let h = Var::from_tensor(&rankstack_nn::testing::seeded_randn(1, &[b, n, d], DType::F64)).unwrap();
        let w = rankstack_nn::testing::seeded_randn(2, &[b, d], DType::F64);
        let run = |y: Tensor| {
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            (flat(&y), flat(g.get(h.as_tensor()).unwrap()))
        };
        let fused = run(masked_max_pool(h.as_tensor(), &masked).unwrap());
        let mask = Tensor::from_vec(masked.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(), (b, n, 1), &Device::Cpu)
            .unwrap()
            .broadcast_as((b, n, d))
            .unwrap();
        let neg_inf = Tensor::full(f64::NEG_INFINITY, (b, n, d), &Device::Cpu).unwrap();
        assert_eq!(fused, run(mask.where_cond(&neg_inf, h.as_tensor()).unwrap().max(1).unwrap()));
        let h = Tensor::new(&[[[1f32, -2.], [9., 9.], [3., -5.]]], &Device::Cpu).unwrap();
        assert!(masked_max_pool(&h, &[false, true]).is_err());
        assert!(masked_max_pool(&h, &[true, true, true]).is_err());
    }
}
