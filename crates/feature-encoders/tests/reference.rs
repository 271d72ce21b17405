//! The feature encoder against the PyTorch reference (`reference/rankstack_ref/feature_encoders.py`,
//! fixtures in `fixtures/feature_encoders/`): forward output, gradients of every float input and
//! parameter, and the buffers (BatchNorm running statistics after a training step, fitted z-score
//! statistics), in float64 and float32.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use feature_encoders::{FeatureBatch, FeatureEncoder, FeatureSchema, SparseInput};
use rankstack_nn::testing::{assert_close, check_fixtures, check_reference, fixture_paths, test_device, Fixture};

fn batch_from_inputs(schema: &FeatureSchema, inputs: &HashMap<String, Tensor>) -> FeatureBatch {
    let get = |k: &str| inputs.get(k).unwrap_or_else(|| panic!("no input `{k}`")).clone();
    FeatureBatch {
        dense: (!schema.dense.is_empty()).then(|| get("dense")),
        sparse: schema
            .sparse
            .iter()
            .map(|f| {
                SparseInput::from_tensors(
                    &get(&format!("sparse.{}.ids", f.name)),
                    &get(&format!("sparse.{}.offsets", f.name)),
                )
                .expect("valid bags")
            })
            .collect(),
        embedding: schema.embedding.iter().map(|f| get(&format!("embedding.{}", f.name))).collect(),
        extra: schema.extra.iter().map(|f| get(&format!("extra.{}", f.name))).collect(),
    }
}

fn check(fixture: &Fixture, dtype: DType, rtol: f64) {
    let schema: FeatureSchema = fixture.config();
    let train = fixture.meta("mode").as_deref() == Some("train");
    let case = fixture.name();
    check_reference(
        fixture,
        dtype,
        rtol,
        |vb| {
            let enc = FeatureEncoder::new(&schema, vb)?;
            if fixture.has("extra.fit_data") {
                enc.fit_dense(&fixture.tensor("extra.fit_data").to_dtype(dtype)?.to_device(&test_device())?)?;
            }
            let initial = fixture.with_prefix("initial_buffer.");
            for (name, var) in enc.buffers() {
                if let Some(t) = initial.get(&name) {
                    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
                }
            }
            Ok(enc)
        },
        |enc, inputs| {
            let out = enc.forward_t(&batch_from_inputs(&schema, inputs), train)?;
            let buffers = enc.buffers();
            assert_eq!(buffers.len(), fixture.with_prefix("buffer.").len(), "{case}: buffer count");
            for (name, var) in buffers {
                let expected = fixture.tensor(&format!("buffer.{name}"));
                if expected.dtype().is_float() {
                    assert_close(&format!("{case}: buffer `{name}`"), var.as_tensor(), expected, rtol);
                } else {
                    assert_eq!(
                        var.as_tensor().to_dtype(DType::I64)?.to_scalar::<i64>()?,
                        expected.to_scalar::<i64>()?,
                        "{case}: `{name}`"
                    );
                }
            }
            Ok(out)
        },
    );
}

#[test]
fn matches_pytorch_in_f64() {
    check_fixtures("feature_encoders", DType::F64, 1e-10, check);
}

#[test]
fn matches_pytorch_in_f32() {
    // 1e-5 of the largest magnitude; check_reference also accepts 4x PyTorch's own float32 error.
    check_fixtures("feature_encoders", DType::F32, 1e-5, check);
}

#[test]
fn fixtures_cover_the_required_cases() {
    let names: Vec<String> =
        fixture_paths("feature_encoders").iter().map(|p| Fixture::load(p).unwrap().name()).collect();
    for needle in ["train", "eval", "empty", "fit", "padding"] {
        assert!(names.iter().any(|n| n.contains(needle)), "no fixture case for `{needle}`: {names:?}");
    }
}
