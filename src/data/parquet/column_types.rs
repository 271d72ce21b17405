//! What each column of the convention must be, checked on a file's Arrow schema before any row
//! is read.

use arrow_schema::DataType;

use crate::data::{DataSchema, SequenceItemSpec};

use super::*;

pub(super) fn is_int(dt: &DataType) -> bool {
    matches!(dt, DataType::Int32 | DataType::Int64)
}

pub(super) fn is_float(dt: &DataType) -> bool {
    matches!(dt, DataType::Float32 | DataType::Float64)
}

pub(super) fn is_number(dt: &DataType) -> bool {
    is_int(dt) || is_float(dt)
}

pub(super) fn is_int_list(dt: &DataType) -> bool {
    matches!(dt, DataType::List(f) if is_int(f.data_type()))
}

/// `FixedSizeList<float, dim>` or `List<float>`.
pub(super) fn is_float_vec(dt: &DataType, dim: usize) -> bool {
    match dt {
        DataType::FixedSizeList(f, n) => is_float(f.data_type()) && *n as usize == dim,
        DataType::List(f) => is_float(f.data_type()),
        _ => false,
    }
}

/// What a column must be.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
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
    pub(super) fn accepts(self, dt: &DataType) -> bool {
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

    pub(super) fn expected(self) -> String {
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
pub(super) fn required_columns(schema: &DataSchema) -> Vec<(String, Kind)> {
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
