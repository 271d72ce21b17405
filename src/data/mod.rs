//! Training data: the data schema, Parquet input/output, the built-in synthetic Homefeed-like data
//! set and the MovieLens-100k converter.
//!
//! | file | what |
//! |---|---|
//! | `schema.rs` | [`DataSchema`]: what a data file holds (features, sequence, tasks), and how it fits a preset to the data |
//! | `batch.rs` | [`LabeledBatch`]: what the trainer eats, and moving model inputs to a device |
//! | `example.rs` | [`Example`], one row in memory, and [`collate`] (rows → tensors) |
//! | `parquet.rs` | the column convention and [`ParquetDataset`] (streaming, checked reader) |
//! | `schema_check.rs` | [`DataSchema::of_model`] (the schema a checkpoint was trained on) and the differences from a file's |
//! | `writer.rs` | [`ParquetWriter`] (writes rows with the schema in the file's metadata) |
//! | `shuffle.rs` | [`Shuffle`]: the seeded shuffle buffer |
//! | `prefetch.rs` | [`Prefetch`]: the batch stream decoded on a thread of its own, ahead of the step |
//! | `synthetic.rs` | [`synthetic`]: the seeded hidden-teacher generator |
//! | `movielens.rs` | [`movielens`]: MovieLens-100k (recbole atomic files) → Parquet, split by time |
//!
//! A data file is self-describing: the [`DataSchema`] is stored as JSON in the Parquet key-value
//! metadata under [`SCHEMA_METADATA_KEY`]. [`DataSchema::apply`] turns an architecture preset into a
//! model that fits the data:
//!
//! ```no_run
//! use rankstack::data::{ParquetDataset, Shuffle};
//! let data = ParquetDataset::open("train.parquet")?;
//! let mut config = ranker_model::presets::preset("pinterest-homefeed")?;
//! data.schema().apply(&mut config)?;
//! for batch in data.batches(512, Some(Shuffle { seed: 0, buffer_rows: 65_536 }))? {
//!     let batch = batch?; // LabeledBatch: model inputs, [B, T] labels (NaN = missing)
//! }
//! # Ok::<(), rankstack::nn::Error>(())
//! ```

mod batch;
mod example;
pub mod movielens;
mod parquet;
mod prefetch;
mod schema;
mod schema_check;
mod shuffle;
pub mod synthetic;
mod upload_ahead;
mod writer;

pub use batch::{inputs_to_device, LabeledBatch};
pub use example::{collate, Example, ExampleItems, ExampleSequence};
pub use parquet::{columns, panic_is_handled, ParquetDataset, RowBatches};
pub use prefetch::Prefetch;
pub use schema::{DataSchema, SequenceItemSpec, SequenceSpec};
pub use shuffle::{Shuffle, ShuffleBuffer};
pub use upload_ahead::UploadAhead;
pub use writer::{ParquetWriter, WriterOptions};

/// The Parquet key-value metadata key holding the [`DataSchema`] as JSON.
pub const SCHEMA_METADATA_KEY: &str = "rankstack.schema";
