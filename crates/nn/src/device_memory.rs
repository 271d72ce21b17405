//! How much memory a device has, and the peak that this process's tensors used on it.
//!
//! The memory discipline of the paper ("optimized for 60% GPU memory utilization") needs two
//! figures: the device's capacity, to pick a batch that fits ([`DeviceMemory::total`]), and the
//! measured peak, to check the cost planner against reality ([`peak_tensor_bytes`]).
//!
//! - **CUDA**: capacity and free bytes from the driver (`cuMemGetInfo`). candle allocates every
//!   tensor with `cuMemAllocAsync` from the device's default memory pool, whose
//!   `CU_MEMPOOL_ATTR_USED_MEM_HIGH` attribute is the high-water mark of the bytes handed out to
//!   tensors: that is the peak reported here. It excludes the CUDA context and cuBLAS's workspace,
//!   which the planner does not model either.
//! - **CPU**: capacity and free bytes are `MemTotal` and `MemAvailable` of `/proc/meminfo`. The
//!   peak is the peak of live heap bytes where the program counts them
//!   ([`CountingAllocator`] as its global allocator, as
//!   `gpu_bench` does): the tensors' own peak, resettable like a GPU's. Otherwise it is the
//!   process's peak resident memory (`VmHWM` of `/proc/self/status`), which also counts the
//!   program itself and cannot be reset.

use candle_core::Device;
use rankstack_kernels::cpu::heap_count::{heap_bytes, reset_heap_peak};

/// The counting global allocator that makes the CPU's figures the tensors' own (re-exported from
/// the kernels, where all `unsafe` code lives).
pub use rankstack_kernels::cpu::heap_count::CountingAllocator;
#[cfg(feature = "cuda")]
use rankstack_kernels::cuda::memory_pool;

use crate::{Error, Result};

/// A device's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Capacity.
    pub total: u64,
    /// Not in use by anyone now (other processes included).
    pub free: u64,
}

/// The capacity and free memory of `device`.
pub fn device_memory(device: &Device) -> Result<DeviceMemory> {
    match device {
        Device::Cpu => {
            let text = std::fs::read_to_string("/proc/meminfo")
                .map_err(Error::io_at(std::path::Path::new("/proc/meminfo")))?;
            let total = meminfo_bytes(&text, "MemTotal:");
            let free = meminfo_bytes(&text, "MemAvailable:");
            match (total, free) {
                (Some(total), Some(free)) => Ok(DeviceMemory { total, free }),
                _ => Err(Error::input("device", "memory", "/proc/meminfo has no MemTotal/MemAvailable")),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (total, free) = memory_pool::device_capacity(d).map_err(cuda_error)?;
            Ok(DeviceMemory { total, free })
        }
        #[allow(unreachable_patterns)]
        other => Err(Error::input("device", "memory", format!("memory figures are not available for {other:?}"))),
    }
}

/// The peak bytes this process's tensors have used on `device` since the start or the last
/// [`reset_peak`] (on the CPU: the peak of live heap bytes where the program counts them, else the
/// peak resident memory of the whole process, which cannot be reset).
pub fn peak_tensor_bytes(device: &Device) -> Result<u64> {
    match device {
        Device::Cpu => {
            if let Some(counts) = heap_bytes() {
                return Ok(counts.peak as u64);
            }
            let text = std::fs::read_to_string("/proc/self/status")
                .map_err(Error::io_at(std::path::Path::new("/proc/self/status")))?;
            meminfo_bytes(&text, "VmHWM:")
                .ok_or_else(|| Error::input("device", "memory", "/proc/self/status has no VmHWM"))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => memory_pool::peak_bytes(d).map_err(cuda_error),
        #[allow(unreachable_patterns)]
        other => Err(Error::input("device", "memory", format!("memory figures are not available for {other:?}"))),
    }
}

/// Starts a new peak measurement for [`peak_tensor_bytes`] (on the CPU only where the program
/// counts its heap).
pub fn reset_peak(device: &Device) -> Result<()> {
    match device {
        Device::Cpu => {
            reset_heap_peak();
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => memory_pool::reset_peak(d).map_err(cuda_error),
        #[allow(unreachable_patterns)]
        _ => Ok(()),
    }
}

/// The bytes this process's tensors hold on `device` now, where that is known: on CUDA the
/// default pool's bytes in use, on the CPU the live heap bytes where the program counts them
/// (`None` otherwise).
pub fn tensor_bytes_in_use(device: &Device) -> Result<Option<u64>> {
    match device {
        Device::Cpu => Ok(heap_bytes().map(|c| c.live as u64)),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => memory_pool::used_bytes(d).map(Some).map_err(cuda_error),
        #[allow(unreachable_patterns)]
        _ => Ok(None),
    }
}

/// `name` of a `/proc` status file (`"MemTotal:   1024 kB"`), in bytes.
fn meminfo_bytes(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(feature = "cuda")]
fn cuda_error(e: candle_core::Error) -> Error {
    Error::input("device", "memory", e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_reports_its_memory_and_a_peak() {
        let m = device_memory(&Device::Cpu).unwrap();
        assert!(m.total > 0 && m.free <= m.total, "{m:?}");
        assert!(peak_tensor_bytes(&Device::Cpu).unwrap() > 0);
        reset_peak(&Device::Cpu).unwrap();
    }

    #[test]
    fn proc_lines_are_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal:"), Some(24_576_000 * 1024));
        assert_eq!(meminfo_bytes(text, "MemAvailable:"), Some(1_024_000));
        assert_eq!(meminfo_bytes(text, "VmHWM:"), None);
        assert_eq!(meminfo_bytes("VmHWM: x kB", "VmHWM:"), None);
    }
}
