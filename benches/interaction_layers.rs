//! Criterion benchmarks of the interaction layers at the paper's sizes: `CrossNet` (4 full-rank
//! layers, d = 1536) and `ParallelMaskNet` (3 x 512, ratio 2.0, input 2144), batch 64, 512 and
//! 2048, forward and forward + backward. `cargo bench --bench interaction_layers`.

#![forbid(unsafe_code)]

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankstack::dcnv2::{CrossNet, CrossNetConfig};
use rankstack::masknet::{ParallelMaskNet, ParallelMaskNetConfig};
use rankstack::nn::testing::seeded_randn;
use rankstack::nn::SeededVarMap;
use std::time::Duration;

const BATCHES: [usize; 3] = [64, 512, 2048];

fn loss(y: &Tensor) -> Tensor {
    y.sqr().and_then(|t| t.mean_all()).expect("loss")
}

/// Benchmarks `forward` and `forward + backward` of one layer at every batch size.
fn bench_layer<M>(
    c: &mut Criterion,
    name: &str,
    input_dim: usize,
    layer: &M,
    forward: impl Fn(&M, &Tensor, bool) -> Tensor,
) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    for batch in BATCHES {
        let x = seeded_randn(batch as u64, &[batch, input_dim], DType::F32);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("forward", batch), &x, |b, x| b.iter(|| forward(layer, x, false)));
        group.bench_with_input(BenchmarkId::new("forward_backward", batch), &x, |b, x| {
            b.iter(|| loss(&forward(layer, x, true)).backward().expect("backward"))
        });
    }
    group.finish();
}

fn bench_crossnet(c: &mut Criterion) {
    rankstack::memory::retain_freed_memory();
    let params = SeededVarMap::new(0);
    let net = CrossNet::new(1536, &CrossNetConfig::full_rank(4), params.var_builder(DType::F32, &Device::Cpu))
        .expect("build");
    bench_layer(c, "crossnet_4x1536", 1536, &net, |n, x, _| n.forward(x).expect("forward"));
}

fn bench_masknet(c: &mut Criterion) {
    rankstack::memory::retain_freed_memory();
    let params = SeededVarMap::new(0);
    let net = ParallelMaskNet::new(2144, &ParallelMaskNetConfig::paper(), params.var_builder(DType::F32, &Device::Cpu))
        .expect("build");
    bench_layer(c, "parallel_masknet_3x512_in2144", 2144, &net, |n, x, train| n.forward_t(x, train).expect("forward"));
}

criterion_group!(benches, bench_crossnet, bench_masknet);
criterion_main!(benches);
