//! The paper's interaction stack on the `homefeed-bench` width: parallel MaskNet (3 blocks,
//! projection ratio 2.0, 512 outputs each) on a 2144-wide encoder output, 4 full-rank DCNv2 layers
//! on the 1536-wide result, then one forward and one backward pass on a batch of random inputs.
//!
//! `cargo run --release --example interaction_stack [-- BATCH]`

#![forbid(unsafe_code)]

use std::time::Instant;

use candle_core::{DType, Device, Module};
use rankstack::dcnv2::{CrossNet, CrossNetConfig};
use rankstack::masknet::{ParallelMaskNet, ParallelMaskNetConfig};
use rankstack::nn::testing::{assert_all_params_get_gradients, seeded_randn};
use rankstack::nn::{loss::bce_with_logits_mean, SeededVarMap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batch: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let input_dim = 2144;
    let params = SeededVarMap::new(42);
    let vb = params.var_builder(DType::F32, &Device::Cpu);
    let masknet = ParallelMaskNet::new(input_dim, &ParallelMaskNetConfig::paper(), vb.pp("masknet"))?;
    let cross = CrossNet::new(masknet.output_dim(), &CrossNetConfig::full_rank(4), vb.pp("crossnet"))?;
    let n_params: usize = params.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    println!("interaction stack: {input_dim} -> ParallelMaskNet 3x512 -> 4 x DCNv2 on 1536; {n_params} parameters");

    let x = seeded_randn(1, &[batch, input_dim], DType::F32);
    let labels = seeded_randn(2, &[batch], DType::F32).ge(0.0)?.to_dtype(DType::F32)?;

    let start = Instant::now();
    let y = cross.forward(&masknet.forward(&x)?)?;
    let forward = start.elapsed();
    // A scalar objective: the mean over features of the crossed output as a logit, against labels.
    let logits = y.mean(1)?;
    let loss = bce_with_logits_mean(&logits, &labels)?;
    let start = Instant::now();
    let grads = loss.backward()?;
    let backward = start.elapsed();
    assert_all_params_get_gradients(&params, &grads);

    let grad_norm: f32 = params
        .named_vars()
        .iter()
        .map(|(_, v)| {
            grads.get(v.as_tensor()).map_or(0.0, |g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        })
        .sum::<f32>()
        .sqrt();
    println!(
        "batch {batch}: output {:?}, loss {:.5}, gradient norm {grad_norm:.5}",
        y.dims(),
        loss.to_scalar::<f32>()?
    );
    println!(
        "forward {:.1} ms, backward {:.1} ms; every parameter received a finite, non-zero gradient",
        forward.as_secs_f64() * 1e3,
        backward.as_secs_f64() * 1e3
    );
    Ok(())
}
