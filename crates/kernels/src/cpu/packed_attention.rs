//! Scaled dot-product attention over packed variable-length sequences, as one fused CPU op.
//!
//! The rows of `B` sequences are stored back to back (`[R, d]`, `R = Σ L_b`); each (sequence,
//! head) task computes its scores, softmax and context while they are in cache, and the backward
//! pass recomputes the weights rather than keeping `Σ H·L_b²` values per layer alive until then.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::isa::Isa;
use super::small_product::{product, View};
use super::softmax_rows::softmax_rows;
use crate::float::{contiguous_storage, dispatch, FloatKernel};
use crate::KernelFloat;

/// Where the sequences are in the packed rows, and which rows are keys: what the kernel reads of
/// a layer's packed-sequence type (`sequence_transformer::PackedSequences` implements it).
pub trait SequenceLayout: Send + Sync + 'static {
    /// The first row of each sequence, then `R` (`B + 1` values, non-decreasing).
    fn row_offsets(&self) -> &[usize];
    /// The additive score bias of every row as a key: `0` attend, `−∞` hidden (`R` values).
    fn key_bias(&self) -> &[f64];
    /// Where device values derived from the layout are kept (offsets, biases, index maps), so
    /// that the layers of one forward pass copy them to a device once; `None` (the default):
    /// each use makes its own.
    fn device_copies(&self) -> Option<&crate::device_copies::DeviceCopies> {
        None
    }
}

/// `O_h = drop(softmax(Q_h K_hᵀ / √d_h + M)) V_h` for every sequence and head `h`, with `Q`, `K`,
/// `V` and `O` the packed rows `[R, d]` (heads are column blocks of width `d_h = d / num_heads`)
/// and `M` the key bias of each row, as one op with its backward pass; `None` where the kernel does
/// not apply (not the CPU, not f32/f64), so the caller falls back to composed operations.
///
/// `dropout` holds the multipliers of the attention weights (`0` or `1 / (1 − p)`), sequence by
/// sequence, head by head, row-major `L_b × L_b` each — the order in which a dense `[B, H, L, L]`
/// dropout would draw them. The caller checks the shapes ([`check`]).
pub fn packed_attention_fused<S: SequenceLayout>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &Arc<S>,
    num_heads: usize,
    dropout: Option<Arc<Vec<f32>>>,
) -> Result<Option<Tensor>> {
    check(q, k, v, sequences.as_ref(), num_heads)?;
    if let Some(mask) = &dropout {
        let expected = weight_count(sequences.as_ref(), num_heads);
        if mask.len() != expected {
            candle_core::bail!("packed attention: {} dropout multipliers, expected {expected}", mask.len());
        }
    }
    if !q.device().is_cpu() || !super::kernels_enabled() || !matches!(q.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let op = PackedAttention { sequences: sequences.clone(), num_heads, dropout };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op).map(Some)
}

/// Checks that `q`, `k`, `v` are `[R, d]` for the layout's `R` rows and that `num_heads` divides `d`.
pub fn check<S: SequenceLayout + ?Sized>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &S,
    num_heads: usize,
) -> Result<()> {
    let (rows, d) = q.dims2()?;
    if k.dims() != [rows, d] || v.dims() != [rows, d] {
        candle_core::bail!(
            "packed attention: q {:?}, k {:?} and v {:?} must have one shape",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let packed_rows = sequences.key_bias().len();
    if rows != packed_rows || num_heads == 0 || !d.is_multiple_of(num_heads) {
        candle_core::bail!(
            "packed attention: {rows} rows of width {d} for {packed_rows} packed rows and {num_heads} heads"
        );
    }
    Ok(())
}

/// `Σ H·L_b²`: the number of attention weights (and dropout multipliers) over the sequences.
pub fn weight_count<S: SequenceLayout + ?Sized>(sequences: &S, num_heads: usize) -> usize {
    sequences.row_offsets().windows(2).map(|w| num_heads * (w[1] - w[0]) * (w[1] - w[0])).sum()
}

/// The op of [`packed_attention_fused`].
struct PackedAttention<S> {
    sequences: Arc<S>,
    num_heads: usize,
    dropout: Option<Arc<Vec<f32>>>,
}

/// One (sequence, head) pair of packed attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadBlock {
    /// The sequence's index in the batch.
    pub sequence: usize,
    /// Its first packed row.
    pub start: usize,
    /// Its length (rows).
    pub len: usize,
    /// The head (columns `head · d/H ..` of the packed rows).
    pub head: usize,
    /// Where its `len × len` attention weights (and dropout multipliers) start in the layout
    /// [`head_blocks`] defines.
    pub mask_offset: usize,
}

/// Every (sequence, head) pair, sequence by sequence and head by head within a sequence: the
/// order in which the attention weights, and the dropout multipliers that [`packed_attention_fused`]
/// takes, are laid out (`len²` values each, row-major; [`weight_count`] in all). The composed
/// attention of other devices places the same multipliers through it.
pub fn head_blocks<S: SequenceLayout + ?Sized>(sequences: &S, num_heads: usize) -> Vec<HeadBlock> {
    let offsets = sequences.row_offsets();
    let mut blocks = Vec::with_capacity(offsets.len().saturating_sub(1) * num_heads);
    let mut mask_offset = 0;
    for (sequence, w) in offsets.windows(2).enumerate() {
        let (start, len) = (w[0], w[1] - w[0]);
        for head in 0..num_heads {
            blocks.push(HeadBlock { sequence, start, len, head, mask_offset });
            mask_offset += len * len;
        }
    }
    blocks
}

/// A pointer into an output buffer that tasks write disjoint blocks of.
#[derive(Clone, Copy)]
struct SharedOut<T>(*mut T);
// SAFETY: every task writes only its own (rows of its sequence) × (columns of its head) block.
unsafe impl<T: Send> Send for SharedOut<T> {}
// SAFETY: as for `Send`: shared only among tasks that write disjoint blocks.
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The pointer `offset` elements into the buffer.
    ///
    /// # Safety
    /// `offset` must lie within the buffer (or one past its end).
    unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: the caller keeps `offset` within the buffer.
        unsafe { self.0.add(offset) }
    }
}

impl<S: SequenceLayout> PackedAttention<S> {
    fn tasks(&self) -> Vec<HeadBlock> {
        head_blocks(self.sequences.as_ref(), self.num_heads)
    }

    /// `p = softmax(scale · Q_h K_hᵀ + M)` of one task into `p` (`len × len`), on the `isa` path.
    ///
    /// # Safety
    /// `q` and `k` hold the packed `[R, d]` rows the task addresses; `p` has `len²` elements;
    /// `isa` is supported.
    #[allow(clippy::too_many_arguments)]
    unsafe fn weights<T: KernelFloat>(
        &self,
        isa: Isa,
        t: HeadBlock,
        q: &[T],
        k: &[T],
        d: usize,
        p: &mut [T],
        scratch: &mut Vec<T>,
    ) {
        let (l, dh) = (t.len, d / self.num_heads);
        // SAFETY: the task's block starts inside the packed rows (caller's contract).
        let at = |x: &[T]| View::rows(unsafe { x.as_ptr().add(t.start * d + t.head * dh) }, d);
        let scale = T::from_f64(1.0 / (dh as f64).sqrt());
        // SAFETY: `l` rows of `dh` columns (stride `d`) of q and k lie in the packed rows; `p` is
        // `l × l`, owned by this task.
        unsafe { product(isa, (l, l, dh), p.as_mut_ptr(), l, at(q), at(k).t(), scale, scratch) };
        let bias: &mut Vec<T> = scratch;
        bias.clear();
        bias.extend(self.sequences.key_bias()[t.start..t.start + l].iter().map(|&b| T::from_f64(b)));
        softmax_rows(isa, p, bias);
    }

    fn multipliers(&self, t: HeadBlock) -> Option<&[f32]> {
        self.dropout.as_ref().map(|m| &m[t.mask_offset..t.mask_offset + t.len * t.len])
    }

    fn forward<T: KernelFloat>(&self, q: &[T], k: &[T], v: &[T], d: usize) -> Vec<T> {
        let dh = d / self.num_heads;
        let mut out = vec![T::ZERO; q.len()];
        let dst = SharedOut(out.as_mut_ptr());
        // Read on the calling thread: `with_isa` overrides are per thread.
        let isa = Isa::active();
        self.tasks().into_par_iter().filter(|t| t.len > 0).for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, scratch): &mut (Vec<T>, Vec<T>), t| {
                let l = t.len;
                p.resize(l * l, T::ZERO);
                // SAFETY: q, k, v are the packed rows; the task writes only its own block of `out`.
                unsafe {
                    self.weights(isa, t, q, k, d, p, scratch);
                    if let Some(m) = self.multipliers(t) {
                        p.iter_mut().zip(m).for_each(|(x, &m)| *x *= T::from_f64(f64::from(m)));
                    }
                    let vh = View::rows(v.as_ptr().add(t.start * d + t.head * dh), d);
                    let o = dst.at(t.start * d + t.head * dh);
                    product(isa, (l, dh, l), o, d, View::rows(p.as_ptr(), l), vh, T::ONE, scratch);
                }
            },
        );
        out
    }

    /// `(∂L/∂Q, ∂L/∂K, ∂L/∂V)` from `g = ∂L/∂O`: per task, with `P` recomputed and `P̃` its
    /// dropped-out version, `∂V = P̃ᵀ G`, `∂P̃ = G Vᵀ`, `∂P = ∂P̃ ⊙ mask`,
    /// `∂S = P ⊙ (∂P − rowsum(∂P ⊙ P))`, `∂Q = scale · ∂S K`, `∂K = scale · ∂Sᵀ Q`.
    fn backward<T: KernelFloat>(&self, q: &[T], k: &[T], v: &[T], g: &[T], d: usize) -> [Vec<T>; 3] {
        let dh = d / self.num_heads;
        let scale = T::from_f64(1.0 / (dh as f64).sqrt());
        let (mut dq, mut dk, mut dv) = (vec![T::ZERO; q.len()], vec![T::ZERO; q.len()], vec![T::ZERO; q.len()]);
        let (dq_out, dk_out, dv_out) =
            (SharedOut(dq.as_mut_ptr()), SharedOut(dk.as_mut_ptr()), SharedOut(dv.as_mut_ptr()));
        let isa = Isa::active();
        self.tasks().into_par_iter().filter(|t| t.len > 0).for_each_init(
            || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(p, dropped, dp, scratch): &mut (Vec<T>, Vec<T>, Vec<T>, Vec<T>), t| {
                let l = t.len;
                let block = t.start * d + t.head * dh;
                p.resize(l * l, T::ZERO);
                dp.resize(l * l, T::ZERO);
                // SAFETY: the inputs are the packed rows; the task writes only its own blocks.
                unsafe {
                    self.weights(isa, t, q, k, d, p, scratch);
                    let m = self.multipliers(t);
                    let p_used: &[T] = match m {
                        Some(m) => {
                            dropped.clear();
                            dropped.extend(p.iter().zip(m).map(|(&x, &m)| x * T::from_f64(f64::from(m))));
                            dropped
                        }
                        None => p,
                    };
                    let rows = |x: &[T]| View::rows(x.as_ptr().add(block), d);
                    let p_used = View::rows(p_used.as_ptr(), l).t();
                    product(isa, (l, dh, l), dv_out.at(block), d, p_used, rows(g), T::ONE, scratch);
                    product(isa, (l, l, dh), dp.as_mut_ptr(), l, rows(g), rows(v).t(), T::ONE, scratch);
                    if let Some(m) = m {
                        dp.iter_mut().zip(m).for_each(|(x, &m)| *x *= T::from_f64(f64::from(m)));
                    }
                    for (dpr, pr) in dp.chunks_mut(l).zip(p.chunks(l)) {
                        let dot = dpr.iter().zip(pr).fold(T::ZERO, |acc, (&a, &b)| acc + a * b);
                        dpr.iter_mut().zip(pr).for_each(|(x, &pv)| *x = (*x - dot) * pv);
                    }
                    let ds = View::rows(dp.as_ptr(), l);
                    product(isa, (l, dh, l), dq_out.at(block), d, ds, rows(k), scale, scratch);
                    product(isa, (l, dh, l), dk_out.at(block), d, ds.t(), rows(q), scale, scratch);
                }
            },
        );
        [dq, dk, dv]
    }
}

/// The contiguous CPU slice of a tensor's storage.
fn slice_of<'a, T: KernelFloat>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else { candle_core::bail!("packed attention: CPU tensors only") };
    contiguous_storage(cpu, layout, "packed attention: input")
}

impl<S: SequenceLayout> PackedAttention<S> {
    fn backward_typed<T: KernelFloat>(&self, x: [&Tensor; 4]) -> Result<[Tensor; 3]> {
        let d = x[0].dim(1)?;
        let [(sq, lq), (sk, lk), (sv, lv), (sg, lg)] = x.map(|t| t.storage_and_layout());
        let (q, k) = (slice_of::<T>(&sq, lq)?, slice_of::<T>(&sk, lk)?);
        let (v, g) = (slice_of::<T>(&sv, lv)?, slice_of::<T>(&sg, lg)?);
        let shape = x[0].shape().clone();
        let grads = self.backward(q, k, v, g, d);
        let [dq, dk, dv] = grads.map(|g| Tensor::from_vec(g, shape.clone(), x[0].device()));
        Ok([dq?, dk?, dv?])
    }
}

/// The forward pass on rows of width `d`, as a typed kernel.
struct Forward<'a, S> {
    op: &'a PackedAttention<S>,
    d: usize,
}

impl<S: SequenceLayout> FloatKernel for Forward<'_, S> {
    const NAME: &'static str = "packed attention";

    /// Inputs `(q, k, v)`.
    fn run<T: KernelFloat>(&self, x: &[&[T]]) -> Result<Vec<T>> {
        Ok(self.op.forward(x[0], x[1], x[2], self.d))
    }
}

impl<S: SequenceLayout> CustomOp3 for PackedAttention<S> {
    fn name(&self) -> &'static str {
        "rankstack-packed-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let forward = Forward { op: self, d: ql.shape().dims2()?.1 };
        Ok((dispatch(&forward, &[(q, ql), (k, kl), (v, vl)])?, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let x = [q, k, v, &g];
        let [dq, dk, dv] = match q.dtype() {
            DType::F32 => self.backward_typed::<f32>(x)?,
            DType::F64 => self.backward_typed::<f64>(x)?,
            dt => candle_core::bail!("packed attention: no backward kernel for {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::oracle::{assert_close, f64s, tensor};

    const INF: f64 = f64::NEG_INFINITY;

    /// A layout for the tests: offsets and key bias as given.
    struct TestLayout {
        offsets: Vec<usize>,
        bias: Vec<f64>,
    }

    impl SequenceLayout for TestLayout {
        fn row_offsets(&self) -> &[usize] {
            &self.offsets
        }
        fn key_bias(&self) -> &[f64] {
            &self.bias
        }
    }

    /// Four sequences of lengths 3, 0, 5, 1 with some hidden keys (never the first).
    fn layout() -> Arc<TestLayout> {
        let bias = vec![0.0, INF, 0.0, /* */ 0.0, 0.0, INF, INF, 0.0, /* */ 0.0];
        Arc::new(TestLayout { offsets: vec![0, 3, 3, 8, 9], bias })
    }

    #[test]
    fn head_blocks_lay_out_sequences_then_heads() {
        let blocks = head_blocks(layout().as_ref(), 2);
        let got: Vec<_> = blocks.iter().map(|b| (b.sequence, b.start, b.len, b.head, b.mask_offset)).collect();
        #[rustfmt::skip]
        let want = vec![
            (0, 0, 3, 0, 0), (0, 0, 3, 1, 9),
            (1, 3, 0, 0, 18), (1, 3, 0, 1, 18),
            (2, 3, 5, 0, 18), (2, 3, 5, 1, 43),
            (3, 8, 1, 0, 68), (3, 8, 1, 1, 69),
        ];
        assert_eq!(got, want);
        assert_eq!(weight_count(layout().as_ref(), 2), 70, "the layout covers every weight once");
    }

    /// The formula with plain loops, f64: per sequence and head, softmax over the keys, dropout,
    /// weighted sum of the values.
    fn naive(q: &[f64], k: &[f64], v: &[f64], seqs: &TestLayout, h: usize, m: Option<&[f32]>) -> Vec<f64> {
        let d = q.len() / seqs.bias.len();
        let dh = d / h;
        let mut out = vec![0.0; q.len()];
        let mut mask_at = 0;
        for w in seqs.offsets.windows(2) {
            let (start, l) = (w[0], w[1] - w[0]);
            for head in 0..h {
                let col = head * dh;
                for i in 0..l {
                    let scores: Vec<f64> = (0..l)
                        .map(|j| {
                            let dot: f64 =
                                (0..dh).map(|c| q[(start + i) * d + col + c] * k[(start + j) * d + col + c]).sum();
                            dot / (dh as f64).sqrt() + seqs.bias[start + j]
                        })
                        .collect();
                    let max = scores.iter().copied().fold(INF, f64::max);
                    let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for j in 0..l {
                        let w = (scores[j] - max).exp() / sum * m.map_or(1.0, |m| f64::from(m[mask_at + i * l + j]));
                        for c in 0..dh {
                            out[(start + i) * d + col + c] += w * v[(start + j) * d + col + c];
                        }
                    }
                }
                mask_at += l * l;
            }
        }
        out
    }

    fn multipliers(seqs: &TestLayout, h: usize) -> Arc<Vec<f32>> {
        let n = weight_count(seqs, h);
        Arc::new((0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.5 }).collect())
    }

    /// Value against the formula; every gradient of `L = Σ O ⊙ R` against central differences of
    /// the formula (f64), on every path this CPU has.
    #[test]
    fn matches_the_f64_oracle_in_value_and_gradient() {
        crate::cpu::for_each_supported_isa("packed attention f64 oracle", |_| oracle_case());
    }

    fn oracle_case() {
        let (seqs, h, d) = (layout(), 2, 6);
        for dropout in [None, Some(multipliers(&layout(), 2))] {
            let m = dropout.as_deref().map(|m| m.as_slice());
            let x = [1, 2, 3].map(|s| Var::from_tensor(&tensor(s, &[9, d], DType::F64)).unwrap());
            let r = f64s(&tensor(4, &[9, d], DType::F64));
            let out =
                packed_attention_fused(x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor(), &seqs, h, dropout.clone())
                    .unwrap()
                    .unwrap();
            let inputs = [0, 1, 2].map(|i| f64s(x[i].as_tensor()));
            assert_close("output", &out, &naive(&inputs[0], &inputs[1], &inputs[2], &seqs, h, m), 1e-13);
            let loss = |x: &[Vec<f64>; 3]| -> f64 {
                naive(&x[0], &x[1], &x[2], &seqs, h, m).iter().zip(&r).map(|(o, r)| o * r).sum()
            };
            let r_tensor = Tensor::from_vec(r.clone(), (9, d), &Device::Cpu).unwrap();
            let grads = (out * r_tensor).unwrap().sum_all().unwrap().backward().unwrap();
            for (i, name) in ["q", "k", "v"].iter().enumerate() {
                let eps = 1e-6;
                let numeric: Vec<f64> = (0..inputs[i].len())
                    .map(|e| {
                        let (mut plus, mut minus) = (inputs.clone(), inputs.clone());
                        plus[i][e] += eps;
                        minus[i][e] -= eps;
                        (loss(&plus) - loss(&minus)) / (2.0 * eps)
                    })
                    .collect();
                let g = grads.get(x[i].as_tensor()).unwrap();
                assert!(f64s(g).iter().any(|v| *v != 0.0), "∂{name} is zero");
                assert_close(&format!("∂{name}, dropout {}", dropout.is_some()), g, &numeric, 1e-7);
            }
        }
    }

    #[test]
    fn f32_matches_f64() {
        crate::cpu::for_each_supported_isa("packed attention f32 against f64", |_| f32_case());
    }

    fn f32_case() {
        let (seqs, h, d) = (layout(), 3, 6);
        let x = [5, 6, 7].map(|s| tensor(s, &[9, d], DType::F64));
        let out = |dt: DType| {
            let [q, k, v] = x.clone().map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap());
            let o =
                packed_attention_fused(q.as_tensor(), k.as_tensor(), v.as_tensor(), &seqs, h, None).unwrap().unwrap();
            let g = o.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let mut all = f64s(&o);
            all.extend([&q, &k, &v].iter().flat_map(|p| f64s(g.get(p.as_tensor()).unwrap())));
            all
        };
        for (a, b) in out(DType::F32).iter().zip(out(DType::F64)) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Q = K = 0: every visible key gets the same weight; the hidden second key none.
    #[test]
    fn equal_scores_average_the_visible_values() {
        let seqs = Arc::new(TestLayout { offsets: vec![0, 3], bias: vec![0.0, INF, 0.0] });
        let zeros = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let v = Tensor::new(&[[1f32, 10.], [100., 1000.], [3., 30.]], &Device::Cpu).unwrap();
        crate::cpu::for_each_supported_isa("packed attention hand-checkable case", |isa| {
            let o = packed_attention_fused(&zeros, &zeros, &v, &seqs, 1, None).unwrap().unwrap();
            assert_eq!(o.to_vec2::<f32>().unwrap(), vec![vec![2.0, 20.0]; 3], "{isa:?}");
        });
    }

    #[test]
    fn bad_shapes_and_masks_are_errors() {
        let seqs = layout();
        let t = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
        let run = |q: Tensor, k: Tensor, h: usize, m: Option<Arc<Vec<f32>>>| {
            packed_attention_fused(&q, &k, &q, &seqs, h, m).unwrap_err().to_string()
        };
        assert!(run(t(9, 6), t(8, 6), 2, None).contains("one shape"));
        assert!(run(t(8, 6), t(8, 6), 2, None).contains("8 rows"));
        assert!(run(t(9, 6), t(9, 6), 4, None).contains("4 heads"));
        assert!(run(t(9, 6), t(9, 6), 2, Some(Arc::new(vec![1.0; 3]))).contains("3 dropout multipliers"));
        let bf16 = t(9, 6).to_dtype(DType::BF16).unwrap();
        assert!(packed_attention_fused(&bf16, &bf16, &bf16, &seqs, 2, None).unwrap().is_none());
    }
}
