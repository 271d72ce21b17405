//! Behaviour of the sequence transformer beyond the reference numerics: config validation, input
//! errors, masking semantics, the seeded training window, gradients and defaults.

use candle_core::{DType, Device, Tensor};
use rankstack_nn::testing::{assert_all_params_get_gradients, seeded_randn};
use rankstack_nn::SeededVarMap;
use sequence_transformer::{
    key_mask, Fusion, PackedSequences, PositionalEncoding, SequenceBatch, SequenceTransformer,
    SequenceTransformerConfig,
};

const REQ: i64 = 1_700_000_000_000;

fn small() -> SequenceTransformerConfig {
    SequenceTransformerConfig {
        max_len: 6,
        num_action_types: 5,
        action_dim: 4,
        item_dim: 4,
        ff_dim: 8,
        num_output_positions: 3,
        dropout: 0.0,
        time_window_ms: 10_000.0,
        ..Default::default()
    }
}

/// Batch `b`, length `s`, item width `e`; example `i` has `s - i % s` real actions, 1 s apart.
fn batch(b: usize, s: usize, e: usize, seed: u64) -> SequenceBatch {
    let dev = Device::Cpu;
    let mut types = vec![0u32; b * s];
    let mut ts = vec![0i64; b * s];
    for i in 0..b {
        for j in 0..s - i % s {
            types[i * s + j] = 1 + ((i + j) % 4) as u32;
            ts[i * s + j] = REQ - 1000 * (j as i64 + 1);
        }
    }
    SequenceBatch {
        action_types: Tensor::from_vec(types, (b, s), &dev).unwrap(),
        item_embeddings: seeded_randn(seed, &[b, s, e], DType::F32),
        timestamps: Tensor::from_vec(ts, (b, s), &dev).unwrap(),
        request_time: Tensor::from_vec(vec![REQ; b], b, &dev).unwrap(),
        candidate: seeded_randn(seed + 1, &[b, e], DType::F32),
    }
}

fn model(config: &SequenceTransformerConfig, seed: u64) -> (SeededVarMap, SequenceTransformer) {
    let store = SeededVarMap::new(seed);
    let m = SequenceTransformer::new(config, store.var_builder(DType::F32, &Device::Cpu)).expect("model");
    (store, m)
}

fn err<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn transact_defaults() {
    let c = SequenceTransformerConfig::default();
    assert_eq!((c.max_len, c.action_dim, c.item_dim, c.num_layers, c.num_heads, c.ff_dim), (100, 32, 32, 2, 2, 32));
    assert_eq!((c.model_dim(), c.output_dim(), c.num_output_positions), (96, 11 * 96, 10));
    assert_eq!(
        (c.fusion, c.positional, c.norm_first, c.dropout),
        (Fusion::Concat, PositionalEncoding::None, false, 0.1)
    );
    let parsed: SequenceTransformerConfig =
        serde_json::from_str(r#"{"fusion": "append", "positional": "learned"}"#).unwrap();
    assert_eq!((parsed.fusion, parsed.positional, parsed.max_len), (Fusion::Append, PositionalEncoding::Learned, 100));
    assert!(serde_json::from_str::<SequenceTransformerConfig>(r#"{"heads": 2}"#).is_err());
    let (_, m) = model(&c, 0);
    let y = m.forward_t(&batch(3, 100, 32, 0), true).unwrap();
    assert_eq!(y.dims(), &[3, 1056]);
}

#[test]
fn invalid_configs_are_errors_naming_the_field() {
    let bad = |edit: &dyn Fn(&mut SequenceTransformerConfig)| {
        let mut c = small();
        edit(&mut c);
        let store = SeededVarMap::new(0);
        err(SequenceTransformer::new(&c, store.var_builder(DType::F32, &Device::Cpu)))
    };
    let e = bad(&|c| c.num_heads = 5);
    assert!(e.contains("num_heads") && e.contains("d = 12"), "{e}");
    assert!(bad(&|c| c.max_len = 0).contains("max_len"));
    assert!(bad(&|c| c.num_output_positions = 7).contains("num_output_positions"));
    assert!(bad(&|c| c.num_layers = 0).contains("num_layers"));
    assert!(bad(&|c| c.num_action_types = 1).contains("num_action_types"));
    assert!(bad(&|c| c.dropout = 1.0).contains("dropout"));
    assert!(bad(&|c| c.layer_norm_eps = 0.0).contains("layer_norm_eps"));
    assert!(bad(&|c| c.time_window_ms = -1.0).contains("time_window_ms"));
    assert!(bad(&|c| c.ff_dim = 0).contains("ff_dim"));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (_, m) = model(&small(), 0);
    let dev = Device::Cpu;
    let good = batch(3, 6, 4, 0);
    // S = 0.
    let mut b = good.clone();
    b.action_types = Tensor::zeros((3, 0), DType::U32, &dev).unwrap();
    b.item_embeddings = Tensor::zeros((3, 0, 4), DType::F32, &dev).unwrap();
    b.timestamps = Tensor::zeros((3, 0), DType::I64, &dev).unwrap();
    assert!(err(m.forward(&b)).contains("sequence length S is 0"));
    // Mismatched batch sizes.
    for which in 0..4 {
        let mut b = good.clone();
        match which {
            0 => b.item_embeddings = seeded_randn(0, &[2, 6, 4], DType::F32),
            1 => b.timestamps = b.timestamps.narrow(0, 0, 2).unwrap(),
            2 => b.request_time = b.request_time.narrow(0, 0, 2).unwrap(),
            _ => b.candidate = seeded_randn(0, &[4, 4], DType::F32),
        }
        let e = err(m.forward(&b));
        assert!(e.contains("SequenceTransformer") && e.contains("batch size"), "{e}");
    }
    // Wrong widths and lengths.
    let mut b = good.clone();
    b.item_embeddings = seeded_randn(0, &[3, 6, 5], DType::F32);
    let e = err(m.forward(&b));
    assert!(e.contains("item_embeddings") && e.contains("[batch, 6, 4]") && e.contains("[3, 6, 5]"), "{e}");
    let mut b = good.clone();
    b.candidate = seeded_randn(0, &[3, 3], DType::F32);
    assert!(err(m.forward(&b)).contains("candidate"));
    let mut b = good.clone();
    b.timestamps = Tensor::zeros((3, 5), DType::I64, &dev).unwrap();
    assert!(err(m.forward(&b)).contains("timestamps"));
    // Action types out of range or negative.
    let mut b = good.clone();
    b.action_types = Tensor::new(&[[1i64, 5, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]], &dev).unwrap();
    let e = err(m.forward(&b));
    assert!(e.contains("type 5 at [0, 1]"), "{e}");
    b.action_types = Tensor::new(&[[1i64, 0, 0, 0, 0, 0], [1, -1, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0]], &dev).unwrap();
    assert!(err(m.forward(&b)).contains("type -1"));
    // Window count.
    assert!(err(m.forward_with_window(&good, Some(&[1.0]), true)).contains("window"));
    // The encoder's own inputs: a key mask of the wrong shape or with NaN, packed rows that do
    // not match their layout.
    let x = seeded_randn(1, &[3, 6, 12], DType::F32);
    let wrong = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
    let e = err(m.encoder().forward_t(&x, Some(&wrong), false));
    assert!(e.contains("TransformerEncoder") && e.contains("key mask") && e.contains("[3, 5]"), "{e}");
    let e = err(m.encoder().layers()[0].forward_t(&x, Some(&wrong), false));
    assert!(e.contains("TransformerEncoderLayer") && e.contains("key mask"), "{e}");
    let nan = Tensor::full(f32::NAN, (3, 6), &dev).unwrap();
    assert!(err(m.encoder().forward_t(&x, Some(&nan), false)).contains("bias NaN"));
    let packed = std::sync::Arc::new(PackedSequences::new(&[2, 3], vec![0.0; 5]).unwrap());
    let e = err(m.encoder().forward_packed(&seeded_randn(2, &[4, 12], DType::F32), &packed, false));
    assert!(e.contains("packed input") && e.contains("[4, 12]"), "{e}");
}

#[test]
fn key_mask_rules() {
    // Request at 100: positions 0..5 at t = 120 (future), 100 (at request: masked), 90, 50, padding.
    let types = [1, 2, 3, 4, 0];
    let ts = [120, 100, 90, 50, 0];
    assert_eq!(key_mask(&types, &ts, &[100], 5, None), vec![false, true, false, false, true]);
    // Window 11 ms masks t = 90 (age 10 < 11) but not t = 50.
    assert_eq!(key_mask(&types, &ts, &[100], 5, Some(&[11.0])), vec![false, true, true, false, true]);
    // The newest position is never masked, even if it is padding.
    assert_eq!(key_mask(&[0, 0], &[0, 0], &[100], 2, None), vec![false, true]);
}

#[test]
fn masked_positions_do_not_influence_unmasked_outputs() {
    let (_, m) = model(&small(), 1);
    let b = batch(3, 6, 4, 7); // example 1 has 5 actions (position 5 is padding)
    let y0 = m.forward(&b).unwrap().to_vec2::<f32>().unwrap();
    let mut b2 = b.clone();
    let mut items: Vec<f32> = b.item_embeddings.flatten_all().unwrap().to_vec1().unwrap();
    for v in &mut items[(6 + 5) * 4..(6 + 6) * 4] {
        *v += 100.0;
    }
    b2.item_embeddings = Tensor::from_vec(items, (3, 6, 4), &Device::Cpu).unwrap();
    let y1 = m.forward(&b2).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y0, y1, "a padded position (beyond the first K) must not change anything");
}

#[test]
fn truncation_keeps_the_newest_and_padding_is_neutral() {
    let (_, m) = model(&small(), 2);
    let long = batch(2, 9, 4, 3);
    let cut = SequenceBatch {
        action_types: long.action_types.narrow(1, 0, 6).unwrap(),
        item_embeddings: long.item_embeddings.narrow(1, 0, 6).unwrap(),
        timestamps: long.timestamps.narrow(1, 0, 6).unwrap(),
        ..long.clone()
    };
    assert_eq!(m.forward(&long).unwrap().to_vec2::<f32>().unwrap(), m.forward(&cut).unwrap().to_vec2::<f32>().unwrap());
    let short = SequenceBatch {
        action_types: long.action_types.narrow(1, 0, 2).unwrap(),
        item_embeddings: long.item_embeddings.narrow(1, 0, 2).unwrap(),
        timestamps: long.timestamps.narrow(1, 0, 2).unwrap(),
        ..long.clone()
    };
    let padded = SequenceBatch {
        action_types: short.action_types.pad_with_zeros(1, 0, 4).unwrap(),
        item_embeddings: short.item_embeddings.pad_with_zeros(1, 0, 4).unwrap(),
        timestamps: short.timestamps.pad_with_zeros(1, 0, 4).unwrap(),
        ..long
    };
    assert_eq!(
        m.forward(&short).unwrap().to_vec2::<f32>().unwrap(),
        m.forward(&padded).unwrap().to_vec2::<f32>().unwrap()
    );
}

#[test]
fn training_window_is_seeded_and_reproducible() {
    let mut c = small();
    c.dropout = 0.1;
    let (_, m) = model(&c, 0);
    let b = batch(8, 6, 4, 1);
    let sampler = m.time_window_sampler();
    let state = sampler.rng_state();
    // Dropout streams are restored too, so the whole training step repeats bit for bit.
    let dropout_states: Vec<[u64; 4]> =
        m.encoder().layers().iter().flat_map(|l| l.dropouts().map(|d| d.rng_state())).collect();
    let a = m.forward_t(&b, true).unwrap().to_vec2::<f32>().unwrap();
    sampler.set_rng_state(state);
    for (d, s) in m.encoder().layers().iter().flat_map(|l| l.dropouts()).zip(&dropout_states) {
        d.set_rng_state(*s);
    }
    assert_eq!(a, m.forward_t(&b, true).unwrap().to_vec2::<f32>().unwrap());
    assert_ne!(a, m.forward_t(&b, true).unwrap().to_vec2::<f32>().unwrap(), "the next step draws new windows");
    // A second model with the same config and seed draws the same windows.
    let (_, m2) = model(&c, 0);
    sampler.set_rng_state(state);
    assert_eq!(sampler.sample(5), m2.time_window_sampler().sample(5));
    // Windows are uniform on [0, max].
    let w = sampler.sample(20_000);
    assert!(w.iter().all(|&x| (0.0..=10_000.0).contains(&x)));
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    assert!((mean - 5_000.0).abs() < 100.0, "mean {mean}");
    // Evaluation never masks by window and is deterministic.
    assert_eq!(m.forward(&b).unwrap().to_vec2::<f32>().unwrap(), m.forward(&b).unwrap().to_vec2::<f32>().unwrap());
}

#[test]
fn window_masks_recent_actions() {
    let (_, m) = model(&small(), 0);
    let b = batch(2, 6, 4, 1); // actions 1 s, 2 s, ... before the request
    let mask: Vec<Vec<u8>> = m.mask(&b, Some(&[2500.0, 0.0])).unwrap().to_vec2().unwrap();
    assert_eq!(mask[0], vec![0, 1, 0, 0, 0, 0], "ages 1 s and 2 s < 2.5 s, position 0 kept");
    assert_eq!(mask[1], vec![0, 0, 0, 0, 0, 1], "example 1 has 5 actions");
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for config in [
        small(),
        SequenceTransformerConfig {
            fusion: Fusion::Append,
            positional: PositionalEncoding::Learned,
            norm_first: true,
            ..small()
        },
    ] {
        let (store, m) = model(&config, 5);
        let y = m.forward_t(&batch(4, 6, 4, 2), true).unwrap();
        let w = seeded_randn(3, y.dims(), DType::F32);
        let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_all_params_get_gradients(&store, &grads);
        // The padding row of the action table gets no gradient.
        let table = store.named_vars().into_iter().find(|(n, _)| n == "action_emb.weight").unwrap().1;
        let g: Vec<Vec<f32>> = grads.get(table.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(g[0].iter().all(|v| *v == 0.0));
    }
}

#[test]
fn parameter_names_follow_pytorch() {
    let (store, _) = model(&small(), 0);
    let names: Vec<String> = store.named_vars().into_iter().map(|(n, _)| n).collect();
    for n in [
        "action_emb.weight",
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.in_proj_bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.1.linear1.weight",
        "encoder.layers.1.linear2.bias",
        "encoder.layers.1.norm1.weight",
        "encoder.layers.1.norm2.bias",
        "pool_proj.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}: {names:?}");
    }
    assert_eq!(names.len(), 1 + 2 * 12 + 2);
}

#[test]
fn reseeding_makes_a_training_step_a_function_of_the_seed() {
    use rankstack_nn::Reseed;
    let mut c = small();
    c.dropout = 0.2;
    let (_, m) = model(&c, 0);
    let b = batch(6, 6, 4, 1);
    m.reseed(99);
    let a = m.forward_t(&b, true).unwrap().to_vec2::<f32>().unwrap();
    m.forward_t(&b, true).unwrap();
    m.reseed(99);
    assert_eq!(a, m.forward_t(&b, true).unwrap().to_vec2::<f32>().unwrap());
    m.reseed(100);
    assert_ne!(a, m.forward_t(&b, true).unwrap().to_vec2::<f32>().unwrap());
}
