//! Index arrays built on the host for several consumers, copied to a device in one upload.
//!
//! A training step's embedding lookups, the composed attention's chunk maps and the optimizer's
//! row write-backs each need a few `u32` arrays on the device (rows, inverse maps, segments).
//! Uploaded one by one, they made a `homefeed-bench` training step copy about seventy small arrays
//! (on a GPU each a driver call that stages pageable memory and may wait for the stream). An
//! [`IndexStage`] collects the arrays of many consumers on the host, [`IndexStage::upload`] copies
//! them in one transfer, and each consumer takes its [`Part`]s of the result as views. The
//! consumers are built in two steps: staged (host work, errors for bad rows), then finished with
//! the uploaded [`StagedIndexes`].
//!
//! ```
//! # use candle_core::Device;
//! use rankstack_kernels::host_transfer::record_transfers;
//! use rankstack_kernels::index_stage::IndexStage;
//! let mut stage = IndexStage::default();
//! let (a, b) = (stage.push(&[3, 1]), stage.push(&[7]));
//! let (staged, transfers) = record_transfers(|| stage.upload(&Device::Cpu, "rows"));
//! let staged = staged?;
//! assert_eq!(transfers.len(), 1);
//! assert_eq!(staged.part(&a)?.to_vec1::<u32>()?, [3, 1]);
//! assert_eq!(staged.part(&b)?.to_vec1::<u32>()?, [7]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use crate::host_transfer::{upload, Origin};

/// `u32` arrays waiting to be copied to a device together.
#[derive(Debug, Default)]
pub struct IndexStage {
    values: Vec<u32>,
}

/// Where one array is in its stage's upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part(Range<usize>);

impl Part {
    /// The array's length.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A stage's arrays on the device, one tensor.
#[derive(Debug, Clone)]
pub struct StagedIndexes {
    all: Tensor,
}

impl IndexStage {
    /// Adds `values`; the [`Part`] finds them after the upload.
    pub fn push(&mut self, values: &[u32]) -> Part {
        let start = self.values.len();
        self.values.extend_from_slice(values);
        Part(start..self.values.len())
    }

    /// Adds the values of `values` (an iterator, to build an array in place).
    pub fn extend(&mut self, values: impl IntoIterator<Item = u32>) -> Part {
        let start = self.values.len();
        self.values.extend(values);
        Part(start..self.values.len())
    }

    /// Copies every array to `device` in one upload (an index array of the batch: [`Origin::Input`]),
    /// recorded as `what`.
    pub fn upload(self, device: &Device, what: &'static str) -> Result<StagedIndexes> {
        let n = self.values.len();
        Ok(StagedIndexes { all: upload(self.values, n, device, what, Origin::Input)? })
    }
}

impl StagedIndexes {
    /// The array of `part`, a `[len]` u32 view of the upload.
    pub fn part(&self, part: &Part) -> Result<Tensor> {
        match part.0.end <= self.all.dim(0)? {
            true => self.all.narrow(0, part.0.start, part.0.len()),
            false => candle_core::bail!("index stage: part {:?} of an upload of {}", part.0, self.all.dim(0)?),
        }
    }

    /// The device the arrays are on.
    pub fn device(&self) -> &Device {
        self.all.device()
    }
}
