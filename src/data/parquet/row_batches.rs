//! [`RowBatches`]: the stream of batches — record batches decoded row by row, optionally through
//! the seeded shuffle buffer, collated into [`LabeledBatch`]es.

use std::collections::VecDeque;
use std::path::PathBuf;

use parquet::arrow::arrow_reader::ParquetRecordBatchReader;
use rankstack_nn::Result;

use crate::data::{collate, DataSchema, Example, LabeledBatch, Shuffle, ShuffleBuffer};

use super::*;

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
    /// A stream over `reader`'s record batches of the row groups `segments` (global start row,
    /// rows), in that order.
    pub(super) fn new(
        schema: DataSchema,
        path: PathBuf,
        has_weight: bool,
        reader: ParquetRecordBatchReader,
        segments: VecDeque<(u64, u64)>,
        shuffle: Option<Shuffle>,
        batch_size: usize,
    ) -> Self {
        Self {
            schema,
            path,
            has_weight,
            reader,
            segments,
            pending: VecDeque::new(),
            shuffle: shuffle.map(ShuffleBuffer::new),
            source_done: false,
            batch_size,
            finished: false,
        }
    }

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
    pub(super) fn next_row(&mut self) -> Result<Option<(u64, Example)>> {
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
