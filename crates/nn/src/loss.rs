//! Numerically stable losses.

use candle_core::{Result, Tensor};

/// Logistic sigmoid with a backward pass (candle-nn's fused op, which records one).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(x)
}

/// `softplus(x) = ln(1 + e^x)`, finite for every finite `x`, with derivative `sigmoid(x)` everywhere.
///
/// Computed as `p(max(x, 0)) + n(min(x, 0)) − ln 2` with `p(a) = a + ln(1 + e^−a)` and
/// `n(b) = ln(1 + e^b)`: for `x > 0` the second term is `n(0) = ln 2`, for `x < 0` the first is
/// `p(0) = ln 2`, so the sum is exact, and neither exponent is ever positive. At `x = 0` candle splits
/// the gradient of a tied `max`/`min` in half on each side, which gives exactly `sigmoid(0) = 1/2`.
/// (The textbook `relu(x) + ln(1 + e^−|x|)` has gradient `0` at `x = 0`, not `1/2`.)
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let pos = x.maximum(0.0)?;
    let neg = x.minimum(0.0)?;
    let p = (&pos + (pos.neg()?.exp()? + 1.0)?.log()?)?;
    let n = (neg.exp()? + 1.0)?.log()?;
    (p + n)? - std::f64::consts::LN_2
}

/// Element-wise binary cross-entropy with logits, `softplus(x) − x·y`.
///
/// Equals `−y·ln σ(x) − (1−y)·ln(1−σ(x))` (PyTorch's `binary_cross_entropy_with_logits` with
/// `reduction="none"`), stays finite for logits of any magnitude (candle's
/// `loss::binary_cross_entropy_with_logit` returns inf/NaN for large logits), and its gradient with
/// respect to `x` is `σ(x) − y`. Targets may be soft labels in `[0, 1]`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    softplus(logits)? - logits.mul(targets)?
}

/// Mean of [`bce_with_logits`] over all elements.
pub fn bce_with_logits_mean(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    bce_with_logits(logits, targets)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn exact(x: f64, y: f64) -> f64 {
        // ln(1 + e^x) − x·y evaluated in a form that is exact enough in f64 for these inputs.
        let sp = if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() };
        sp - x * y
    }

    #[test]
    fn finite_and_exact_for_large_logits() {
        let xs = [-1e4f64, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4];
        let ys = [1.0, 0.0, 0.3, 1.0, 0.0, 1.0, 0.0];
        let x = Tensor::new(&xs, &Device::Cpu).unwrap();
        let y = Tensor::new(&ys, &Device::Cpu).unwrap();
        let l: Vec<f64> = bce_with_logits(&x, &y).unwrap().to_vec1().unwrap();
        for i in 0..xs.len() {
            let e = exact(xs[i], ys[i]);
            assert!((l[i] - e).abs() <= 1e-12 * e.abs().max(1.0), "x={} got {} want {}", xs[i], l[i], e);
        }
        // Hand-checkable: at x = 0 the loss is ln 2 whatever the label.
        assert!((l[3] - std::f64::consts::LN_2).abs() < 1e-15);
    }

    #[test]
    fn gradient_is_sigmoid_minus_label_everywhere_including_zero() {
        let xs = [-1e4f32, -3.0, 0.0, 2.0, 1e4];
        let ys = [1f32, 0.25, 1.0, 0.0, 0.0];
        let x = Var::new(&xs, &Device::Cpu).unwrap();
        let y = Tensor::new(&ys, &Device::Cpu).unwrap();
        let g = bce_with_logits(x.as_tensor(), &y).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        for i in 0..xs.len() {
            let want = 1.0 / (1.0 + (-xs[i] as f64).exp()) - ys[i] as f64;
            assert!((gx[i] as f64 - want).abs() < 1e-6, "x={} grad {} want {}", xs[i], gx[i], want);
        }
    }
}
