//! An op's auxiliary tensors read where the op runs: the index maps, bag weights and sequence
//! layouts that a custom op holds beside its inputs (uploaded whole to the inputs' device), as
//! slices on the host ([`on_host`]) or on the GPU (`on_gpu`). One place for the storage lookups,
//! the device check and the error that names the op, which each op's `cpu_fwd` and `cuda_fwd`
//! would otherwise repeat.

use candle_core::{Result, Storage, Tensor, WithDType};

use crate::float::contiguous_storage;

/// Runs `f` with the values of `a` and `b` on the host; an error naming `op` where either is
/// not on the CPU, not of its type, or not contiguous.
pub(crate) fn on_host<A: WithDType, B: WithDType, R>(
    op: &str,
    (a, b): (&Tensor, &Tensor),
    f: impl FnOnce(&[A], &[B]) -> Result<R>,
) -> Result<R> {
    let (storage_a, layout_a) = a.storage_and_layout();
    let (storage_b, layout_b) = b.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*storage_a, &*storage_b) else {
        candle_core::bail!("{op}: its auxiliary tensors are not on the CPU")
    };
    f(
        contiguous_storage(sa, layout_a, format_args!("{op}: auxiliary tensor 1"))?,
        contiguous_storage(sb, layout_b, format_args!("{op}: auxiliary tensor 2"))?,
    )
}

/// Runs `f` with the CUDA buffers of `a` and `b` (views of the elements each covers); an error
/// naming `op` where either is not on the GPU, not of its type, or not contiguous.
#[cfg(feature = "cuda")]
pub(crate) fn on_gpu<A, B, R>(
    op: &str,
    (a, b): (&Tensor, &Tensor),
    f: impl FnOnce(
        &candle_core::cuda_backend::cudarc::driver::CudaView<'_, A>,
        &candle_core::cuda_backend::cudarc::driver::CudaView<'_, B>,
    ) -> Result<R>,
) -> Result<R>
where
    A: candle_core::cuda_backend::CudaDType,
    B: candle_core::cuda_backend::CudaDType,
{
    let (storage_a, layout_a) = a.storage_and_layout();
    let (storage_b, layout_b) = b.storage_and_layout();
    let (Storage::Cuda(sa), Storage::Cuda(sb)) = (&*storage_a, &*storage_b) else {
        candle_core::bail!("{op}: its auxiliary tensors are not on the GPU")
    };
    let covered = |i: usize, layout: &candle_core::Layout| match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => candle_core::bail!("{op}: auxiliary tensor {i} is not contiguous"),
    };
    let (range_a, range_b) = (covered(1, layout_a)?, covered(2, layout_b)?);
    f(&sa.as_cuda_slice::<A>()?.slice(range_a), &sb.as_cuda_slice::<B>()?.slice(range_b))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn reads_both_tensors_and_names_the_op_when_one_is_wrong() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1u32, 2, 3], &dev).unwrap();
        let b = Tensor::new(&[0.5f32, 1.5], &dev).unwrap();
        let sum = on_host("test op", (&a, &b), |a: &[u32], b: &[f32]| {
            Ok(a.iter().sum::<u32>() as f32 + b.iter().sum::<f32>())
        });
        assert_eq!(sum.unwrap(), 8.0);
        // A view starting past the buffer's start reads its own values.
        let tail = a.narrow(0, 1, 2).unwrap();
        assert_eq!(on_host("test op", (&tail, &b), |a: &[u32], _: &[f32]| Ok(a.to_vec())).unwrap(), [2, 3]);
        let err = on_host("test op", (&a, &b), |_: &[u32], _: &[u32]| Ok(())).unwrap_err().to_string();
        assert!(err.contains("test op: auxiliary tensor 2 must be U32, got F32"), "{err}");
        let f64s = b.to_dtype(DType::F64).unwrap();
        let err = on_host("test op", (&f64s, &b), |_: &[f32], _: &[f32]| Ok(())).unwrap_err().to_string();
        assert!(err.contains("test op: auxiliary tensor 1 must be F32, got F64"), "{err}");
    }
}
