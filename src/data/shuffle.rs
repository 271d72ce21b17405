//! The seeded shuffle buffer used to shuffle a stream of rows without loading it whole.
//!
//! Algorithm (as `tf.data`'s `shuffle`): fill a buffer with the first `N = buffer_rows` rows; for
//! each further row draw `j ~ U{0..N}` from the seeded [`Rng`], emit the buffered row `j` and put
//! the new row in its place; at the end of the stream emit the remaining rows by repeatedly drawing
//! `j` uniformly among those left (swap-remove). Every row is emitted exactly once; the order is a
//! function of the seed and the input order only. With `N ≥` the number of rows this is a uniform
//! random permutation; smaller buffers mix rows locally (a row moves at most about `N` positions
//! earlier), so files should not be sorted by label. The Parquet reader also visits row groups in
//! a seeded random order when shuffling.

use rankstack_nn::rng::Rng;

/// Shuffling settings: a seed and the buffer size in rows (0 is treated as 1: no shuffling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shuffle {
    /// Seed of the shuffle stream (use a different seed per epoch, e.g. `seed + epoch`).
    pub seed: u64,
    /// Rows held in memory for mixing.
    pub buffer_rows: usize,
}

/// A seeded shuffle buffer (see the module doc).
#[derive(Debug, Clone)]
pub struct ShuffleBuffer<T> {
    rng: Rng,
    capacity: usize,
    items: Vec<T>,
}

impl<T> ShuffleBuffer<T> {
    /// An empty buffer for `shuffle`.
    pub fn new(shuffle: Shuffle) -> Self {
        let capacity = shuffle.buffer_rows.max(1);
        Self { rng: Rng::for_name(shuffle.seed, "shuffle"), capacity, items: Vec::with_capacity(capacity.min(1 << 20)) }
    }

    /// Adds `item`; once the buffer is full, returns a uniformly drawn buffered item in exchange.
    pub fn push(&mut self, item: T) -> Option<T> {
        if self.items.len() < self.capacity {
            self.items.push(item);
            return None;
        }
        let j = self.rng.below(self.items.len() as u64) as usize;
        Some(std::mem::replace(&mut self.items[j], item))
    }

    /// Removes and returns a uniformly drawn buffered item (for draining at the end of the stream).
    pub fn pop(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        let j = self.rng.below(self.items.len() as u64) as usize;
        Some(self.items.swap_remove(j))
    }

    /// Items buffered now.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, buffer_rows: usize, n: u32) -> Vec<u32> {
        let mut buf = ShuffleBuffer::new(Shuffle { seed, buffer_rows });
        let mut out: Vec<u32> = (0..n).filter_map(|i| buf.push(i)).collect();
        out.extend(std::iter::from_fn(|| buf.pop()));
        out
    }

    #[test]
    fn every_item_once_and_seeded() {
        for buffer_rows in [0, 1, 7, 100, 1000] {
            let out = run(3, buffer_rows, 100);
            let mut sorted = out.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..100).collect::<Vec<_>>());
            assert_eq!(out, run(3, buffer_rows, 100));
        }
        assert_eq!(run(3, 1, 50), (0..50).collect::<Vec<_>>());
        assert_ne!(run(3, 100, 100), run(4, 100, 100));
    }
}
