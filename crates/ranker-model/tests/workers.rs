//! Scores do not depend on how many workers compute them: a small batch may run on a smaller pool
//! when other processes load the CPUs (`rankstack_kernels::cpu::on_worker_pool_for_rows`), and a
//! user must get the same bits as on the whole pool.

use candle_core::{DType, Device};
use ranker_model::{presets, random_batch, Ranker};
use rankstack_kernels::cpu::{for_each_supported_isa, on_worker_pool_with_threads, SMALL_BATCH_ROWS};
use rankstack_nn::packed_matmul::WeightPrecision;
use rankstack_nn::{pack_linear_layers, SeededVarMap};

#[test]
fn small_batches_score_the_same_bits_on_one_worker_as_on_the_whole_pool() {
    if rayon::current_num_threads() < 2 {
        eprintln!("SKIPPED small_batches_score_the_same_bits_on_one_worker_as_on_the_whole_pool: one worker only");
        return;
    }
    // The paper's model: its products are wide enough to be split over every worker.
    let config = presets::preset("pinterest-homefeed").unwrap();
    let batches: Vec<_> = [1, SMALL_BATCH_ROWS].iter().map(|&rows| random_batch(&config, rows, 5).unwrap()).collect();
    let name = "small_batches_score_the_same_bits_on_one_worker_as_on_the_whole_pool";
    for_each_supported_isa(name, |isa| {
        for precision in [None, Some(WeightPrecision::F32), Some(WeightPrecision::Bf16)] {
            let store = SeededVarMap::new(3);
            let mut ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
            if let Some(precision) = precision {
                pack_linear_layers(&mut ranker, precision).unwrap();
            }
            for batch in &batches {
                let whole = ranker.predict(batch).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let one = on_worker_pool_with_threads(1, || {
                    assert_eq!(rayon::current_num_threads(), 1);
                    ranker.predict(batch).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&whole), bits(&one), "{isa:?}, {precision:?}, {} probabilities", whole.len());
            }
        }
    });
}
