//! A recorded forward pass ([`rankstack_nn::probe::record_parts`]) names every part of the model
//! in order, charges every layer's marks, and computes the same logits, bit for bit, as an
//! unrecorded one: in evaluation and in training, on the CPU (where the forward pass runs on the
//! kernels' worker pool, so the recording has to follow it there). This test program counts its
//! heap, so every part also says how much memory it left allocated and the tensors it wrote.

use candle_core::{DType, Device, Tensor};
use ranker_model::{presets, random_batch, Ranker, RankerConfig};
use rankstack_nn::device_memory::CountingAllocator;
use rankstack_nn::probe::{record_parts, REST};
use rankstack_nn::{Reseed, SeededVarMap};

#[global_allocator]
static HEAP: CountingAllocator = CountingAllocator;

/// The `pinterest-homefeed` structure (TransAct, parallel MaskNet, cross layers, MLP, heads) at a
/// test's size.
fn small_homefeed() -> RankerConfig {
    let mut config = presets::preset("pinterest-homefeed").unwrap();
    let seq = config.sequence.as_mut().unwrap();
    seq.max_len = 6;
    seq.num_output_positions = 2;
    seq.item_dim = 8;
    seq.action_dim = 8;
    seq.ff_dim = 8;
    config.features.sparse.truncate(2);
    for f in &mut config.features.sparse {
        f.cardinality = 50;
        f.dim = Some(4);
    }
    config.features.embedding.truncate(1);
    config.features.embedding[0].dim = 8;
    config.features.dense.truncate(4);
    config
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn a_recorded_forward_pass_names_every_part_and_computes_the_same_logits() {
    let config = small_homefeed();
    let store = SeededVarMap::new(11);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let batch = random_batch(&config, 5, 3).unwrap();
    let layers = config.sequence.as_ref().unwrap().num_layers;
    let expected = [
        ("transact.prepare", 1),
        ("transact.tokens", 1),
        ("transact.pack", 1),
        ("transformer.attention", layers),
        ("transformer.feed_forward", layers),
        ("transact.unpack", 1),
        ("transact.pool", 1),
        ("features", 1),
        ("parallel_masknet", 1),
        ("crossnet", 1),
        ("mlp", 1),
        ("heads", 1),
        (REST, 1),
    ];
    for train in [false, true] {
        ranker.reseed(5);
        let plain = ranker.forward_t(&batch, train).unwrap();
        ranker.reseed(5);
        let (recorded, parts) = record_parts(&Device::Cpu, || ranker.forward_t(&batch, train)).unwrap();
        assert_eq!(bits(&recorded), bits(&plain), "train = {train}: recording changed the logits");
        let got: Vec<(&str, usize)> = parts.iter().map(|p| (p.name.as_str(), p.count)).collect();
        assert_eq!(got, expected, "train = {train}");
        assert!(parts.iter().all(|p| p.seconds.is_finite() && p.seconds >= 0.0), "{parts:?}");
        assert!(parts.iter().all(|p| p.memory_growth.is_some() && p.peak_bytes.is_some()), "heap counted: {parts:?}");
        assert!(parts.iter().all(|p| p.written.is_some()), "buffers counted: {parts:?}");
        let masknet = parts.iter().find(|p| p.name == "parallel_masknet").unwrap();
        // The MaskNet wrote at least one block's output, [5, 512] f32, in buffers of 4 KiB or more.
        let written = masknet.written.unwrap();
        assert!(written.count >= 1 && written.bytes >= 5 * 512 * 4, "{masknet:?}");
        // In training every intermediate stays alive for the backward pass.
        if train {
            assert!(masknet.memory_growth.unwrap() > 0, "{masknet:?}");
        }
    }
}
