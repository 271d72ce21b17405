//! Criterion benchmarks of one linear layer at the MaskNet aggregation size (2144 → 4288) and the
//! DCNv2 size (1536 → 1536), batch 1, 64, 512 and 2048:
//!
//! - scoring: candle's layer, the unpacked `Linear` (the fused op, packing per call), the packed
//!   f32 kernel and the packed bf16 kernel (`rankstack_nn::packed_matmul`);
//! - training (forward and backward, weight and bias gradients): candle's layer against `Linear`,
//!   whose backward products run on the same kernel (`fused_linear`).
//!
//! `cargo bench --bench packed_linear`.

#![forbid(unsafe_code)]

use std::time::Duration;

use candle_core::{DType, Module, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankstack::nn::packed_matmul::WeightPrecision;
use rankstack::nn::testing::seeded_randn;
use rankstack::nn::Linear;

fn bench_linear(c: &mut Criterion) {
    rankstack::memory::retain_freed_memory();
    for (k, n) in [(2144usize, 4288usize), (1536, 1536)] {
        let (w, b) = (seeded_randn(1, &[n, k], DType::F32), seeded_randn(2, &[n], DType::F32));
        let candle = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let unpacked = Linear::new(w.clone(), Some(b.clone()));
        let mut variants: Vec<(&str, Box<dyn Module>)> =
            vec![("candle_f32", Box::new(candle)), ("unpacked_f32", Box::new(unpacked.clone()))];
        for (name, precision) in [("packed_f32", WeightPrecision::F32), ("packed_bf16", WeightPrecision::Bf16)] {
            let mut layer = unpacked.clone();
            layer.pack(precision).expect("pack");
            variants.push((name, Box::new(layer)));
        }
        let (wv, bv) = (Var::from_tensor(&w).expect("var"), Var::from_tensor(&b).expect("var"));
        let trainable: [(&str, Box<dyn Module>); 2] = [
            (
                "train_candle_f32",
                Box::new(candle_nn::Linear::new(wv.as_tensor().clone(), Some(bv.as_tensor().clone()))),
            ),
            ("train_fused_f32", Box::new(Linear::new(wv.as_tensor().clone(), Some(bv.as_tensor().clone())))),
        ];
        let mut group = c.benchmark_group(format!("linear_{k}_to_{n}"));
        group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
        for batch in [1usize, 64, 512, 2048] {
            let x = seeded_randn(3, &[batch, k], DType::F32);
            // Throughput in multiply-adds of the forward product, so criterion's rate reads as half
            // the FLOP rate (a training step does three such products).
            group.throughput(Throughput::Elements((batch * k * n) as u64));
            for (name, layer) in &variants {
                group.bench_with_input(BenchmarkId::new(*name, batch), &x, |bench, x| {
                    bench.iter(|| layer.forward(x).expect("forward"))
                });
            }
            let r = seeded_randn(4, &[batch, n], DType::F32);
            for (name, layer) in &trainable {
                group.bench_with_input(BenchmarkId::new(*name, batch), &x, |bench, x| {
                    bench.iter(|| {
                        let y = layer.forward(x).expect("forward");
                        let loss: Tensor = y.mul(&r).and_then(|t| t.sum_all()).expect("loss");
                        loss.backward().expect("backward")
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);
