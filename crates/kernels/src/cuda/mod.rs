//! The CUDA side of the kernels: what needs the driver API directly (candle's own CUDA ops cover
//! the arithmetic; the layers compose them).
//!
//! - [`memory_pool`]: the high-water mark of the default memory pool candle allocates from.

pub mod memory_pool;
