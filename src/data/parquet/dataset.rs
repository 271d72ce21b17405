//! [`ParquetDataset`]: opening and checking a file, and streaming its rows.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_schema::{Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use rankstack_nn::rng::Rng;
use rankstack_nn::{Error, Result};

use crate::data::{DataSchema, Example, Shuffle, SCHEMA_METADATA_KEY};

use super::*;

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
pub(super) fn reader_builder(file: File, path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
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

pub(super) fn quiet_catch_unwind<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    QUIET_PANIC.with(|q| q.set(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANIC.with(|q| q.set(false));
    out
}

/// How [`ParquetDataset`] treats the label columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Labels {
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

    /// Streams the file as [`LabeledBatch`](crate::data::LabeledBatch)es of `batch_size` rows (the last one may be smaller);
    /// with `shuffle`, row groups are visited in a seeded random order and rows pass through a
    /// seeded [`ShuffleBuffer`](crate::data::ShuffleBuffer). Every row appears exactly once. After an error the stream ends.
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
        Ok(RowBatches::new(
            self.schema.clone(),
            self.path.clone(),
            self.has_weight,
            reader,
            segments,
            shuffle,
            batch_size,
        ))
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
