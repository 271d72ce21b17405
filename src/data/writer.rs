//! Writing rows ([`Example`]s) to a Parquet file in the column convention of [`super::columns`],
//! with the [`DataSchema`] as JSON in the file's key-value metadata.
//!
//! Column order: dense features, sparse features, embedding features, then (with a sequence)
//! `seq_action_types`, `seq_timestamps`, `seq_item_ids` / `seq_item_embeddings`,
//! `candidate_item_id` / `candidate_item_embedding`, `request_time`, then `label_<task>` per task
//! and, if enabled, `example_weight`. Types: dense and labels Float32 (NaN written as null),
//! sparse Int64 (or `List<Int64>` for the features named in [`WriterOptions::sparse_lists`]),
//! vectors `FixedSizeList<Float32, dim>`, id and timestamp lists `List<Int64>`. Snappy compression.
//! The output is a deterministic function of the rows, the schema and the options (no timestamps
//! are written). The file is written to `<path>.tmp` and renamed into place by
//! [`ParquetWriter::finish`], so a failed or interrupted write never leaves a partial file at
//! `path`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, Int64Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use rankstack_nn::{Error, Result};

use super::{columns, DataSchema, Example, ExampleItems, SequenceItemSpec, SCHEMA_METADATA_KEY};

const LAYER: &str = "ParquetWriter";

/// Options of [`ParquetWriter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// Sparse features written as `List<Int64>` bags; the others are written as one Int64 id per row
    /// (a row whose bag does not hold exactly one id is then an error).
    pub sparse_lists: Vec<String>,
    /// Write an `example_weight` column (every row must then have a weight).
    pub example_weights: bool,
    /// Rows per row group (> 0).
    pub rows_per_group: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self { sparse_lists: Vec::new(), example_weights: false, rows_per_group: 65_536 }
    }
}

/// Writes [`Example`]s to a Parquet file (see the module doc).
pub struct ParquetWriter {
    schema: DataSchema,
    options: WriterOptions,
    arrow: SchemaRef,
    writer: Option<ArrowWriter<File>>,
    path: PathBuf,
    tmp: PathBuf,
    rows: u64,
}

impl std::fmt::Debug for ParquetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetWriter").field("path", &self.path).field("rows", &self.rows).finish_non_exhaustive()
    }
}

fn list_of(dt: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(dt, true)))
}

fn vector(dim: usize) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new_list_field(DataType::Float32, true)), dim as i32)
}

fn arrow_schema(schema: &DataSchema, options: &WriterOptions) -> Schema {
    let f = &schema.features;
    let mut fields: Vec<Field> = Vec::new();
    fields.extend(f.dense.iter().map(|d| Field::new(&d.name, DataType::Float32, true)));
    fields.extend(f.sparse.iter().map(|s| {
        let dt = if options.sparse_lists.contains(&s.name) { list_of(DataType::Int64) } else { DataType::Int64 };
        Field::new(&s.name, dt, true)
    }));
    fields.extend(f.embedding.iter().map(|e| Field::new(&e.name, vector(e.dim), true)));
    if let Some(seq) = &schema.sequence {
        fields.push(Field::new(columns::SEQ_ACTION_TYPES, list_of(DataType::Int64), true));
        fields.push(Field::new(columns::SEQ_TIMESTAMPS, list_of(DataType::Int64), true));
        match seq.items {
            SequenceItemSpec::Ids { .. } => {
                fields.push(Field::new(columns::SEQ_ITEM_IDS, list_of(DataType::Int64), true));
                fields.push(Field::new(columns::CANDIDATE_ITEM_ID, DataType::Int64, true));
            }
            SequenceItemSpec::Embeddings { dim } => {
                fields.push(Field::new(columns::SEQ_ITEM_EMBEDDINGS, list_of(vector(dim)), true));
                fields.push(Field::new(columns::CANDIDATE_ITEM_EMBEDDING, vector(dim), true));
            }
        }
        fields.push(Field::new(columns::REQUEST_TIME, DataType::Int64, true));
    }
    fields.extend(schema.tasks.iter().map(|t| Field::new(columns::label(t), DataType::Float32, true)));
    if options.example_weights {
        fields.push(Field::new(columns::EXAMPLE_WEIGHT, DataType::Float32, true));
    }
    Schema::new(fields)
}

fn floats_nan_as_null(values: impl Iterator<Item = f32>) -> ArrayRef {
    let mut b = Float32Builder::new();
    for v in values {
        b.append_option((!v.is_nan()).then_some(v));
    }
    Arc::new(b.finish())
}

fn int_lists<'a>(lists: impl Iterator<Item = &'a [i64]>) -> ArrayRef {
    let mut b = ListBuilder::new(Int64Builder::new());
    for l in lists {
        b.values().append_slice(l);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn vectors<'a>(vs: impl Iterator<Item = &'a [f32]>, dim: usize) -> ArrayRef {
    let mut b = FixedSizeListBuilder::new(Float32Builder::new(), dim as i32);
    for v in vs {
        b.values().append_slice(v);
        b.append(true);
    }
    Arc::new(b.finish())
}

impl ParquetWriter {
    /// Creates `<path>.tmp` for writing rows of `schema` (validated).
    pub fn create(path: impl AsRef<Path>, schema: &DataSchema, options: WriterOptions) -> Result<Self> {
        schema.validate()?;
        if options.rows_per_group == 0 {
            return Err(Error::config(LAYER, "rows_per_group", "must be > 0"));
        }
        if let Some(name) = options.sparse_lists.iter().find(|n| !schema.features.sparse.iter().any(|s| &&s.name == n))
        {
            return Err(Error::config(
                LAYER,
                "sparse_lists",
                format!("`{name}` is not a sparse feature of the schema"),
            ));
        }
        let path = path.as_ref().to_path_buf();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|source| Error::Io { path: tmp.display().to_string(), source })?;
        let arrow: SchemaRef = Arc::new(arrow_schema(schema, &options));
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(options.rows_per_group))
            .set_key_value_metadata(Some(vec![KeyValue::new(SCHEMA_METADATA_KEY.to_string(), schema.to_json())]))
            .build();
        let writer = ArrowWriter::try_new(file, arrow.clone(), Some(props))
            .map_err(|e| Error::input(LAYER, tmp.display().to_string(), e.to_string()))?;
        Ok(Self { schema: schema.clone(), options, arrow, writer: Some(writer), path, tmp, rows: 0 })
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends `rows` (checked against the schema; errors name the column and the global row).
    pub fn write(&mut self, rows: &[Example]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        for (k, row) in rows.iter().enumerate() {
            let index = self.rows + k as u64;
            row.check(&self.schema, index)?;
            for (f, bag) in self.schema.features.sparse.iter().zip(&row.sparse) {
                if !self.options.sparse_lists.contains(&f.name) && bag.len() != 1 {
                    return Err(Error::input(
                        LAYER,
                        format!("column `{}`, row {index}", f.name),
                        format!(
                            "{} ids in a single-valued column (name it in `sparse_lists` to write bags)",
                            bag.len()
                        ),
                    ));
                }
            }
            if self.options.example_weights != row.example_weight.is_some() {
                return Err(Error::input(
                    LAYER,
                    format!("column `{}`, row {index}", columns::EXAMPLE_WEIGHT),
                    if self.options.example_weights {
                        "the row has no weight"
                    } else {
                        "the row has a weight but the writer writes none"
                    },
                ));
            }
        }
        let batch = self.record_batch(rows)?;
        let writer = self.writer.as_mut().ok_or_else(|| Error::input(LAYER, "write", "the writer is finished"))?;
        writer.write(&batch).map_err(|e| Error::input(LAYER, self.tmp.display().to_string(), e.to_string()))?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    fn record_batch(&self, rows: &[Example]) -> Result<RecordBatch> {
        let f = &self.schema.features;
        let mut arrays: Vec<ArrayRef> = Vec::new();
        for i in 0..f.dense.len() {
            arrays.push(floats_nan_as_null(rows.iter().map(|r| r.dense[i])));
        }
        for (i, s) in f.sparse.iter().enumerate() {
            if self.options.sparse_lists.contains(&s.name) {
                arrays.push(int_lists(rows.iter().map(|r| &r.sparse[i][..])));
            } else {
                let mut b = Int64Builder::new();
                rows.iter().for_each(|r| b.append_value(r.sparse[i][0]));
                arrays.push(Arc::new(b.finish()));
            }
        }
        for (i, e) in f.embedding.iter().enumerate() {
            arrays.push(vectors(rows.iter().map(|r| &r.embedding[i][..]), e.dim));
        }
        if let Some(spec) = &self.schema.sequence {
            let seqs: Vec<_> = rows.iter().filter_map(|r| r.sequence.as_ref()).collect();
            arrays.push(int_lists(seqs.iter().map(|s| &s.action_types[..])));
            arrays.push(int_lists(seqs.iter().map(|s| &s.timestamps[..])));
            match spec.items {
                SequenceItemSpec::Ids { .. } => {
                    let mut ids: Vec<&[i64]> = Vec::with_capacity(seqs.len());
                    let mut cand = Int64Builder::new();
                    for s in &seqs {
                        if let ExampleItems::Ids { sequence, candidate } = &s.items {
                            ids.push(sequence);
                            cand.append_value(*candidate);
                        }
                    }
                    arrays.push(int_lists(ids.into_iter()));
                    arrays.push(Arc::new(cand.finish()));
                }
                SequenceItemSpec::Embeddings { dim } => {
                    let mut lists = ListBuilder::new(FixedSizeListBuilder::new(Float32Builder::new(), dim as i32));
                    let mut cands: Vec<&[f32]> = Vec::with_capacity(seqs.len());
                    for s in &seqs {
                        if let ExampleItems::Embeddings { sequence, candidate } = &s.items {
                            for v in sequence {
                                lists.values().values().append_slice(v);
                                lists.values().append(true);
                            }
                            lists.append(true);
                            cands.push(candidate);
                        }
                    }
                    arrays.push(Arc::new(lists.finish()));
                    arrays.push(vectors(cands.into_iter(), dim));
                }
            }
            let mut req = Int64Builder::new();
            seqs.iter().for_each(|s| req.append_value(s.request_time));
            arrays.push(Arc::new(req.finish()));
        }
        for t in 0..self.schema.tasks.len() {
            arrays.push(floats_nan_as_null(rows.iter().map(|r| r.labels[t])));
        }
        if self.options.example_weights {
            arrays.push(floats_nan_as_null(rows.iter().map(|r| r.example_weight.unwrap_or(1.0))));
        }
        RecordBatch::try_new(self.arrow.clone(), arrays).map_err(|e| Error::input(LAYER, "record batch", e.to_string()))
    }

    /// Flushes, closes and renames the file into place; returns the number of rows written.
    pub fn finish(mut self) -> Result<u64> {
        let writer = self.writer.take().ok_or_else(|| Error::input(LAYER, "finish", "the writer is finished"))?;
        let file =
            writer.into_inner().map_err(|e| Error::input(LAYER, self.tmp.display().to_string(), e.to_string()))?;
        file.sync_all().map_err(|source| Error::Io { path: self.tmp.display().to_string(), source })?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|source| Error::Io { path: self.path.display().to_string(), source })?;
        Ok(self.rows)
    }
}

impl Drop for ParquetWriter {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
