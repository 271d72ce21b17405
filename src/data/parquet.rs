//! Reading training data from Parquet: the column convention and the streaming, checked reader.
//!
//! # Column convention
//!
//! One row per (request, candidate). Column names come from the [`DataSchema`]:
//!
//! | column | Arrow type | null |
//! |---|---|---|
//! | dense feature `<name>` | Float32 or Float64 (Int32/Int64 accepted) | → NaN (missing) |
//! | sparse feature `<name>` | Int64 or Int32 (one id), or `List<Int64 or Int32>` (a bag, may be empty) | → empty bag |
//! | embedding feature `<name>` | `FixedSizeList<Float32, dim>` (Float64 or a List of length dim accepted) | error |
//! | `seq_action_types` | `List<Int64>` (Int32 accepted), newest action first, values in `1..num_action_types` | → empty |
//! | `seq_timestamps` | `List<Int64>` (ms), same length as `seq_action_types` | → empty |
//! | `seq_item_ids` | `List<Int64>`, ids `≥ 0`, same length (item-id sequences) | → empty |
//! | `seq_item_embeddings` | `List<FixedSizeList<Float32, E>>`, same length (item-vector sequences) | → empty |
//! | `candidate_item_id` / `candidate_item_embedding` | Int64 / `FixedSizeList<Float32, E>` | error |
//! | `request_time` | Int64 (ms) | error |
//! | `label_<task>` | Float32 or Float64 in `[0, 1]` (Boolean, Int32/Int64 accepted) | → NaN (missing label) |
//! | `example_weight` (optional) | Float32 (Float64, Int accepted), finite and `≥ 0` | error |
//!
//! The sequence columns, the candidate and `request_time` are required iff the schema has a
//! sequence. Other columns are ignored (only the needed ones are read). Sequences longer than
//! `max_len` keep their newest (first) `max_len` actions, shorter ones are padded (see
//! [`super::collate`]). Negative ids are errors; ids at or above a cardinality are handled by the
//! model's OOV policy.
//!
//! # Errors
//!
//! [`ParquetDataset::open`] checks every required column's presence and type before reading any
//! row; the error names the column. While streaming, a bad value (mismatched sequence lengths, a
//! null where none is allowed, a label outside `[0, 1]`, …) stops the stream with an error naming
//! the column and the first bad row's global (0-based, file-order) index. No row is ever skipped.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, BooleanArray, FixedSizeListArray, ListArray, PrimitiveArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use rankstack_nn::rng::Rng;
use rankstack_nn::{Error, Result};

use super::{
    collate, DataSchema, Example, ExampleItems, ExampleSequence, LabeledBatch, SequenceItemSpec, Shuffle,
    ShuffleBuffer, SCHEMA_METADATA_KEY,
};

const LAYER: &str = "data";

/// Column names of the convention (see the module doc).
pub mod columns {
    /// Action types of the user sequence.
    pub const SEQ_ACTION_TYPES: &str = "seq_action_types";
    /// Action timestamps (ms).
    pub const SEQ_TIMESTAMPS: &str = "seq_timestamps";
    /// Item ids of the sequence.
    pub const SEQ_ITEM_IDS: &str = "seq_item_ids";
    /// Item vectors of the sequence.
    pub const SEQ_ITEM_EMBEDDINGS: &str = "seq_item_embeddings";
    /// The candidate's item id.
    pub const CANDIDATE_ITEM_ID: &str = "candidate_item_id";
    /// The candidate's item vector.
    pub const CANDIDATE_ITEM_EMBEDDING: &str = "candidate_item_embedding";
    /// Request time (ms).
    pub const REQUEST_TIME: &str = "request_time";
    /// Optional per-row loss weight.
    pub const EXAMPLE_WEIGHT: &str = "example_weight";

    /// The label column of `task`: `label_<task>`.
    pub fn label(task: &str) -> String {
        format!("label_{task}")
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::input("parquet", path.display().to_string(), e.to_string())
}

fn col_err(column: &str, reason: impl Into<String>) -> Error {
    Error::input(LAYER, format!("column `{column}`"), reason)
}

fn row_err(column: &str, row: u64, reason: impl Into<String>) -> Error {
    Error::input(LAYER, format!("column `{column}`, row {row}"), reason)
}

// ---------------------------------------------------------------------------------------------
// Type checks.

fn is_int(dt: &DataType) -> bool {
    matches!(dt, DataType::Int32 | DataType::Int64)
}

fn is_float(dt: &DataType) -> bool {
    matches!(dt, DataType::Float32 | DataType::Float64)
}

fn is_number(dt: &DataType) -> bool {
    is_int(dt) || is_float(dt)
}

fn is_int_list(dt: &DataType) -> bool {
    matches!(dt, DataType::List(f) if is_int(f.data_type()))
}

/// `FixedSizeList<float, dim>` or `List<float>`.
fn is_float_vec(dt: &DataType, dim: usize) -> bool {
    match dt {
        DataType::FixedSizeList(f, n) => is_float(f.data_type()) && *n as usize == dim,
        DataType::List(f) => is_float(f.data_type()),
        _ => false,
    }
}

/// What a column must be.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Dense,
    Sparse,
    Vector(usize),
    IntList,
    VectorList(usize),
    Int,
    Label,
    Weight,
}

impl Kind {
    fn accepts(self, dt: &DataType) -> bool {
        match self {
            Kind::Dense | Kind::Weight => is_number(dt),
            Kind::Label => is_number(dt) || *dt == DataType::Boolean,
            Kind::Sparse => is_int(dt) || is_int_list(dt),
            Kind::Vector(dim) => is_float_vec(dt, dim),
            Kind::IntList => is_int_list(dt),
            Kind::VectorList(dim) => matches!(dt, DataType::List(f) if is_float_vec(f.data_type(), dim)),
            Kind::Int => is_int(dt),
        }
    }

    fn expected(self) -> String {
        match self {
            Kind::Dense => "Float32 or Float64".into(),
            Kind::Weight => "Float32 or Float64".into(),
            Kind::Label => "Float32, Float64, Boolean or an integer".into(),
            Kind::Sparse => "Int64/Int32 or List<Int64/Int32>".into(),
            Kind::Vector(dim) => format!("FixedSizeList<Float32, {dim}>"),
            Kind::IntList => "List<Int64>".into(),
            Kind::VectorList(dim) => format!("List<FixedSizeList<Float32, {dim}>>"),
            Kind::Int => "Int64".into(),
        }
    }
}

/// The columns a schema needs, with their kinds, in a fixed order.
fn required_columns(schema: &DataSchema) -> Vec<(String, Kind)> {
    let f = &schema.features;
    let mut out: Vec<(String, Kind)> = Vec::new();
    out.extend(f.dense.iter().map(|d| (d.name.clone(), Kind::Dense)));
    out.extend(f.sparse.iter().map(|s| (s.name.clone(), Kind::Sparse)));
    out.extend(f.embedding.iter().map(|e| (e.name.clone(), Kind::Vector(e.dim))));
    if let Some(seq) = &schema.sequence {
        out.push((columns::SEQ_ACTION_TYPES.into(), Kind::IntList));
        out.push((columns::SEQ_TIMESTAMPS.into(), Kind::IntList));
        match seq.items {
            SequenceItemSpec::Ids { .. } => {
                out.push((columns::SEQ_ITEM_IDS.into(), Kind::IntList));
                out.push((columns::CANDIDATE_ITEM_ID.into(), Kind::Int));
            }
            SequenceItemSpec::Embeddings { dim } => {
                out.push((columns::SEQ_ITEM_EMBEDDINGS.into(), Kind::VectorList(dim)));
                out.push((columns::CANDIDATE_ITEM_EMBEDDING.into(), Kind::Vector(dim)));
            }
        }
        out.push((columns::REQUEST_TIME.into(), Kind::Int));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Column views over one record batch.

/// A numeric column read as f64 (`None` = null).
enum Num<'a> {
    F32(&'a PrimitiveArray<Float32Type>),
    F64(&'a PrimitiveArray<Float64Type>),
    I32(&'a PrimitiveArray<Int32Type>),
    I64(&'a PrimitiveArray<Int64Type>),
    Bool(&'a BooleanArray),
}

impl<'a> Num<'a> {
    fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
        Ok(match a.data_type() {
            DataType::Float32 => Num::F32(a.as_primitive()),
            DataType::Float64 => Num::F64(a.as_primitive()),
            DataType::Int32 => Num::I32(a.as_primitive()),
            DataType::Int64 => Num::I64(a.as_primitive()),
            DataType::Boolean => Num::Bool(a.as_boolean()),
            other => return Err(col_err(name, format!("unexpected type {other}"))),
        })
    }

    fn get(&self, i: usize) -> Option<f64> {
        macro_rules! get {
            ($a:expr) => {
                if $a.is_null(i) {
                    None
                } else {
                    Some($a.value(i) as f64)
                }
            };
        }
        match self {
            Num::F32(a) => get!(a),
            Num::F64(a) => get!(a),
            Num::I32(a) => get!(a),
            Num::I64(a) => get!(a),
            Num::Bool(a) => {
                if a.is_null(i) {
                    None
                } else {
                    Some(if a.value(i) { 1.0 } else { 0.0 })
                }
            }
        }
    }
}

/// An integer column (`None` = null).
enum Int<'a> {
    I32(&'a PrimitiveArray<Int32Type>),
    I64(&'a PrimitiveArray<Int64Type>),
}

impl<'a> Int<'a> {
    fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
        Ok(match a.data_type() {
            DataType::Int32 => Int::I32(a.as_primitive()),
            DataType::Int64 => Int::I64(a.as_primitive()),
            other => return Err(col_err(name, format!("unexpected type {other}"))),
        })
    }

    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Int::I32(a) => (!a.is_null(i)).then(|| i64::from(a.value(i))),
            Int::I64(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// A `List<int>` column.
struct IntList<'a> {
    list: &'a ListArray,
    values: Int<'a>,
}

impl<'a> IntList<'a> {
    fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
        let list = a.as_list_opt::<i32>().ok_or_else(|| col_err(name, "expected a List"))?;
        Ok(Self { list, values: Int::new(list.values().as_ref(), name)? })
    }

    /// The ids of row `i` (a null list is empty); a null element is an error.
    fn get(&self, i: usize, name: &str, row: u64) -> Result<Vec<i64>> {
        if self.list.is_null(i) {
            return Ok(Vec::new());
        }
        let offsets = self.list.value_offsets();
        (offsets[i] as usize..offsets[i + 1] as usize)
            .map(|k| self.values.get(k).ok_or_else(|| row_err(name, row, "null element in the list")))
            .collect()
    }
}

/// Float vectors: `FixedSizeList<float, n>` or `List<float>`, over a float values array.
struct FloatVecs<'a> {
    nulls: &'a dyn Array,
    /// Value range of vector `i`.
    range: Box<dyn Fn(usize) -> (usize, usize) + 'a>,
    values: Num<'a>,
}

impl<'a> FloatVecs<'a> {
    fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
        match a.data_type() {
            DataType::FixedSizeList(_, n) => {
                let fixed: &FixedSizeListArray = a.as_fixed_size_list();
                let n = *n as usize;
                Ok(Self {
                    nulls: a,
                    range: Box::new(move |i| {
                        let start = fixed.value_offset(i) as usize;
                        (start, start + n)
                    }),
                    values: Num::new(fixed.values().as_ref(), name)?,
                })
            }
            DataType::List(_) => {
                let list: &ListArray = a.as_list();
                let offsets = list.value_offsets();
                Ok(Self {
                    nulls: a,
                    range: Box::new(move |i| (offsets[i] as usize, offsets[i + 1] as usize)),
                    values: Num::new(list.values().as_ref(), name)?,
                })
            }
            other => Err(col_err(name, format!("unexpected type {other}"))),
        }
    }

    /// Vector `i`, which must be non-null, of length `dim`, with finite values.
    fn get(&self, i: usize, dim: usize, name: &str, row: u64) -> Result<Vec<f32>> {
        if self.nulls.is_null(i) {
            return Err(row_err(name, row, "null vector"));
        }
        let (a, b) = (self.range)(i);
        if b - a != dim {
            return Err(row_err(name, row, format!("vector of length {}, expected {dim}", b - a)));
        }
        (a..b)
            .map(|k| match self.values.get(k) {
                Some(x) if x.is_finite() => Ok(x as f32),
                _ => Err(row_err(name, row, "null or non-finite value in the vector")),
            })
            .collect()
    }
}

enum Sparse<'a> {
    Scalar(Int<'a>),
    Bags(IntList<'a>),
}

enum SeqItems<'a> {
    Ids { sequence: IntList<'a>, candidate: Int<'a> },
    Embeddings { list: &'a ListArray, vectors: FloatVecs<'a>, candidate: FloatVecs<'a>, dim: usize },
}

struct SeqViews<'a> {
    types: IntList<'a>,
    stamps: IntList<'a>,
    items: SeqItems<'a>,
    request: Int<'a>,
}

/// Views of all needed columns of one record batch.
struct Views<'a> {
    dense: Vec<Num<'a>>,
    sparse: Vec<Sparse<'a>>,
    embedding: Vec<FloatVecs<'a>>,
    seq: Option<SeqViews<'a>>,
    labels: Vec<Option<Num<'a>>>,
    weight: Option<Num<'a>>,
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| col_err(name, "missing from a record batch"))
}

impl<'a> Views<'a> {
    fn new(batch: &'a RecordBatch, schema: &DataSchema, has_weight: bool) -> Result<Self> {
        let f = &schema.features;
        let dense =
            f.dense.iter().map(|d| Num::new(column(batch, &d.name)?.as_ref(), &d.name)).collect::<Result<_>>()?;
        let sparse = f
            .sparse
            .iter()
            .map(|s| {
                let a = column(batch, &s.name)?.as_ref();
                Ok(if is_int(a.data_type()) {
                    Sparse::Scalar(Int::new(a, &s.name)?)
                } else {
                    Sparse::Bags(IntList::new(a, &s.name)?)
                })
            })
            .collect::<Result<_>>()?;
        let embedding = f
            .embedding
            .iter()
            .map(|e| FloatVecs::new(column(batch, &e.name)?.as_ref(), &e.name))
            .collect::<Result<_>>()?;
        let seq = match &schema.sequence {
            None => None,
            Some(spec) => {
                let items = match spec.items {
                    SequenceItemSpec::Ids { .. } => SeqItems::Ids {
                        sequence: IntList::new(column(batch, columns::SEQ_ITEM_IDS)?.as_ref(), columns::SEQ_ITEM_IDS)?,
                        candidate: Int::new(
                            column(batch, columns::CANDIDATE_ITEM_ID)?.as_ref(),
                            columns::CANDIDATE_ITEM_ID,
                        )?,
                    },
                    SequenceItemSpec::Embeddings { dim } => {
                        let list = column(batch, columns::SEQ_ITEM_EMBEDDINGS)?
                            .as_list_opt::<i32>()
                            .ok_or_else(|| col_err(columns::SEQ_ITEM_EMBEDDINGS, "expected a List"))?;
                        SeqItems::Embeddings {
                            list,
                            vectors: FloatVecs::new(list.values().as_ref(), columns::SEQ_ITEM_EMBEDDINGS)?,
                            candidate: FloatVecs::new(
                                column(batch, columns::CANDIDATE_ITEM_EMBEDDING)?.as_ref(),
                                columns::CANDIDATE_ITEM_EMBEDDING,
                            )?,
                            dim,
                        }
                    }
                };
                Some(SeqViews {
                    types: IntList::new(column(batch, columns::SEQ_ACTION_TYPES)?.as_ref(), columns::SEQ_ACTION_TYPES)?,
                    stamps: IntList::new(column(batch, columns::SEQ_TIMESTAMPS)?.as_ref(), columns::SEQ_TIMESTAMPS)?,
                    items,
                    request: Int::new(column(batch, columns::REQUEST_TIME)?.as_ref(), columns::REQUEST_TIME)?,
                })
            }
        };
        let labels = schema
            .tasks
            .iter()
            .map(|t| {
                let name = columns::label(t);
                batch.column_by_name(&name).map(|a| Num::new(a.as_ref(), &name)).transpose()
            })
            .collect::<Result<_>>()?;
        let weight = if has_weight {
            Some(Num::new(column(batch, columns::EXAMPLE_WEIGHT)?.as_ref(), columns::EXAMPLE_WEIGHT)?)
        } else {
            None
        };
        Ok(Self { dense, sparse, embedding, seq, labels, weight })
    }

    /// Row `i` of the batch, whose global index is `row`.
    fn example(&self, i: usize, row: u64, schema: &DataSchema) -> Result<Example> {
        let dense = self.dense.iter().map(|c| c.get(i).map_or(f32::NAN, |x| x as f32)).collect();
        let sparse = self
            .sparse
            .iter()
            .zip(&schema.features.sparse)
            .map(|(c, f)| match c {
                Sparse::Scalar(ids) => Ok(ids.get(i).into_iter().collect()),
                Sparse::Bags(list) => list.get(i, &f.name, row),
            })
            .collect::<Result<_>>()?;
        let embedding = self
            .embedding
            .iter()
            .zip(&schema.features.embedding)
            .map(|(c, f)| c.get(i, f.dim, &f.name, row))
            .collect::<Result<_>>()?;
        let sequence = match &self.seq {
            None => None,
            Some(s) => {
                let action_types = s.types.get(i, columns::SEQ_ACTION_TYPES, row)?;
                let timestamps = s.stamps.get(i, columns::SEQ_TIMESTAMPS, row)?;
                let items = match &s.items {
                    SeqItems::Ids { sequence, candidate } => ExampleItems::Ids {
                        sequence: sequence.get(i, columns::SEQ_ITEM_IDS, row)?,
                        candidate: candidate.get(i).ok_or_else(|| row_err(columns::CANDIDATE_ITEM_ID, row, "null"))?,
                    },
                    SeqItems::Embeddings { list, vectors, candidate, dim } => {
                        let sequence = if list.is_null(i) {
                            Vec::new()
                        } else {
                            let offsets = list.value_offsets();
                            (offsets[i] as usize..offsets[i + 1] as usize)
                                .map(|k| vectors.get(k, *dim, columns::SEQ_ITEM_EMBEDDINGS, row))
                                .collect::<Result<_>>()?
                        };
                        ExampleItems::Embeddings {
                            sequence,
                            candidate: candidate.get(i, *dim, columns::CANDIDATE_ITEM_EMBEDDING, row)?,
                        }
                    }
                };
                let request_time = s.request.get(i).ok_or_else(|| row_err(columns::REQUEST_TIME, row, "null"))?;
                Some(ExampleSequence { action_types, timestamps, items, request_time })
            }
        };
        let labels =
            self.labels.iter().map(|c| c.as_ref().and_then(|c| c.get(i)).map_or(f32::NAN, |y| y as f32)).collect();
        let example_weight = match &self.weight {
            None => None,
            Some(w) => Some(w.get(i).ok_or_else(|| row_err(columns::EXAMPLE_WEIGHT, row, "null weight"))? as f32),
        };
        let example = Example { dense, sparse, embedding, sequence, labels, example_weight };
        example.check(schema, row)?;
        Ok(example)
    }
}

// ---------------------------------------------------------------------------------------------
// The dataset.

/// A Parquet data file, opened and checked (see the module doc). Reading streams record batches;
/// the file is never loaded whole.
#[derive(Debug, Clone)]
pub struct ParquetDataset {
    path: PathBuf,
    schema: DataSchema,
    num_rows: u64,
    /// Row count of each row group.
    row_groups: Vec<u64>,
    /// Root column indices to read.
    projection: Vec<usize>,
    has_weight: bool,
    missing_labels: Vec<String>,
}

/// A reader of `file`. The Arrow schema some writers embed in the metadata (`ARROW:schema`) gives
/// exact types (e.g. a fixed-size list's width, checked up front); decoding that untrusted
/// flatbuffer panics inside arrow-ipc on some damaged files (found by `tests/faults.rs`), so a
/// panic there is caught, and the file is read with the types derived from the Parquet schema
/// alone (its rows are still checked one by one).
fn reader_builder(file: File, path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let retry = file.try_clone().map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    let decoded = quiet_catch_unwind(|| ParquetRecordBatchReaderBuilder::try_new(file));
    let built = match decoded {
        Ok(built) => built,
        Err(_) => {
            use std::io::Seek;
            let mut retry = retry;
            retry.rewind().map_err(|source| Error::Io { path: path.display().to_string(), source })?;
            let options = parquet::arrow::arrow_reader::ArrowReaderOptions::new().with_skip_arrow_metadata(true);
            ParquetRecordBatchReaderBuilder::try_new_with_options(retry, options)
        }
    };
    built.map_err(|e| io_err(path, e))
}

thread_local! {
    static QUIET_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the current thread is inside a third-party call whose panic is caught and handled
/// (a damaged file's metadata): a process's panic hook should then stay silent.
pub fn panic_is_handled() -> bool {
    QUIET_PANIC.with(std::cell::Cell::get)
}

fn quiet_catch_unwind<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    QUIET_PANIC.with(|q| q.set(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANIC.with(|q| q.set(false));
    out
}

/// How [`ParquetDataset`] treats the label columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Labels {
    /// Each must be present and valid (training, evaluation).
    Required,
    /// Read when present, NaN when absent.
    Optional,
    /// Never read (scoring): labels and example weights are neither checked nor projected.
    Ignored,
}

impl ParquetDataset {
    /// Opens a file written with a [`DataSchema`] in its metadata (key [`SCHEMA_METADATA_KEY`]).
    /// Every column of the schema, labels included, must be present with an accepted type.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_impl(path.as_ref(), None, Labels::Required)
    }

    /// Opens a file with an explicit schema (e.g. users' own files without rankstack metadata).
    pub fn open_with_schema(path: impl AsRef<Path>, schema: &DataSchema) -> Result<Self> {
        Self::open_impl(path.as_ref(), Some(schema), Labels::Required)
    }

    /// Opens a file for scoring: as [`ParquetDataset::open`] / [`ParquetDataset::open_with_schema`]
    /// (schema from the metadata when `schema` is `None`), but label columns may be missing; their
    /// labels read as NaN. [`ParquetDataset::missing_labels`] lists them.
    pub fn open_unlabeled(path: impl AsRef<Path>, schema: Option<&DataSchema>) -> Result<Self> {
        Self::open_impl(path.as_ref(), schema, Labels::Optional)
    }

    /// Opens a file for scoring without reading its labels or example weights at all: those
    /// columns may be absent, of any type or hold any values (scoring does not use them); every
    /// label reads as NaN and [`ParquetDataset::missing_labels`] lists every label column.
    pub fn open_features_only(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_impl(path.as_ref(), None, Labels::Ignored)
    }

    fn open_impl(path: &Path, schema: Option<&DataSchema>, labels: Labels) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        let builder = reader_builder(file, path)?;
        let schema = match schema {
            Some(s) => s.clone(),
            None => {
                let kv = builder.metadata().file_metadata().key_value_metadata();
                let json = kv
                    .and_then(|kv| kv.iter().find(|k| k.key == SCHEMA_METADATA_KEY))
                    .and_then(|k| k.value.clone())
                    .ok_or_else(|| {
                        io_err(path, format!("no `{SCHEMA_METADATA_KEY}` metadata; open it with an explicit schema"))
                    })?;
                DataSchema::from_json(&json)
                    .map_err(|e| io_err(path, format!("bad `{SCHEMA_METADATA_KEY}` metadata: {e}")))?
            }
        };
        schema.validate()?;
        let arrow: &Schema = builder.schema();
        let mut projection = Vec::new();
        let mut check = |name: &str, kind: Kind, required: bool| -> Result<bool> {
            match arrow.index_of(name) {
                Ok(i) => {
                    let field: &Field = arrow.field(i);
                    if !kind.accepts(field.data_type()) {
                        return Err(col_err(
                            name,
                            format!(
                                "has type {}, expected {} in {}",
                                field.data_type(),
                                kind.expected(),
                                path.display()
                            ),
                        ));
                    }
                    projection.push(i);
                    Ok(true)
                }
                Err(_) if required => Err(col_err(name, format!("is missing from {}", path.display()))),
                Err(_) => Ok(false),
            }
        };
        for (name, kind) in required_columns(&schema) {
            check(&name, kind, true)?;
        }
        let mut missing_labels = Vec::new();
        for task in &schema.tasks {
            let name = columns::label(task);
            if labels == Labels::Ignored || !check(&name, Kind::Label, labels == Labels::Required)? {
                missing_labels.push(name);
            }
        }
        let has_weight = labels != Labels::Ignored && check(columns::EXAMPLE_WEIGHT, Kind::Weight, false)?;
        projection.sort_unstable();
        let meta = builder.metadata();
        let row_groups: Vec<u64> = meta.row_groups().iter().map(|g| g.num_rows() as u64).collect();
        let num_rows = row_groups.iter().sum();
        Ok(Self { path: path.to_path_buf(), schema, num_rows, row_groups, projection, has_weight, missing_labels })
    }

    /// The data schema.
    pub fn schema(&self) -> &DataSchema {
        &self.schema
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of rows in the file.
    pub fn num_rows(&self) -> u64 {
        self.num_rows
    }

    /// Whether the file has an `example_weight` column.
    pub fn has_example_weights(&self) -> bool {
        self.has_weight
    }

    /// Label columns absent from the file (only with [`ParquetDataset::open_unlabeled`]).
    pub fn missing_labels(&self) -> &[String] {
        &self.missing_labels
    }

    /// Streams the file as [`LabeledBatch`]es of `batch_size` rows (the last one may be smaller);
    /// with `shuffle`, row groups are visited in a seeded random order and rows pass through a
    /// seeded [`ShuffleBuffer`]. Every row appears exactly once. After an error the stream ends.
    pub fn batches(&self, batch_size: usize, shuffle: Option<Shuffle>) -> Result<RowBatches> {
        if batch_size == 0 {
            return Err(Error::config(LAYER, "batch_size", "must be > 0"));
        }
        let mut order: Vec<usize> = (0..self.row_groups.len()).collect();
        if let Some(s) = shuffle {
            let mut rng = Rng::for_name(s.seed, "row_groups");
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let mut starts = Vec::with_capacity(self.row_groups.len());
        let mut acc = 0u64;
        for &n in &self.row_groups {
            starts.push(acc);
            acc += n;
        }
        let segments: VecDeque<(u64, u64)> = order.iter().map(|&g| (starts[g], self.row_groups[g])).collect();
        let file =
            File::open(&self.path).map_err(|source| Error::Io { path: self.path.display().to_string(), source })?;
        let builder = reader_builder(file, &self.path)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), self.projection.iter().copied());
        let reader = builder
            .with_projection(mask)
            .with_row_groups(order)
            .with_batch_size(batch_size.clamp(256, 8192))
            .build()
            .map_err(|e| io_err(&self.path, e))?;
        Ok(RowBatches {
            schema: self.schema.clone(),
            path: self.path.clone(),
            has_weight: self.has_weight,
            reader,
            segments,
            pending: VecDeque::new(),
            shuffle: shuffle.map(ShuffleBuffer::new),
            source_done: false,
            batch_size,
            finished: false,
        })
    }

    /// Reads every row in file order (for tests, small files and scoring).
    pub fn read_all(&self) -> Result<Vec<Example>> {
        let mut stream = self.batches(8192, None)?;
        let mut out = Vec::with_capacity(self.num_rows as usize);
        while let Some((_, example)) = stream.next_row()? {
            out.push(example);
        }
        Ok(out)
    }
}

/// The stream of batches of [`ParquetDataset::batches`].
pub struct RowBatches {
    schema: DataSchema,
    path: PathBuf,
    has_weight: bool,
    reader: ParquetRecordBatchReader,
    /// Remaining (global start row, rows) of the row groups in reading order.
    segments: VecDeque<(u64, u64)>,
    pending: VecDeque<(u64, Example)>,
    shuffle: Option<ShuffleBuffer<(u64, Example)>>,
    source_done: bool,
    batch_size: usize,
    finished: bool,
}

impl std::fmt::Debug for RowBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowBatches")
            .field("path", &self.path)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl RowBatches {
    /// The next row in file order (with its global index), decoding a record batch when needed.
    fn next_source_row(&mut self) -> Result<Option<(u64, Example)>> {
        while self.pending.is_empty() {
            if self.source_done {
                return Ok(None);
            }
            match self.reader.next() {
                None => self.source_done = true,
                Some(Err(e)) => return Err(io_err(&self.path, e)),
                Some(Ok(batch)) => {
                    let views = Views::new(&batch, &self.schema, self.has_weight)?;
                    for i in 0..batch.num_rows() {
                        let row = self.next_global_index()?;
                        let example = views.example(i, row, &self.schema)?;
                        self.pending.push_back((row, example));
                    }
                }
            }
        }
        Ok(self.pending.pop_front())
    }

    fn next_global_index(&mut self) -> Result<u64> {
        loop {
            let (start, len) = self
                .segments
                .front_mut()
                .ok_or_else(|| io_err(&self.path, "the file has more rows than its metadata says"))?;
            if *len > 0 {
                let row = *start;
                *start += 1;
                *len -= 1;
                return Ok(row);
            }
            self.segments.pop_front();
        }
    }

    /// The next row after shuffling (if any).
    fn next_row(&mut self) -> Result<Option<(u64, Example)>> {
        if self.shuffle.is_none() {
            return self.next_source_row();
        }
        loop {
            if !self.source_done || !self.pending.is_empty() {
                match self.next_source_row()? {
                    Some(row) => {
                        if let Some(out) = self.shuffle.as_mut().and_then(|b| b.push(row)) {
                            return Ok(Some(out));
                        }
                        continue;
                    }
                    None => continue,
                }
            }
            return Ok(self.shuffle.as_mut().and_then(ShuffleBuffer::pop));
        }
    }

    fn next_batch(&mut self) -> Result<Option<LabeledBatch>> {
        // The capacity is a hint, bounded: `batch_size` is the user's number (it may exceed the
        // file's rows by far, up to `usize::MAX`), so it must not size an allocation.
        let hint = self.batch_size.min(8192);
        let mut rows = Vec::with_capacity(hint);
        let mut index = Vec::with_capacity(hint);
        while rows.len() < self.batch_size {
            match self.next_row()? {
                Some((i, example)) => {
                    index.push(i);
                    rows.push(example);
                }
                None => break,
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        collate(&self.schema, &rows, &index).map(Some)
    }
}

impl Iterator for RowBatches {
    type Item = Result<LabeledBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let out = self.next_batch().transpose();
        if !matches!(out, Some(Ok(_))) {
            self.finished = true;
        }
        out
    }
}
