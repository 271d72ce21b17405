//! Scaled dot-product attention over packed variable-length sequences, one fused CPU kernel.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use rankstack_nn::distinct_rows::{gather_rows, scatter_rows};
use rankstack_nn::kernel_float::{contiguous, contiguous_storage};
use rankstack_nn::{batched_matmul, fused_softmax::masked_softmax_last_dim_fused, KernelFloat};

use crate::heads::{merge_heads, split_heads};
use crate::PackedSequences;

/// `O_h = drop(softmax(Q_h K_hᵀ / √d_h + M)) V_h` for every sequence and head `h`, with `Q`, `K`,
/// `V` and `O` the packed rows `[R, d]` of [`PackedSequences`] (heads are column blocks of width
/// `d_h = d / num_heads`) and `M` the key bias of each row (`0` or `−∞`).
///
/// `dropout` holds the multipliers of the attention weights (`0` or `1 / (1 − p)`), sequence by
/// sequence, head by head, row-major `L_b × L_b` each — the order in which a dense
/// `[B, H, L, L]` dropout would draw them.
///
/// On the CPU (f32/f64) this is one graph node: each (sequence, head) task computes its scores,
/// softmax and context while they are in cache, and the backward pass recomputes the weights
/// rather than keeping `Σ H·L_b²` values per layer alive until then. Elsewhere (other devices and
/// dtypes) it is the composed attention on a dense, padded batch.
///
/// ```
/// # use std::sync::Arc;
/// # use candle_core::{Device, DType, Tensor};
/// # use sequence_transformer::{packed_attention, PackedSequences};
/// // Two sequences of 3 and 2 rows, width 4, 2 heads; the last row of the first is no key.
/// let seqs = Arc::new(PackedSequences::new(&[3, 2], vec![0.0, 0.0, f64::NEG_INFINITY, 0.0, 0.0])?);
/// let x = Tensor::randn(0f32, 1., (5, 4), &Device::Cpu)?;
/// let out = packed_attention(&x, &x, &x, &seqs, 2, None)?;
/// assert_eq!(out.dims(), &[5, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &Arc<PackedSequences>,
    num_heads: usize,
    dropout: Option<Arc<Vec<f32>>>,
) -> Result<Tensor> {
    packed_attention_checks(q, k, v, sequences, num_heads)?;
    let op = PackedAttention { sequences: sequences.clone(), num_heads, dropout, device_dropout: 0.0 };
    if let Some(mask) = &op.dropout {
        let expected = sequences.attention_weight_count(num_heads);
        if mask.len() != expected {
            candle_core::bail!("packed attention: {} dropout multipliers, expected {expected}", mask.len());
        }
    }
    if q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64) {
        return q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    op.composed(q, k, v)
}

/// [`packed_attention`] with dropout of probability `p` on the attention weights, its mask drawn
/// on the inputs' device by the device's random generator ([`rankstack_nn::dropout::device_mask`])
/// instead of from host multipliers: for GPUs, where drawing `B·H·ΣL²` values on the host and
/// copying them over would cost more than the attention itself. Always the composed path.
pub fn packed_attention_with_device_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &Arc<PackedSequences>,
    num_heads: usize,
    p: f64,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("packed attention: dropout {p} is outside [0, 1)");
    }
    // The checks of the host path, on a copy of the op without dropout.
    packed_attention_checks(q, k, v, sequences, num_heads)?;
    PackedAttention { sequences: sequences.clone(), num_heads, dropout: None, device_dropout: p }.composed(q, k, v)
}

fn packed_attention_checks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &PackedSequences,
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
    if rows != sequences.num_rows() || num_heads == 0 || !d.is_multiple_of(num_heads) {
        candle_core::bail!(
            "packed attention: {rows} rows of width {d} for {} packed rows and {num_heads} heads",
            sequences.num_rows()
        );
    }
    Ok(())
}

/// The op of [`packed_attention`].
#[derive(Clone)]
struct PackedAttention {
    sequences: Arc<PackedSequences>,
    num_heads: usize,
    dropout: Option<Arc<Vec<f32>>>,
    /// Dropout drawn on the device (composed path only); 0: none.
    device_dropout: f64,
}

/// One (sequence, head) pair: sequence `seq` at rows `start..start + len`, columns of head `head`, and the offset
/// of its dropout multipliers.
#[derive(Clone, Copy)]
struct Task {
    seq: usize,
    start: usize,
    len: usize,
    head: usize,
    mask_offset: usize,
}

/// A pointer into an output buffer that tasks write disjoint blocks of.
#[derive(Clone, Copy)]
struct SharedOut<T>(*mut T);
// SAFETY: every task writes only its own (rows of its sequence) × (columns of its head) block.
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    fn at(self, offset: usize) -> *mut T {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// A row-major view: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

impl<T> View<T> {
    fn rows(ptr: *const T, rs: usize) -> Self {
        Self { ptr, rs: rs as isize, cs: 1 }
    }
    fn t(self) -> Self {
        Self { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

/// `dst (m × n, row stride dst_rs) = scale · a (m × k) · b (k × n)`, single-threaded.
///
/// # Safety
/// The views must address `m × k` and `k × n` valid elements and `dst` `m × n` writable ones that
/// no other thread touches.
#[allow(clippy::too_many_arguments)]
unsafe fn product<T: KernelFloat>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    a: View<T>,
    b: View<T>,
    scale: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        T::ZERO,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl PackedAttention {
    fn tasks(&self) -> Vec<Task> {
        let mut tasks = Vec::with_capacity(self.sequences.batch_size() * self.num_heads);
        let mut mask_offset = 0;
        for (seq, (start, len)) in self.sequences.offsets().iter().copied().zip(self.sequences.lengths()).enumerate() {
            for head in 0..self.num_heads {
                tasks.push(Task { seq, start, len, head, mask_offset });
                mask_offset += len * len;
            }
        }
        tasks
    }

    /// `p = softmax(scale · Q_h K_hᵀ + M)` of one task into `p` (`len × len`).
    ///
    /// # Safety
    /// `q` and `k` hold the packed `[R, d]` rows.
    unsafe fn weights<T: KernelFloat>(&self, t: Task, q: &[T], k: &[T], d: usize, p: &mut [T]) {
        let (l, dh) = (t.len, d / self.num_heads);
        let at = |x: &[T]| View::rows(x.as_ptr().add(t.start * d + t.head * dh), d);
        let scale = T::from_f64(1.0 / (dh as f64).sqrt());
        product(l, l, dh, p.as_mut_ptr(), l, at(q), at(k).t(), scale);
        let bias = &self.sequences.key_bias()[t.start..t.start + l];
        for row in p.chunks_mut(l) {
            let mut max = T::NEG_INFINITY;
            for (s, &b) in row.iter_mut().zip(bias) {
                *s += T::from_f64(b);
                max = KernelFloat::max(max, *s);
            }
            let mut sum = T::ZERO;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = T::ONE / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
    }

    fn multipliers(&self, t: Task) -> Option<&[f32]> {
        self.dropout.as_ref().map(|m| &m[t.mask_offset..t.mask_offset + t.len * t.len])
    }

    fn forward<T: KernelFloat>(&self, q: &[T], k: &[T], v: &[T], d: usize) -> Vec<T> {
        let dh = d / self.num_heads;
        let mut out = vec![T::ZERO; q.len()];
        let dst = SharedOut(out.as_mut_ptr());
        self.tasks().into_par_iter().filter(|t| t.len > 0).for_each_init(Vec::new, |p: &mut Vec<T>, t| {
            let l = t.len;
            p.resize(l * l, T::ZERO);
            // SAFETY: q, k, v are the packed rows; the task writes only its own block of `out`.
            unsafe {
                self.weights(t, q, k, d, p);
                if let Some(m) = self.multipliers(t) {
                    p.iter_mut().zip(m).for_each(|(x, &m)| *x *= T::from_f64(f64::from(m)));
                }
                let vh = View::rows(v.as_ptr().add(t.start * d + t.head * dh), d);
                product(l, dh, l, dst.at(t.start * d + t.head * dh), d, View::rows(p.as_ptr(), l), vh, T::ONE);
            }
        });
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
        self.tasks().into_par_iter().filter(|t| t.len > 0).for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(p, dropped, dp): &mut (Vec<T>, Vec<T>, Vec<T>), t| {
                let l = t.len;
                let block = t.start * d + t.head * dh;
                p.resize(l * l, T::ZERO);
                dp.resize(l * l, T::ZERO);
                // SAFETY: the inputs are the packed rows; the task writes only its own blocks.
                unsafe {
                    self.weights(t, q, k, d, p);
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
                    product(l, dh, l, dv_out.at(block), d, View::rows(p_used.as_ptr(), l).t(), rows(g), T::ONE);
                    product(l, l, dh, dp.as_mut_ptr(), l, rows(g), rows(v).t(), T::ONE);
                    if let Some(m) = m {
                        dp.iter_mut().zip(m).for_each(|(x, &m)| *x *= T::from_f64(f64::from(m)));
                    }
                    for (dpr, pr) in dp.chunks_mut(l).zip(p.chunks(l)) {
                        let dot = dpr.iter().zip(pr).fold(T::ZERO, |acc, (&a, &b)| acc + a * b);
                        dpr.iter_mut().zip(pr).for_each(|(x, &pv)| *x = (*x - dot) * pv);
                    }
                    product(l, dh, l, dq_out.at(block), d, View::rows(dp.as_ptr(), l), rows(k), scale);
                    product(l, dh, l, dk_out.at(block), d, View::rows(dp.as_ptr(), l).t(), rows(q), scale);
                }
            },
        );
        [dq, dk, dv]
    }

    /// The same attention composed of candle operations on a dense, padded `[B, H, L, L]` batch
    /// (devices and dtypes the fused kernel does not cover).
    fn composed(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let seqs = &self.sequences;
        let (b, d, h) = (seqs.batch_size(), q.dim(1)?, self.num_heads);
        let dh = d / h;
        let l = seqs.lengths().max().unwrap_or(0);
        // Row r of sequence s goes to dense row s·L + (r − start); padding rows are hidden keys.
        let mut index = Vec::with_capacity(seqs.num_rows());
        let mut bias = vec![f64::NEG_INFINITY; b * l];
        for (s, (start, len)) in seqs.offsets().iter().copied().zip(seqs.lengths()).enumerate() {
            for i in 0..len {
                index.push((s * l + i) as u32);
                bias[s * l + i] = seqs.key_bias()[start + i];
            }
        }
        let dev = q.device();
        let uniform = seqs.uniform_length().is_some();
        // Distinct rows both ways: gathers, not candle's serial CUDA index_add (see distinct_rows).
        let dense = |x: &Tensor| -> Result<Tensor> {
            match uniform {
                true => x.reshape((b, l, d)),
                false => scatter_rows(x, &index, b * l)?.reshape((b, l, d)),
            }
        };
        let (qd, kd, vd) = (dense(q)?, dense(k)?, dense(v)?);
        let q = split_heads(&qd.reshape((b * l, d))?, b, l, h, 1.0 / (dh as f64).sqrt())?;
        let k = split_heads(&kd.reshape((b * l, d))?, b, l, h, 1.0)?;
        let v = split_heads(&vd.reshape((b * l, d))?, b, l, h, 1.0)?;
        let bias = Tensor::from_vec(bias, (b, l), dev)?.to_dtype(q.dtype())?;
        let mut weights = masked_softmax_last_dim_fused(&batched_matmul(&q, &k.t()?)?, &bias)?;
        if let Some(m) = &self.dropout {
            // Sequence s's multipliers fill the top-left L_s × L_s block of each of its heads.
            let mut dense = vec![0f32; b * h * l * l];
            for t in self.tasks() {
                let base = (t.seq * h + t.head) * l * l;
                for (i, row) in m[t.mask_offset..t.mask_offset + t.len * t.len].chunks(t.len.max(1)).enumerate() {
                    dense[base + i * l..base + i * l + t.len].copy_from_slice(row);
                }
            }
            weights = weights.mul(&Tensor::from_vec(dense, (b, h, l, l), dev)?.to_dtype(weights.dtype())?)?;
        }
        if self.device_dropout > 0.0 {
            weights = weights.mul(&rankstack_nn::dropout::device_mask(self.device_dropout, &weights)?)?;
        }
        let out = merge_heads(&batched_matmul(&weights, &v)?)?;
        if uniform {
            Ok(out)
        } else {
            gather_rows(&out, &index)
        }
    }
}

/// The contiguous CPU slice of a tensor's storage.
fn slice_of<'a, T: KernelFloat>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else { candle_core::bail!("packed attention: CPU tensors only") };
    contiguous_storage(cpu, layout, "packed attention: input")
}

impl PackedAttention {
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

impl CustomOp3 for PackedAttention {
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
        const INPUT: &str = "packed attention: input";
        let d = ql.shape().dims()[1];
        let out = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => CpuStorage::F32(self.forward(
                contiguous(q, ql, INPUT)?,
                contiguous(k, kl, INPUT)?,
                contiguous(v, vl, INPUT)?,
                d,
            )),
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => CpuStorage::F64(self.forward(
                contiguous(q, ql, INPUT)?,
                contiguous(k, kl, INPUT)?,
                contiguous(v, vl, INPUT)?,
                d,
            )),
            _ => candle_core::bail!("packed attention: q, k and v must all be f32 or all f64"),
        };
        Ok((out, ql.shape().clone()))
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
    use super::*;
    use candle_core::{Device, Var};
    use rankstack_nn::testing::seeded_randn;

    const INF: f64 = f64::NEG_INFINITY;

    /// Four sequences of lengths 3, 0, 5, 1 with some hidden keys (never the first).
    fn layout() -> Arc<PackedSequences> {
        let bias = vec![0.0, INF, 0.0, /* */ 0.0, 0.0, INF, INF, 0.0, /* */ 0.0];
        Arc::new(PackedSequences::new(&[3, 0, 5, 1], bias).unwrap())
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The formula with plain loops, f64: per sequence and head, softmax over the keys, dropout,
    /// weighted sum of the values.
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        seqs: &PackedSequences,
        h: usize,
        d: usize,
        m: Option<&[f32]>,
    ) -> Vec<f64> {
        let dh = d / h;
        let mut out = vec![0.0; q.len()];
        let mut mask_at = 0;
        for (start, l) in seqs.offsets().iter().copied().zip(seqs.lengths()) {
            for head in 0..h {
                let col = head * dh;
                for i in 0..l {
                    let scores: Vec<f64> = (0..l)
                        .map(|j| {
                            let dot: f64 =
                                (0..dh).map(|c| q[(start + i) * d + col + c] * k[(start + j) * d + col + c]).sum();
                            dot / (dh as f64).sqrt() + seqs.key_bias()[start + j]
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

    fn multipliers(seqs: &PackedSequences, h: usize) -> Arc<Vec<f32>> {
        let n = seqs.attention_weight_count(h);
        Arc::new((0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.5 }).collect())
    }

    #[test]
    fn matches_the_formula_and_the_composed_version_in_value_and_gradient() {
        let (seqs, h, d) = (layout(), 2, 6);
        for dropout in [None, Some(multipliers(&layout(), 2))] {
            let x = [1, 2, 3].map(|s| Var::from_tensor(&seeded_randn(s, &[9, d], DType::F64)).unwrap());
            let op = PackedAttention {
                sequences: seqs.clone(),
                num_heads: h,
                dropout: dropout.clone(),
                device_dropout: 0.0,
            };
            let fused =
                packed_attention(x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor(), &seqs, h, dropout.clone())
                    .unwrap();
            let composed = op.composed(x[0].as_tensor(), x[1].as_tensor(), x[2].as_tensor()).unwrap();
            let [q, k, v] = [0, 1, 2].map(|i| flat(x[i].as_tensor()));
            let reference = naive(&q, &k, &v, &seqs, h, d, dropout.as_deref().map(|m| m.as_slice()));
            for (name, other) in [("formula", reference), ("composed", flat(&composed))] {
                for (a, b) in flat(&fused).iter().zip(&other) {
                    assert!((a - b).abs() <= 1e-13, "{name}, dropout {}: {a} vs {b}", dropout.is_some());
                }
            }
            let r = seeded_randn(4, &[9, d], DType::F64);
            let g1 = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (i, name) in ["q", "k", "v"].iter().enumerate() {
                let (a, b) = (flat(g1.get(x[i].as_tensor()).unwrap()), flat(g2.get(x[i].as_tensor()).unwrap()));
                assert!(a.iter().any(|v| *v != 0.0), "∂{name} is zero");
                for (a, b) in a.iter().zip(&b) {
                    assert!((a - b).abs() <= 1e-13, "∂{name}, dropout {}: {a} vs {b}", dropout.is_some());
                }
            }
        }
    }

    #[test]
    fn f32_matches_f64() {
        let (seqs, h, d) = (layout(), 3, 6);
        let x = [5, 6, 7].map(|s| seeded_randn(s, &[9, d], DType::F64));
        let out = |dt: DType| {
            let [q, k, v] = x.clone().map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap());
            let o = packed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &seqs, h, None).unwrap();
            let g = o.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let mut all = flat(&o);
            all.extend([&q, &k, &v].iter().flat_map(|p| flat(g.get(p.as_tensor()).unwrap())));
            all
        };
        for (a, b) in out(DType::F32).iter().zip(out(DType::F64)) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn equal_scores_average_the_visible_values() {
        // Q = K = 0: every visible key gets the same weight; the hidden second key none.
        let seqs = Arc::new(PackedSequences::new(&[3], vec![0.0, INF, 0.0]).unwrap());
        let zeros = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let v = Tensor::new(&[[1f32, 10.], [100., 1000.], [3., 30.]], &Device::Cpu).unwrap();
        let o = packed_attention(&zeros, &zeros, &v, &seqs, 1, None).unwrap();
        assert_eq!(o.to_vec2::<f32>().unwrap(), vec![vec![2.0, 20.0]; 3]);
    }

    #[test]
    fn bad_shapes_and_masks_are_errors() {
        let seqs = layout();
        let t = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
        let e = packed_attention(&t(9, 6), &t(8, 6), &t(9, 6), &seqs, 2, None).unwrap_err().to_string();
        assert!(e.contains("one shape"), "{e}");
        let e = packed_attention(&t(8, 6), &t(8, 6), &t(8, 6), &seqs, 2, None).unwrap_err().to_string();
        assert!(e.contains("8 rows"), "{e}");
        let e = packed_attention(&t(9, 6), &t(9, 6), &t(9, 6), &seqs, 4, None).unwrap_err().to_string();
        assert!(e.contains("4 heads"), "{e}");
        let e = packed_attention(&t(9, 6), &t(9, 6), &t(9, 6), &seqs, 2, Some(Arc::new(vec![1.0; 3]))).unwrap_err();
        assert!(e.to_string().contains("3 dropout multipliers"), "{e}");
    }
}
