//! The whole ranker against the PyTorch reference (`reference/rankstack_ref/ranker.py`), built
//! from the same config document: per-task logits and the gradients of every parameter and float
//! input, in training mode (BatchNorm batch statistics) with dropout off. Plus the "train in
//! PyTorch, serve in Rust" path: a checkpoint exported by the reference loads and scores identically.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ranker_model::{batch_from_reference_inputs, checkpoint, Ranker, RankerBatch, RankerConfig};
use rankstack_nn::testing::{assert_close, check_fixtures, check_reference, fixtures_root, Fixture};

/// The fixture's inputs as a [`RankerBatch`] (keys as in `reference/rankstack_ref/ranker.py`; float
/// inputs are already in `dtype`, so they stay the variables the gradients are taken against).
fn batch(config: &RankerConfig, i: &HashMap<String, Tensor>, dtype: DType) -> candle_core::Result<RankerBatch> {
    batch_from_reference_inputs(config, i, dtype)
}

fn check(fixture: &Fixture, dtype: DType, rtol: f64) {
    let config: RankerConfig = fixture.config();
    check_reference(
        fixture,
        dtype,
        rtol,
        |vb| Ranker::new(&config, vb),
        |m, i| m.forward_t(&batch(&config, i, dtype)?, true),
    );
}

/// float64: ~1e-13 in practice; the bound leaves room for the depth (encoder, transformer, MaskNet,
/// four cross layers, MLP, heads).
#[test]
fn whole_model_matches_pytorch_in_f64() {
    check_fixtures("ranker", DType::F64, 1e-9, check);
}

/// float32: 1e-5 relative to each tensor's largest entry, or 4x PyTorch's own float32 error where
/// that is larger (input gradients through LayerNorm/BatchNorm cancel; see rankstack_nn::testing).
#[test]
fn whole_model_matches_pytorch_in_f32() {
    check_fixtures("ranker", DType::F32, 1e-5, check);
}

#[test]
fn a_pytorch_export_loads_and_scores_identically() {
    let dir = fixtures_root().join("ranker/exported_homefeed_small");
    let (ranker, _) = checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let expected = rankstack_nn::checkpoint::read_safetensors(dir.join("expected.safetensors")).unwrap();
    let inputs: HashMap<String, Tensor> = expected
        .tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("input.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let probabilities = ranker.predict(&batch(ranker.config(), &inputs, DType::F32).unwrap()).unwrap();
    // Same float32 weights and inputs, eval mode (BatchNorm running statistics from the export).
    assert_close("exported model probabilities", &probabilities, &expected.tensors["probabilities"], 1e-5);
}
