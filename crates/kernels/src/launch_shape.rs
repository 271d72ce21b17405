//! The grid and block sizes of rankstack's CUDA kernels (`cuda/*.cu`), in one place for the CUDA
//! launches and for the kernels' host emulation in the tests (`cuda_on_host`): a grid-stride
//! kernel's order of sums, and so its bits, depends on them.

/// A one-dimensional launch: `blocks` blocks of `threads` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LaunchShape {
    pub(crate) blocks: u32,
    pub(crate) threads: u32,
}

/// A kernel that gives each of `rows` rows a block and spreads a row's `width` columns over the
/// block's threads: a warp's multiple, at most 256 (a wider row loops).
pub(crate) fn one_block_per_row(rows: usize, width: usize) -> LaunchShape {
    let threads = width.div_ceil(32).clamp(1, 8) as u32 * 32;
    LaunchShape { blocks: rows as u32, threads }
}

/// The packed attention (`cuda/packed_attention.cu`): a block per (sequence, head), its threads
/// over the sequence's query rows: a warp's multiple, at most 128 (a longer sequence loops).
pub(crate) fn one_block_per_sequence_head(blocks: usize, longest: usize) -> LaunchShape {
    LaunchShape { blocks: blocks as u32, threads: longest.div_ceil(32).clamp(1, 4) as u32 * 32 }
}

/// A grid-stride loop over `count` elements: 256 threads per block, at most 2¹⁶ blocks (a thread
/// then handles every `blocks · 256`-th element).
pub(crate) fn grid_stride(count: usize) -> LaunchShape {
    LaunchShape { blocks: count.div_ceil(256).clamp(1, 1 << 16) as u32, threads: 256 }
}

#[cfg(feature = "cuda")]
impl LaunchShape {
    /// The shape as cudarc's launch configuration (no dynamic shared memory).
    pub(crate) fn config(self) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}
