//! The candle op behind [`crate::distinct_rows`] and [`crate::repeated_rows`]: `y = x[index]`
//! along dim 0 of a 2-D `x` (candle's own `index_select`, on every device), with the backward
//! pass each of them brings.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// `∂x` from `∂y`, for [`RowGatherOp`].
pub(crate) type Backward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `y[i] = x[index[i]]` with a caller-chosen backward pass.
pub(crate) struct RowGatherOp {
    /// The op's name in candle's errors.
    pub name: &'static str,
    /// `[out_rows]` u32, on the device of `x`.
    pub index: Tensor,
    /// `∂x` from `∂y`.
    pub backward: Backward,
}

impl RowGatherOp {
    fn shape(&self, layout: &Layout) -> Result<Shape> {
        let (_, d) = layout.shape().dims2()?;
        Ok(Shape::from((self.index.dim(0)?, d)))
    }
}

impl CustomOp1 for RowGatherOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ids, ids_layout) = self.index.storage_and_layout();
        let Storage::Cpu(ids) = &*ids else { candle_core::bail!("{}: index not on the CPU", self.name) };
        Ok((storage.index_select(ids, layout, ids_layout, 0)?, self.shape(layout)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ids, ids_layout) = self.index.storage_and_layout();
        let Storage::Cuda(ids) = &*ids else { candle_core::bail!("{}: index not on the GPU", self.name) };
        Ok((storage.index_select(ids, layout, ids_layout, 0)?, self.shape(layout)?))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.backward)(grad)?))
    }
}
