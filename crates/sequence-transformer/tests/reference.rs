//! The sequence transformer against `torch.nn.TransformerEncoder` (reference module
//! `reference/rankstack_ref/sequence_transformer.py`, fixtures in `fixtures/sequence_transformer/`):
//! forward output and the gradients of every float input and parameter, in float64 and float32.
//! Fixtures are computed with autograd on, i.e. on PyTorch's "slow path" (see the crate docs).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rankstack_nn::testing::{check_reference, fixture_paths, Fixture};
use sequence_transformer::{SequenceBatch, SequenceTransformer, SequenceTransformerConfig};

fn batch(inputs: &HashMap<String, Tensor>) -> SequenceBatch {
    let get = |k: &str| inputs.get(k).unwrap_or_else(|| panic!("no input `{k}`")).clone();
    SequenceBatch {
        action_types: get("action_types"),
        item_embeddings: get("item_embeddings"),
        timestamps: get("timestamps"),
        request_time: get("request_time"),
        candidate: get("candidate"),
    }
}

fn check(fixture: &Fixture, dtype: DType, rtol: f64) {
    let config: SequenceTransformerConfig = fixture.config();
    let train = fixture.meta("mode").as_deref() == Some("train");
    check_reference(
        fixture,
        dtype,
        rtol,
        |vb| SequenceTransformer::new(&config, vb),
        |model, inputs| {
            let window: Option<Vec<f64>> =
                inputs.get("window_ms").map(|w| w.to_dtype(DType::F64).and_then(|w| w.to_vec1()).expect("window"));
            model.forward_with_window(&batch(inputs), window.as_deref(), train)
        },
    );
}

#[test]
fn matches_torch_transformer_encoder_in_f64() {
    for path in fixture_paths("sequence_transformer") {
        check(&Fixture::load(&path).expect("fixture"), DType::F64, 1e-10);
    }
}

#[test]
fn matches_torch_transformer_encoder_in_f32() {
    // 1e-5 of the largest magnitude; check_reference also accepts 4x PyTorch's own float32 error
    // (input gradients through two LayerNorms cancel to small sums).
    for path in fixture_paths("sequence_transformer") {
        check(&Fixture::load(&path).expect("fixture"), DType::F32, 1e-5);
    }
}

#[test]
fn fixtures_cover_the_required_cases() {
    let names: Vec<String> =
        fixture_paths("sequence_transformer").iter().map(|p| Fixture::load(p).unwrap().name()).collect();
    for needle in ["train_window", "eval", "padding_heavy", "one_valid_action", "append", "truncate", "pad_short"] {
        assert!(names.iter().any(|n| n.contains(needle)), "no fixture case for `{needle}`: {names:?}");
    }
}

#[test]
fn fixtures_cover_the_peer_variants() {
    let names: Vec<String> =
        fixture_paths("sequence_transformer").iter().map(|p| Fixture::load(p).unwrap().name()).collect();
    for needle in [
        "pool_all",
        "per_batch_day_window",
        "strict_mask",
        "vocab",
        "no_candidate",
        "no_pool",
        "all_positions",
        "gelu",
        "no_bias",
        "final_norm",
        "prenorm_final_norm",
    ] {
        assert!(names.iter().any(|n| n.contains(needle)), "no fixture case for `{needle}`: {names:?}");
    }
}
