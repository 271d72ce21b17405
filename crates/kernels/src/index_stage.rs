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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_transfer::record_transfers;

    /// Parts come back in order, empty ones included, as views of one upload; a part of another,
    /// larger stage is an error, not a view past the end.
    #[test]
    fn parts_are_views_of_one_upload_and_a_foreign_part_is_an_error() {
        let mut stage = IndexStage::default();
        let a = stage.push(&[5, 6, 7]);
        let empty = stage.push(&[]);
        let b = stage.extend((0..4).map(|i| i * 10));
        assert_eq!((a.len(), empty.is_empty(), b.len()), (3, true, 4));
        let (staged, transfers) = record_transfers(|| stage.upload(&Device::Cpu, "test rows").unwrap());
        let seen: Vec<_> = transfers.iter().map(|t| (t.what, t.elements, t.origin)).collect();
        assert_eq!(seen, [("test rows", 7, Origin::Input)]);
        assert_eq!(staged.part(&a).unwrap().to_vec1::<u32>().unwrap(), [5, 6, 7]);
        assert_eq!(staged.part(&empty).unwrap().dims(), [0]);
        assert_eq!(staged.part(&b).unwrap().to_vec1::<u32>().unwrap(), [0, 10, 20, 30]);
        let mut larger = IndexStage::default();
        larger.push(&[0; 7]);
        let foreign = larger.push(&[1, 2]);
        let err = staged.part(&foreign).unwrap_err().to_string();
        assert!(err.contains("index stage: part 7..9 of an upload of 7"), "{err}");
    }
}
