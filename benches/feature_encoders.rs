//! Criterion benchmarks of the `FeatureEncoder` at batch 64, 512 and 2048 on a Homefeed-like schema:
//! 32 dense features (4 with missing indicators; default pipeline with BatchNorm), 8 sparse features
//! (cardinality 10 to 100 000, two multi-valued bags of up to 10 ids), two 256-wide pretrained
//! embeddings projected to 64, and the TransAct output (1056 columns) as an extra block.
//! Forward in evaluation mode and forward + backward in training mode.
//! `cargo bench --bench feature_encoders`.

#![forbid(unsafe_code)]

use std::time::Duration;

use candle_core::{DType, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use rankstack::feature_encoders::{
    DenseFeature, EmbeddingFeature, ExtraFeature, FeatureBatch, FeatureEncoder, FeatureSchema, Pooling, SparseFeature,
    SparseInput,
};
use rankstack::nn::rng::Rng;
use rankstack::nn::testing::seeded_randn;
use rankstack::nn::SeededVarMap;

const BATCHES: [usize; 3] = [64, 512, 2048];
const CARDINALITIES: [usize; 8] = [10, 50, 200, 1_000, 5_000, 20_000, 50_000, 100_000];

fn schema() -> FeatureSchema {
    let dense = (0..32).map(|i| DenseFeature { name: format!("d{i}"), missing_indicator: i % 8 == 0 }).collect();
    let sparse = CARDINALITIES
        .iter()
        .enumerate()
        .map(|(i, &c)| SparseFeature {
            pooling: if i >= 6 { Pooling::Mean } else { Pooling::Sum },
            ..SparseFeature::new(format!("s{i}"), c)
        })
        .collect();
    let embedding = ["pin", "user"]
        .iter()
        .map(|n| EmbeddingFeature {
            name: n.to_string(),
            dim: 256,
            projection: Some(64),
            projection_bias: true,
            normalize: true,
        })
        .collect();
    FeatureSchema {
        dense,
        sparse,
        embedding,
        extra: vec![ExtraFeature { name: "sequence".into(), dim: 1056 }],
        ..Default::default()
    }
}

fn batch(b: usize) -> FeatureBatch {
    let mut rng = Rng::new(b as u64);
    let sparse = CARDINALITIES
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let bags: Vec<Vec<i64>> = (0..b)
                .map(|_| {
                    let n = if i >= 6 { rng.below(11) as usize } else { 1 };
                    (0..n).map(|_| rng.below(c as u64 + c as u64 / 10) as i64).collect()
                })
                .collect();
            SparseInput::from_bags(&bags)
        })
        .collect();
    FeatureBatch {
        dense: Some(seeded_randn(1, &[b, 32], DType::F32)),
        sparse,
        embedding: vec![seeded_randn(2, &[b, 256], DType::F32), seeded_randn(3, &[b, 256], DType::F32)],
        extra: vec![seeded_randn(4, &[b, 1056], DType::F32)],
    }
}

fn loss(y: &Tensor) -> Tensor {
    y.sqr().and_then(|t| t.mean_all()).expect("loss")
}

fn bench_feature_encoder(c: &mut Criterion) {
    rankstack::memory::retain_freed_memory();
    let params = SeededVarMap::new(0);
    let enc = FeatureEncoder::new(&schema(), params.var_builder(DType::F32, &candle_core::Device::Cpu)).expect("build");
    let mut group = c.benchmark_group(format!("feature_encoder_d{}", enc.output_dim()));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for b in BATCHES {
        let input = batch(b);
        group.throughput(Throughput::Elements(b as u64));
        group.bench_with_input(BenchmarkId::new("forward", b), &input, |bench, x| {
            bench.iter(|| enc.forward(x).expect("forward"))
        });
        group.bench_with_input(BenchmarkId::new("forward_backward", b), &input, |bench, x| {
            bench.iter(|| loss(&enc.forward_t(x, true).expect("forward")).backward().expect("backward"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_feature_encoder);
criterion_main!(benches);
