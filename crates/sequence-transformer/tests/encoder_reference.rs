//! `TransformerEncoder` with a caller's `src_mask` against `torch.nn.TransformerEncoder` itself
//! (fixtures in `fixtures/transformer_encoder/`, written by
//! `reference/rankstack_ref/cases_sequence_transformer.py`): additive `[S, S]` and `[B·H, S, S]`
//! masks, boolean (causal) masks, with and without a key-padding mask, ReLU and GELU, `bias=False`
//! and a final norm; forward output and the gradients of every float input (the additive mask
//! included) and parameter, in float64 and float32.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rankstack_nn::testing::{check_reference, fixture_paths, Fixture};
use rankstack_nn::Activation;
use sequence_transformer::{AttentionMask, EncoderLayerConfig, TransformerEncoder};
use serde::Deserialize;

/// The fixture's `config`: the arguments of `torch.nn.TransformerEncoder(Layer)`.
#[derive(Deserialize)]
struct EncoderCase {
    d_model: usize,
    num_layers: usize,
    num_heads: usize,
    ff_dim: usize,
    dropout: f64,
    norm_first: bool,
    layer_norm_eps: f64,
    activation: Activation,
    bias: bool,
    final_norm: bool,
}

fn src_mask(inputs: &HashMap<String, Tensor>) -> AttentionMask {
    let mask = inputs.get("src_mask").expect("no input `src_mask`").clone();
    match mask.dtype().is_float() {
        true => AttentionMask::Additive(mask),
        false => AttentionMask::Boolean(mask),
    }
}

/// `key_padding` (1 = padded) as the additive key mask (−∞ = padded).
fn key_mask(inputs: &HashMap<String, Tensor>, dtype: DType) -> Option<Tensor> {
    let padded = inputs.get("key_padding")?.to_dtype(DType::F64).and_then(|t| t.to_vec2::<f64>()).expect("key_padding");
    let rows: Vec<f64> = padded.iter().flatten().map(|&p| if p != 0.0 { f64::NEG_INFINITY } else { 0.0 }).collect();
    let device = inputs["x"].device();
    Some(Tensor::from_vec(rows, (padded.len(), padded[0].len()), device).and_then(|t| t.to_dtype(dtype)).expect("mask"))
}

fn check(fixture: &Fixture, dtype: DType, rtol: f64) {
    let c: EncoderCase = fixture.config();
    let train = fixture.meta("mode").as_deref() == Some("train");
    let layer = EncoderLayerConfig {
        num_heads: c.num_heads,
        ff_dim: c.ff_dim,
        dropout: c.dropout,
        norm_first: c.norm_first,
        layer_norm_eps: c.layer_norm_eps,
        seed: 0,
        activation: c.activation,
        bias: c.bias,
    };
    check_reference(
        fixture,
        dtype,
        rtol,
        |vb| TransformerEncoder::with_final_norm(c.d_model, c.num_layers, &layer, c.final_norm, vb),
        |encoder, inputs| {
            let key_mask = key_mask(inputs, dtype);
            encoder.forward_with_src_mask(&inputs["x"], &src_mask(inputs), key_mask.as_ref(), train)
        },
    );
}

#[test]
fn matches_torch_transformer_encoder_with_src_mask_in_f64() {
    for path in fixture_paths("transformer_encoder") {
        check(&Fixture::load(&path).expect("fixture"), DType::F64, 1e-10);
    }
}

#[test]
fn matches_torch_transformer_encoder_with_src_mask_in_f32() {
    for path in fixture_paths("transformer_encoder") {
        check(&Fixture::load(&path).expect("fixture"), DType::F32, 1e-5);
    }
}

#[test]
fn fixtures_cover_the_mask_kinds_and_options() {
    let names: Vec<String> =
        fixture_paths("transformer_encoder").iter().map(|p| Fixture::load(p).unwrap().name()).collect();
    for needle in ["additive_2d", "additive_3d", "bool_causal", "key_padding", "gelu", "no_bias", "final_norm", "train"]
    {
        assert!(names.iter().any(|n| n.contains(needle)), "no fixture case for `{needle}`: {names:?}");
    }
}
