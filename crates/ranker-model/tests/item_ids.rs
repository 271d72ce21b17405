//! Sequences given as item ids, embedded by the model's learned item table.

mod common;

use candle_core::{DType, Device, Tensor};
use ranker_model::{random_batch, random_labels, ItemEmbeddingConfig, Ranker, SequenceItems};
use rankstack_nn::testing::assert_all_params_get_gradients;
use rankstack_nn::SeededVarMap;

#[test]
fn item_ids_are_embedded_out_of_vocabulary_shared_and_trained() {
    let mut config = common::small();
    config.item_embedding = Some(ItemEmbeddingConfig { cardinality: 50 });
    let store = SeededVarMap::new(3);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let table = store.named_vars().into_iter().find(|(n, _)| n == "item_embedding.weight").unwrap().1;
    assert_eq!(table.dims(), &[51, 4]);
    let params: usize = store.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(ranker.cost(1).total().params, params);

    let batch = random_batch(&config, 6, 1).unwrap();
    let labels = random_labels(&config, 6, 2).unwrap();
    let logits = ranker.forward_t(&batch, true).unwrap();
    let grads = ranker.loss(&logits, &labels, None).unwrap().backward().unwrap();
    assert_all_params_get_gradients(&store, &grads);

    // Ids 50 and 10^9 both map to the reserved last row, so they score identically.
    let with_candidate = |id: i64| {
        let mut b = batch.clone();
        if let Some(seq) = b.sequence.as_mut() {
            if let SequenceItems::Ids { candidate, .. } = &mut seq.items {
                *candidate = Tensor::new(vec![id; 6], &Device::Cpu).unwrap();
            }
        }
        b
    };
    let a = ranker.forward(&with_candidate(50)).unwrap().to_vec2::<f32>().unwrap();
    let b = ranker.forward(&with_candidate(1_000_000_000)).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a, b);
    let e = ranker.forward(&with_candidate(-1)).unwrap_err().to_string();
    assert!(e.contains("negative item id -1"), "{e}");
}

#[test]
fn mismatched_item_representation_is_an_error() {
    let config = common::small();
    let store = SeededVarMap::new(0);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let mut with_ids = config.clone();
    with_ids.item_embedding = Some(ItemEmbeddingConfig { cardinality: 5 });
    let batch = random_batch(&with_ids, 2, 0).unwrap();
    let e = ranker.forward(&batch).unwrap_err().to_string();
    assert!(e.contains("no `item_embedding` table"), "{e}");
    let mut no_seq = with_ids.clone();
    no_seq.sequence = None;
    let e = Ranker::new(&no_seq, SeededVarMap::new(0).var_builder(DType::F32, &Device::Cpu)).unwrap_err().to_string();
    assert!(e.contains("`item_embedding`"), "{e}");
}
