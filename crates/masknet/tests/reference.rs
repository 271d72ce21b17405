//! MaskNet against the independent PyTorch reference (`reference/rankstack_ref/masknet.py`):
//! forward values, input gradients and every parameter gradient for every fixture in
//! `fixtures/masknet/`.

use candle_core::DType;
use masknet::{MaskBlock, MaskBlockConfig, ParallelMaskNet, ParallelMaskNetConfig, SerialMaskNet, SerialMaskNetConfig};
use rankstack_nn::testing::{check_fixtures, check_reference, Fixture};

fn check(fixture: &Fixture, dtype: DType, rtol: f64) {
    match fixture.meta("layer").as_deref() {
        Some("MaskBlock") => {
            let config: MaskBlockConfig = fixture.config();
            let (m, z) = (fixture.dim("mask_input_dim"), fixture.dim("hidden_input_dim"));
            check_reference(
                fixture,
                dtype,
                rtol,
                |vb| MaskBlock::new(m, z, &config, vb),
                |b, i| b.forward(&i["mask_input"], &i["hidden_input"]),
            );
        }
        Some("ParallelMaskNet") => {
            let config: ParallelMaskNetConfig = fixture.config();
            let m = fixture.dim("input_dim");
            check_reference(fixture, dtype, rtol, |vb| ParallelMaskNet::new(m, &config, vb), |n, i| n.forward(&i["x"]));
        }
        Some("SerialMaskNet") => {
            let config: SerialMaskNetConfig = fixture.config();
            let m = fixture.dim("input_dim");
            check_reference(fixture, dtype, rtol, |vb| SerialMaskNet::new(m, &config, vb), |n, i| n.forward(&i["x"]));
        }
        other => panic!("{}: unknown layer {other:?}", fixture.name()),
    }
}

/// float64: summation order is the only difference from PyTorch (~1e-14 relative).
#[test]
fn matches_pytorch_in_f64() {
    check_fixtures("masknet", DType::F64, 1e-10, check);
}

/// float32: a few ulps per op; 1e-5 holds for outputs and parameter gradients. Input gradients
/// through LayerNorm are sums whose terms cancel (they sum to zero by construction), so for small
/// rows their float32 error relative to their own size is larger — PyTorch's too; there
/// `check_reference` allows 4x PyTorch's own float32 error instead (see rankstack_nn::testing).
#[test]
fn matches_pytorch_in_f32() {
    check_fixtures("masknet", DType::F32, 1e-5, check);
}
