//! The options that reproduce TransAct's public code and `torch.nn.TransformerEncoder`'s
//! arguments, checked by hand with constant weights, plus their validation and serde defaults (the
//! PyTorch reference fixtures are in `reference.rs` and `encoder_reference.rs`).
//!
//! The hand cases zero every encoder weight and bias (LayerNorm weights 1): attention and the
//! feed-forward then add nothing, so a post-norm encoder maps each token `x` to `LN(LN(x)) =
//! LN(x)`, and a 2-wide token `[a, b]` to `[1, −1]` (`a > b`), `[−1, 1]` (`a < b`) or `[0, 0]`.

use candle_core::{DType, Device, Tensor};
use rankstack_nn::testing::set_parameter;
use rankstack_nn::{Activation, SeededVarMap};
use sequence_transformer::{
    pool_all::max_pool_first, ActionVocab, AttentionMask, EncoderLayerConfig, Fusion, FutureMask, MaxPool,
    SequenceBatch, SequenceTransformer, SequenceTransformerConfig, TimeWindowSampler, TimeWindowSampling,
    TransformerEncoder, DAY_MS,
};

const DEV: Device = Device::Cpu;
const REQ: i64 = 1_000_000;

/// S = 3, action and item width 1, no candidate fusion: d = 2; one layer, one head; no window.
fn tiny(max_pool: MaxPool) -> SequenceTransformerConfig {
    SequenceTransformerConfig {
        max_len: 3,
        num_action_types: 4,
        action_dim: 1,
        item_dim: 1,
        fusion: Fusion::None,
        num_layers: 1,
        num_heads: 1,
        ff_dim: 2,
        dropout: 0.0,
        layer_norm_eps: 1e-12,
        time_window_ms: 0.0,
        max_pool,
        all_output_positions: true,
        num_output_positions: 0,
        ..Default::default()
    }
}

/// Zero encoder, action embeddings [0, 2, −1, 3] (type 0 is padding), identity `pool_proj`.
fn hand_model(config: &SequenceTransformerConfig) -> (SeededVarMap, SequenceTransformer) {
    let store = SeededVarMap::new(0);
    let model = SequenceTransformer::new(config, store.var_builder(DType::F64, &DEV)).unwrap();
    for (name, var) in store.named_vars() {
        let value = if name.contains("norm") && name.ends_with("weight") { 1.0 } else { 0.0 };
        var.set(&Tensor::full(value, var.shape(), &DEV).unwrap()).unwrap();
    }
    set_parameter(&store, "action_emb.weight", &[0.0, 2.0, -1.0, 3.0]);
    if config.max_pool != MaxPool::None {
        set_parameter(&store, "pool_proj.weight", &[1.0, 0.0, 0.0, 1.0]);
    }
    (store, model)
}

/// One example: types `types`, items `items`, timestamps `ts`, request at `REQ`.
fn one(types: [i64; 3], items: [f64; 3], ts: [i64; 3]) -> SequenceBatch {
    SequenceBatch {
        action_types: Tensor::new(&[types], &DEV).unwrap(),
        item_embeddings: Tensor::new(&[[[items[0]], [items[1]], [items[2]]]], &DEV).unwrap(),
        timestamps: Tensor::new(&[ts], &DEV).unwrap(),
        request_time: Tensor::new(&[REQ], &DEV).unwrap(),
        candidate: Tensor::new(&[[7.0f64]], &DEV).unwrap(),
    }
}

fn row(y: &Tensor) -> Vec<f64> {
    y.flatten_all().unwrap().to_vec1::<f64>().unwrap().iter().map(|v| (v * 1e6).round() / 1e6).collect()
}

#[test]
fn max_pool_over_all_positions_and_without_fusion_by_hand() {
    // Tokens [action ‖ item] (the candidate is not fused): [2, .5] → [1, −1]; [3, 1] → [1, −1];
    // padding [0, 0] → [0, 0]. Unmasked pool: [1, −1]; over every position: [1, 0].
    let batch = one([1, 3, 0], [0.5, 1.0, 0.0], [REQ - 10, REQ - 20, 0]);
    let rows = [1.0, -1.0, 1.0, -1.0, 0.0, 0.0];
    let (_s, unmasked) = hand_model(&tiny(MaxPool::Unmasked));
    assert_eq!(row(&unmasked.forward(&batch).unwrap()), [&[1.0, -1.0][..], &rows].concat());
    let (_s, all) = hand_model(&tiny(MaxPool::AllPositions));
    assert_eq!(row(&all.forward(&batch).unwrap()), [&[1.0, 0.0][..], &rows].concat());
    // No max-pool: the K = S positions alone, and no pool_proj parameter.
    let (store, none) = hand_model(&tiny(MaxPool::None));
    assert_eq!(row(&none.forward(&batch).unwrap()), rows);
    assert!(store.named_vars().iter().all(|(n, _)| !n.starts_with("pool_proj")));
    assert_eq!(none.output_dim(), 6);
}

#[test]
fn the_pool_over_all_positions_sends_the_gradient_to_the_first_maximum() {
    // Column 0: 3 at t = 1 and t = 2 (first: 1); column 1: 5 at t = 0 and t = 1 (first: 0).
    let h = candle_core::Var::new(&[[[1f64, 5.0], [3.0, 5.0], [3.0, 2.0]]], &DEV).unwrap();
    let y = max_pool_first(h.as_tensor()).unwrap();
    assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![3.0, 5.0]]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let dh = g.get(h.as_tensor()).unwrap().to_vec3::<f64>().unwrap();
    assert_eq!(dh, vec![vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![0.0, 0.0]]]);
}

#[test]
fn strict_future_mask_keeps_an_action_at_the_request_time() {
    // Position 1 happens exactly at the request time: masked by default, kept with `after`.
    let batch = one([1, 3, 2], [0.5, 1.0, 0.0], [REQ - 10, REQ, REQ + 5]);
    let (_s, default) = hand_model(&tiny(MaxPool::Unmasked));
    assert_eq!(default.mask(&batch, None).unwrap().to_vec2::<u8>().unwrap(), vec![vec![0, 1, 1]]);
    let strict = SequenceTransformerConfig { future_mask: FutureMask::After, ..tiny(MaxPool::Unmasked) };
    let (_s, strict) = hand_model(&strict);
    assert_eq!(strict.mask(&batch, None).unwrap().to_vec2::<u8>().unwrap(), vec![vec![0, 0, 1]]);
    // In training a window still masks it (request − t = 0 < T for any T > 0).
    assert_eq!(strict.mask(&batch, Some(&[1.0])).unwrap().to_vec2::<u8>().unwrap(), vec![vec![0, 1, 1]]);
}

#[test]
fn action_vocab_remaps_raw_ids_and_unknown_ids_become_padding() {
    let vocab = SequenceTransformerConfig { action_vocab: Some(vec![70, 30, 11]), ..tiny(MaxPool::Unmasked) };
    let (_s, model) = hand_model(&vocab);
    // Raw 70 → type 1 (emb 2), raw 11 → type 3 (emb 3), raw 99 unknown → padding (masked).
    let batch = one([70, 11, 99], [0.5, 1.0, 4.0], [REQ - 10, REQ - 20, REQ - 30]);
    assert_eq!(model.mask(&batch, None).unwrap().to_vec2::<u8>().unwrap(), vec![vec![0, 0, 1]]);
    // Padding gets a zero action embedding: its token is [0, 4] → [−1, 1].
    assert_eq!(row(&model.forward(&batch).unwrap()), [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0]);
    // Without a vocabulary the same raw ids are an error naming the input.
    let (_s, plain) = hand_model(&tiny(MaxPool::Unmasked));
    let msg = plain.forward(&batch).unwrap_err().to_string();
    assert!(msg.contains("action_types") && msg.contains("type 70"), "{msg}");
    assert_eq!(ActionVocab::new(&[70, 30, 11]).map(&[30, -4, 0]), vec![2, 0, 0]);
}

#[test]
fn per_batch_day_windows_are_whole_days_shared_by_the_batch() {
    let sampler = TimeWindowSampler::with_sampling(3.5 * DAY_MS, TimeWindowSampling::PerBatchDays, 11);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let w = sampler.sample(4);
        assert!(w.iter().all(|&t| t == w[0]), "{w:?}");
        assert_eq!(w[0] % DAY_MS, 0.0);
        seen.insert((w[0] / DAY_MS) as u32);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    let state = sampler.rng_state();
    let a = sampler.sample(2);
    sampler.set_rng_state(state);
    assert_eq!(a, sampler.sample(2));
}

/// A change to a config.
type Edit = dyn Fn(&mut SequenceTransformerConfig);

fn config_error(f: impl Fn(&mut SequenceTransformerConfig)) -> String {
    let mut c = tiny(MaxPool::Unmasked);
    f(&mut c);
    let store = SeededVarMap::new(0);
    SequenceTransformer::new(&c, store.var_builder(DType::F32, &DEV)).unwrap_err().to_string()
}

#[test]
fn invalid_variant_combinations_fail_at_construction_naming_the_field() {
    let cases: [(&Edit, &str, &str); 8] = [
        (&|c| c.num_output_positions = 2, "`num_output_positions`", "all_output_positions"),
        (&|c| (c.max_pool, c.all_output_positions) = (MaxPool::None, false), "`max_pool`", "output would be empty"),
        (&|c| c.action_vocab = Some(vec![]), "`action_vocab`", "empty"),
        (&|c| c.action_vocab = Some(vec![5, 0, 6]), "`action_vocab`", "padding id"),
        (&|c| c.action_vocab = Some(vec![5, 6, 5]), "`action_vocab`", "id 5 twice"),
        (&|c| c.action_vocab = Some(vec![5, 6]), "`num_action_types`", "lists 2 ids"),
        (
            &|c| (c.time_window_sampling, c.time_window_ms) = (TimeWindowSampling::PerBatchDays, 3_600_000.0),
            "`time_window_ms`",
            "whole days",
        ),
        (&|c| c.num_heads = 3, "`num_heads`", "d = 2"),
    ];
    for (i, (f, field, reason)) in cases.iter().enumerate() {
        let msg = config_error(f);
        assert!(msg.contains(field) && msg.contains(reason), "case {i}: {msg}");
    }
    // all_output_positions with K = S is accepted, as is a day window of ≥ 1 day.
    assert!(SequenceTransformer::new(
        &SequenceTransformerConfig { num_output_positions: 3, ..tiny(MaxPool::None) },
        SeededVarMap::new(0).var_builder(DType::F32, &DEV)
    )
    .is_ok());
}

#[test]
fn old_configs_load_with_the_default_variants() {
    let c: SequenceTransformerConfig = serde_json::from_str(r#"{"max_len": 10, "num_output_positions": 2}"#).unwrap();
    assert_eq!(
        (c.max_pool, c.future_mask, c.all_output_positions, c.action_vocab.clone(), c.activation, c.bias, c.final_norm),
        (MaxPool::Unmasked, FutureMask::AtOrAfter, false, None, Activation::Relu, true, false)
    );
    assert_eq!(c.time_window_sampling, TimeWindowSampling::PerExample);
    let json = r#"{"max_pool": "all_positions", "future_mask": "after", "fusion": "none", "action_vocab": [4, 9],
        "num_action_types": 3, "activation": "gelu", "bias": false, "final_norm": true,
        "time_window_sampling": "per_batch_days", "time_window_ms": 86400000, "all_output_positions": true,
        "num_output_positions": 0}"#;
    let c: SequenceTransformerConfig = serde_json::from_str(json).unwrap();
    c.validate().unwrap();
    assert_eq!((c.output_positions(), c.model_dim(), c.output_dim()), (100, 64, 101 * 64));
    assert!(serde_json::from_str::<SequenceTransformerConfig>(r#"{"max_pool": "mean"}"#).is_err());
}

/// Pre-norm, one head, zero feed-forward: `out = x + attn(LN(x))` with `Q = K = 0` (uniform scores
/// plus the mask), `V` and the output projection the identity.
fn attention_only_encoder(final_norm: bool) -> (SeededVarMap, TransformerEncoder) {
    let store = SeededVarMap::new(0);
    let cfg = EncoderLayerConfig {
        num_heads: 1,
        ff_dim: 2,
        dropout: 0.0,
        norm_first: true,
        layer_norm_eps: 1e-12,
        ..Default::default()
    };
    let enc = TransformerEncoder::with_final_norm(2, 1, &cfg, final_norm, store.var_builder(DType::F64, &DEV)).unwrap();
    for (name, var) in store.named_vars() {
        let value = if name.contains("norm") && name.ends_with("weight") { 1.0 } else { 0.0 };
        var.set(&Tensor::full(value, var.shape(), &DEV).unwrap()).unwrap();
    }
    let identity = [1.0, 0.0, 0.0, 1.0];
    set_parameter(&store, "layers.0.self_attn.in_proj_weight", &[[0.0; 8].as_slice(), &identity].concat());
    set_parameter(&store, "layers.0.self_attn.out_proj.weight", &identity);
    (store, enc)
}

#[test]
fn src_mask_by_hand() {
    // x rows [1, 0], [0, 1], [0, 1]: LN gives [1, −1], [−1, 1], [−1, 1]. A causal mask averages
    // rows 0..=i: [1, −1], [0, 0], [−1/3, 1/3]; out = x + that.
    let x = Tensor::new(&[[[1f64, 0.0], [0.0, 1.0], [0.0, 1.0]]], &DEV).unwrap();
    let (_s, enc) = attention_only_encoder(false);
    let causal = Tensor::new(&[[0u8, 1, 1], [0, 0, 1], [0, 0, 0]], &DEV).unwrap();
    let expected = [2.0, -1.0, 0.0, 1.0, -1.0 / 3.0, 4.0 / 3.0].map(|v: f64| (v * 1e6).round() / 1e6);
    let y = enc.forward_with_src_mask(&x, &AttentionMask::Boolean(causal), None, false).unwrap();
    assert_eq!(row(&y), expected);
    let inf = f64::NEG_INFINITY;
    let additive = Tensor::new(&[[0.0, inf, inf], [0.0, 0.0, inf], [0.0, 0.0, 0.0]], &DEV).unwrap();
    let y = enc.forward_with_src_mask(&x, &AttentionMask::Additive(additive), None, false).unwrap();
    assert_eq!(row(&y), expected);
    // A key mask hiding row 2 on top of no src_mask restriction: rows average rows 0 and 1 → 0.
    let open = Tensor::zeros((3, 3), DType::F64, &DEV).unwrap();
    let keys = Tensor::new(&[[0.0, 0.0, inf]], &DEV).unwrap();
    let y = enc.forward_with_src_mask(&x, &AttentionMask::Additive(open), Some(&keys), false).unwrap();
    assert_eq!(row(&y), [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]);
    // The final norm normalises each row: [2, −1] → [1, −1], [0, 1] → [−1, 1].
    let (_s, normed) = attention_only_encoder(true);
    let causal = Tensor::new(&[[0u8, 1, 1], [0, 0, 1], [0, 0, 0]], &DEV).unwrap();
    let y = normed.forward_with_src_mask(&x, &AttentionMask::Boolean(causal), None, false).unwrap();
    assert_eq!(row(&y), [1.0, -1.0, -1.0, 1.0, -1.0, 1.0]);
}

#[test]
fn bad_src_masks_are_errors_naming_the_mask() {
    let (_s, enc) = attention_only_encoder(false);
    let x = Tensor::zeros((2, 3, 2), DType::F64, &DEV).unwrap();
    let run = |m: AttentionMask| enc.forward_with_src_mask(&x, &m, None, false).unwrap_err().to_string();
    let msg = run(AttentionMask::Additive(Tensor::zeros((3, 4), DType::F64, &DEV).unwrap()));
    assert!(msg.contains("src_mask") && msg.contains("[3, 3] or [2, 3, 3]") && msg.contains("[3, 4]"), "{msg}");
    let msg = run(AttentionMask::Additive(Tensor::full(f64::NAN, (3, 3), &DEV).unwrap()));
    assert!(msg.contains("src_mask") && msg.contains("NaN"), "{msg}");
    let msg = run(AttentionMask::Boolean(Tensor::zeros((3, 3), DType::F64, &DEV).unwrap()));
    assert!(msg.contains("integer tensor"), "{msg}");
    let msg = run(AttentionMask::Additive(Tensor::zeros((3, 3), DType::U8, &DEV).unwrap()));
    assert!(msg.contains("float tensor"), "{msg}");
}

#[test]
fn gelu_bias_free_layers_have_no_bias_parameters() {
    let store = SeededVarMap::new(0);
    let cfg =
        EncoderLayerConfig { num_heads: 2, ff_dim: 4, activation: Activation::Gelu, bias: false, ..Default::default() };
    TransformerEncoder::with_final_norm(4, 2, &cfg, true, store.var_builder(DType::F32, &DEV)).unwrap();
    let names: Vec<String> = store.named_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| !n.contains("bias")), "{names:?}");
    assert!(names.contains(&"norm.weight".to_string()) && names.contains(&"layers.1.norm2.weight".to_string()));
    assert_eq!(names.len(), 2 * 6 + 1, "{names:?}");
}

#[test]
fn training_draws_one_whole_day_window_per_batch() {
    let config = SequenceTransformerConfig {
        time_window_sampling: TimeWindowSampling::PerBatchDays,
        time_window_ms: 2.0 * DAY_MS,
        ..tiny(MaxPool::Unmasked)
    };
    let (_s, model) = hand_model(&config);
    let day = DAY_MS as i64;
    let batch = SequenceBatch {
        action_types: Tensor::new(&[[1i64, 3, 2], [2, 1, 3]], &DEV).unwrap(),
        item_embeddings: Tensor::new(&[[[0.5f64], [1.0], [2.0]], [[0.1], [0.2], [0.3]]], &DEV).unwrap(),
        timestamps: Tensor::new(
            &[[REQ - 10, REQ - day / 2, REQ - 3 * day], [REQ - 5, REQ - day - 1, REQ - 2 * day]],
            &DEV,
        )
        .unwrap(),
        request_time: Tensor::new(&[REQ, REQ], &DEV).unwrap(),
        candidate: Tensor::new(&[[7.0f64], [7.0]], &DEV).unwrap(),
    };
    let sampler = model.time_window_sampler();
    for _ in 0..8 {
        let state = sampler.rng_state();
        let window = sampler.sample(2);
        assert_eq!(window[0], window[1]);
        sampler.set_rng_state(state);
        let trained = model.forward_t(&batch, true).unwrap();
        let explicit = model.forward_with_window(&batch, Some(&window), true).unwrap();
        assert_eq!(row(&trained), row(&explicit));
        // The window masks exactly the actions younger than it (position 0 never).
        let mask = model.mask(&batch, Some(&window)).unwrap().to_vec2::<u8>().unwrap();
        let days = window[0] / DAY_MS;
        let expected = match days as u32 {
            0 => vec![vec![0, 0, 0], vec![0, 0, 0]],
            1 => vec![vec![0, 1, 0], vec![0, 0, 0]],
            _ => vec![vec![0, 1, 0], vec![0, 1, 0]],
        };
        assert_eq!(mask, expected, "window of {days} days");
    }
}
