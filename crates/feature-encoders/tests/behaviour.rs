//! Behaviour of the feature encoders beyond the reference numerics: schema parsing and validation,
//! error reporting, the column layout, OOV and padding rules, buffers, gradients, reproducibility.

use candle_core::{DType, Device, Tensor};
use feature_encoders::{
    default_embedding_dim, BlockKind, DensePipelineConfig, FeatureBatch, FeatureEncoder, FeatureSchema, OovPolicy,
    Pooling, SparseEmbedding, SparseFeature, SparseInput,
};
use rankstack_nn::testing::{assert_all_params_get_gradients, seeded_randn};
use rankstack_nn::SeededVarMap;

const SCHEMA: &str = r#"
dense = [{ name = "age" }, { name = "ctr", missing_indicator = true }, { name = "count" }]

[dense_pipeline]
batch_norm_momentum = 0.2

[[sparse]]
name = "country"
cardinality = 16

[[sparse]]
name = "topics"
cardinality = 50
pooling = "mean"
padding_id = 0

[[sparse]]
name = "hashed"
cardinality = 7
oov = "hash"
dim = 5
normalize = false

[[sparse]]
name = "strict"
cardinality = 10
oov = "reject"

[[embedding]]
name = "pin"
dim = 12
projection = 6

[[embedding]]
name = "user"
dim = 5

[[extra]]
name = "sequence"
dim = 3
"#;

fn schema() -> FeatureSchema {
    FeatureSchema::from_toml_str(SCHEMA).expect("schema")
}

fn batch(b: usize, seed: u64) -> FeatureBatch {
    let bags: Vec<Vec<i64>> =
        (0..b).map(|i| if i % 3 == 1 { vec![] } else { vec![i as i64, (i * 7 % 60) as i64, 0] }).collect();
    FeatureBatch {
        dense: Some(seeded_randn(seed, &[b, 3], DType::F32)),
        sparse: vec![
            SparseInput::single(&(0..b as i64).map(|i| i * 5).collect::<Vec<_>>()),
            SparseInput::from_bags(&bags),
            SparseInput::from_bags(&(0..b).map(|i| vec![i as i64 * 3, 100 + i as i64]).collect::<Vec<_>>()),
            SparseInput::single(&(0..b as i64).map(|i| i % 10).collect::<Vec<_>>()),
        ],
        embedding: vec![seeded_randn(seed + 1, &[b, 12], DType::F32), seeded_randn(seed + 2, &[b, 5], DType::F32)],
        extra: vec![seeded_randn(seed + 3, &[b, 3], DType::F32)],
    }
}

fn encoder(seed: u64) -> (SeededVarMap, FeatureEncoder) {
    let store = SeededVarMap::new(seed);
    let enc = FeatureEncoder::new(&schema(), store.var_builder(DType::F32, &Device::Cpu)).expect("encoder");
    (store, enc)
}

fn err<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn toml_and_json_schemas_parse_and_agree() {
    let s = schema();
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(FeatureSchema::from_json_str(&json).unwrap(), s);
    assert_eq!(s.sparse[1].pooling, Pooling::Mean);
    assert_eq!(s.sparse[0].oov, OovPolicy::Reserved);
    assert_eq!(s.dense_pipeline, DensePipelineConfig { batch_norm_momentum: 0.2, ..Default::default() });
    let e = err(FeatureSchema::from_json_str(r#"{"dense": [{"name": "a", "colour": 1}]}"#));
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn default_width_rule() {
    let cases = [(1, 8), (2, 8), (16, 12), (81, 20), (250, 24), (10_000, 60), (13_000, 64), (1 << 40, 64)];
    for (c, d) in cases {
        assert_eq!(default_embedding_dim(c), d, "cardinality {c}");
    }
    // 6 · 1^0.25 = 6 → 8; the lower clamp 4 is reached only by overrides.
    assert_eq!(SparseFeature { dim: Some(3), ..SparseFeature::new("x", 5) }.embedding_dim(), 3);
}

#[test]
fn validation_errors_name_the_feature_and_field() {
    let bad = |edit: &dyn Fn(&mut FeatureSchema)| {
        let mut s = schema();
        edit(&mut s);
        err(s.validate())
    };
    assert!(bad(&|s| s.sparse[0].cardinality = 0).contains("sparse.country.cardinality"));
    assert!(bad(&|s| s.sparse[1].padding_id = Some(50)).contains("sparse.topics.padding_id"));
    assert!(bad(&|s| s.sparse[2].dim = Some(0)).contains("sparse.hashed.dim"));
    assert!(bad(&|s| s.embedding[0].projection = Some(0)).contains("embedding.pin.projection"));
    assert!(bad(&|s| s.embedding[1].dim = 0).contains("embedding.user.dim"));
    assert!(bad(&|s| s.extra[0].dim = 0).contains("extra.sequence.dim"));
    assert!(bad(&|s| s.dense[2].name = "age".into()).contains("duplicate"));
    assert!(bad(&|s| s.sparse[3].name = "a.b".into()).contains("sparse.a.b.name"));
    assert!(bad(&|s| s.dense_pipeline.batch_norm_momentum = 0.0).contains("batch_norm_momentum"));
    assert!(bad(&|s| s.dense_pipeline.clamp_value = -1.0).contains("clamp_value"));
    assert!(err(FeatureSchema::default().validate()).contains("no features"));
    let store = SeededVarMap::new(0);
    let mut s = schema();
    s.sparse[0].cardinality = 0;
    assert!(err(FeatureEncoder::new(&s, store.var_builder(DType::F32, &Device::Cpu)))
        .contains("sparse.country.cardinality"));
}

#[test]
fn output_dim_and_documented_column_order() {
    let (_, enc) = encoder(0);
    let blocks: Vec<(&str, BlockKind, usize, usize)> =
        enc.columns().iter().map(|c| (c.name.as_str(), c.kind, c.columns.start, c.columns.end)).collect();
    assert_eq!(
        blocks,
        vec![
            ("dense", BlockKind::Dense, 0, 3),
            ("dense_missing", BlockKind::DenseMissing, 3, 4),
            ("country", BlockKind::Sparse, 4, 16),
            ("topics", BlockKind::Sparse, 16, 32),
            ("hashed", BlockKind::Sparse, 32, 37),
            ("strict", BlockKind::Sparse, 37, 49),
            ("pin", BlockKind::Embedding, 49, 55),
            ("user", BlockKind::Embedding, 55, 60),
            ("sequence", BlockKind::Extra, 60, 63),
        ]
    );
    assert_eq!(enc.output_dim(), 63);
    let y = enc.forward_t(&batch(5, 1), true).unwrap();
    assert_eq!(y.dims(), &[5, 63]);
    // The extra block is passed through unchanged, in the last columns.
    let b = batch(5, 1);
    let tail: Vec<Vec<f32>> = y.narrow(1, 60, 3).unwrap().to_vec2().unwrap();
    assert_eq!(tail, b.extra[0].to_vec2::<f32>().unwrap());
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let (store, enc) = encoder(3);
    let y = enc.forward_t(&batch(6, 2), true).unwrap();
    let w = seeded_randn(9, y.dims(), DType::F32);
    let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
    assert_all_params_get_gradients(&store, &grads);
}

#[test]
fn same_seed_same_output() {
    let run = |seed| encoder(seed).1.forward_t(&batch(4, 5), true).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

#[test]
fn oov_policies_and_padding_rows() {
    let store = SeededVarMap::new(0);
    let vb = store.var_builder(DType::F64, &Device::Cpu);
    let reserved = SparseEmbedding::new(&SparseFeature::new("r", 10), vb.pp("r")).unwrap();
    let y: Vec<Vec<f64>> = reserved.forward(&SparseInput::single(&[10, 500, 3])).unwrap().to_vec2().unwrap();
    assert_eq!(y[0], y[1], "all OOV ids share the reserved row");
    assert_ne!(y[0], y[2]);
    let hashed =
        SparseEmbedding::new(&SparseFeature { oov: OovPolicy::Hash, ..SparseFeature::new("h", 10) }, vb.pp("h"))
            .unwrap();
    let y: Vec<Vec<f64>> = hashed.forward(&SparseInput::single(&[13, 3, 23])).unwrap().to_vec2().unwrap();
    assert!(y[0] == y[1] && y[1] == y[2], "13 and 23 hash to 3");

    // Padding: the row starts at zero, is skipped by mean pooling, and gets no gradient.
    let f = SparseFeature { pooling: Pooling::Mean, padding_id: Some(2), ..SparseFeature::new("p", 6) };
    let table = SparseEmbedding::new(&f, vb.pp("p")).unwrap();
    let weight = store.named_vars().into_iter().find(|(n, _)| n == "p.weight").unwrap().1;
    assert!(weight.as_tensor().get(2).unwrap().to_vec1::<f64>().unwrap().iter().all(|v| *v == 0.0));
    let y = table.forward(&SparseInput::from_bags(&[vec![1, 2], vec![1], vec![2, 2], vec![]])).unwrap();
    let rows: Vec<Vec<f64>> = y.to_vec2().unwrap();
    assert_eq!(rows[0], rows[1], "padding does not count in the mean");
    assert!(rows[2].iter().chain(&rows[3]).all(|v| *v == 0.0), "padding-only and empty bags are zero");
    let g = y.sum_all().unwrap().backward().unwrap();
    let gw: Vec<Vec<f64>> = g.get(weight.as_tensor()).unwrap().to_vec2().unwrap();
    assert!(gw[2].iter().all(|v| *v == 0.0) && gw[1].iter().all(|v| *v == 2.0));
}

#[test]
fn bad_ids_are_errors_not_panics() {
    let (_, enc) = encoder(0);
    let mut b = batch(4, 0);
    b.sparse[3] = SparseInput::single(&[1, 2, 10, 3]);
    let e = err(enc.forward(&b));
    assert!(e.contains("sparse.strict") && e.contains("id 10") && e.contains("reject"), "{e}");
    for feature in 0..4 {
        let mut b = batch(4, 0);
        b.sparse[feature] = SparseInput::single(&[1, -4, 2, 3]);
        let e = err(enc.forward(&b));
        assert!(e.contains("negative") && e.contains("-4"), "{e}");
    }
    assert!(err(SparseInput::new(vec![1, 2], vec![0, 3])).contains("offsets"));
    assert!(err(SparseInput::new(vec![1, 2], vec![1])).contains("start at 0"));
    assert!(err(SparseInput::new(vec![1, 2], vec![0, 2, 1])).contains("non-decreasing"));
}

#[test]
fn mismatched_batches_and_widths_are_errors() {
    let (_, enc) = encoder(0);
    let mut b = batch(4, 0);
    b.sparse[1] = SparseInput::from_bags(&[vec![1], vec![2], vec![3]]);
    let e = err(enc.forward(&b));
    assert!(e.contains("sparse.topics") && e.contains("batch size 3") && e.contains('4'), "{e}");
    let mut b = batch(4, 0);
    b.embedding[0] = seeded_randn(0, &[5, 12], DType::F32);
    assert!(err(enc.forward(&b)).contains("embedding.pin"));
    let mut b = batch(4, 0);
    b.embedding[1] = seeded_randn(0, &[4, 6], DType::F32);
    let e = err(enc.forward(&b));
    assert!(e.contains("embedding.user") && e.contains("[batch, 5]") && e.contains("[4, 6]"), "{e}");
    let mut b = batch(4, 0);
    b.dense = Some(seeded_randn(0, &[4, 2], DType::F32));
    let e = err(enc.forward(&b));
    assert!(e.contains("dense") && e.contains("[batch, 3]"), "{e}");
    let mut b = batch(4, 0);
    b.extra[0] = seeded_randn(0, &[4, 4], DType::F32);
    assert!(err(enc.forward(&b)).contains("extra.sequence"));
    let mut b = batch(4, 0);
    b.embedding.pop();
    assert!(err(enc.forward(&b)).contains("embedding"));
    let mut b = batch(4, 0);
    b.dense = None;
    assert!(err(enc.forward(&b)).contains("dense"));
    // BatchNorm cannot train on one row.
    assert!(err(enc.forward_t(&batch(1, 0), true)).contains("more than one row"));
    assert!(enc.forward(&batch(1, 0)).is_ok());
}

#[test]
fn dense_pipeline_non_finite_indicator_clamp_and_buffers() {
    let json = r#"{"dense": [{"name": "a", "missing_indicator": true}, {"name": "b"}],
                   "dense_pipeline": {"standardize": true, "batch_norm": false, "clamp_value": 1.0}}"#;
    let s = FeatureSchema::from_json_str(json).unwrap();
    let store = SeededVarMap::new(0);
    let enc = FeatureEncoder::new(&s, store.var_builder(DType::F64, &Device::Cpu)).unwrap();
    assert!(store.named_vars().is_empty(), "no BatchNorm, no parameters");
    let dev = Device::Cpu;
    // Column a: values 0, e−1, e²−1 → log1p 0, 1, 2 → mean 1, std sqrt(2/3).
    let e = std::f64::consts::E;
    enc.fit_dense(&Tensor::new(&[[0.0, 5.0], [e - 1.0, 5.0], [e * e - 1.0, 5.0]], &dev).unwrap()).unwrap();
    let names: Vec<String> = enc.buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["dense.standardize_mean", "dense.standardize_std"]);
    let std: Vec<f64> = enc.buffers()[1].1.as_tensor().to_vec1().unwrap();
    assert!((std[0] - (2.0f64 / 3.0).sqrt()).abs() < 1e-12 && std[1] == 1.0, "constant column gets std 1: {std:?}");
    let x = Tensor::new(&[[f64::NAN, 5.0], [e * e * e - 1.0, f64::INFINITY]], &dev).unwrap();
    let xb = FeatureBatch { dense: Some(x.clone()), ..Default::default() };
    let y: Vec<Vec<f64>> = enc.forward(&xb).unwrap().to_vec2().unwrap();
    // NaN → 0 → (0 − 1)/0.816 = −1.22 → clamp −1, indicator 1; 3 → (3 − 1)/0.816 → clamp 1.
    // b = 5 → (ln 6 − ln 6)/1 = 0; b = +inf → 0 → (0 − ln 6)/1 → clamp −1 (b has no indicator).
    assert_eq!(y, vec![vec![-1.0, 0.0, 1.0], vec![1.0, -1.0, 0.0]]);
    // Buffers round-trip through a checkpoint.
    let saved: std::collections::HashMap<String, Tensor> =
        enc.buffers().into_iter().map(|(n, v)| (n, v.as_tensor().copy().unwrap())).collect();
    let enc2 = FeatureEncoder::new(&s, SeededVarMap::new(1).var_builder(DType::F64, &dev)).unwrap();
    rankstack_nn::checkpoint::load_into(&enc2.buffers(), &saved).unwrap();
    assert_eq!(enc2.forward(&xb).unwrap().to_vec2::<f64>().unwrap(), y);
    // Fit without standardisation is an error naming the field.
    let (_, plain) = encoder(0);
    assert!(err(plain.fit_dense(&seeded_randn(0, &[4, 3], DType::F32))).contains("standardize"));
}

#[test]
fn batch_norm_running_stats_train_vs_eval() {
    let (_, enc) = encoder(0);
    let names: Vec<String> = enc.buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["dense.batch_norm.running_mean", "dense.batch_norm.running_var", "dense.batch_norm.num_batches_tracked"]
    );
    let b = batch(8, 4);
    let before: Vec<f32> = enc.buffers()[0].1.as_tensor().to_vec1().unwrap();
    let eval1 = enc.forward(&b).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(before, enc.buffers()[0].1.as_tensor().to_vec1::<f32>().unwrap(), "eval does not update");
    enc.forward_t(&b, true).unwrap();
    assert_ne!(before, enc.buffers()[0].1.as_tensor().to_vec1::<f32>().unwrap(), "train updates");
    assert_ne!(eval1, enc.forward(&b).unwrap().to_vec2::<f32>().unwrap(), "eval uses the running stats");
}
