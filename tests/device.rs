//! The whole model on a GPU against the CPU: one training step (loss, every dense and row-sparse
//! gradient, the weights after AdamW), evaluation, and the trainer end to end.
//!
//! These run on the device of `RANKSTACK_TEST_DEVICE` (`cargo xtask gpu-bundle` builds them with
//! the `cuda` feature and its `run.sh` sets `cuda`). On the CPU they have nothing to compare and
//! say so in their output, except two that run the GPU's graph of candle operations on the CPU
//! with the CPU kernels off: its training step against the kernels', and the count of what a
//! training step and an evaluation read back to the host.

mod support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rankstack::data::ParquetDataset;
use rankstack::device::DeviceSpec;
use rankstack::kernels::cpu::{with_isa, Isa};
use rankstack::nn::host_transfer::{record_transfers, Direction, Origin, Transfer};
use rankstack::nn::{Reseed, SeededVarMap};
use rankstack::ranker_model::{Ranker, RankerConfig};
use rankstack::train::{evaluate, AdamW, AdamWConfig, BatchSource, TrainOptions, Trainer};
use support::{tmpdir, write_data};

/// The GPU under test, or `None` (with the reason printed) on the CPU.
fn gpu(test: &str) -> Option<Device> {
    let device = rankstack::nn::testing::test_device();
    if device.is_cpu() {
        eprintln!("{test}: skipped (no GPU: set RANKSTACK_TEST_DEVICE=cuda on a GPU machine; cargo xtask gpu-bundle)");
        return None;
    }
    Some(device)
}

/// The tiny test architecture without dropout (the CPU and the GPU then compute the same
/// function; the sequence encoder's random time window is drawn on the host, so it is shared).
fn config(data: &ParquetDataset) -> RankerConfig {
    let mut config = support::tiny_config(data);
    let text = config.to_toml_string().replace("dropout = 0.1", "dropout = 0.0");
    config = RankerConfig::from_toml_str(&text).unwrap();
    config
}

/// The learning rate of the single-step test.
const LR: f64 = 1e-2;

/// Everything one training step produces, by parameter name, as f64 values.
struct Step {
    loss: f64,
    grads: HashMap<String, Vec<f64>>,
    weights: HashMap<String, Vec<f64>>,
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// One training step of a fresh model (seed 3) on `device`: forward in training mode, loss,
/// backward, row-sparse embedding gradients, AdamW.
fn step(config: &RankerConfig, data: &ParquetDataset, device: &Device) -> Step {
    step_with_autocast(config, data, device, None)
}

/// [`step`] with every linear layer's product autocast to `autocast` (`train --precision bf16`).
fn step_with_autocast(config: &RankerConfig, data: &ParquetDataset, device: &Device, autocast: Option<DType>) -> Step {
    let store = SeededVarMap::new(3);
    let mut ranker = Ranker::new(config, store.var_builder(DType::F32, device)).unwrap();
    rankstack::nn::autocast_linear_layers(&mut ranker, autocast);
    ranker.set_row_sparse_gradients(true);
    let b = data.batches(64, None).unwrap().next().unwrap().unwrap().into_device(device).unwrap();
    ranker.reseed(11);
    let logits = ranker.forward_t(&b.batch, true).unwrap();
    let loss = ranker.loss(&logits, &b.labels, b.example_weights.as_ref()).unwrap();
    let grads = loss.backward().unwrap();
    let rows = ranker.take_row_gradients(&grads).unwrap();
    let params = store.named_vars();
    let mut by_name = HashMap::new();
    for (name, var) in &params {
        if let Some(g) = grads.get(var.as_tensor()) {
            by_name.insert(name.clone(), values(g));
        }
        for r in rows.iter().filter(|r| r.table.id() == var.as_tensor().id()) {
            by_name.insert(format!("{name} rows {:?}", &r.rows[..r.rows.len().min(4)]), values(&r.grad));
        }
    }
    let mut optimizer = AdamW::new(params.clone(), AdamWConfig { lr: LR, ..AdamWConfig::default() }).unwrap();
    optimizer.step(&grads, &rows, LR).unwrap();
    let weights = params.iter().map(|(n, v)| (n.clone(), values(v.as_tensor()))).collect();
    Step { loss: loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap(), grads: by_name, weights }
}

/// Max-norm relative difference of `a` and `b`.
fn relative(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn a_training_step_on_the_gpu_equals_the_cpu_step() {
    let Some(gpu) = gpu("a_training_step_on_the_gpu_equals_the_cpu_step") else { return };
    let dir = tmpdir("device-step");
    let (train, _) = write_data(&dir, 256, 10);
    let config = config(&train);
    let (cpu, dev) = (step(&config, &train, &Device::Cpu), step(&config, &train, &gpu));
    assert_steps_agree(&cpu, &dev, "GPU");
}

/// bf16 autocast (`train --precision bf16`) on the GPU: the same step as the GPU's graph run on
/// the CPU (which the test above ties to the CPU kernels' autocast step), loss and every gradient
/// within bf16 rounding.
#[test]
fn a_bf16_autocast_step_on_the_gpu_equals_the_gpu_graph_on_the_cpu() {
    let Some(gpu) = gpu("a_bf16_autocast_step_on_the_gpu_equals_the_gpu_graph_on_the_cpu") else { return };
    let dir = tmpdir("device-autocast-step");
    let (train, _) = write_data(&dir, 256, 10);
    let config = config(&train);
    let bf16 = Some(DType::BF16);
    let graph = with_isa(Isa::Candle, || step_with_autocast(&config, &train, &Device::Cpu, bf16));
    let dev = step_with_autocast(&config, &train, &gpu, bf16);
    assert_bf16_steps_agree(&graph, &dev, "bf16 autocast, GPU vs the GPU graph on the CPU", Some(2e-2));
}

/// The graph of candle operations that a GPU runs, run on the CPU with rankstack's CPU kernels off
/// (`RANKSTACK_CPU=candle`, here `with_isa(Isa::Candle)`), equals the kernels' step: the composed
/// attention, LayerNorm, pooling, linear products and the tensor formulation of AdamW are checked
/// on every machine, GPU or not. (This is also the graph whose memory `gpu_bench` measures on a CPU.)
#[test]
fn the_gpu_graph_run_on_the_cpu_equals_the_cpu_kernels_step() {
    let dir = tmpdir("device-graph-on-cpu");
    let (train, _) = write_data(&dir, 256, 10);
    let config = config(&train);
    let kernels = step(&config, &train, &Device::Cpu);
    let composed = with_isa(Isa::Candle, || step(&config, &train, &Device::Cpu));
    assert_steps_agree(&kernels, &composed, "candle-only CPU graph");
}

/// A bf16 autocast step (`train --precision bf16`) on the GPU's graph, run on the CPU with the
/// kernels off (where `gpu_bench` measures its memory), where the linear layers and TransAct's
/// attention are lean graph nodes under autocast too. Against the same autocast step with the
/// CPU kernels (candle's graph of casts and products, the fused f32 kernels around them): the
/// same loss and every gradient within bf16 rounding. Against the f32 step: every parameter
/// receives a finite gradient and the loss is within 1%; the gradients themselves are not
/// bounded there (in this tiny model bf16's rounding moves them by up to about 45% of their
/// largest value, the same before and after the lean nodes; the worst is printed).
#[test]
fn a_bf16_autocast_step_on_the_gpu_graph_equals_the_autocast_step_of_the_cpu_kernels() {
    let dir = tmpdir("device-autocast-on-cpu");
    let (train, _) = write_data(&dir, 256, 10);
    let config = config(&train);
    let bf16 = Some(DType::BF16);
    let kernels = step_with_autocast(&config, &train, &Device::Cpu, bf16);
    let graph = with_isa(Isa::Candle, || step_with_autocast(&config, &train, &Device::Cpu, bf16));
    assert_bf16_steps_agree(&kernels, &graph, "bf16 autocast, candle-only CPU graph vs CPU kernels", Some(2e-2));
    let f32_step = step(&config, &train, &Device::Cpu);
    assert_bf16_steps_agree(&f32_step, &graph, "bf16 autocast, candle-only CPU graph vs f32", None);
}

/// `bf16`'s step against `reference`'s: the same parameters receive gradients, all finite; the
/// loss within 1e-4 (relative) where `gradients` bounds the gradients' relative difference, within
/// 1% where it does not.
fn assert_bf16_steps_agree(reference: &Step, bf16: &Step, what: &str, gradients: Option<f64>) {
    let loss = (reference.loss - bf16.loss).abs() / reference.loss.abs();
    let loss_bound = if gradients.is_some() { 1e-4 } else { 1e-2 };
    assert!(loss <= loss_bound, "loss: {} vs {} ({what})", reference.loss, bf16.loss);
    assert_eq!(reference.grads.len(), bf16.grads.len(), "the same parameters receive gradients ({what})");
    let mut worst = (0f64, String::new());
    for (name, g) in &reference.grads {
        let theirs = bf16.grads.get(name).unwrap_or_else(|| panic!("no gradient for {name} ({what})"));
        assert!(theirs.iter().all(|v| v.is_finite()), "a non-finite gradient of {name} ({what})");
        let r = relative(g, theirs);
        if let Some(bound) = gradients {
            assert!(r <= bound, "gradient of {name}: relative difference {r:.3e} ({what})");
        }
        if r > worst.0 {
            worst = (r, name.clone());
        }
    }
    eprintln!(
        "{what}: loss {:.6} vs {:.6}; {} gradients, worst {:.2e} ({})",
        reference.loss,
        bf16.loss,
        reference.grads.len(),
        worst.0,
        worst.1
    );
}

/// `other`'s step (loss, every gradient, the weights after AdamW) against the CPU kernels' step.
fn assert_steps_agree(cpu: &Step, other: &Step, what: &str) {
    assert!((cpu.loss - other.loss).abs() <= 1e-5 * cpu.loss.abs(), "loss: CPU {} vs {what} {}", cpu.loss, other.loss);
    assert_eq!(cpu.grads.len(), other.grads.len(), "the same parameters receive gradients");
    let mut worst = (0f64, String::new());
    for (name, g) in &cpu.grads {
        let theirs = other.grads.get(name).unwrap_or_else(|| panic!("no {what} gradient for {name}"));
        let r = relative(g, theirs);
        assert!(r <= 1e-4, "gradient of {name}: relative difference {r:.3e} ({what})");
        if r > worst.0 {
            worst = (r, name.clone());
        }
    }
    // AdamW's first step moves a weight by lr · g / (|g| + ε): where |g| is near ε, a gradient
    // difference of round-off size changes the update by up to a whole step. So the weights are
    // only bounded here; `adamw_on_the_gpu_equals_the_cpu_kernel_bit_for_bit` checks the optimizer.
    for (name, w) in &cpu.weights {
        let worst = w.iter().zip(&other.weights[name]).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 2.0 * LR, "{name} after AdamW: moved {worst:.3e} apart, more than two steps of {LR} ({what})");
    }
    eprintln!(
        "{what} step = CPU step: loss {:.6} vs {:.6}; {} gradients, worst {:.2e} ({})",
        cpu.loss,
        other.loss,
        cpu.grads.len(),
        worst.0,
        worst.1
    );
}

/// The embedding lookup's gradient (`rankstack_kernels::repeated_rows`: on CUDA one block per
/// row, `cuda/segment_sum.cu`) equals the CPU's bit for bit: both add each row's positions in
/// ascending order. One row repeated 2 858 times, rows never looked up, width 96.
#[test]
fn repeated_row_gradients_on_the_gpu_equal_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu("repeated_row_gradients_on_the_gpu_equal_the_cpu_bit_for_bit") else { return };
    let (n, d, positions) = (500usize, 96usize, 20_000usize);
    let table: Vec<f32> = (0..n * d).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
    // Row 3 at every 7th position; the others spread over rows 0..449; rows 450.. never read.
    let rows: Vec<u32> = (0..positions).map(|i| if i % 7 == 0 { 3 } else { (i * i % 449) as u32 }).collect();
    let weights: Vec<f32> = (0..positions * d).map(|i| ((i * 31 % 997) as f32 - 498.0) * 1e-2).collect();
    let run = |device: &Device| {
        let w = candle_core::Var::from_tensor(&Tensor::from_slice(&table, (n, d), device).unwrap()).unwrap();
        let y = rankstack::kernels::repeated_rows::gather_repeated_rows(w.as_tensor(), &rows).unwrap();
        let c = Tensor::from_slice(&weights, (positions, d), device).unwrap();
        // ∂loss/∂y = c exactly, so only the segmented sums can differ.
        let grads = (y * c).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        g.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    let (cpu, dev) = (run(&Device::Cpu), run(&gpu));
    let differing = cpu.iter().zip(&dev).filter(|(a, b)| a != b).count();
    eprintln!(
        "repeated-row gradient, {positions} positions into {n} rows of {d}: {differing} of {} values differ",
        cpu.len()
    );
    assert_eq!(differing, 0);
}

/// The row-sparse write-back (`rankstack_kernels::overwrite_rows`: on CUDA one block per row,
/// `cuda/overwrite_rows.cu`) writes the same values as the CPU: rows in any order, a width wider
/// than a block's threads, f32 and f64, every other row untouched.
#[test]
fn rows_overwritten_on_the_gpu_equal_the_cpu_bit_for_bit() {
    let Some(gpu) = gpu("rows_overwritten_on_the_gpu_equal_the_cpu_bit_for_bit") else { return };
    use rankstack::kernels::overwrite_rows::OverwriteRows;
    let (n, d) = (1000usize, 300usize);
    let rows: Vec<u32> = (0..400u32).map(|i| (i * 613) % n as u32).collect();
    for dtype in [DType::F32, DType::F64] {
        let run = |device: &Device| {
            let table = Tensor::arange(0f32, (n * d) as f32, device).unwrap().reshape((n, d)).unwrap();
            let table = table.to_dtype(dtype).unwrap();
            let new = (Tensor::arange(0f32, (rows.len() * d) as f32, device).unwrap() * -0.5)
                .unwrap()
                .reshape((rows.len(), d))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            OverwriteRows::new(&rows, n, device, "test").unwrap().apply(&table, &new).unwrap();
            values(&table)
        };
        let (cpu, dev) = (run(&Device::Cpu), run(&gpu));
        let differing = cpu.iter().zip(&dev).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        eprintln!("rows overwritten ({dtype:?}): {differing} of {} values differ", cpu.len());
        assert_eq!(differing, 0, "{dtype:?}");
    }
}

/// AdamW on the GPU (`rankstack_kernels::device_adamw`: the moments, then the parameter, two
/// launches of `cuda/adamw.cu`) gives the CPU fused kernel's bits: parameter and both moments,
/// dense and row-sparse steps, one with a gradient scale (clipping's), on a parameter larger
/// than one grid of the kernels (2¹⁶ blocks of 256 threads), so that the grid-stride loops run.
#[test]
fn adamw_on_the_gpu_equals_the_cpu_kernel_bit_for_bit() {
    let Some(gpu) = gpu("adamw_on_the_gpu_equals_the_cpu_kernel_bit_for_bit") else { return };
    let (n, d) = (4100usize, 4100usize);
    let init: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    let rows: Vec<u32> =
        (0..1500u32).map(|i| (i * 2741) % n as u32).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let run = |device: &Device| {
        let w = candle_core::Var::from_tensor(&Tensor::from_slice(&init, (n, d), device).unwrap()).unwrap();
        let config = AdamWConfig { lr: 0.05, weight_decay: 0.1, ..AdamWConfig::default() };
        let mut opt = AdamW::new(vec![("w".to_string(), w.clone())], config).unwrap();
        for step in 0..4usize {
            // A dense gradient on even steps, a row-sparse one on odd steps; identical values on
            // both devices (small ones included, where AdamW is most sensitive).
            let g: Vec<f32> = (0..n * d).map(|i| ((i * 7 + step * 13) % 11) as f32 * 1e-3 - 5e-3).collect();
            let gt = Tensor::from_slice(&g, (n, d), device).unwrap();
            if step % 2 == 0 {
                let grads = (w.as_tensor() * &gt).unwrap().sum_all().unwrap().backward().unwrap();
                // Step 2 with clipping's factor folded into the update.
                let scale = if step == 2 { 0.37 } else { 1.0 };
                opt.step_with_gradient_scale(&grads, &[], 0.05, scale).unwrap();
            } else {
                let index = Tensor::from_slice(&rows, rows.len(), device).unwrap();
                let grad = gt.index_select(&index, 0).unwrap();
                let row = rankstack::nn::RowGradient { table: w.as_tensor().clone(), rows: rows.clone(), grad };
                let none = Tensor::zeros(1, DType::F32, device).unwrap().sum_all().unwrap().backward().unwrap();
                opt.step(&none, &[row], 0.05).unwrap();
            }
        }
        let state = opt.state().unwrap();
        [values(w.as_tensor()), values(&state["m.w"]), values(&state["v.w"])]
    };
    let (cpu, dev) = (run(&Device::Cpu), run(&gpu));
    for (what, (c, g)) in ["parameter", "m", "v"].iter().zip(cpu.iter().zip(&dev)) {
        let differing = c.iter().zip(g).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        eprintln!(
            "AdamW on the GPU vs the CPU's fused kernel, 4 steps, {what}: {differing} of {} values differ",
            c.len()
        );
        assert_eq!(differing, 0, "{what}");
    }
}

/// The squared gradient norm's partial sums on the GPU (`cuda/sum_of_squares.cu`) against the
/// CPU's mirror of the same blocks: the totals differ only in the last sum over the partials
/// (candle's on each device).
#[test]
fn the_sum_of_squares_on_the_gpu_equals_the_cpu() {
    let Some(gpu) = gpu("the_sum_of_squares_on_the_gpu_equals_the_cpu") else { return };
    use rankstack::kernels::device_sum_of_squares::sum_of_squares_on_device;
    // One element, a partial block, many blocks, more than a full grid's loop; f32 and f64.
    let sizes = [1usize, 1000, 300_000, 3_000_017];
    let run = |device: &Device| {
        let tensors: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let x: Vec<f64> = (0..n).map(|i| ((i * 7919 + k) % 1999) as f64 / 999.0 - 1.0).collect();
                let t = Tensor::from_vec(x, n, device).unwrap();
                if k % 2 == 0 {
                    t.to_dtype(DType::F32).unwrap()
                } else {
                    t
                }
            })
            .collect();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        values(&sum_of_squares_on_device(&refs).unwrap().unwrap())[0]
    };
    let (cpu, dev) = (with_isa(Isa::Candle, || run(&Device::Cpu)), run(&gpu));
    eprintln!("sum of squares, {sizes:?} elements: CPU {cpu} vs GPU {dev}");
    assert!((cpu - dev).abs() <= 1e-13 * cpu, "{cpu} vs {dev}");
}

#[test]
fn scoring_attention_on_the_gpu_equals_the_cpu_mirror() {
    let Some(gpu) = gpu("scoring_attention_on_the_gpu_equals_the_cpu_mirror") else { return };
    use rankstack::kernels::cpu::packed_attention::SequenceLayout;
    use rankstack::kernels::device_packed_attention::{packed_attention_forward_on_device, HEAD_WIDTHS};
    struct Packed(Vec<usize>, Vec<f64>);
    impl SequenceLayout for Packed {
        fn row_offsets(&self) -> &[usize] {
            &self.0
        }
        fn key_bias(&self) -> &[f64] {
            &self.1
        }
    }
    // 3000 sequences of 0..=150 rows (longer than a block's 128 threads), every 9th key hidden.
    let lengths: Vec<usize> = (0..3000).map(|s| (s * 37) % 151).collect();
    let offsets: Vec<usize> =
        std::iter::once(0).chain(lengths.iter().scan(0, |o, l| Some(*o + l)).collect::<Vec<_>>()).collect();
    let rows = *offsets.last().unwrap();
    let bias: Vec<f64> = (0..rows).map(|i| if i % 9 == 4 { f64::NEG_INFINITY } else { 0.0 }).collect();
    let packed = Packed(offsets, bias);
    for (heads, dh) in HEAD_WIDTHS.iter().map(|&dh| (2, dh)) {
        let d = heads * dh;
        let run = |device: &Device| {
            let x = |seed: usize| {
                let v: Vec<f32> = (0..rows * d).map(|i| ((i * 7919 + seed) % 1999) as f32 / 999.0 - 1.0).collect();
                Tensor::from_vec(v, (rows, d), device).unwrap()
            };
            let out = packed_attention_forward_on_device(&x(1), &x(2), &x(3), &packed, heads).unwrap().unwrap();
            values(&out)
        };
        let (cpu, dev) = (run(&Device::Cpu), run(&gpu));
        let worst = cpu.iter().zip(&dev).map(|(a, b)| (a - b).abs() / (1.0 + a.abs())).fold(0.0, f64::max);
        eprintln!("scoring attention, {rows} rows, {heads} heads of width {dh}: GPU vs CPU mirror within {worst:.2e}");
        // expf differs by a few ulp between the GPU and the host's libm; nothing else does.
        assert!(worst <= 1e-5, "width {dh}: {worst}");
    }
}

#[test]
fn evaluation_on_the_gpu_equals_evaluation_on_the_cpu() {
    let Some(gpu) = gpu("evaluation_on_the_gpu_equals_evaluation_on_the_cpu") else { return };
    let dir = tmpdir("device-eval");
    let (train, eval) = write_data(&dir, 64, 500);
    let config = support::tiny_config(&train); // evaluation has no dropout: the full config
    let report = |device: &Device| {
        let ranker = Ranker::new(&config, SeededVarMap::new(5).var_builder(DType::F32, device)).unwrap();
        evaluate(&ranker, &eval as &dyn BatchSource, 128, 0, 0).unwrap()
    };
    let (cpu, dev) = (report(&Device::Cpu), report(&gpu));
    assert!((cpu.loss - dev.loss).abs() <= 1e-5 * cpu.loss, "{} vs {}", cpu.loss, dev.loss);
    for ((name, a), (_, b)) in cpu.tasks.iter().zip(&dev.tasks) {
        assert!((a.auc - b.auc).abs() <= 1e-4, "{name} AUC {} vs {}", a.auc, b.auc);
        assert!((a.log_loss - b.log_loss).abs() <= 1e-5 * a.log_loss, "{name} log loss");
    }
}

#[test]
fn the_trainer_runs_on_the_gpu_and_stays_close_to_the_cpu_run() {
    if gpu("the_trainer_runs_on_the_gpu_and_stays_close_to_the_cpu_run").is_none() {
        return;
    }
    let dir = tmpdir("device-trainer");
    let (train, eval) = write_data(&dir, 512, 200);
    let config = config(&train);
    let options = |device| TrainOptions {
        epochs: 1,
        batch_size: 64,
        warmup_steps: 2,
        quiet: true,
        seed: 7,
        device,
        ..TrainOptions::default()
    };
    let run = |name: &str, device| {
        let mut t = Trainer::new(&config, options(device), dir.join(name)).unwrap();
        let report = t.fit(&train, Some(&eval)).unwrap();
        let weights: HashMap<String, Vec<f64>> =
            t.store().named_vars().iter().map(|(n, v)| (n.clone(), values(v.as_tensor()))).collect();
        (report, weights)
    };
    let (cpu, cpu_w) = run("cpu", DeviceSpec::Cpu);
    let (dev, dev_w) = run("gpu", DeviceSpec::Cuda(0));
    assert_eq!(cpu.steps, dev.steps);
    // AdamW amplifies round-off in near-zero gradients (see the single-step test), so the weights
    // drift apart by up to a few steps' size; what the model computes stays close.
    let worst = cpu_w.iter().map(|(n, w)| relative(w, &dev_w[n])).fold(0f64, f64::max);
    let (a, b) = (&cpu.evaluations[0], &dev.evaluations[0]);
    assert!((a.loss - b.loss).abs() <= 1e-2 * a.loss, "eval loss {} vs {}", a.loss, b.loss);
    for ((name, x), (_, y)) in a.tasks.iter().zip(&b.tasks) {
        assert!((x.auc - y.auc).abs() <= 2e-2, "{name}: AUC {} vs {}", x.auc, y.auc);
    }
    // The run directory of a GPU run loads anywhere: its checkpoint is plain f32 tensors.
    let log = std::fs::read_to_string(dir.join("gpu/metrics.jsonl")).unwrap();
    let memory: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "memory")
        .unwrap();
    eprintln!("GPU run: {} steps, worst weight difference {worst:.2e}; memory line {memory}", dev.steps);
    assert!(memory["measured_peak_bytes"].as_u64().unwrap() > 0);
}

/// What training and evaluation copy between host and device ([`rankstack::nn::host_transfer`]),
/// listed on the GPU's graph run on the CPU (every machine) and on the GPU.
///
/// Reads: a training step reads one pair of computed values, the loss and the squared gradient
/// norm; an evaluation batch one vector, the loss and the probabilities; everything else they read
/// is input that the data pipeline keeps on the host (never copied back from a device); the
/// checkpoint at the end reads the finiteness sums (twice: the model's tensors, the optimizer's
/// moments) and the tensors it writes. The config pools over every position (the pooling that
/// looks for the first maximum) and normalises its dense features with BatchNorm (whose batch
/// counter is a device tensor), the two parts that read activations or buffers back before.
///
/// Writes: only the batch's inputs and the index tensors the host derives from its ids; never a
/// parameter, an optimizer moment, a constant (the task weights, the max-pool's positions and
/// the action table's row ids are on the device since the model was built) or a computed value.
/// Dropout is off here (on a GPU it draws on the device).
#[test]
fn training_and_evaluation_copy_inputs_in_and_read_one_computed_value_set_out_per_batch() {
    let dir = tmpdir("device-reads");
    let (train, eval) = write_data(&dir, 192, 130);
    let text = config(&train).to_toml_string();
    assert!(text.contains("max_pool = \"unmasked\"") && text.contains("batch_norm = true"), "{text}");
    let config =
        RankerConfig::from_toml_str(&text.replace("max_pool = \"unmasked\"", "max_pool = \"all_positions\"")).unwrap();
    let mut runs = vec![("the GPU's graph on the CPU", DeviceSpec::Cpu, true)];
    if gpu("training_and_evaluation_copy_inputs_in_and_read_one_computed_value_set_out_per_batch (GPU part)").is_some()
    {
        runs.push(("the GPU", DeviceSpec::Cuda(0), false));
    }
    for (what, device, candle_graph) in runs {
        let on_gpu = !matches!(device, DeviceSpec::Cpu);
        let options =
            TrainOptions { epochs: 1, batch_size: 64, quiet: true, seed: 7, device, ..TrainOptions::default() };
        let run = || {
            let mut trainer = Trainer::new(&config, options, dir.join(format!("run-{candle_graph}"))).unwrap();
            let (report, training) = record_transfers(|| trainer.fit(&train, None).unwrap());
            let (eval_report, evaluation) = record_transfers(|| {
                evaluate(trainer.ranker(), &eval as &dyn BatchSource, 64, 1, report.steps).unwrap()
            });
            (report.steps, eval_report, training, evaluation)
        };
        let (steps, eval_report, training, evaluation) = if candle_graph { with_isa(Isa::Candle, run) } else { run() };
        let reads = |all: &[Transfer]| -> Vec<Transfer> {
            all.iter().filter(|t| t.direction == Direction::ToHost).cloned().collect()
        };
        let writes = |all: &[Transfer]| -> Vec<Transfer> {
            all.iter().filter(|t| t.direction == Direction::ToDevice).cloned().collect()
        };
        let computed = |all: &[Transfer]| -> Vec<(&'static str, usize)> {
            reads(all).iter().filter(|r| r.origin == Origin::Computed).map(|r| (r.what, r.elements)).collect()
        };
        let from_device: Vec<Transfer> = reads(&training)
            .into_iter()
            .chain(reads(&evaluation))
            .filter(|r| r.origin == Origin::Input && r.crosses)
            .collect();
        assert!(from_device.is_empty(), "{what}: inputs read back from the device: {from_device:?}");

        // Training: one read per step, then the checkpoint's.
        assert_eq!(steps, 3);
        let train_reads = computed(&training);
        assert_eq!(train_reads[..3], [("loss and squared gradient norm", 2); 3], "{what}: {train_reads:?}");
        let at_checkpoint = &train_reads[3..];
        assert!(
            at_checkpoint.iter().all(|(w, _)| ["finiteness sums", "tensor written to a file"].contains(w)),
            "{what}: {at_checkpoint:?}"
        );
        assert!(
            at_checkpoint.iter().any(|(w, _)| *w == "tensor written to a file"),
            "{what}: a checkpoint was written"
        );
        // One finiteness read for the model's tensors, one for the optimizer's moments.
        let finiteness = at_checkpoint.iter().filter(|(w, _)| *w == "finiteness sums").count();
        assert_eq!(finiteness, 2, "{what}: {at_checkpoint:?}");

        // Evaluation: 130 rows in batches of 64 are 3 batches, each one read of the loss and
        // rows × tasks probabilities.
        let tasks = eval_report.tasks.len();
        let expected: Vec<_> = [64, 64, 2].iter().map(|rows| ("loss and probabilities", 1 + rows * tasks)).collect();
        assert_eq!(computed(&evaluation), expected, "{what}");
        assert!(eval_report.loss.is_finite());

        // Writes: inputs only.
        for (part, all, batches) in [("training", &training, steps), ("evaluation", &evaluation, 3u64)] {
            let writes = writes(all);
            let not_input: Vec<&Transfer> = writes.iter().filter(|t| t.origin != Origin::Input).collect();
            assert!(not_input.is_empty(), "{what}, {part}: writes of other than inputs: {not_input:?}");
            let count = |name: &str| writes.iter().filter(|t| t.what == name).count();
            // The dense features, the sequence's item and candidate embeddings; the labels.
            assert_eq!(count("batch input") as u64, 3 * batches, "{what}, {part}");
            assert_eq!(count("labels") as u64, batches, "{what}, {part}");
            assert!(writes.iter().all(|t| t.crosses == on_gpu), "{what}, {part}: crossing flags");
        }
        let names = |all: &[Transfer]| {
            let mut names: Vec<&str> = writes(all).iter().map(|t| t.what).collect();
            names.sort();
            names.dedup();
            names
        };
        eprintln!(
            "{what}: training: {} reads ({} of inputs kept on the host), {} writes ({} values) in {steps} steps and \
             the checkpoint; evaluation: {} reads, {} writes; writes of training: {:?}",
            reads(&training).len(),
            reads(&training).iter().filter(|r| r.origin == Origin::Input).count(),
            writes(&training).len(),
            writes(&training).iter().map(|t| t.elements).sum::<usize>(),
            reads(&evaluation).len(),
            writes(&evaluation).len(),
            names(&training),
        );
    }
}
