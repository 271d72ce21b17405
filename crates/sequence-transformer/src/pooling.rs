//! Max-pooling over the unmasked positions of a sequence (TransAct's output compression).

use std::sync::Arc;

use candle_core::{Result, Tensor};
use rankstack_nn::host_transfer::{upload, Origin};
use rankstack_nn::recompute::with_backward;

/// `y[b, j] = max_{t : ¬masked[b, t]} h[b, t, j]` for `h` `[B, n, d]` and `masked` row-major
/// `[B, n]` (`true` = masked). Every row must keep at least one position (TransAct never masks
/// position 0). The gradient goes to the unmasked positions that attain the maximum, split equally
/// among them when several tie (PyTorch's rule for `amax`; TransAct has no positional encoding, so
/// two actions of the same type on the same item give equal rows and tie in every column).
///
/// On the CPU one fused op ([`rankstack_kernels::cpu::masked_max`]); elsewhere composed of candle
/// operations with the same values and gradient rule.
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
    composed_max_pool(h, masked, (b, n, d))
}

/// [`masked_max_pool`] from candle's operations (other devices and dtypes), one graph node
/// ([`with_backward`]) whose backward pass sends `∂y / count` to each unmasked position that
/// attains the maximum (`count` of them): it keeps nothing of `[B, n, d]` size for the backward
/// pass, which recomputes the candidates.
fn composed_max_pool(h: &Tensor, masked: &[bool], (b, n, d): (usize, usize, usize)) -> Result<Tensor> {
    let mask = masked.iter().map(|&m| u8::from(m)).collect::<Vec<_>>();
    let mask = Arc::new(upload(mask, (b, n, 1), h.device(), "pooling mask", Origin::Input)?);
    let again = mask.clone();
    with_backward(
        &[h],
        move |x| candidates(&x[0], &mask, (b, n, d))?.max(1),
        move |x, _, grad| {
            let h = &x[0];
            let candidates = candidates(h, &again, (b, n, d))?;
            let selected = candidates.broadcast_eq(&candidates.max_keepdim(1)?)?;
            let count = selected.to_dtype(h.dtype())?.sum_keepdim(1)?;
            let share = grad.unsqueeze(1)?.div(&count)?.broadcast_as((b, n, d))?;
            Ok(vec![Some(selected.where_cond(&share, &constant(0.0, h)?)?)])
        },
    )
}

/// `h` with the masked positions at `−∞`.
fn candidates(h: &Tensor, mask: &Tensor, (b, n, d): (usize, usize, usize)) -> Result<Tensor> {
    mask.broadcast_as((b, n, d))?.where_cond(&constant(f64::NEG_INFINITY, h)?, h)
}

/// `value` in `h`'s dtype and shape, as one element broadcast: `where_cond` reads it in place, so
/// no `[B, n, d]` tensor of it is written (a full one in f64 and its cast were two thirds of the
/// pool's writes).
fn constant(value: f64, h: &Tensor) -> Result<Tensor> {
    Tensor::full(value, 1, h.device())?.to_dtype(h.dtype())?.broadcast_as(h.shape())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    /// `∂(Σ y)/∂h`, flat.
    fn run_tied(y: Tensor, h: &Var) -> Vec<f64> {
        let g = y.sum_all().unwrap().backward().unwrap();
        g.get(h.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The fused CPU op against the composed fallback (what other devices run), in value and
    /// gradient (ties included), and the errors for bad masks.
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
        assert_eq!(fused, run(composed_max_pool(h.as_tensor(), &masked, (b, n, d)).unwrap()));
        // Ties: positions 0 and 2 share column 0's gradient in both versions.
        let h = Var::new(&[[[3f64, -2.], [9., 9.], [3., -5.]]], &Device::Cpu).unwrap();
        let tied = [false, true, false];
        let fused = run_tied(masked_max_pool(h.as_tensor(), &tied).unwrap(), &h);
        assert_eq!(fused, vec![0.5, 1.0, 0.0, 0.0, 0.5, 0.0]);
        assert_eq!(fused, run_tied(composed_max_pool(h.as_tensor(), &tied, (1, 3, 2)).unwrap(), &h));
        let h = Tensor::new(&[[[1f32, -2.], [9., 9.], [3., -5.]]], &Device::Cpu).unwrap();
        assert!(masked_max_pool(&h, &[false, true]).is_err());
        assert!(masked_max_pool(&h, &[true, true, true]).is_err());
    }
}
