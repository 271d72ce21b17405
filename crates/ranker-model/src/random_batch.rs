//! Random inputs of the right shapes for a config: for tests, benchmarks and smoke runs.

use candle_core::{DType, Device, Result, Tensor};
use feature_encoders::{FeatureBatch, SparseInput};
use rankstack_nn::rng::Rng;
use rankstack_nn::Error;

use crate::{RankerBatch, RankerConfig, SequenceItems, UserSequence};

fn normal(rng: &mut Rng, dims: &[usize], scale: f64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|_| (scale * rng.normal()) as f32).collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
}

/// A batch of `batch_size` random examples for `config`, reproducible from `seed`.
///
/// Dense values are `N(0, 3²)`; sparse ids uniform over each vocabulary (one id per example);
/// embeddings and extra blocks `N(0, 1)`; sequences have uniformly random lengths in `1..=S`
/// (about half of the positions are padding), action types uniform over the non-padding types, one
/// action a minute before a fixed request time, newest first.
pub fn random_batch(config: &RankerConfig, batch_size: usize, seed: u64) -> Result<RankerBatch> {
    let mut rng = Rng::new(seed);
    let schema = &config.features;
    let b = batch_size;
    let dense = if schema.dense.is_empty() { None } else { Some(normal(&mut rng, &[b, schema.dense.len()], 3.0)?) };
    let sparse = schema
        .sparse
        .iter()
        .map(|f| {
            let ids: Vec<i64> = (0..b).map(|_| rng.below(f.cardinality as u64) as i64).collect();
            SparseInput::single(&ids)
        })
        .collect();
    let embedding = schema.embedding.iter().map(|f| normal(&mut rng, &[b, f.dim], 1.0)).collect::<Result<Vec<_>>>()?;
    let extra = schema.extra.iter().map(|f| normal(&mut rng, &[b, f.dim], 1.0)).collect::<Result<Vec<_>>>()?;
    let sequence = match &config.sequence {
        None => None,
        Some(seq) => {
            let s = seq.max_len;
            let request_ms: i64 = 1_700_000_000_000;
            let mut types = vec![0u32; b * s];
            let mut stamps = vec![0i64; b * s];
            for row in 0..b {
                let len = 1 + rng.below(s as u64) as usize;
                for j in 0..len {
                    types[row * s + j] = 1 + rng.below(seq.num_action_types as u64 - 1) as u32;
                    stamps[row * s + j] = request_ms - 60_000 * (j as i64 + 1);
                }
            }
            let items = match &config.item_embedding {
                Some(table) => {
                    let mut id = |n: usize| -> Result<Tensor> {
                        let ids: Vec<i64> = (0..n).map(|_| rng.below(table.cardinality as u64) as i64).collect();
                        Tensor::from_vec(ids, n, &Device::Cpu)
                    };
                    SequenceItems::Ids { sequence: id(b * s)?.reshape((b, s))?, candidate: id(b)? }
                }
                None => SequenceItems::Embeddings {
                    sequence: normal(&mut rng, &[b, s, seq.item_dim], 1.0)?,
                    candidate: normal(&mut rng, &[b, seq.item_dim], 1.0)?,
                },
            };
            Some(UserSequence {
                action_types: Tensor::from_vec(types, (b, s), &Device::Cpu)?,
                timestamps: Tensor::from_vec(stamps, (b, s), &Device::Cpu)?,
                request_time: Tensor::from_vec(vec![request_ms; b], b, &Device::Cpu)?,
                items,
            })
        }
    };
    Ok(RankerBatch { features: FeatureBatch { dense, sparse, embedding, extra }, sequence })
}

/// Random 0/1 labels `[batch_size, tasks]` (rate 1/2), reproducible from `seed`.
pub fn random_labels(config: &RankerConfig, batch_size: usize, seed: u64) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    let n = batch_size * config.tasks.len();
    let values: Vec<f32> = (0..n).map(|_| if rng.uniform() < 0.5 { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(values, (batch_size, config.tasks.len()), &Device::Cpu)?.to_dtype(DType::F32)
}

/// `batch` as named tensors in the layout of the PyTorch reference model
/// (`reference/rankstack_ref/ranker.py`): `dense`, `sparse.<name>.ids` / `.offsets` (`EmbeddingBag`
/// layout), `embedding.<name>`, `seq.action_types`, `seq.timestamps`, `seq.request_time` and
/// `seq.item_embeddings` + `seq.candidate` or `seq.item_ids` + `seq.candidate_id`. The benchmarks
/// write it so that PyTorch scores exactly the inputs rankstack scores.
pub fn reference_inputs(config: &RankerConfig, batch: &RankerBatch) -> Result<Vec<(String, Tensor)>> {
    let schema = &config.features;
    let f = &batch.features;
    let mut out = Vec::new();
    if let Some(dense) = &f.dense {
        out.push(("dense".to_string(), dense.clone()));
    }
    for (feature, input) in schema.sparse.iter().zip(&f.sparse) {
        let (mut ids, mut offsets) = (Vec::new(), Vec::new());
        for b in 0..input.batch_size() {
            offsets.push(ids.len() as i64);
            ids.extend_from_slice(input.bag(b));
        }
        let (n, b) = (ids.len(), offsets.len());
        out.push((format!("sparse.{}.ids", feature.name), Tensor::from_vec(ids, n, &Device::Cpu)?));
        out.push((format!("sparse.{}.offsets", feature.name), Tensor::from_vec(offsets, b, &Device::Cpu)?));
    }
    for (feature, x) in schema.embedding.iter().zip(&f.embedding) {
        out.push((format!("embedding.{}", feature.name), x.clone()));
    }
    if let Some(seq) = &batch.sequence {
        out.push(("seq.action_types".into(), seq.action_types.to_dtype(DType::I64)?));
        out.push(("seq.timestamps".into(), seq.timestamps.clone()));
        out.push(("seq.request_time".into(), seq.request_time.clone()));
        match &seq.items {
            SequenceItems::Embeddings { sequence, candidate } => {
                out.push(("seq.item_embeddings".into(), sequence.clone()));
                out.push(("seq.candidate".into(), candidate.clone()));
            }
            SequenceItems::Ids { sequence, candidate } => {
                out.push(("seq.item_ids".into(), sequence.clone()));
                out.push(("seq.candidate_id".into(), candidate.clone()));
            }
        }
    }
    Ok(out)
}

/// The inverse of [`reference_inputs`]: a batch from named tensors in the PyTorch reference's
/// layout (fixture inputs, exported batches), with float inputs converted to `dtype`. A missing
/// key is an error naming it.
pub fn batch_from_reference_inputs(
    config: &RankerConfig,
    inputs: &std::collections::HashMap<String, Tensor>,
    dtype: DType,
) -> Result<RankerBatch> {
    let get = |key: &str| -> Result<&Tensor> {
        inputs.get(key).ok_or_else(|| {
            Error::input("Ranker", "reference inputs", format!("no tensor `{key}` for this config")).into()
        })
    };
    let float = |key: &str| get(key)?.to_dtype(dtype);
    let ints =
        |key: &str| rankstack_nn::host_transfer::read_input::<i64>(&get(key)?.to_dtype(DType::I64)?, "reference ids");
    let sparse = config
        .features
        .sparse
        .iter()
        .map(|f| {
            let ids = ints(&format!("sparse.{}.ids", f.name))?;
            let offsets = ints(&format!("sparse.{}.offsets", f.name))?.into_iter().map(|o| o as usize).collect();
            Ok(SparseInput::new(ids, offsets)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let embedding =
        config.features.embedding.iter().map(|f| float(&format!("embedding.{}", f.name))).collect::<Result<_>>()?;
    let dense = if config.features.dense.is_empty() { None } else { Some(float("dense")?) };
    let sequence = match &config.sequence {
        None => None,
        Some(_) => Some(UserSequence {
            action_types: get("seq.action_types")?.clone(),
            timestamps: get("seq.timestamps")?.clone(),
            request_time: get("seq.request_time")?.clone(),
            items: if config.item_embedding.is_some() {
                SequenceItems::Ids {
                    sequence: get("seq.item_ids")?.clone(),
                    candidate: get("seq.candidate_id")?.clone(),
                }
            } else {
                SequenceItems::Embeddings {
                    sequence: float("seq.item_embeddings")?,
                    candidate: float("seq.candidate")?,
                }
            },
        }),
    };
    Ok(RankerBatch { features: FeatureBatch { dense, sparse, embedding, extra: vec![] }, sequence })
}
