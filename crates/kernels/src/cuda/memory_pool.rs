//! The device's default memory pool, which candle's `cuMemAllocAsync` draws every tensor from:
//! its high-water mark is the peak memory this process's tensors used
//! (`rankstack_nn::device_memory::peak_tensor_bytes`).

use candle_core::{CudaDevice, Result};
use cudarc::driver::result::{device, mem_pool};
use cudarc::driver::sys;

fn cuda_error(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA memory pool: {e}"))
}

/// The peak bytes handed out to tensors by the device's default pool since the context was created
/// or [`reset_peak`] last ran (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`).
pub fn peak_bytes(d: &CudaDevice) -> Result<u64> {
    pool_attribute(d, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
}

/// The bytes handed out to tensors by the device's default pool now
/// (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`).
pub fn used_bytes(d: &CudaDevice) -> Result<u64> {
    pool_attribute(d, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, None)
}

/// Starts a new peak measurement for [`peak_bytes`].
pub fn reset_peak(d: &CudaDevice) -> Result<()> {
    pool_attribute(d, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)).map(|_| ())
}

/// The capacity and free memory of the device, in bytes (`cuMemGetInfo`): `(total, free)`.
pub fn device_capacity(d: &CudaDevice) -> Result<(u64, u64)> {
    let (free, total) = d.cuda_stream().context().mem_get_info().map_err(cuda_error)?;
    Ok((total as u64, free as u64))
}

/// Reads (or, with `set`, writes and then reads) a `u64` attribute of the device's default memory
/// pool.
fn pool_attribute(d: &CudaDevice, attr: sys::CUmemPool_attribute, set: Option<u64>) -> Result<u64> {
    let context = d.cuda_stream().context().clone();
    context.bind_to_thread().map_err(cuda_error)?;
    // SAFETY: `cu_device` is the live device of a context this function holds, and the pool is
    // that device's default pool, which lives as long as the context.
    let pool = unsafe { device::get_default_mem_pool(context.cu_device()) }.map_err(cuda_error)?;
    let mut value: u64 = set.unwrap_or(0);
    if set.is_some() {
        // SAFETY: the high-water-mark attributes are `cuuint64_t`, which `value` is, and the
        // driver reads only it; `pool` is live (above).
        unsafe { mem_pool::set_attribute(pool, attr, (&mut value as *mut u64).cast()) }.map_err(cuda_error)?;
    }
    // SAFETY: as above; the driver writes only `value`.
    unsafe { mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast()) }.map_err(cuda_error)?;
    Ok(value)
}
