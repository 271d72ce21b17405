//! Sequences given as item ids, embedded by the model's learned item table.

mod common;

use candle_core::{DType, Device, Tensor};
use ranker_model::{random_batch, random_labels, ItemEmbeddingConfig, Ranker, SequenceItems};
use rankstack_nn::testing::{assert_all_params_get_gradients, assert_all_params_get_gradients_or_rows};
use rankstack_nn::{Reseed, SeededVarMap};

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

#[test]
fn row_sparse_mode_gives_every_table_the_rows_of_its_dense_gradient() {
    let mut config = common::small();
    config.item_embedding = Some(ItemEmbeddingConfig { cardinality: 50 });
    let store = SeededVarMap::new(4);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let batch = random_batch(&config, 6, 1).unwrap();
    let labels = random_labels(&config, 6, 2).unwrap();
    let step = |sparse: bool| {
        ranker.set_row_sparse_gradients(sparse);
        ranker.reseed(9);
        let logits = ranker.forward_t(&batch, true).unwrap();
        let grads = ranker.loss(&logits, &labels, None).unwrap().backward().unwrap();
        let rows = ranker.take_row_gradients(&grads).unwrap();
        (logits.to_vec2::<f32>().unwrap(), grads, rows)
    };
    let (dense_logits, dense, none) = step(false);
    assert!(none.is_empty());
    let (sparse_logits, sparse, rows) = step(true);
    assert_eq!(dense_logits, sparse_logits);
    assert_all_params_get_gradients_or_rows(&store, &sparse, &rows);
    let tables: Vec<(String, candle_core::Var)> = store
        .named_vars()
        .into_iter()
        .filter(|(n, _)| n.ends_with("embedding.weight") || n.starts_with("features.sparse."))
        .collect();
    assert!(tables.len() >= 2, "the small config has sparse features and the item table");
    for (name, table) in &tables {
        assert!(sparse.get(table.as_tensor()).is_none(), "{name} has a dense gradient in row-sparse mode");
        let r =
            rows.iter().find(|r| r.table.id() == table.as_tensor().id()).unwrap_or_else(|| panic!("{name}: no rows"));
        let full = dense.get(table.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let got = r.grad.to_vec2::<f32>().unwrap();
        for (k, &row) in r.rows.iter().enumerate() {
            assert_eq!(got[k], full[row as usize], "{name} row {row}");
        }
        // Every other row's dense gradient is zero.
        for (i, g) in full.iter().enumerate() {
            if !r.rows.contains(&(i as u32)) {
                assert!(g.iter().all(|&x| x == 0.0), "{name} row {i}");
            }
        }
    }
    // Every other parameter has the same dense gradient either way.
    for (name, var) in store.named_vars() {
        if let (Some(a), Some(b)) = (dense.get(var.as_tensor()), sparse.get(var.as_tensor())) {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a, b, "{name}");
        }
    }
}
