//! Twitter's recap MaskNet (`fixtures/peers/twitter_*`, from `TwitterMaskNet` in
//! `reference/rankstack_ref/masknet.py`, written from Twitter's `mask_net.py`, with its parameter
//! names): its state dict imported with `from_twitter_state_dict` gives a rankstack MaskNet whose
//! forward values, input gradients and every parameter gradient match, parallel and serial, with
//! the input LayerNorm and a truncated aggregation width.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use masknet::{
    from_twitter_state_dict, AggregationRounding, MaskBlockConfig, MaskNetConfig, ParallelMaskNet,
    ParallelMaskNetConfig, SerialMaskNet,
};
use rankstack_nn::testing::{check_reference, fixture_paths, Fixture};
use rankstack_nn::Activation;

fn twitter_fixtures() -> Vec<Fixture> {
    let fixtures: Vec<Fixture> = fixture_paths("peers")
        .iter()
        .map(|p| Fixture::load(p).unwrap())
        .filter(|f| f.meta("peer").as_deref() == Some("twitter-masknet"))
        .collect();
    assert_eq!(fixtures.len(), 4, "parallel, parallel with truncation and input LayerNorm, per-block parallel, serial");
    fixtures
}

fn check(peer: &Fixture, dtype: DType, rtol: f64) {
    let m: usize = peer.meta("input_dim").unwrap().parse().unwrap();
    match peer.meta("layer").as_deref() {
        Some("ParallelMaskNet") => {
            let config: ParallelMaskNetConfig = peer.config();
            let wrapped = MaskNetConfig::Parallel(config.clone());
            let fixture = peer.with_imported_params(|s| from_twitter_state_dict(m, &wrapped, s)).unwrap();
            check_reference(
                &fixture,
                dtype,
                rtol,
                |vb| ParallelMaskNet::new(m, &config, vb),
                |n, i| n.forward(&i["x"]),
            );
        }
        Some("SerialMaskNet") => {
            let config: masknet::SerialMaskNetConfig = peer.config();
            let wrapped = MaskNetConfig::Serial(config.clone());
            let fixture = peer.with_imported_params(|s| from_twitter_state_dict(m, &wrapped, s)).unwrap();
            check_reference(&fixture, dtype, rtol, |vb| SerialMaskNet::new(m, &config, vb), |n, i| n.forward(&i["x"]));
        }
        other => panic!("{}: unexpected layer {other:?}", peer.name()),
    }
}

#[test]
fn imported_twitter_masknets_match_in_f64() {
    for fixture in twitter_fixtures() {
        check(&fixture, DType::F64, 1e-10);
    }
}

#[test]
fn imported_twitter_masknets_match_in_f32() {
    for fixture in twitter_fixtures() {
        check(&fixture, DType::F32, 1e-5);
    }
}

fn twitter_block() -> MaskBlockConfig {
    MaskBlockConfig { hidden_bias: true, activation: Activation::Identity, ..MaskBlockConfig::new(4) }
}

#[test]
fn configs_that_differ_from_twitter_are_refused_with_the_fix() {
    let parallel = |block| {
        MaskNetConfig::Parallel(ParallelMaskNetConfig { num_blocks: 1, block, blocks: Vec::new(), top_mlp: None })
    };
    let relu = MaskBlockConfig { activation: Activation::Relu, ..twitter_block() };
    let err = from_twitter_state_dict(6, &parallel(relu), HashMap::new()).unwrap_err().to_string();
    assert!(err.contains("blocks[0].activation") && err.contains("identity"), "{err}");
    let no_bias = MaskBlockConfig { hidden_bias: false, ..twitter_block() };
    let err = from_twitter_state_dict(6, &parallel(no_bias), HashMap::new()).unwrap_err().to_string();
    assert!(err.contains("blocks[0].hidden_bias"), "{err}");
    // rf 1.5 on m = 5: Twitter truncates to 7, the ratio rounds to 8; the shapes say so.
    let rounded = MaskBlockConfig { projection_ratio: 1.5, ..twitter_block() };
    let state: HashMap<String, Tensor> = [
        ("_mask_blocks.0._mask_layer.0.weight", vec![7, 5]),
        ("_mask_blocks.0._mask_layer.0.bias", vec![7]),
        ("_mask_blocks.0._mask_layer.2.weight", vec![5, 7]),
        ("_mask_blocks.0._mask_layer.2.bias", vec![5]),
        ("_mask_blocks.0._hidden_layer.weight", vec![4, 5]),
        ("_mask_blocks.0._hidden_layer.bias", vec![4]),
        ("_mask_blocks.0._layer_norm.weight", vec![4]),
        ("_mask_blocks.0._layer_norm.bias", vec![4]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap()))
    .collect();
    let err = from_twitter_state_dict(5, &parallel(rounded), state.clone()).unwrap_err().to_string();
    assert!(
        err.contains("tensor `_mask_blocks.0._mask_layer.0.weight` has shape [7, 5], the model expects [8, 5]"),
        "{err}"
    );
    let stated = MaskBlockConfig { aggregation_dim: Some(7), ..twitter_block() };
    assert_eq!(from_twitter_state_dict(5, &parallel(stated), state.clone()).unwrap().len(), 8);
    let truncated = MaskBlockConfig {
        projection_ratio: 1.5,
        aggregation_rounding: AggregationRounding::Truncate,
        ..twitter_block()
    };
    assert_eq!(from_twitter_state_dict(5, &parallel(truncated), state).unwrap().len(), 8);
}
