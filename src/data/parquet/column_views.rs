//! Typed views of the needed columns of one Arrow record batch, and the decoding of one row into
//! an [`Example`], each bad value an error naming the column and the row.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, BooleanArray, FixedSizeListArray, ListArray, PrimitiveArray, RecordBatch};
use arrow_schema::DataType;
use rankstack_nn::Result;

use crate::data::{DataSchema, Example, ExampleItems, ExampleSequence, SequenceItemSpec};

use super::*;

/// A numeric column read as f64 (`None` = null).
pub(super) enum Num<'a> {
    F32(&'a PrimitiveArray<Float32Type>),
    F64(&'a PrimitiveArray<Float64Type>),
    I32(&'a PrimitiveArray<Int32Type>),
    I64(&'a PrimitiveArray<Int64Type>),
    Bool(&'a BooleanArray),
}

impl<'a> Num<'a> {
    pub(super) fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
        Ok(match a.data_type() {
            DataType::Float32 => Num::F32(a.as_primitive()),
            DataType::Float64 => Num::F64(a.as_primitive()),
            DataType::Int32 => Num::I32(a.as_primitive()),
            DataType::Int64 => Num::I64(a.as_primitive()),
            DataType::Boolean => Num::Bool(a.as_boolean()),
            other => return Err(col_err(name, format!("unexpected type {other}"))),
        })
    }

    pub(super) fn get(&self, i: usize) -> Option<f64> {
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
pub(super) enum Int<'a> {
    I32(&'a PrimitiveArray<Int32Type>),
    I64(&'a PrimitiveArray<Int64Type>),
}

impl<'a> Int<'a> {
    pub(super) fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
        Ok(match a.data_type() {
            DataType::Int32 => Int::I32(a.as_primitive()),
            DataType::Int64 => Int::I64(a.as_primitive()),
            other => return Err(col_err(name, format!("unexpected type {other}"))),
        })
    }

    pub(super) fn get(&self, i: usize) -> Option<i64> {
        match self {
            Int::I32(a) => (!a.is_null(i)).then(|| i64::from(a.value(i))),
            Int::I64(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// A `List<int>` column.
pub(super) struct IntList<'a> {
    list: &'a ListArray,
    values: Int<'a>,
}

impl<'a> IntList<'a> {
    pub(super) fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
        let list = a.as_list_opt::<i32>().ok_or_else(|| col_err(name, "expected a List"))?;
        Ok(Self { list, values: Int::new(list.values().as_ref(), name)? })
    }

    /// The ids of row `i` (a null list is empty); a null element is an error.
    pub(super) fn get(&self, i: usize, name: &str, row: u64) -> Result<Vec<i64>> {
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
pub(super) struct FloatVecs<'a> {
    nulls: &'a dyn Array,
    /// Value range of vector `i`.
    range: Box<dyn Fn(usize) -> (usize, usize) + 'a>,
    values: Num<'a>,
}

impl<'a> FloatVecs<'a> {
    pub(super) fn new(a: &'a dyn Array, name: &str) -> Result<Self> {
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
    pub(super) fn get(&self, i: usize, dim: usize, name: &str, row: u64) -> Result<Vec<f32>> {
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

pub(super) enum Sparse<'a> {
    Scalar(Int<'a>),
    Bags(IntList<'a>),
}

pub(super) enum SeqItems<'a> {
    Ids { sequence: IntList<'a>, candidate: Int<'a> },
    Embeddings { list: &'a ListArray, vectors: FloatVecs<'a>, candidate: FloatVecs<'a>, dim: usize },
}

pub(super) struct SeqViews<'a> {
    types: IntList<'a>,
    stamps: IntList<'a>,
    items: SeqItems<'a>,
    request: Int<'a>,
}

/// Views of all needed columns of one record batch.
pub(super) struct Views<'a> {
    dense: Vec<Num<'a>>,
    sparse: Vec<Sparse<'a>>,
    embedding: Vec<FloatVecs<'a>>,
    seq: Option<SeqViews<'a>>,
    labels: Vec<Option<Num<'a>>>,
    weight: Option<Num<'a>>,
}

pub(super) fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| col_err(name, "missing from a record batch"))
}

impl<'a> Views<'a> {
    pub(super) fn new(batch: &'a RecordBatch, schema: &DataSchema, has_weight: bool) -> Result<Self> {
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
    pub(super) fn example(&self, i: usize, row: u64, schema: &DataSchema) -> Result<Example> {
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
