//! An inference request's body → checked rows ([`Example`]s) for the batcher.
//!
//! Everything a batch could fail on is checked here, per request, so that one bad request never
//! fails the requests it would have been batched with: names, datatypes, shapes, element counts,
//! integer and float values (±∞ is refused; a missing dense value is JSON `null` or, in binary
//! data, NaN; NaN anywhere else is refused),
//! id ranges (negative ids, out-of-vocabulary ids of features that reject them), sequence padding,
//! and finally [`Example::check`] on every row. Every error names the input and the problem.
//!
//! Bodies are JSON, or JSON followed by binary tensors (the protocol's binary tensor extension:
//! the `Inference-Header-Content-Length` header gives the JSON's length, and an input with
//! `parameters.binary_data_size` takes its little-endian values from the bytes after it, in
//! order).

use std::time::Duration;

use feature_encoders::OovPolicy;
use serde_json::{Map, Value};

use super::signature::{Datatype, InputRole, InputSpec, ModelSignature};
use crate::data::{DataSchema, Example, ExampleItems, ExampleSequence, SequenceItemSpec};

/// A request the server cannot serve as sent: HTTP 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl BadRequest {
    fn input(name: &str, problem: impl std::fmt::Display) -> Self {
        Self(format!("input `{name}`: {problem}"))
    }
}

type Result<T> = std::result::Result<T, BadRequest>;

/// One requested output: its index in [`ModelSignature::outputs`] and whether it goes back as
/// binary data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputChoice {
    /// Index of the output (= the task).
    pub index: usize,
    /// Binary tensor extension instead of JSON `data`.
    pub binary: bool,
}

/// A checked inference request.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// One row per candidate.
    pub rows: Vec<Example>,
    /// The outputs to return, in order (all of them unless the request names some).
    pub outputs: Vec<OutputChoice>,
    /// How long the request may wait in the queue (`parameters.timeout`, in microseconds, as
    /// Triton reads it; 0 or absent: no limit).
    pub timeout: Option<Duration>,
}

/// Parses and checks a request body. `json_len` is the `Inference-Header-Content-Length` header
/// (binary tensor extension), `max_candidates` the server's largest batch.
pub fn parse(
    body: &[u8],
    json_len: Option<usize>,
    signature: &ModelSignature,
    schema: &DataSchema,
    max_candidates: usize,
) -> Result<InferRequest> {
    let (json_part, mut binary) = match json_len {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(BadRequest(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )))
        }
    };
    let root: Value = serde_json::from_slice(json_part).map_err(|e| json_error(json_part, &e))?;
    let root = root.as_object().ok_or_else(|| BadRequest("the request must be a JSON object".into()))?;
    for key in root.keys() {
        if !matches!(key.as_str(), "id" | "inputs" | "outputs" | "parameters") {
            return Err(BadRequest(format!("unknown field `{key}` (expected id, inputs, outputs, parameters)")));
        }
    }
    let id = match root.get("id") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(BadRequest("`id` must be a string".into())),
    };
    let parameters = object_field(root, "parameters", "the request's `parameters`")?;
    // As in Triton, 0 means no timeout.
    let timeout = match parameters.and_then(|p| p.get("timeout")) {
        None => None,
        Some(v) => match v.as_u64() {
            Some(0) => None,
            Some(us) => Some(Duration::from_micros(us)),
            None => return Err(BadRequest("parameters.timeout must be a whole number of microseconds".into())),
        },
    };
    let all_binary = match parameters.and_then(|p| p.get("binary_data_output")) {
        None => false,
        Some(v) => {
            v.as_bool().ok_or_else(|| BadRequest("parameters.binary_data_output must be true or false".into()))?
        }
    };

    let inputs = root
        .get("inputs")
        .ok_or_else(|| BadRequest("the request has no `inputs`".into()))?
        .as_array()
        .ok_or_else(|| BadRequest("`inputs` must be an array".into()))?;
    let mut tensors: Vec<Option<Tensor>> = vec![None; signature.inputs.len()];
    for (k, input) in inputs.iter().enumerate() {
        let (input, name) = named_tensor(input, "inputs", k)?;
        let (index, spec) = signature.input(name).ok_or_else(|| {
            let known: Vec<&str> = signature.inputs.iter().map(|i| i.name.as_str()).collect();
            BadRequest::input(name, format!("the model has no such input (its inputs: {})", known.join(", ")))
        })?;
        if tensors[index].is_some() {
            return Err(BadRequest::input(name, "given twice"));
        }
        tensors[index] = Some(Tensor::parse(input, spec, &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(BadRequest(format!("{} bytes of binary data follow the inputs' binary_data_size", binary.len())));
    }
    let tensors: Vec<Tensor> = tensors
        .into_iter()
        .zip(&signature.inputs)
        .map(|(t, spec)| t.ok_or_else(|| BadRequest::input(&spec.name, "missing (every input is required)")))
        .collect::<Result<_>>()?;
    let outputs = requested_outputs(root, signature, all_binary)?;
    let rows = Rows::new(&signature.inputs, &tensors, max_candidates)?.build(schema)?;
    Ok(InferRequest { id, rows, outputs, timeout })
}

/// A JSON syntax error; NaN and ±Infinity (which Python's `json` writes) get their own message.
fn json_error(text: &[u8], e: &serde_json::Error) -> BadRequest {
    let offset = line_column_offset(text, e.line(), e.column());
    let rest = offset.map_or(&[][..], |o| &text[o.min(text.len())..]);
    let rest = rest.strip_prefix(b"-").unwrap_or(rest);
    if e.is_syntax() && (rest.starts_with(b"NaN") || rest.starts_with(b"Infinity")) {
        return BadRequest(format!(
            "NaN and Infinity are not JSON numbers (line {}, column {}): send null for a missing dense value",
            e.line(),
            e.column()
        ));
    }
    BadRequest(format!("malformed JSON: {e}"))
}

/// The byte offset of serde_json's (1-based line, column of the offending character) position.
fn line_column_offset(text: &[u8], line: usize, column: usize) -> Option<usize> {
    let mut start = 0;
    for _ in 1..line {
        start += text[start..].iter().position(|&b| b == b'\n')? + 1;
    }
    Some(start + column.saturating_sub(1))
}

fn object_field<'a>(parent: &'a Map<String, Value>, key: &str, what: &str) -> Result<Option<&'a Map<String, Value>>> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(BadRequest(format!("{what} must be an object"))),
    }
}

/// Entry `k` of the `list` array (`inputs` or `outputs`): an object with a string `name`.
fn named_tensor<'a>(entry: &'a Value, list: &str, k: usize) -> Result<(&'a Map<String, Value>, &'a str)> {
    let object = entry.as_object().ok_or_else(|| BadRequest(format!("{list}[{k}] must be an object")))?;
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest(format!("{list}[{k}] has no string `name`")))?;
    Ok((object, name))
}

fn requested_outputs(
    root: &Map<String, Value>,
    signature: &ModelSignature,
    all_binary: bool,
) -> Result<Vec<OutputChoice>> {
    let Some(requested) = root.get("outputs") else {
        return Ok((0..signature.outputs.len()).map(|index| OutputChoice { index, binary: all_binary }).collect());
    };
    let requested = requested.as_array().ok_or_else(|| BadRequest("`outputs` must be an array".into()))?;
    let mut chosen: Vec<OutputChoice> = Vec::new();
    for (k, out) in requested.iter().enumerate() {
        let (out, name) = named_tensor(out, "outputs", k)?;
        let index = signature.outputs.iter().position(|o| o == name).ok_or_else(|| {
            BadRequest(format!(
                "output `{name}`: the model has no such output (its outputs: {})",
                signature.outputs.join(", ")
            ))
        })?;
        if chosen.iter().any(|c| c.index == index) {
            return Err(BadRequest(format!("output `{name}`: requested twice")));
        }
        let params = object_field(out, "parameters", &format!("output `{name}`'s parameters"))?;
        let binary = match params.and_then(|p| p.get("binary_data")) {
            None => all_binary,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| BadRequest(format!("output `{name}`: parameters.binary_data must be true or false")))?,
        };
        if params.is_some_and(|p| p.contains_key("classification")) {
            return Err(BadRequest(format!("output `{name}`: the classification extension is not supported")));
        }
        chosen.push(OutputChoice { index, binary });
    }
    Ok(chosen)
}

/// The values of one input tensor.
#[derive(Debug, Clone)]
enum Values {
    /// FP32 values; NaN only in dense features (missing: JSON `null`, or NaN in binary data).
    F32(Vec<f32>),
    /// INT64 values.
    I64(Vec<i64>),
}

/// One parsed input tensor.
#[derive(Debug, Clone)]
struct Tensor {
    shape: Vec<usize>,
    values: Values,
}

impl Tensor {
    /// Reads an input object: datatype and shape checked against `spec`, the element count against
    /// the shape, values from `data` or from the front of `binary`.
    fn parse(input: &Map<String, Value>, spec: &InputSpec, binary: &mut &[u8]) -> Result<Self> {
        let name = spec.name.as_str();
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| BadRequest::input(name, "no string `datatype`"))?;
        if datatype != spec.datatype.as_str() {
            return Err(BadRequest::input(name, format!("datatype {datatype}, expected {}", spec.datatype.as_str())));
        }
        let shape = input
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| BadRequest::input(name, "no `shape` array"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| BadRequest::input(name, "shape must be non-negative integers"))?;
        check_shape(spec, &shape)?;
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let count = count.ok_or_else(|| BadRequest::input(name, format!("shape {shape:?} is too large")))?;
        let params = object_field(input, "parameters", &format!("input `{name}`'s parameters"))?;
        let binary_size = match params.and_then(|p| p.get("binary_data_size")) {
            None => None,
            Some(v) => {
                Some(v.as_u64().ok_or_else(|| BadRequest::input(name, "binary_data_size must be a byte count"))?
                    as usize)
            }
        };
        let values = match (binary_size, input.get("data")) {
            (Some(_), Some(_)) => return Err(BadRequest::input(name, "has both `data` and binary_data_size")),
            (None, None) => return Err(BadRequest::input(name, "no `data` (and no binary_data_size)")),
            (Some(size), None) => {
                if size != count * spec.datatype.size() {
                    return Err(BadRequest::input(
                        name,
                        format!(
                            "binary_data_size {size} for shape {shape:?} of {} (expected {})",
                            datatype,
                            count * spec.datatype.size()
                        ),
                    ));
                }
                if binary.len() < size {
                    return Err(BadRequest::input(
                        name,
                        format!("binary_data_size {size} but only {} bytes remain", binary.len()),
                    ));
                }
                let (bytes, rest) = binary.split_at(size);
                *binary = rest;
                decode_binary(spec, bytes)?
            }
            (None, Some(data)) => decode_json(spec, data, count)?,
        };
        Ok(Self { shape, values })
    }
}

/// Checks the rank and the fixed dimensions; dense and sparse inputs also take a simpler rank.
fn check_shape(spec: &InputSpec, shape: &[usize]) -> Result<()> {
    let rank_ok = match spec.role {
        InputRole::Dense(_) => shape.len() == 1 || (shape.len() == 2 && shape[1] == 1),
        InputRole::Sparse(_) => shape.len() == 1 || shape.len() == 2,
        _ => shape.len() == spec.shape.len(),
    };
    let dims_ok = rank_ok && spec.shape.iter().zip(shape).all(|(&want, &got)| want < 0 || want as usize == got);
    if !dims_ok {
        let want: Vec<String> = spec.shape.iter().map(|d| if *d < 0 { "-1".into() } else { d.to_string() }).collect();
        return Err(BadRequest::input(&spec.name, format!("shape {shape:?}, expected [{}]", want.join(", "))));
    }
    Ok(())
}

/// Flattens nested JSON arrays (row-major), as the protocol allows either form.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

fn decode_json(spec: &InputSpec, data: &Value, count: usize) -> Result<Values> {
    let name = spec.name.as_str();
    let mut flat = Vec::with_capacity(count);
    flatten(data, &mut flat);
    if flat.len() != count {
        return Err(BadRequest::input(name, format!("{} values for its shape's {count}", flat.len())));
    }
    let missing_allowed = matches!(spec.role, InputRole::Dense(_));
    match spec.datatype {
        Datatype::Int64 => flat
            .iter()
            .enumerate()
            .map(|(k, v)| {
                v.as_i64().ok_or_else(|| BadRequest::input(name, format!("value {k} ({v}) is not a 64-bit integer")))
            })
            .collect::<Result<Vec<i64>>>()
            .map(Values::I64),
        Datatype::Fp32 => flat
            .iter()
            .enumerate()
            .map(|(k, v)| match v {
                Value::Null if missing_allowed => Ok(f32::NAN),
                Value::Number(n) => {
                    let x = n.as_f64().unwrap_or(f64::NAN) as f32;
                    if x.is_finite() {
                        Ok(x)
                    } else {
                        Err(BadRequest::input(name, format!("value {k} ({n}) is outside the FP32 range")))
                    }
                }
                Value::Null => {
                    Err(BadRequest::input(name, format!("value {k} is null (only dense features may be missing)")))
                }
                other => Err(BadRequest::input(name, format!("value {k} ({other}) is not a number"))),
            })
            .collect::<Result<Vec<f32>>>()
            .map(Values::F32),
    }
}

fn decode_binary(spec: &InputSpec, bytes: &[u8]) -> Result<Values> {
    match spec.datatype {
        Datatype::Int64 => {
            Ok(Values::I64(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))
        }
        Datatype::Fp32 => {
            let values: Vec<f32> =
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
            // NaN marks a missing dense value (as JSON null, and as a null in the training data).
            let missing_allowed = matches!(spec.role, InputRole::Dense(_));
            if let Some(k) = values.iter().position(|x| !(x.is_finite() || (missing_allowed && x.is_nan()))) {
                let rule = if missing_allowed {
                    "dense values must be finite or NaN (missing)"
                } else {
                    "only dense features may hold NaN (missing)"
                };
                return Err(BadRequest::input(&spec.name, format!("value {k} is {} ({rule})", values[k])));
            }
            Ok(Values::F32(values))
        }
    }
}

/// The parsed inputs of one request, ready to become rows.
struct Rows<'a> {
    specs: &'a [InputSpec],
    tensors: &'a [Tensor],
    candidates: usize,
}

impl<'a> Rows<'a> {
    /// Finds the number of candidates `B`: every candidate-level input has it as its first
    /// dimension; user-level inputs have `B` or 1.
    fn new(specs: &'a [InputSpec], tensors: &'a [Tensor], max_candidates: usize) -> Result<Self> {
        let candidate_dims: Vec<(usize, &str)> = specs
            .iter()
            .zip(tensors)
            .filter(|(s, _)| !s.role.is_per_user())
            .map(|(s, t)| (t.shape[0], s.name.as_str()))
            .collect();
        let candidates = candidate_dims
            .first()
            .map(|d| d.0)
            .unwrap_or_else(|| tensors.iter().map(|t| t.shape[0]).max().unwrap_or(0));
        if let Some((d, name)) = candidate_dims.iter().find(|(d, _)| *d != candidates) {
            return Err(BadRequest::input(
                name,
                format!("{d} candidates, but `{}` has {candidates}", candidate_dims[0].1),
            ));
        }
        for (spec, t) in specs.iter().zip(tensors) {
            if spec.role.is_per_user() && t.shape[0] != candidates && t.shape[0] != 1 {
                return Err(BadRequest::input(
                    &spec.name,
                    format!(
                        "first dimension {} must be the number of candidates ({candidates}) or 1 (one user for all)",
                        t.shape[0]
                    ),
                ));
            }
        }
        if candidates == 0 {
            return Err(BadRequest("the request has no candidates (first dimension 0)".into()));
        }
        if candidates > max_candidates {
            return Err(BadRequest(format!(
                "{candidates} candidates in one request: the server's --max-batch is {max_candidates}"
            )));
        }
        let rows = Self { specs, tensors, candidates };
        rows.check_sequence_lengths()?;
        Ok(rows)
    }

    fn tensor(&self, role: InputRole) -> Option<(&'a InputSpec, &'a Tensor)> {
        self.specs.iter().zip(self.tensors).find(|(s, _)| s.role == role)
    }

    /// The sequence inputs share their length `L`.
    fn check_sequence_lengths(&self) -> Result<()> {
        let Some((_, types)) = self.tensor(InputRole::SeqActionTypes) else { return Ok(()) };
        for role in [InputRole::SeqTimestamps, InputRole::SeqItemIds, InputRole::SeqItemEmbeddings] {
            if let Some((spec, t)) = self.tensor(role) {
                if t.shape[1] != types.shape[1] {
                    return Err(BadRequest::input(
                        &spec.name,
                        format!("shape {:?} does not match seq_action_types' {:?}", t.shape, types.shape),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Row `r` of a tensor: its values for candidate `r` (row 0 for a user-level input sent once).
    fn row(t: &Tensor, r: usize) -> std::ops::Range<usize> {
        let width: usize = t.shape[1..].iter().product();
        let r = if t.shape[0] == 1 { 0 } else { r };
        r * width..(r + 1) * width
    }

    fn build(&self, schema: &DataSchema) -> Result<Vec<Example>> {
        (0..self.candidates).map(|r| self.example(schema, r)).collect()
    }

    fn example(&self, schema: &DataSchema, r: usize) -> Result<Example> {
        let f = &schema.features;
        let mut dense = vec![0f32; f.dense.len()];
        let mut sparse = vec![Vec::new(); f.sparse.len()];
        let mut embedding = vec![Vec::new(); f.embedding.len()];
        let mut seq = SequenceParts::default();
        for (spec, t) in self.specs.iter().zip(self.tensors) {
            let range = Self::row(t, r);
            match (&t.values, spec.role) {
                (Values::F32(v), InputRole::Dense(i)) => dense[i] = v[range.start],
                (Values::I64(v), InputRole::Sparse(i)) => sparse[i] = sparse_bag(spec, &f.sparse[i], &v[range], r)?,
                (Values::F32(v), InputRole::Embedding(i)) => embedding[i] = v[range].to_vec(),
                (Values::I64(v), InputRole::SeqActionTypes) => {
                    seq.action_types = Some(action_types(spec, &v[range], r)?)
                }
                (Values::I64(v), InputRole::SeqTimestamps) => seq.timestamps = v[range].to_vec(),
                (Values::I64(v), InputRole::SeqItemIds) => seq.item_ids = v[range].to_vec(),
                (Values::F32(v), InputRole::SeqItemEmbeddings) => seq.item_vectors = v[range].to_vec(),
                (Values::I64(v), InputRole::CandidateItemId) => seq.candidate_id = v[range.start],
                (Values::F32(v), InputRole::CandidateItemEmbedding) => seq.candidate_vector = v[range].to_vec(),
                (Values::I64(v), InputRole::RequestTime) => seq.request_time = v[range.start],
                _ => unreachable!("Tensor::parse decodes each input as its spec's datatype"),
            }
        }
        let sequence = schema.sequence.as_ref().map(|spec| seq.into_sequence(&spec.items));
        let example = Example {
            dense,
            sparse,
            embedding,
            sequence,
            labels: vec![f32::NAN; schema.tasks.len()],
            example_weight: None,
        };
        example.check(schema, r as u64).map_err(|e| match e {
            // `what` reads "column `name`, row r": the request's words are input and candidate.
            rankstack_nn::Error::Input { what, reason, .. } => BadRequest(format!(
                "{}: {reason}",
                what.replacen("column", "input", 1).replacen(", row", ", candidate", 1)
            )),
            other => BadRequest(other.to_string()),
        })?;
        Ok(example)
    }
}

/// A sparse feature's bag for one row: `-1` entries are padding; other negative ids, and ids at or
/// above the cardinality of a feature that rejects unknown ids, are errors.
fn sparse_bag(
    spec: &InputSpec,
    feature: &feature_encoders::SparseFeature,
    values: &[i64],
    r: usize,
) -> Result<Vec<i64>> {
    let mut bag = Vec::with_capacity(values.len());
    for &id in values {
        if id == -1 {
            continue;
        }
        if id < 0 {
            return Err(BadRequest::input(
                &spec.name,
                format!("candidate {r}: negative id {id} (-1 is the only padding)"),
            ));
        }
        if feature.oov == OovPolicy::Reject && id as u64 >= feature.cardinality as u64 {
            return Err(BadRequest::input(
                &spec.name,
                format!(
                    "candidate {r}: id {id} is outside 0..{} and the feature rejects unknown ids",
                    feature.cardinality
                ),
            ));
        }
        bag.push(id);
    }
    Ok(bag)
}

/// The action types of one row up to its padding: `0`s only at the end.
fn action_types(spec: &InputSpec, values: &[i64], r: usize) -> Result<Vec<i64>> {
    let len = values.iter().position(|&t| t == 0).unwrap_or(values.len());
    if let Some(j) = values[len..].iter().position(|&t| t != 0) {
        return Err(BadRequest::input(
            &spec.name,
            format!(
                "candidate {r}: action type {} at position {} after padding (0s must come last)",
                values[len + j],
                len + j
            ),
        ));
    }
    Ok(values[..len].to_vec())
}

/// The sequence inputs of one row, gathered before they become an [`ExampleSequence`].
#[derive(Default)]
struct SequenceParts {
    action_types: Option<Vec<i64>>,
    timestamps: Vec<i64>,
    item_ids: Vec<i64>,
    item_vectors: Vec<f32>,
    candidate_id: i64,
    candidate_vector: Vec<f32>,
    request_time: i64,
}

impl SequenceParts {
    /// The row's sequence, cut to its unpadded length `n` (the action types before the first 0).
    fn into_sequence(self, items: &SequenceItemSpec) -> ExampleSequence {
        let action_types = self.action_types.unwrap_or_default();
        let n = action_types.len();
        let timestamps = self.timestamps[..n.min(self.timestamps.len())].to_vec();
        let items = match items {
            SequenceItemSpec::Ids { .. } => ExampleItems::Ids {
                sequence: self.item_ids[..n.min(self.item_ids.len())].to_vec(),
                candidate: self.candidate_id,
            },
            SequenceItemSpec::Embeddings { dim } => ExampleItems::Embeddings {
                sequence: self.item_vectors.chunks(*dim).take(n).map(<[f32]>::to_vec).collect(),
                candidate: self.candidate_vector,
            },
        };
        ExampleSequence { action_types, timestamps, items, request_time: self.request_time }
    }
}
