//! The CUDA side of the kernels: what needs the driver API directly (candle's own CUDA ops cover
//! the arithmetic; the layers compose them).
//!
//! - [`memory_pool`]: the high-water mark of the default memory pool candle allocates from.
//! - [`one_block_per_row`]: the launch shape of the row kernels (`cuda/*.cu`).

pub mod memory_pool;

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

/// The launch shape of a kernel that gives each of `rows` rows a block and spreads a row's
/// `width` columns over the block's threads: a warp's multiple, at most 256 (a wider row loops).
pub fn one_block_per_row(rows: usize, width: usize) -> LaunchConfig {
    let threads = width.div_ceil(32).clamp(1, 8) as u32 * 32;
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
