//! Peer modules imported into the sequence transformer crate (`fixtures/peers/`):
//!
//! - Pinterest's TransAct (`TransActPeer` in `reference/rankstack_ref/sequence_transformer.py`,
//!   written from `transact.py`, with its parameter names and its `action_type_lookup` buffer), on
//!   inputs where the default config reproduces it (no padding, no action at or after the request);
//! - `torch.nn.TransformerEncoder` itself, post-norm and pre-norm, with a boolean
//!   `src_key_padding_mask` read from the fixture as safetensors `BOOL`.
//!
//! Each state dict is imported with its `from_*_state_dict`; forward values, input gradients and
//! every parameter gradient match the peer in f64 and f32.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rankstack_nn::checkpoint::read_safetensors;
use rankstack_nn::testing::{check_reference, fixture_paths, fixtures_root, Fixture};
use sequence_transformer::{
    from_torch_transformer_state_dict, from_transact_state_dict, SequenceBatch, SequenceTransformer,
    SequenceTransformerConfig, TorchTransformerConfig,
};

fn peer_fixtures(peer: &str, expected: usize) -> Vec<Fixture> {
    let fixtures: Vec<Fixture> = fixture_paths("peers")
        .iter()
        .map(|p| Fixture::load(p).unwrap())
        .filter(|f| f.meta("peer").as_deref() == Some(peer))
        .collect();
    assert_eq!(fixtures.len(), expected, "{peer} fixtures");
    fixtures
}

fn check_transact(peer: &Fixture, dtype: DType, rtol: f64) {
    let config: SequenceTransformerConfig = peer.config();
    let fixture = peer.with_imported_params(|s| from_transact_state_dict(&config, s)).unwrap();
    check_reference(
        &fixture,
        dtype,
        rtol,
        |vb| SequenceTransformer::new(&config, vb),
        |model, i| {
            let get = |k: &str| i[k].clone();
            model.forward(&SequenceBatch {
                action_types: get("action_types"),
                item_embeddings: get("item_embeddings"),
                timestamps: get("timestamps"),
                request_time: get("request_time"),
                candidate: get("candidate"),
            })
        },
    );
}

/// `mask` (u8, 1 = padded) as the encoder's additive key mask: 0 kept, −∞ hidden.
fn key_mask(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let hidden = mask.to_dtype(dtype)?;
    let zeros = hidden.zeros_like()?;
    let neg_inf = (zeros.ones_like()? * f64::NEG_INFINITY)?;
    hidden.ne(0u8)?.where_cond(&neg_inf, &zeros)
}

fn check_torch_transformer(peer: &Fixture, dtype: DType, rtol: f64) {
    let config: TorchTransformerConfig = peer.config();
    let fixture = peer.with_imported_params(|s| from_torch_transformer_state_dict(&config, s)).unwrap();
    assert_eq!(fixture.tensor("input.mask").dtype(), DType::U8, "safetensors BOOL reads as u8");
    check_reference(
        &fixture,
        dtype,
        rtol,
        |vb| config.build(vb),
        |encoder, i| encoder.forward_t(&i["x"], Some(&key_mask(&i["mask"], i["x"].dtype())?), false),
    );
}

#[test]
fn imported_transact_matches_in_f64_and_f32() {
    for fixture in peer_fixtures("transact", 4) {
        check_transact(&fixture, DType::F64, 1e-10);
        check_transact(&fixture, DType::F32, 1e-5);
    }
}

#[test]
fn imported_torch_transformer_encoders_match_in_f64_and_f32() {
    for fixture in peer_fixtures("torch-transformer", 3) {
        check_torch_transformer(&fixture, DType::F64, 1e-10);
        check_torch_transformer(&fixture, DType::F32, 1e-5);
    }
}

#[test]
fn transact_state_dicts_are_checked_in_full() {
    let fixture = &peer_fixtures("transact", 4)[0];
    let config: SequenceTransformerConfig = fixture.config();
    let mut state: HashMap<String, Tensor> = fixture.with_prefix("param.");
    state.remove("out_linear.bias");
    state.insert(
        "transformer_encoder.norm.weight".into(),
        Tensor::ones(10, DType::F64, &candle_core::Device::Cpu).unwrap(),
    );
    let wider = SequenceTransformerConfig { ff_dim: config.ff_dim + 1, ..config.clone() };
    let err = from_transact_state_dict(&wider, state).unwrap_err().to_string();
    for needle in [
        "TransAct state dict does not fit the config",
        "tensor `transformer_encoder.layers.0.linear1.weight` has shape [8, 10], the model expects [9, 10]",
        "missing tensor `out_linear.bias`",
        "unexpected tensor `transformer_encoder.norm.weight`",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let append = SequenceTransformerConfig { fusion: sequence_transformer::Fusion::Append, ..config };
    let err = from_transact_state_dict(&append, HashMap::new()).unwrap_err().to_string();
    assert!(err.contains("invalid config `fusion`"), "{err}");
}

#[test]
fn transact_action_lookup_must_agree_with_the_action_vocab() {
    let fixture =
        Fixture::load(fixtures_root().join("peers/transact_pool_all_strict_mask_vocab_b4_s6.safetensors")).unwrap();
    let config: SequenceTransformerConfig = fixture.config();
    assert_eq!(config.action_vocab.as_deref(), Some(&[7, 3, 11, 5][..]));
    let state_dict = fixtures_root().join("peers/state_dicts/transact_pool_all_strict_mask_vocab_b4_s6.safetensors");
    let state = read_safetensors(&state_dict).unwrap().tensors;
    assert_eq!(state["action_type_lookup"].dtype(), DType::I64);
    assert!(from_transact_state_dict(&config, state.clone()).is_ok());
    let unset = SequenceTransformerConfig { action_vocab: None, ..config.clone() };
    let err = from_transact_state_dict(&unset, state.clone()).unwrap_err().to_string();
    assert!(err.contains("action_type_lookup") && err.contains("set action_vocab = [7, 3, 11, 5]"), "{err}");
    let swapped = SequenceTransformerConfig { action_vocab: Some(vec![3, 7, 11, 5]), ..config };
    let err = from_transact_state_dict(&swapped, state).unwrap_err().to_string();
    assert!(err.contains("implies action_vocab = [7, 3, 11, 5], the config has [3, 7, 11, 5]"), "{err}");
}
