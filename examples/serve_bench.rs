//! The inputs of `cargo xtask serve-bench` (see `docs/serving.md`): the `homefeed-bench` model as
//! a checkpoint and infer request bodies for `rankstack serve`.
//!
//! ```text
//! serve_bench prepare DIR   writes DIR/checkpoint (config.json, model.safetensors) and
//!                           DIR/request-B.json for B = 1, 64, 512 candidates, and the same
//!                           as binary tensors (DIR/request-B.bin, the JSON part's length in
//!                           DIR/request-B.bin.json-length)
//! ```
//!
//! A request is one feed request: one user (the sequence, full length, and the request time sent
//! once, with first dimension 1) and `B` candidates with their own features (dense `N(0, 3²)`,
//! one uniform id per sparse feature, `N(0, 1)` embeddings, uniform candidate items).

#![forbid(unsafe_code)]

use std::path::Path;

use candle_core::{DType, Device};
use rankstack::data::DataSchema;
use rankstack::nn::rng::Rng;
use rankstack::nn::SeededVarMap;
use rankstack::ranker_model::{checkpoint, presets, Ranker};
use rankstack::serve::{InputRole, ModelSignature};
use serde_json::{json, Value};

/// Candidates per request.
const REQUEST_SIZES: [usize; 3] = [1, 64, 512];
/// Seed of the model's initialisation (as `bench_compare`).
const MODEL_SEED: u64 = 2024;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match (args.first().map(String::as_str), args.get(1)) {
        (Some("prepare"), Some(dir)) => prepare(Path::new(dir)),
        _ => Err("usage: serve_bench prepare DIR".into()),
    };
    if let Err(e) = result {
        eprintln!("serve_bench: {e}");
        std::process::exit(1);
    }
}

fn prepare(dir: &Path) -> Result<()> {
    let config = presets::preset("homefeed-bench")?;
    let store = SeededVarMap::new(MODEL_SEED);
    let ranker = Ranker::new(&config, store.var_builder(DType::F32, &Device::Cpu))?;
    checkpoint::save(dir.join("checkpoint"), &ranker, &store)?;
    let schema = DataSchema::of_model(&config)?;
    let signature = ModelSignature::new(&schema)?;
    for b in REQUEST_SIZES {
        let body = request(&schema, &signature, b, b as u64);
        std::fs::write(dir.join(format!("request-{b}.json")), body.to_string())?;
        let (binary, json_len) = binary_request(&body);
        std::fs::write(dir.join(format!("request-{b}.bin")), binary)?;
        std::fs::write(dir.join(format!("request-{b}.bin.json-length")), json_len.to_string())?;
    }
    println!("wrote {}", dir.display());
    Ok(())
}

/// The same request with every input's values as binary data after the JSON (the binary tensor
/// extension), and the JSON part's length (the `Inference-Header-Content-Length` header).
fn binary_request(body: &Value) -> (Vec<u8>, usize) {
    let mut head = body.clone();
    let mut data = Vec::new();
    for input in head["inputs"].as_array_mut().expect("inputs") {
        let mut values = Vec::new();
        flatten(&input["data"], &mut values);
        let before = data.len();
        for v in values {
            match input["datatype"].as_str() {
                Some("INT64") => data.extend(v.as_i64().expect("an integer").to_le_bytes()),
                _ => data.extend((v.as_f64().expect("a number") as f32).to_le_bytes()),
            }
        }
        let input = input.as_object_mut().expect("an object");
        input.remove("data");
        input.insert("parameters".into(), json!({"binary_data_size": data.len() - before}));
    }
    let mut bytes = head.to_string().into_bytes();
    let json_len = bytes.len();
    bytes.extend(data);
    (bytes, json_len)
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// One feed request of `b` candidates for one user.
fn request(schema: &DataSchema, signature: &ModelSignature, b: usize, seed: u64) -> Value {
    let mut rng = Rng::new(seed);
    let mut normal = |n: usize, scale: f64| -> Vec<f32> { (0..n).map(|_| (rng.normal() * scale) as f32).collect() };
    let seq = schema.sequence.as_ref();
    let s = seq.map_or(0, |q| q.max_len);
    let request_ms: i64 = 1_700_000_000_000;
    let mut ids = Rng::new(seed + 1);
    let inputs: Vec<Value> = signature
        .inputs
        .iter()
        .map(|spec| {
            let (shape, data): (Vec<usize>, Value) = match spec.role {
                InputRole::Dense(_) => (vec![b], json!(normal(b, 3.0))),
                InputRole::Sparse(i) => {
                    let c = schema.features.sparse[i].cardinality as u64;
                    (vec![b, 1], json!((0..b).map(|_| ids.below(c)).collect::<Vec<_>>()))
                }
                InputRole::Embedding(i) => {
                    let dim = schema.features.embedding[i].dim;
                    (vec![b, dim], json!(normal(b * dim, 1.0)))
                }
                InputRole::SeqActionTypes => {
                    let n = seq.map_or(2, |q| q.num_action_types) as u64;
                    (vec![1, s], json!((0..s).map(|_| 1 + ids.below(n - 1)).collect::<Vec<_>>()))
                }
                InputRole::SeqTimestamps => {
                    (vec![1, s], json!((0..s).map(|j| request_ms - 60_000 * (j as i64 + 1)).collect::<Vec<_>>()))
                }
                InputRole::SeqItemIds | InputRole::CandidateItemId => {
                    let c = match seq.map(|q| &q.items) {
                        Some(rankstack::data::SequenceItemSpec::Ids { cardinality, .. }) => *cardinality as u64,
                        _ => 1,
                    };
                    let n = if spec.role == InputRole::SeqItemIds { s } else { b };
                    let shape = if spec.role == InputRole::SeqItemIds { vec![1, s] } else { vec![b] };
                    (shape, json!((0..n).map(|_| ids.below(c)).collect::<Vec<_>>()))
                }
                InputRole::SeqItemEmbeddings => {
                    let e = spec.shape[2] as usize;
                    (vec![1, s, e], json!(normal(s * e, 1.0)))
                }
                InputRole::CandidateItemEmbedding => {
                    let e = spec.shape[1] as usize;
                    (vec![b, e], json!(normal(b * e, 1.0)))
                }
                InputRole::RequestTime => (vec![1], json!([request_ms])),
            };
            json!({"name": spec.name, "datatype": spec.datatype.as_str(), "shape": shape, "data": data})
        })
        .collect();
    json!({"inputs": inputs})
}
