//! Linear layers: the workspace's default initialisation, and packed weights for serving.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::recompute::with_backward;
use crate::Activation;

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::cpu::linear as fused_linear;
use rankstack_kernels::cpu::packed_matmul::{packed_kernel_available, PackedWeight, WeightPrecision};
use rankstack_kernels::device_bias_add::{add_bias_in_place, add_bias_relu_in_place};

/// `y = x Wᵀ + b` with PyTorch-layout parameters `weight` `[out, in]` and `bias` `[out]`.
///
/// As built, it holds its weight and bias tensors. On the CPU with f32 operands and AVX-512 the
/// product is one differentiable op on the crate's packed kernel (`fused_linear`: forward and a
/// backward pass that forms `∂W` directly in its layout; the same values as candle's product up
/// to f32 summation order); elsewhere, and for products of fewer than 16 rows (where candle's
/// matrix-vector path is faster), it is `candle_nn::Linear`; in training on the graph a GPU runs
/// (a GPU, or the CPU with its kernels off) it is one graph node that keeps neither the product
/// nor, with [`Linear::forward_activated`], the pre-activation, nor under autocast the rounded
/// operands; in scoring on that graph (no input in a graph) the bias goes into the product in
/// place ([`add_bias_in_place`]: the same bits, one full-size write less). A serving model can
/// [`Linear::pack`] its weight once into a [`PackedWeight`]: f32
/// (no per-call repacking, bias added in the kernel) or bf16 (half the memory and twice the
/// multiply-add rate on CPUs with AVX512-BF16). A packed layer takes f32 inputs on the CPU and its
/// output carries no gradient.
///
/// ```
/// # use candle_core::{Device, Module, Tensor};
/// use rankstack_nn::{packed_matmul::WeightPrecision, Linear};
/// let w = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
/// let mut layer = Linear::new(w, Some(Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?));
/// let x = Tensor::new(&[[1f32, 1.]], &Device::Cpu)?;
/// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, vec![vec![3.5, 6.5]]);
/// layer.pack(WeightPrecision::Bf16)?;
/// assert!(layer.weight().is_none() && layer.packed().is_some());
/// assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, vec![vec![3.5, 6.5]]); // exact in bf16
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Linear {
    inner: Inner,
    /// Autocast: the dtype the product runs in when it differs from the input's (see
    /// [`Linear::set_autocast`]).
    autocast: Option<DType>,
}

#[derive(Debug, Clone)]
enum Inner {
    /// The parameter tensors (candle's layer holds them and runs off the fused path).
    Tensor(candle_nn::Linear),
    Packed {
        weight: Arc<PackedWeight>,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// A layer from `weight` `[out, in]` and an optional `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: Inner::Tensor(candle_nn::Linear::new(weight, bias)), autocast: None }
    }

    /// Autocast, as PyTorch's `torch.autocast`: with `Some(dtype)` the product `x Wᵀ` runs in
    /// `dtype` (input and weight rounded to it, the result widened back to the input's dtype)
    /// and the bias is added in the input's dtype; gradients flow through the casts to the
    /// full-precision weight (the master copy). For bf16 training on a GPU; `None` turns it off.
    pub fn set_autocast(&mut self, dtype: Option<DType>) {
        self.autocast = dtype;
    }

    /// The autocast dtype ([`Linear::set_autocast`]), if any.
    pub fn autocast(&self) -> Option<DType> {
        self.autocast
    }

    /// The weight tensor, or `None` once packed.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.inner {
            Inner::Tensor(l) => Some(l.weight()),
            Inner::Packed { .. } => None,
        }
    }

    /// The packed weight, if [`Linear::pack`] packed it.
    pub fn packed(&self) -> Option<&PackedWeight> {
        match &self.inner {
            Inner::Tensor(_) => None,
            Inner::Packed { weight, .. } => Some(weight),
        }
    }

    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        match &self.inner {
            Inner::Tensor(l) => l.bias(),
            Inner::Packed { bias, .. } => bias.as_ref(),
        }
    }

    /// Number of outputs.
    pub fn out_dim(&self) -> usize {
        match &self.inner {
            Inner::Tensor(l) => l.weight().dims().first().copied().unwrap_or(0),
            Inner::Packed { weight, .. } => weight.out_dim(),
        }
    }

    /// Number of inputs.
    pub fn in_dim(&self) -> usize {
        match &self.inner {
            Inner::Tensor(l) => l.weight().dims().last().copied().unwrap_or(0),
            Inner::Packed { weight, .. } => weight.in_dim(),
        }
    }

    /// Packs the weight for serving (see [`PackedWeight`]) and drops the tensor; returns whether
    /// it packed. Only an f32 weight on the CPU is packed (the packed product takes f32
    /// activations). f32 packs only where its kernel runs (elsewhere the tensor path is faster);
    /// bf16 packs wherever asked (without AVX512-BF16 the product then takes the slower widening
    /// path, see [`packed_kernel_available`]). The layer's output carries no gradient afterwards.
    /// Packing a packed layer again is a no-op.
    ///
    /// On a GPU there is no packed kernel: [`WeightPrecision::Bf16`] converts the weight to a bf16
    /// tensor once (a frozen serving weight), and the product then runs in bf16 with f32 inputs
    /// rounded to bf16 and the output widened back (cuBLAS accumulates in f32), the bias added in
    /// f32; [`WeightPrecision::F32`] leaves the layer as it is.
    pub fn pack(&mut self, precision: WeightPrecision) -> Result<bool> {
        let Inner::Tensor(layer) = &self.inner else { return Ok(false) };
        let w = layer.weight();
        if !w.device().is_cpu() && w.dtype() == DType::F32 && precision == WeightPrecision::Bf16 {
            let weight = w.detach().to_dtype(DType::BF16)?;
            let bias = layer.bias().map(Tensor::detach);
            self.inner = Inner::Tensor(candle_nn::Linear::new(weight, bias));
            return Ok(true);
        }
        if !w.device().is_cpu() || w.dtype() != candle_core::DType::F32 {
            return Ok(false);
        }
        if precision == WeightPrecision::F32 && !packed_kernel_available(WeightPrecision::F32) {
            return Ok(false);
        }
        let weight = Arc::new(PackedWeight::pack(w, precision)?);
        let bias = match layer.bias() {
            Some(b) => Some(b.detach().to_dtype(candle_core::DType::F32)?),
            None => None,
        };
        self.inner = Inner::Packed { weight, bias };
        Ok(true)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((layer, cast)) = self.device_graph_product(x) {
            return device_graph_node(x, layer.weight(), layer.bias(), false, cast);
        }
        if let Some((y, bias)) = self.plain_device_product(x)? {
            return match bias {
                Some(b) => add_bias(y, b, false),
                None => Ok(y),
            };
        }
        match &self.inner {
            Inner::Tensor(layer)
                if self.autocast.is_some_and(|d| d != x.dtype())
                    || (layer.weight().dtype() == DType::BF16 && x.dtype() != DType::BF16) =>
            {
                // Autocast, or a weight stored in a lower precision than the input (a GPU serving
                // model in bf16): the product in the lower dtype, everything around it in x's.
                let dtype = self.autocast.unwrap_or(layer.weight().dtype());
                let product = candle_nn::Linear::new(layer.weight().to_dtype(dtype)?, None);
                let y = product.forward(&x.to_dtype(dtype)?.contiguous()?)?.to_dtype(x.dtype())?;
                match layer.bias() {
                    // The product widened back is a tensor of its own (x's dtype differs).
                    Some(b) => add_bias(y, &b.to_dtype(x.dtype())?, false),
                    None => Ok(y),
                }
            }
            Inner::Tensor(layer) if fused_linear::applies(x, layer.weight()) => {
                fused_linear::linear(x, layer.weight(), layer.bias())
            }
            // candle 0.11's CPU product folds a batch-broadcast weight into one GEMM assuming the
            // input's rows are adjacent, which gives wrong values for a transposed [b, l, d] view
            // (huggingface/candle#3744, fix proposed in #3758), so it gets a contiguous input (a
            // no-op when it already is).
            Inner::Tensor(layer) => layer.forward(&x.contiguous()?),
            Inner::Packed { weight, bias } => weight.matmul_t(x, bias.as_ref()),
        }
    }
}

impl Linear {
    /// `activation(x Wᵀ + b)`. In training on a GPU's graph (see [`Linear`]) a ReLU is part of
    /// the layer's one graph node, so that neither the product nor the pre-activation is kept for
    /// the backward pass; its gradient then follows PyTorch's rule (none where the output is 0,
    /// so none at a pre-activation of exactly 0, where candle's `relu` lets it through).
    /// Elsewhere it is `activation.apply(self.forward(x))`.
    pub fn forward_activated(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        match self.device_graph_product(x) {
            Some((layer, cast)) if activation == Activation::Relu => {
                device_graph_node(x, layer.weight(), layer.bias(), true, cast)
            }
            Some(_) => activation.apply(&self.forward(x)?),
            // In scoring on a GPU's graph the ReLU goes into the bias's in-place pass.
            None if activation == Activation::Relu => match self.plain_device_product(x)? {
                Some((y, Some(b))) => add_bias(y, b, true),
                Some((y, None)) => y.relu(),
                None => activation.apply(&self.forward(x)?),
            },
            None => activation.apply(&self.forward(x)?),
        }
    }

    /// Off the CPU kernels, a 2-D input through a layer of plain tensors in its dtype (no
    /// autocast, no bf16 serving weight): candle's own product `x Wᵀ`, a new tensor, and the bias
    /// still to add. `None` where the layer computes otherwise.
    fn plain_device_product(&self, x: &Tensor) -> Result<Option<(Tensor, Option<&Tensor>)>> {
        let Inner::Tensor(layer) = &self.inner else { return Ok(None) };
        let plain = self.autocast.is_none_or(|d| d == x.dtype()) && layer.weight().dtype() == x.dtype();
        if !plain || x.rank() != 2 || kernels_run_on(x.device()) {
            return Ok(None);
        }
        Ok(Some((x.contiguous()?.matmul(&layer.weight().t()?)?, layer.bias())))
    }

    /// Where `x · W` is a training product on the graph a GPU runs ([`trains_on_device_graph`])
    /// with input, weight and bias in one dtype (the f32 master weights under autocast): the
    /// layer, and the dtype its products round to ([`Linear::set_autocast`]; `None`: the input's
    /// own). `None` where the product is not such a node.
    fn device_graph_product(&self, x: &Tensor) -> Option<(&candle_nn::Linear, Option<DType>)> {
        let Inner::Tensor(layer) = &self.inner else { return None };
        let one_dtype = layer.weight().dtype() == x.dtype() && layer.bias().is_none_or(|b| b.dtype() == x.dtype());
        (one_dtype && trains_on_device_graph(x, layer)).then(|| (layer, self.autocast.filter(|d| *d != x.dtype())))
    }
}

/// `y + b` (then candle's ReLU with `relu`) for a product `y` `[rows, out]` that is a new tensor
/// no one else holds: off the CPU kernels and outside any graph (scoring) the bias (and the ReLU)
/// go into `y` in place ([`add_bias_in_place`], [`add_bias_relu_in_place`]: one or two full-size
/// writes and allocations less per layer, the same bits), elsewhere candle's `broadcast_add` (and
/// `relu`).
fn add_bias(y: Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
    let in_place = !kernels_run_on(y.device())
        && y.rank() == 2
        && y.is_contiguous()
        && b.dtype() == y.dtype()
        && matches!(y.dtype(), DType::F32 | DType::F64)
        && !y.track_op()
        && !b.track_op();
    match (in_place, relu) {
        (true, false) => add_bias_in_place(&y, b).map(|()| y),
        (true, true) => add_bias_relu_in_place(&y, b).map(|()| y),
        (false, false) => y.broadcast_add(b),
        (false, true) => y.broadcast_add(b)?.relu(),
    }
}

/// Whether `x · layer` is a training step's product on the graph a GPU runs (a GPU, or the CPU
/// with its kernels off): an input or the weight takes part in a graph.
fn trains_on_device_graph(x: &Tensor, layer: &candle_nn::Linear) -> bool {
    !kernels_run_on(x.device()) && (x.track_op() || layer.weight().track_op())
}

/// `x Wᵀ + b` (then ReLU where `relu`) as one graph node with its backward pass written out
/// ([`with_backward`]):
///
/// ```text
/// y = x Wᵀ + b,  ∂x = ∂y W,  ∂W = ∂yᵀ x,  ∂b = Σ_rows ∂y      (∂y ⊙ [y > 0] first, for ReLU)
/// ```
///
/// With `cast` (autocast, [`Linear::set_autocast`]) the three products run on operands rounded to
/// that dtype and their results return to the input's, as the casts around a product of candle's
/// own graph (and PyTorch's autocast) do: `y = cast(x) cast(W)ᵀ + b`, `∂x = cast(∂y) cast(W)`,
/// `∂W = cast(∂y)ᵀ cast(x)`, `∂b = Σ_rows ∂y` in the input's dtype. Nothing rounded is kept: the
/// backward pass rounds `x` and `W` again.
///
/// candle's own graph of `matmul` then `broadcast_add` keeps the product `x Wᵀ` (an input of the
/// addition) until the backward pass, though no gradient needs its values; with a ReLU the sum
/// too. On a GPU these were the largest tensors a training step kept (MaskNet's `[B, 4288]`
/// aggregation, TransAct's `[R, 3d]` in-projection). The node keeps its inputs and its output only.
/// `x` `[..., in]` runs as one `[rows, in]` product.
fn device_graph_node(x: &Tensor, w: &Tensor, b: Option<&Tensor>, relu: bool, cast: Option<DType>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    fused_linear::expect_input_width(x, in_dim)?;
    let lead = &x.dims()[..x.rank() - 1];
    let rows = lead.iter().product::<usize>();
    let out_shape: Vec<usize> = lead.iter().copied().chain([out_dim]).collect();
    let x2 = x.contiguous()?.reshape((rows, in_dim))?;
    let inputs: Vec<&Tensor> = [Some(&x2), Some(w), b].into_iter().flatten().collect();
    let has_bias = b.is_some();
    let y = with_backward(
        &inputs,
        move |t| {
            let y = matmul_t_autocast(&t[0], &t[1], cast)?;
            let y = if has_bias { y.broadcast_add(&t[2])? } else { y };
            if relu {
                y.relu()
            } else {
                Ok(y)
            }
        },
        move |t, y, grad| {
            let grad = if relu { grad.mul(&y.gt(0.0)?.to_dtype(grad.dtype())?)? } else { grad.clone() };
            let g = rounded(&grad, cast)?;
            let dx = g.matmul(&rounded(&t[1], cast)?)?.to_dtype(t[0].dtype())?;
            let dw = g.t()?.matmul(&rounded(&t[0], cast)?)?.to_dtype(t[1].dtype())?;
            let db = if has_bias { Some(grad.sum(0)?) } else { None };
            Ok([Some(dx), Some(dw)].into_iter().chain(has_bias.then_some(db)).collect())
        },
    )?;
    y.reshape(out_shape)
}

/// `x Wᵀ` for `w` `[out, in]`, under autocast (`cast`: [`Linear::set_autocast`]) on operands
/// rounded to that dtype, the result in `x`'s dtype: the product of a training node on the GPU's
/// graph (this layer's, and the projections of TransAct's attention node).
pub fn matmul_t_autocast(x: &Tensor, w: &Tensor, cast: Option<DType>) -> Result<Tensor> {
    rounded(x, cast)?.matmul(&rounded(w, cast)?.t()?)?.to_dtype(x.dtype())
}

/// `t` rounded to `cast` where there is one (a product's operand under autocast).
fn rounded(t: &Tensor, cast: Option<DType>) -> Result<Tensor> {
    match cast {
        Some(dtype) => t.to_dtype(dtype),
        None => Ok(t.clone()),
    }
}

/// A module built (in part) from [`Linear`] layers, so that a serving model can pack all of them
/// at once with [`pack_linear_layers`].
pub trait LinearLayers {
    /// Every linear layer of the module (including those of its sub-modules).
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear>;
}

impl LinearLayers for Linear {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        vec![self]
    }
}

impl<T: LinearLayers> LinearLayers for Option<T> {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        self.iter_mut().flat_map(T::linear_layers_mut).collect()
    }
}

impl<T: LinearLayers> LinearLayers for Vec<T> {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        self.iter_mut().flat_map(T::linear_layers_mut).collect()
    }
}

/// Packs every linear layer of `module` (see [`Linear::pack`]); returns how many were packed.
pub fn pack_linear_layers(module: &mut impl LinearLayers, precision: WeightPrecision) -> Result<usize> {
    let mut packed = 0;
    for layer in module.linear_layers_mut() {
        packed += usize::from(layer.pack(precision)?);
    }
    Ok(packed)
}

/// Sets [`Linear::set_autocast`] on every linear layer of `module`; returns how many.
pub fn autocast_linear_layers(module: &mut impl LinearLayers, dtype: Option<DType>) -> usize {
    let layers = module.linear_layers_mut();
    let n = layers.len();
    for layer in layers {
        layer.set_autocast(dtype);
    }
    n
}

/// A `y = x Wᵀ + b` layer with PyTorch-layout parameters `weight` `[out, in]` and `bias` `[out]`,
/// Xavier-normal weight and zero bias.
pub fn linear_xavier(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", crate::init::xavier_normal(in_dim, out_dim))?;
    let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
    Ok(Linear::new(weight, bias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Scoring on the GPU's graph (the CPU with its kernels off): the bias (and a ReLU) go into
    /// the product in place, with `candle_nn::Linear`'s (and candle's `relu`'s) bits; with a weight in a graph the layer composes, and
    /// the gradient reaches the weight and the bias.
    #[test]
    fn scoring_off_the_cpu_kernels_adds_the_bias_in_place_with_the_same_bits() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        let dev = Device::Cpu;
        let x = Tensor::from_vec((0..40 * 24).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect(), (40, 24), &dev)
            .unwrap();
        let w = Tensor::from_vec((0..24 * 9).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect(), (9, 24), &dev)
            .unwrap();
        let b = Tensor::from_vec((0..9).map(|i| i as f32 * 0.3 - 1.0).collect(), 9, &dev).unwrap();
        let want = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
        let layer = Linear::new(w.clone(), Some(b.clone()));
        let got = with_isa(Isa::Candle, || layer.forward(&x).unwrap());
        let bits = crate::testing::value_bits;
        assert_eq!(bits(&got), bits(&want));
        let activated = with_isa(Isa::Candle, || layer.forward_activated(&x, Activation::Relu).unwrap());
        assert_eq!(bits(&activated), bits(&want.relu().unwrap()), "the ReLU in the same pass");
        let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let trained = Linear::new(wv.as_tensor().clone(), Some(bv.as_tensor().clone()));
        let y = with_isa(Isa::Candle, || trained.forward(&x).unwrap());
        assert_eq!(bits(&y), bits(&want));
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(wv.as_tensor()).is_some() && grads.get(bv.as_tensor()).is_some());
    }

    /// Autocast to bf16: the product of the bf16-rounded operands (exact here: small integers),
    /// the bias added in f32, the output in f32, and gradients reaching the f32 weight and bias.
    #[test]
    fn autocast_multiplies_in_bf16_and_trains_the_f32_weight() {
        let dev = candle_core::Device::Cpu;
        let w = Var::new(&[[1f32, 2., 3.], [-1., 0.5, 4.]], &dev).unwrap();
        let b = Var::new(&[0.25f32, -0.125], &dev).unwrap();
        let mut layer = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
        layer.set_autocast(Some(DType::BF16));
        let x = Tensor::new(&[[1f32, 1., 1.], [2., 0., -1.], [0.5, 0.25, 2.]], &dev).unwrap();
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![6.25, 3.375], vec![-0.75, -6.125], vec![7.25, 7.5]]);
        // A value bf16 cannot hold is rounded before the product: 1 + 2⁻¹⁰ → 1.
        let fine = Tensor::new(&[[1.0f32 + 1.0 / 1024.0, 0., 0.]], &dev).unwrap();
        assert_eq!(layer.forward(&fine).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.25, -1.125]]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        // ∂Σy/∂W = column sums of x for every output row; ∂Σy/∂b = number of rows.
        assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), vec![vec![3.5, 1.25, 2.0]; 2]);
        assert_eq!(grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![3.0, 3.0]);
        layer.set_autocast(None);
        assert_eq!(layer.forward(&fine).unwrap().to_vec2::<f32>().unwrap()[0][0], 0.25 + 1.0 + 1.0 / 1024.0);
    }

    /// Off the fused path (here: f64) the layer is candle's, bit for bit; on it (f32 with the
    /// AVX-512 kernel), the same values and gradients up to f32 summation order.
    #[test]
    fn tensor_path_matches_candle_linear_in_value_and_gradient() {
        for dtype in [DType::F64, DType::F32] {
            for dims in [vec![5, 7], vec![2, 5, 7], vec![2, 3, 5, 7]] {
                let var = |seed, dims: &[usize]| {
                    Var::from_tensor(&crate::testing::seeded_randn(seed, dims, DType::F32).to_dtype(dtype).unwrap())
                        .unwrap()
                };
                let (x, w, b) = (var(1, &dims), var(2, &[4, 7]), var(3, &[4]));
                let ours = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
                let theirs = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
                let (y1, y2) = (ours.forward(x.as_tensor()).unwrap(), theirs.forward(x.as_tensor()).unwrap());
                let flat =
                    |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let close = |a: &Tensor, b: &Tensor| {
                    let (a, b) = (flat(a), flat(b));
                    if dtype == DType::F64 {
                        assert_eq!(a, b);
                    } else {
                        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
                        let err = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                        assert!(err <= 1e-6 * scale, "{dims:?}: {err} against {scale}");
                    }
                };
                close(&y1, &y2);
                let g1 = y1.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &w, &b] {
                    close(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                }
            }
        }
    }

    /// On the GPU's graph (here the CPU with its kernels off) a training product is one node
    /// (`device_graph_node`): the values and gradients of candle's own graph (product, bias, ReLU)
    /// for inputs of rank 2 to 4, with and without bias, and ReLU's gradient by PyTorch's rule at
    /// a pre-activation of exactly 0.
    #[test]
    fn the_device_graph_node_matches_candles_graph() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let (a, b) = (flat(a), flat(b));
            let scale = b.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
            let err = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(a.len() == b.len() && err <= 1e-14 * scale, "{what}: {err} against {scale}");
        };
        for dims in [vec![5, 7], vec![2, 5, 7], vec![2, 3, 5, 7]] {
            for bias in [true, false] {
                for relu in [false, true] {
                    let what = format!("{dims:?}, bias {bias}, relu {relu}");
                    let var = |seed, dims: &[usize]| {
                        Var::from_tensor(&crate::testing::seeded_randn(seed, dims, DType::F64)).unwrap()
                    };
                    let (x, w, b) = (var(1, &dims), var(2, &[4, 7]), var(3, &[4]));
                    let b = bias.then_some(b);
                    let layer = Linear::new(w.as_tensor().clone(), b.as_ref().map(|b| b.as_tensor().clone()));
                    let activation = if relu { Activation::Relu } else { Activation::Identity };
                    let node = with_isa(Isa::Candle, || layer.forward_activated(x.as_tensor(), activation)).unwrap();
                    let theirs =
                        candle_nn::Linear::new(w.as_tensor().clone(), b.as_ref().map(|b| b.as_tensor().clone()));
                    let plain = activation.apply(&theirs.forward(x.as_tensor()).unwrap()).unwrap();
                    assert_eq!(node.dims(), plain.dims(), "{what}");
                    close(&node, &plain, &what);
                    let g1 = node.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    for v in [Some(&x), Some(&w), b.as_ref()].into_iter().flatten() {
                        close(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap(), &what);
                    }
                }
            }
        }
        // x Wᵀ = [0, 2]: no gradient through the 0 (PyTorch's `relu` backward), one through the 2.
        let x = Var::new(&[[1f64, 1.]], &Device::Cpu).unwrap();
        let layer = Linear::new(Tensor::new(&[[1f64, -1.], [1., 1.]], &Device::Cpu).unwrap(), None);
        let y = with_isa(Isa::Candle, || layer.forward_activated(x.as_tensor(), Activation::Relu)).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![0., 2.]]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap(), vec![vec![1., 1.]]);
    }

    /// Under autocast to bf16, a training product on the GPU's graph is one node too: the values
    /// of candle's own graph of casts and products (the layer's path without the node) exactly,
    /// and its gradients to within one bf16 rounding (the weight's gradient is formed as
    /// `cast(∂y)ᵀ cast(x)` rather than as the transpose of `cast(x)ᵀ cast(∂y)`), for inputs of rank
    /// 2 and 3, with and without bias and ReLU. The node keeps no rounded copy: its graph holds
    /// `x`, `W`, `b` and its output only.
    #[test]
    fn the_autocast_device_graph_node_matches_candles_autocast_graph() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for dims in [vec![33, 24], vec![3, 11, 24]] {
            for bias in [true, false] {
                for relu in [false, true] {
                    let what = format!("{dims:?}, bias {bias}, relu {relu}");
                    let var = |seed, dims: &[usize]| {
                        Var::from_tensor(&crate::testing::seeded_randn(seed, dims, DType::F32)).unwrap()
                    };
                    let (x, w, b) = (var(1, &dims), var(2, &[20, 24]), var(3, &[20]));
                    let b = bias.then_some(b);
                    let mut layer = Linear::new(w.as_tensor().clone(), b.as_ref().map(|b| b.as_tensor().clone()));
                    layer.set_autocast(Some(DType::BF16));
                    let activation = if relu { Activation::Relu } else { Activation::Identity };
                    let node = with_isa(Isa::Candle, || layer.forward_activated(x.as_tensor(), activation)).unwrap();
                    // candle's graph: what the layer builds where no node applies (no tracked input).
                    let plain = {
                        let w16 = w.as_tensor().to_dtype(DType::BF16).unwrap();
                        let x16 = x.as_tensor().to_dtype(DType::BF16).unwrap();
                        let y = candle_nn::Linear::new(w16, None).forward(&x16).unwrap().to_dtype(DType::F32).unwrap();
                        let y = match &b {
                            Some(b) => y.broadcast_add(b.as_tensor()).unwrap(),
                            None => y,
                        };
                        activation.apply(&y).unwrap()
                    };
                    assert_eq!((node.dims(), node.dtype()), (plain.dims(), DType::F32), "{what}");
                    assert_eq!(flat(&node), flat(&plain), "{what}");
                    let g1 = node.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    let g2 = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                    for v in [Some(&x), Some(&w), b.as_ref()].into_iter().flatten() {
                        let (a, e) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                        assert_eq!(a.dtype(), DType::F32, "{what}");
                        let (a, e) = (flat(a), flat(e));
                        let scale = e.iter().fold(0f64, |m, v| m.max(v.abs()));
                        let err = a.iter().zip(&e).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
                        assert!(a.len() == e.len() && err <= scale / 128.0, "{what}: {err} against {scale}");
                    }
                }
            }
        }
    }

    /// A transposed view as input gives the product of its values on both paths (candle 0.11's
    /// own layer does not: see `Module for Linear`).
    #[test]
    fn strided_inputs_give_the_product_of_their_values() {
        for dtype in [DType::F64, DType::F32] {
            let w = crate::testing::seeded_randn(1, &[9, 20], dtype);
            let x = crate::testing::seeded_randn(2, &[3, 20, 4], dtype).transpose(1, 2).unwrap();
            let layer = Linear::new(w.clone(), None);
            let want = x.contiguous().unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
            let diff = (layer.forward(&x).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap() < 1e-5, "{dtype:?}");
        }
    }

    #[test]
    fn packing_keeps_the_product_and_reports_what_it_did() {
        let w = crate::testing::seeded_randn(2, &[40, 70], DType::F32);
        let b = crate::testing::seeded_randn(3, &[40], DType::F32);
        let x = crate::testing::seeded_randn(1, &[3, 9, 70], DType::F32);
        let plain = Linear::new(w.clone(), Some(b.clone()));
        let want = plain.forward(&x).unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for (precision, limit) in [(WeightPrecision::F32, 1e-5), (WeightPrecision::Bf16, 0.02)] {
            let mut layer = plain.clone();
            let packed = layer.pack(precision).unwrap();
            assert_eq!(packed, precision == WeightPrecision::Bf16 || packed_kernel_available(precision));
            assert_eq!((layer.in_dim(), layer.out_dim()), (70, 40));
            let y = layer.forward(&x).unwrap();
            let diff = (y - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= limit * scale, "{precision:?}: {diff} against scale {scale}");
            assert!(!layer.pack(precision).unwrap(), "packing twice is a no-op");
        }
        // f64 weights stay unpacked; collections pack every f32 member.
        let mut layers = vec![Linear::new(w.to_dtype(DType::F64).unwrap(), None), plain.clone()];
        assert!(!layers[0].pack(WeightPrecision::F32).unwrap());
        assert_eq!(pack_linear_layers(&mut layers, WeightPrecision::Bf16).unwrap(), 1);
        assert!(layers[0].weight().is_some() && layers[1].packed().is_some());
        let err = layers[1].forward(&x.narrow(2, 0, 69).unwrap()).unwrap_err();
        assert!(err.to_string().contains("[..., 70]"), "{err}");
    }
}
