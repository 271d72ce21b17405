//! Criterion benchmarks of the TransAct sequence encoder with the TransAct defaults (S = 100,
//! action and item width 32, concat fusion d = 96, 2 layers, 2 heads, feed-forward 32, K = 10,
//! output 1056) at batch 64, 512 and 2048: forward in evaluation mode, and forward + backward in
//! training mode (dropout 0.1 and the random time window active) at 64 and 512 (also at 2048 with
//! `RANKSTACK_BENCH_FULL=1`: one training step there takes tens of seconds on a 2-core CPU).
//! Flat sampling with 10 samples keeps the whole run to a few minutes.
//! `cargo bench --bench sequence_encoder`.

#![forbid(unsafe_code)]

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use rankstack::nn::rng::Rng;
use rankstack::nn::testing::seeded_randn;
use rankstack::nn::SeededVarMap;
use rankstack::sequence_transformer::{SequenceBatch, SequenceTransformer, SequenceTransformerConfig};

const BATCHES: [usize; 3] = [64, 512, 2048];
const REQUEST: i64 = 1_700_000_000_000;

/// Histories of 20 to 100 actions (the rest padding), minutes to days old.
fn batch(b: usize, config: &SequenceTransformerConfig) -> SequenceBatch {
    let (s, e) = (config.max_len, config.item_dim);
    let mut rng = Rng::new(b as u64);
    let mut types = vec![0u32; b * s];
    let mut ts = vec![0i64; b * s];
    for i in 0..b {
        let n = 20 + rng.below((s - 19) as u64) as usize;
        let mut t = REQUEST;
        for j in 0..n {
            t -= 60_000 + rng.below(3_600_000) as i64;
            types[i * s + j] = 1 + rng.below(config.num_action_types as u64 - 1) as u32;
            ts[i * s + j] = t;
        }
    }
    let dev = Device::Cpu;
    SequenceBatch {
        action_types: Tensor::from_vec(types, (b, s), &dev).expect("types"),
        item_embeddings: seeded_randn(1, &[b, s, e], DType::F32),
        timestamps: Tensor::from_vec(ts, (b, s), &dev).expect("timestamps"),
        request_time: Tensor::from_vec(vec![REQUEST; b], b, &dev).expect("request"),
        candidate: seeded_randn(2, &[b, e], DType::F32),
    }
}

fn bench_sequence_encoder(c: &mut Criterion) {
    rankstack::memory::retain_freed_memory();
    let config = SequenceTransformerConfig::default();
    let params = SeededVarMap::new(0);
    let model = SequenceTransformer::new(&config, params.var_builder(DType::F32, &Device::Cpu)).expect("build");
    let mut group = c.benchmark_group("transact_s100_d96");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let full = std::env::var_os("RANKSTACK_BENCH_FULL").is_some();
    for b in BATCHES {
        let input = batch(b, &config);
        group.throughput(Throughput::Elements(b as u64));
        group.bench_with_input(BenchmarkId::new("forward", b), &input, |bench, x| {
            bench.iter(|| model.forward(x).expect("forward"))
        });
        if b > 512 && !full {
            continue;
        }
        group.bench_with_input(BenchmarkId::new("forward_backward", b), &input, |bench, x| {
            bench.iter(|| {
                let y = model.forward_t(x, true).expect("forward");
                y.sqr().and_then(|t| t.mean_all()).expect("loss").backward().expect("backward")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_sequence_encoder);
criterion_main!(benches);
