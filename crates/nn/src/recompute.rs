//! Recomputing a part of the graph in the backward pass instead of keeping its intermediates
//! (activation checkpointing), on any device; and a part with a backward pass of its own
//! ([`with_backward`]).
//!
//! candle keeps every intermediate tensor of a forward pass alive until the backward pass is done:
//! each op's result holds its inputs. For a part whose intermediates are much larger than its
//! inputs and output, such as attention composed of candle operations (its `[B, H, L, L]` scores,
//! exponentials, weights and dropout mask against `[R, d]` inputs), that is most of a training
//! step's memory. [`recompute_in_backward`] runs such a part on detached inputs, so its
//! intermediates are freed as soon as its output exists, and records one graph node in their
//! place; the node's backward pass runs the part again, with gradient tracking, and
//! back-propagates the incoming gradient through it. The values and the gradients are the same
//! bits as the part's own graph would give (the same operations run, in the same order); the price
//! is one more forward computation of the part in the backward pass, and one copy of its output.
//!
//! The part must compute the same function both times: anything random in it (a dropout mask) is
//! drawn once, outside, and captured.
//!
//! ```
//! # use candle_core::{Device, Tensor, Var};
//! use rankstack_nn::recompute::recompute_in_backward;
//! let a = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
//! let b = Var::new(&[4f32, 5., 6.], &Device::Cpu)?;
//! // exp(a) · b, its `exp(a)` not kept for the backward pass.
//! let y = recompute_in_backward(&[a.as_tensor(), b.as_tensor()], |x| x[0].exp()?.mul(&x[1]))?;
//! let grads = y.sum_all()?.backward()?;
//! let da: Vec<f32> = grads.get(a.as_tensor()).unwrap().to_vec1()?;
//! assert_eq!(da, [4. * 1f32.exp(), 5. * 2f32.exp(), 6. * 3f32.exp()]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var};

/// The backward pass of a part: the gradients of its inputs from the inputs and the output (both
/// detached) and the gradient of the output; `None` for an input that gets none.
type Backward = dyn Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// `part(inputs)` (one to three inputs), its intermediates freed at once and recomputed in the
/// backward pass (see the module documentation). Where no input takes part in a graph (inference)
/// it is simply `part(inputs)`.
pub fn recompute_in_backward(
    inputs: &[&Tensor],
    part: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let part = Arc::new(part);
    let again = part.clone();
    with_backward(inputs, move |x| part(x), move |x, _, grad| backprop_through(again.as_ref(), x, grad))
}

/// [`recompute_in_backward`] for a part of one input `x` and any number of parameters (a
/// layer's weights and biases, all of `x`'s dtype): a graph node takes at most three inputs, so
/// the parameters travel as one concatenated vector (a copy, small next to `x`) and reach `part`
/// in their own shapes again; their gradients return through the concatenation.
///
/// ```
/// # use candle_core::{Device, Tensor, Var};
/// use rankstack_nn::recompute::recompute_with_params;
/// let x = Var::new(&[[1f32, 2.]], &Device::Cpu)?;
/// let (w, b, s) = (Var::new(&[[3f32], [4.]], &Device::Cpu)?, Var::new(&[0.5f32], &Device::Cpu)?, Var::new(&[2f32], &Device::Cpu)?);
/// // s ⊙ relu(x w + b), nothing of it kept for the backward pass.
/// let y = recompute_with_params(x.as_tensor(), &[w.as_tensor(), b.as_tensor(), s.as_tensor()], |x, p| {
///     x.matmul(&p[0])?.broadcast_add(&p[1])?.relu()?.broadcast_mul(&p[2])
/// })?;
/// assert_eq!(y.to_vec2::<f32>()?, [[23.0]]);
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec2::<f32>()?, [[2.0], [4.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn recompute_with_params(
    x: &Tensor,
    params: &[&Tensor],
    part: impl Fn(&Tensor, &[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let (layout, packed) = PackedParams::pack(params)?;
    match packed {
        None => recompute_in_backward(&[x], move |t| part(&t[0], &[])),
        Some(packed) => recompute_in_backward(&[x, &packed], move |t| part(&t[0], &layout.unpack(&t[1])?)),
    }
}

/// A layer's parameters as one flat vector, for a graph node (which takes at most three inputs),
/// and the shapes to split it into again. Gradients return to each parameter through the
/// concatenation; a node with a backward pass of its own packs its parameters' gradients the same
/// way ([`PackedParams::pack_gradients`]).
#[derive(Clone)]
pub(crate) struct PackedParams {
    shapes: Vec<Shape>,
}

impl PackedParams {
    /// `params` flattened and concatenated in order (one parameter alone: only flattened, no
    /// copy; `None` without parameters), and the layout to split them again.
    pub(crate) fn pack(params: &[&Tensor]) -> Result<(Self, Option<Tensor>)> {
        let shapes = params.iter().map(|p| p.shape().clone()).collect();
        let flat = params.iter().map(|p| p.flatten_all()).collect::<Result<Vec<_>>>()?;
        Ok((Self { shapes }, Self::join(flat)?))
    }

    /// The parameters of `packed`, in their own shapes and order.
    pub(crate) fn unpack(&self, packed: &Tensor) -> Result<Vec<Tensor>> {
        let mut offset = 0;
        let mut params = Vec::with_capacity(self.shapes.len());
        for shape in &self.shapes {
            params.push(packed.narrow(0, offset, shape.elem_count())?.reshape(shape)?);
            offset += shape.elem_count();
        }
        Ok(params)
    }

    /// The packed vector's gradient from its parameters' gradients, in the same order.
    pub(crate) fn pack_gradients(grads: impl IntoIterator<Item = Tensor>) -> Result<Option<Tensor>> {
        Self::join(grads.into_iter().map(|g| g.flatten_all()).collect::<Result<Vec<_>>>()?)
    }

    fn join(mut flat: Vec<Tensor>) -> Result<Option<Tensor>> {
        Ok(match flat.len() {
            0 => None,
            1 => flat.pop(),
            _ => Some(Tensor::cat(&flat, 0)?),
        })
    }
}

/// `forward(inputs)` (one to three inputs) as one graph node whose backward pass is `backward`
/// (`(inputs, output, output's gradient)`, the inputs and output detached → the inputs'
/// gradients), its intermediates freed at once: for a part whose gradient has a cheaper formula
/// than back-propagation through its operations (fewer large temporaries). `backward` must be the
/// derivative of `forward`; gradients of inputs outside the graph are dropped. Where no input
/// takes part in a graph it is simply `forward(inputs)`.
pub fn with_backward(
    inputs: &[&Tensor],
    forward: impl Fn(&[Tensor]) -> Result<Tensor>,
    backward: impl Fn(&[Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        return forward(&owned);
    }
    if !(1..=3).contains(&inputs.len()) {
        candle_core::bail!("recompute: 1 to 3 inputs, got {}", inputs.len());
    }
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let output = forward(&detached)?;
    let op = Recomputed {
        backward: Arc::new(backward),
        output: Mutex::new(Some(output)),
        tracked: inputs.iter().map(|t| t.track_op()).collect(),
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => unreachable!("the count is checked above"),
    }
}

/// The inputs' gradients of `part` at `inputs` for the output gradient `grad`: the part run again
/// with tracking, `grad` back-propagated through it (`None` for an input the part does not use).
/// For a [`with_backward`] node that back-propagates through its part piece by piece.
pub fn backprop_through(
    part: &(dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync),
    inputs: &[Tensor],
    grad: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let vars = inputs.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
    let leaves: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = part(&leaves)?;
    // d/d(out) of Σ out ⊙ grad is `grad` exactly.
    let grads = out.mul(grad)?.sum_all()?.backward()?;
    Ok(vars.iter().map(|v| grads.get(v.as_tensor()).cloned()).collect())
}

/// The graph node standing for the part. Its CUDA forward pass is compiled whenever candle's is
/// (with candle's stand-in types otherwise), so a layer crate used on a GPU needs no feature of
/// this crate to run it.
struct Recomputed {
    backward: Arc<Backward>,
    /// The output computed on the detached inputs, until the node's forward pass copies it into
    /// the graph (then dropped: the graph keeps the copy only).
    output: Mutex<Option<Tensor>>,
    /// Which inputs take part in the graph (the others get no gradient).
    tracked: Vec<bool>,
}

impl Recomputed {
    fn take_output(&self) -> Result<Tensor> {
        self.output
            .lock()
            .map_err(|_| candle_core::Error::Msg("recompute: lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("recompute: the node's forward pass ran twice".into()))
    }

    /// The output's values as fresh contiguous storage of the input's backend.
    fn output_storage<S>(&self, device: &S::Device, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let out = self.take_output()?;
        let (storage, layout) = out.storage_and_layout();
        let Some(src) = pick(&storage) else {
            candle_core::bail!("recompute: the part's output is on another device than its inputs");
        };
        let mut dst = device.zeros_impl(layout.shape(), src.dtype())?;
        src.copy_strided_src(&mut dst, 0, layout)?;
        Ok((dst, layout.shape().clone()))
    }

    fn cpu_output(&self) -> Result<(CpuStorage, Shape)> {
        self.output_storage::<CpuStorage>(&candle_core::cpu_backend::CpuDevice, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_output(&self, like: &candle_core::CudaStorage) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output_storage::<candle_core::CudaStorage>(like.device(), |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    /// The gradients of the inputs (`None` for those outside the graph).
    fn gradients(&self, inputs: &[&Tensor], output: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
        let grads = (self.backward)(&detached, &output.detach(), &grad.detach())?;
        if grads.len() != inputs.len() {
            candle_core::bail!("recompute: {} gradients for {} inputs", grads.len(), inputs.len());
        }
        Ok(grads.into_iter().zip(&self.tracked).map(|(g, &tracked)| g.filter(|_| tracked)).collect())
    }
}

impl CustomOp1 for Recomputed {
    fn name(&self) -> &'static str {
        "rankstack-recomputed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    fn cuda_fwd(&self, s: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output(s)
    }

    fn bwd(&self, a: &Tensor, output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut g = self.gradients(&[a], output, grad)?;
        Ok(g.remove(0))
    }
}

impl CustomOp2 for Recomputed {
    fn name(&self) -> &'static str {
        "rankstack-recomputed"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output(s)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, output: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.gradients(&[a, b], output, grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        "rankstack-recomputed"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output(s)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.gradients(&[a, b, c], output, grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, D};

    use crate::testing::value_bits as bits;

    /// A part with large intermediates: softmax(a bᵀ) c, as attention.
    fn attention(x: &[Tensor]) -> Result<Tensor> {
        crate::softmax(&x[0].matmul(&x[1].t()?)?, D::Minus1)?.matmul(&x[2])
    }

    #[test]
    fn values_and_gradients_are_the_parts_own_bits() {
        let var =
            |seed, dims: &[usize]| Var::from_tensor(&crate::testing::seeded_randn(seed, dims, DType::F64)).unwrap();
        let (q, k, v) = (var(1, &[5, 3]), var(2, &[4, 3]), var(3, &[4, 2]));
        let weight = crate::testing::seeded_randn(4, &[5, 2], DType::F64);
        let loss = |y: &Tensor| y.mul(&weight).unwrap().sum_all().unwrap();
        let inputs = [q.as_tensor(), k.as_tensor(), v.as_tensor()];

        let plain = attention(&[q.as_tensor().clone(), k.as_tensor().clone(), v.as_tensor().clone()]).unwrap();
        let plain_grads = loss(&plain).backward().unwrap();
        let recomputed = recompute_in_backward(&inputs, attention).unwrap();
        assert_eq!(bits(&recomputed), bits(&plain));
        let grads = loss(&recomputed).backward().unwrap();
        for t in inputs {
            assert_eq!(bits(grads.get(t).unwrap()), bits(plain_grads.get(t).unwrap()));
        }

        // An input outside the graph gets no gradient; with none in a graph it is a plain call.
        let constant = v.as_tensor().detach();
        let y = recompute_in_backward(&[q.as_tensor(), k.as_tensor(), &constant], attention).unwrap();
        let g = loss(&y).backward().unwrap();
        assert!(g.get(&constant).is_none() && g.get(q.as_tensor()).is_some());
        let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
        let refs: Vec<&Tensor> = detached.iter().collect();
        let y = recompute_in_backward(&refs, attention).unwrap();
        assert!(!y.track_op());
        assert_eq!(bits(&y), bits(&plain));

        // One and two inputs, and a strided (transposed) output.
        let y = recompute_in_backward(&[q.as_tensor()], |x| x[0].exp()?.t()).unwrap();
        assert_eq!(y.dims(), &[3, 5]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(bits(g.get(q.as_tensor()).unwrap()), bits(&q.as_tensor().exp().unwrap()));
        let y = recompute_in_backward(&[q.as_tensor(), k.as_tensor()], |x| x[0].matmul(&x[1].t()?)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(k.as_tensor()).unwrap().dims(), &[4, 3]);
        let four = [q.as_tensor(), k.as_tensor(), v.as_tensor(), q.as_tensor()];
        let e = recompute_in_backward(&four, |x| x[0].exp()).unwrap_err().to_string();
        assert!(e.contains("1 to 3 inputs"), "{e}");
    }
}
