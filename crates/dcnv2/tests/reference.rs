//! DCN-V2 against the independent PyTorch reference (`reference/rankstack_ref/dcnv2.py`):
//! forward values, input gradients and every parameter gradient, for every fixture in
//! `fixtures/dcnv2/`.

use candle_core::{DType, Module};
use dcnv2::{CrossNet, CrossNetConfig, ParallelCrossNet, ParallelCrossNetConfig};
use rankstack_nn::testing::{check_fixtures, check_reference, Fixture};

fn check(fixture: &Fixture, dtype: DType, rtol: f64) {
    let d = fixture.dim("input_dim");
    match fixture.meta("layer").as_deref() {
        Some("CrossNet") => {
            let config: CrossNetConfig = fixture.config();
            check_reference(fixture, dtype, rtol, |vb| CrossNet::new(d, &config, vb), |m, i| m.forward(&i["x"]));
        }
        Some("ParallelCrossNet") => {
            let config: ParallelCrossNetConfig = fixture.config();
            check_reference(
                fixture,
                dtype,
                rtol,
                |vb| ParallelCrossNet::new(d, &config, vb),
                |m, i| m.forward(&i["x"]),
            );
        }
        other => panic!("{}: unknown layer {other:?}", fixture.name()),
    }
}

/// In float64 the only differences from PyTorch are summation order inside matmuls, so the results
/// agree to ~1e-13 relative; 1e-10 leaves room for the 20-layer stacks, where each layer's rounding
/// is multiplied by the next layers' Jacobians.
#[test]
fn matches_pytorch_in_f64() {
    check_fixtures("dcnv2", DType::F64, 1e-10, check);
}

/// In float32 each layer adds a few ulps (2^-24 ≈ 6e-8) of relative error; after 20 stacked layers
/// and products with x0 that compounds to ~1e-6, so 1e-5 holds across all fixtures, including
/// inputs of magnitude 1e3 (the error is relative to the tensor's largest entry). Where PyTorch's
/// own float32 result is further off than that, `check_reference` allows 4x PyTorch's error.
#[test]
fn matches_pytorch_in_f32() {
    check_fixtures("dcnv2", DType::F32, 1e-5, check);
}
