//! The options that reproduce Twitter's recap MaskNet: `int()` truncation of the aggregation width
//! and one config per block in a parallel MaskNet. Hand-checkable constant-weight cases,
//! validation and serde (the reference fixtures are in `reference.rs`).

use candle_core::{DType, Device, Tensor};
use masknet::{AggregationRounding, MaskBlock, MaskBlockConfig, ParallelMaskNet, ParallelMaskNetConfig};
use rankstack_nn::testing::set_parameter;
use rankstack_nn::{Activation, SeededVarMap};

const DEV: Device = Device::Cpu;

fn err<T: std::fmt::Debug>(r: rankstack_nn::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn truncation_gives_twitters_aggregation_width() {
    // rf 1.25 on width 10: 12.5 rounds to 13 (ours) and truncates to 12 (Twitter's int()).
    let store = SeededVarMap::new(0);
    let vb = store.var_builder(DType::F32, &DEV);
    let round = MaskBlockConfig { projection_ratio: 1.25, ..MaskBlockConfig::new(4) };
    let truncate = MaskBlockConfig { aggregation_rounding: AggregationRounding::Truncate, ..round.clone() };
    assert_eq!(MaskBlock::new(10, 10, &round, vb.pp("a")).unwrap().aggregation_dim(), 13);
    assert_eq!(MaskBlock::new(10, 10, &truncate, vb.pp("b")).unwrap().aggregation_dim(), 12);
    assert_eq!(truncate.aggregation_width_unchecked(10), 12);
    // 0.19 × 5 = 0.95: rounds to 1, truncates to 0, which is an error naming the field.
    let small = MaskBlockConfig { projection_ratio: 0.19, ..truncate };
    let msg = err(MaskBlock::new(5, 5, &small, vb.pp("c")));
    assert!(msg.contains("`projection_ratio`") && msg.contains("truncates to an aggregation width of 0"), "{msg}");
    assert_eq!(
        MaskBlock::new(5, 5, &MaskBlockConfig { projection_ratio: 0.19, ..round }, vb.pp("d"))
            .unwrap()
            .aggregation_dim(),
        1
    );
}

/// Block `i` of a parallel net on m = 2 with t = 1: W1 = [1 1], b1 = 0, W2 = [1 1]ᵀ, b2 = [0, 1],
/// W_h = identity rows (q = 2) or [1 0] (q = 1), LayerNorm weight 1, bias 0.
fn set_hand_weights(store: &SeededVarMap, i: usize, q: usize) {
    let p = |name: &str| format!("blocks.{i}.{name}");
    set_parameter(store, &p("mask.aggregation.weight"), &[1.0, 1.0]);
    set_parameter(store, &p("mask.aggregation.bias"), &[0.0]);
    set_parameter(store, &p("mask.projection.weight"), &[1.0, 1.0]);
    set_parameter(store, &p("mask.projection.bias"), &[0.0, 1.0]);
    let identity = [1.0, 0.0, 0.0, 1.0];
    set_parameter(store, &p("hidden.weight"), &identity[..2 * q]);
}

#[test]
fn per_block_configs_by_hand() {
    // v = [1, 2]: W1 v = 3, ReLU 3, mask = [3, 4], mask ⊙ v = [3, 8].
    // Block 0 (q = 2, ReLU): LN([3, 8]) = [−1, 1] (mean 5.5, std 2.5) → [0, 1].
    // Block 1 (q = 2, identity): [−1, 1].
    // Block 2 (q = 1): W_h picks 3; LN of one value is 0; ReLU → 0.
    let block = |q: usize, activation: Activation| MaskBlockConfig {
        aggregation_dim: Some(1),
        activation,
        layer_norm_eps: 1e-12,
        ..MaskBlockConfig::new(q)
    };
    let config: ParallelMaskNetConfig = serde_json::from_value(serde_json::json!({
        "blocks": [block(2, Activation::Relu), block(2, Activation::Identity), block(1, Activation::Relu)]
    }))
    .unwrap();
    let store = SeededVarMap::new(0);
    let net = ParallelMaskNet::new(2, &config, store.var_builder(DType::F64, &DEV)).unwrap();
    for (i, q) in [(0, 2), (1, 2), (2, 1)] {
        set_hand_weights(&store, i, q);
    }
    assert_eq!(net.output_dim(), 5);
    assert_eq!(config.concat_dim(), 5);
    let y: Vec<Vec<f64>> = net.forward(&Tensor::new(&[[1f64, 2.0]], &DEV).unwrap()).unwrap().to_vec2().unwrap();
    let expected = [0.0, 1.0, -1.0, 1.0, 0.0];
    for (a, e) in y[0].iter().zip(expected) {
        assert!((a - e).abs() < 1e-9, "{:?} vs {expected:?}", y[0]);
    }
}

#[test]
fn per_block_configs_are_validated_at_construction() {
    let store = SeededVarMap::new(0);
    let vb = store.var_builder(DType::F32, &DEV);
    let blocks = vec![MaskBlockConfig::new(4), MaskBlockConfig::new(3)];
    let with = |f: &dyn Fn(&mut ParallelMaskNetConfig)| {
        let mut c = ParallelMaskNetConfig {
            num_blocks: 0,
            block: MaskBlockConfig::new(0),
            blocks: blocks.clone(),
            top_mlp: None,
        };
        f(&mut c);
        c
    };
    let msg = err(ParallelMaskNet::new(6, &with(&|c| c.num_blocks = 3), vb.clone()));
    assert!(msg.contains("`num_blocks`") && msg.contains("is 3 but `blocks` lists 2 blocks"), "{msg}");
    let msg = err(ParallelMaskNet::new(6, &with(&|c| c.block = MaskBlockConfig::new(5)), vb.clone()));
    assert!(msg.contains("`block`") && msg.contains("together with `blocks`"), "{msg}");
    let msg = err(ParallelMaskNet::new(6, &with(&|c| c.blocks[1].aggregation_dim = Some(0)), vb.clone()));
    assert!(msg.contains("`blocks.1.aggregation_dim`"), "{msg}");
    let msg = err(ParallelMaskNet::new(6, &with(&|c| c.blocks.clear()), vb.clone()));
    assert!(msg.contains("`num_blocks`"), "{msg}");
    // num_blocks equal to the list length is accepted.
    assert_eq!(ParallelMaskNet::new(6, &with(&|c| c.num_blocks = 2), vb.pp("ok")).unwrap().output_dim(), 7);
}

#[test]
fn per_block_serde_round_trips_and_old_configs_are_unchanged() {
    let c: ParallelMaskNetConfig = serde_json::from_str(
        r#"{"blocks": [{"output_dim": 4, "aggregation_rounding": "truncate"}, {"output_dim": 2}]}"#,
    )
    .unwrap();
    assert_eq!((c.num_blocks, c.blocks.len(), c.blocks[0].aggregation_rounding), (0, 2, AggregationRounding::Truncate));
    let json = serde_json::to_value(&c).unwrap();
    assert!(json.get("num_blocks").is_none() && json.get("block").is_none(), "{json}");
    assert_eq!(serde_json::from_value::<ParallelMaskNetConfig>(json).unwrap(), c);
    // The shared-config form serialises as before (no `blocks` key) and defaults to rounding.
    let paper = serde_json::to_value(ParallelMaskNetConfig::paper()).unwrap();
    assert!(paper.get("blocks").is_none() && paper["num_blocks"] == 3, "{paper}");
    assert_eq!(ParallelMaskNetConfig::paper().block.aggregation_rounding, AggregationRounding::Round);
    let bad = serde_json::from_str::<ParallelMaskNetConfig>(
        r#"{"blocks": [{"output_dim": 4, "aggregation_rounding": "floor"}]}"#,
    );
    assert!(bad.unwrap_err().to_string().contains("unknown variant `floor`"));
}

#[test]
fn reference_fixtures_cover_the_twitter_variants() {
    use rankstack_nn::testing::{fixture_paths, Fixture};
    let names: Vec<String> = fixture_paths("masknet").iter().map(|p| Fixture::load(p).unwrap().name()).collect();
    for needle in ["twitter_truncate", "parallel_per_block_twitter", "parallel_per_block_top_mlp"] {
        assert!(names.iter().any(|n| n.contains(needle)), "no fixture case for `{needle}`: {names:?}");
    }
}
