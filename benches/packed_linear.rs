//! Criterion benchmarks of one linear layer at the MaskNet aggregation size (2144 → 4288) and the
//! DCNv2 size (1536 → 1536): candle's product (the training path), the packed f32 kernel and the
//! packed bf16 kernel (`rankstack_nn::packed_matmul`), batch 1, 64, 512 and 2048.
//! `cargo bench --bench packed_linear`.

use std::time::Duration;

use candle_core::{DType, Module};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankstack::nn::packed_matmul::WeightPrecision;
use rankstack::nn::testing::seeded_randn;
use rankstack::nn::Linear;

fn bench_linear(c: &mut Criterion) {
    rankstack::nn::memory::retain_freed_memory();
    for (k, n) in [(2144usize, 4288usize), (1536, 1536)] {
        let unpacked = Linear::new(seeded_randn(1, &[n, k], DType::F32), Some(seeded_randn(2, &[n], DType::F32)));
        let mut variants = vec![("candle_f32", unpacked.clone())];
        for (name, precision) in [("packed_f32", WeightPrecision::F32), ("packed_bf16", WeightPrecision::Bf16)] {
            let mut layer = unpacked.clone();
            layer.pack(precision).expect("pack");
            variants.push((name, layer));
        }
        let mut group = c.benchmark_group(format!("linear_{k}_to_{n}"));
        group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
        for batch in [1usize, 64, 512, 2048] {
            let x = seeded_randn(3, &[batch, k], DType::F32);
            // Throughput in multiply-adds, so criterion's rate reads as half the FLOP rate.
            group.throughput(Throughput::Elements((batch * k * n) as u64));
            for (name, layer) in &variants {
                group.bench_with_input(BenchmarkId::new(*name, batch), &x, |b, x| {
                    b.iter(|| layer.forward(x).expect("forward"))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);
