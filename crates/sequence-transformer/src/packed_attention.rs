//! Scaled dot-product attention over packed variable-length sequences: the fused CPU kernel
//! ([`rankstack_kernels::cpu::packed_attention`]) or, on other devices and dtypes, the same
//! attention composed of candle operations on a dense, padded batch.

use std::sync::Arc;

use candle_core::{Result, Tensor, D};

use rankstack_kernels::cpu::packed_attention::{check, head_blocks, packed_attention_fused, SequenceLayout};
use rankstack_kernels::device_copies::DeviceCopies;
use rankstack_kernels::device_packed_attention::packed_attention_forward_on_device;
use rankstack_kernels::distinct_rows::{DistinctRows, StagedDistinctRows};
use rankstack_kernels::index_stage::IndexStage;
use rankstack_nn::dropout::{device_keep_mask, device_multipliers};
use rankstack_nn::host_transfer::{upload, upload_slice, Origin};
use rankstack_nn::linear::matmul_t_autocast;
use rankstack_nn::recompute::{backprop_through, recompute_in_backward, with_backward};

use crate::PackedSequences;

impl SequenceLayout for PackedSequences {
    fn row_offsets(&self) -> &[usize] {
        self.offsets()
    }

    fn key_bias(&self) -> &[f64] {
        PackedSequences::key_bias(self)
    }

    fn device_copies(&self) -> Option<&DeviceCopies> {
        Some(PackedSequences::device_copies(self))
    }
}

/// `O_h = drop(softmax(Q_h K_hᵀ / √d_h + M)) V_h` for every sequence and head `h`, with `Q`, `K`,
/// `V` and `O` the packed rows `[R, d]` of [`PackedSequences`] (heads are column blocks of width
/// `d_h = d / num_heads`) and `M` the key bias of each row (`0` or `−∞`).
///
/// `dropout` holds the multipliers of the attention weights (`0` or `1 / (1 − p)`), sequence by
/// sequence, head by head, row-major `L_b × L_b` each — the order in which a dense
/// `[B, H, L, L]` dropout would draw them.
///
/// On the CPU (f32/f64) this is one graph node, the fused kernel: each (sequence, head) task
/// computes its scores, softmax and context while they are in cache, and the backward pass
/// recomputes the weights rather than keeping `Σ H·L_b²` values per layer alive until then.
/// Elsewhere (other devices and dtypes), without dropout and where no input takes part in a graph
/// (scoring), it is one forward-only kernel
/// ([`rankstack_kernels::device_packed_attention`], f32, common head widths); otherwise the
/// composed attention on a dense, padded batch.
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
    if let Some(out) = packed_attention_fused(q, k, v, sequences, num_heads, dropout.clone())? {
        return Ok(out);
    }
    if dropout.is_none() {
        if let Some(out) = packed_attention_forward_on_device(q, k, v, sequences.as_ref(), num_heads)? {
            return Ok(out);
        }
    }
    Composed { sequences: sequences.clone(), num_heads, dropout, device_dropout: 0.0, chunk_weights: CHUNK_WEIGHTS }
        .composed(q, k, v)
}

/// [`packed_attention`] with dropout of probability `p` on the attention weights, its mask drawn
/// on the inputs' device by the device's random generator ([`rankstack_nn::dropout::device_keep_mask`])
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
    Composed::with_device_dropout([q, k, v], sequences, num_heads, p)?.composed(q, k, v)
}

/// Self-attention of the packed rows `x` `[R, d]` with PyTorch's packed in-projection: `Q`, `K`,
/// `V` are `x` times the three row blocks of `in_proj_weight` `[3d, d]` (plus those of
/// `in_proj_bias` `[3d]`), then [`packed_attention_with_device_dropout`] of them. Composed of
/// candle operations (what a GPU runs), as one graph node whose backward pass projects and
/// attends again, chunk by chunk: a training step keeps only its `[R, d]` output, not the three
/// `[R, d]` projections nor anything of the attention. With `autocast` (a dtype other than
/// `x`'s, e.g. bf16 for f32 `x`) the projections multiply operands rounded to it and return to
/// `x`'s dtype, as [`rankstack_nn::Linear::set_autocast`] does; the attention runs in `x`'s dtype.
pub fn packed_self_attention_with_device_dropout(
    x: &Tensor,
    in_proj_weight: &Tensor,
    in_proj_bias: Option<&Tensor>,
    sequences: &Arc<PackedSequences>,
    num_heads: usize,
    p: f64,
    autocast: Option<candle_core::DType>,
) -> Result<Tensor> {
    let op = Composed::with_device_dropout([x, x, x], sequences, num_heads, p)?;
    let d = x.dim(1)?;
    if in_proj_weight.dims() != [3 * d, d] {
        candle_core::bail!("packed attention: in_proj_weight {:?}, expected [{}, {d}]", in_proj_weight.dims(), 3 * d);
    }
    if let Some(b) = in_proj_bias.filter(|b| b.dims() != [3 * d]) {
        candle_core::bail!("packed attention: in_proj_bias {:?}, expected [{}]", b.dims(), 3 * d);
    }
    op.projected(x, in_proj_weight, in_proj_bias, autocast.filter(|d| *d != x.dtype()))
}

/// The attention composed of candle operations on a dense, padded `[B, H, L, L]` batch.
struct Composed {
    sequences: Arc<PackedSequences>,
    num_heads: usize,
    /// Host multipliers, as [`packed_attention`] takes them.
    dropout: Option<Arc<Vec<f32>>>,
    /// Dropout drawn on the device; 0: none.
    device_dropout: f64,
    /// [`CHUNK_WEIGHTS`], smaller in tests.
    chunk_weights: usize,
}

impl Composed {
    /// The attention of `q`, `k`, `v` (checked against `sequences`) with dropout `p` drawn on the
    /// device.
    fn with_device_dropout(
        [q, k, v]: [&Tensor; 3],
        sequences: &Arc<PackedSequences>,
        num_heads: usize,
        p: f64,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("packed attention: dropout {p} is outside [0, 1)");
        }
        check(q, k, v, sequences.as_ref(), num_heads)?;
        Ok(Self {
            sequences: sequences.clone(),
            num_heads,
            dropout: None,
            device_dropout: p,
            chunk_weights: CHUNK_WEIGHTS,
        })
    }

    /// The same attention composed of candle operations on a dense, padded `[B, H, L, L]` batch
    /// (devices and dtypes the fused kernel does not cover). In training its intermediates are
    /// not kept for the backward pass, which computes them again ([`recompute_in_backward`]), as
    /// the fused CPU kernel does, and the `[B, H, L, L]` core has an analytic backward pass
    /// ([`AttentionCore`]): kept and back-propagated, they were most of a GPU training step's
    /// memory. A dropout mask is drawn once and kept (`u8` when drawn on the device), so that
    /// every computation uses the same one.
    fn composed(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut outputs = Vec::new();
        let prepared = self.prepare(q.dtype(), q.device())?;
        for Chunk { rows, dense } in self.chunks(&prepared, q.dim(1)?, self.chunk_weights)? {
            let part = |x: &Tensor| x.narrow(0, rows.start, rows.len());
            let (q, k, v) = (part(q)?, part(k)?, part(v)?);
            outputs.push(recompute_in_backward(&[&q, &k, &v], move |x| dense.attend(&x[0], &x[1], &x[2]))?);
        }
        match outputs.len() {
            0 => q.zeros_like(),
            1 => Ok(outputs.remove(0)),
            _ => Tensor::cat(&outputs, 0),
        }
    }

    /// The attention of the projections `[Q ‖ K ‖ V] = x W_inᵀ + b_in` (`w` `[3d, d]`, `b` `[3d]`)
    /// as one graph node over `x`, `w` and `b`: in training it keeps nothing but its output for
    /// the backward pass, which projects and attends again chunk by chunk and back-propagates
    /// through each chunk alone, in chunks of a quarter of the forward pass's size (its
    /// transient memory, about nine `[chunk, H, L, L]`-sized tensors, was the largest of a GPU
    /// training step). Each chunk projects its own rows, by the three row blocks of `w` (a
    /// `[rows, 3d]` product split into three would give three zero-padded `[rows, 3d]` gradients
    /// in the backward pass). With `cast`, each projection multiplies operands rounded to that
    /// dtype and returns to `x`'s (autocast); the backward pass differentiates the casts too.
    fn projected(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        cast: Option<candle_core::DType>,
    ) -> Result<Tensor> {
        let d = x.dim(1)?;
        let prepared = self.prepare(x.dtype(), x.device())?;
        let forward_chunks = self.chunks(&prepared, d, self.chunk_weights)?;
        let backward_chunks = Arc::new(self.chunks(&prepared, d, (self.chunk_weights / 4).max(1))?);
        let has_bias = b.is_some();
        // Inputs: the chunk's rows of x, w, and b if any.
        let attend = move |chunk: &Chunk, t: &[Tensor]| -> Result<Tensor> {
            let project = |i: usize| -> Result<Tensor> {
                let y = matmul_t_autocast(&t[0], &t[1].narrow(0, i * d, d)?, cast)?;
                if has_bias {
                    y.broadcast_add(&t[2].narrow(0, i * d, d)?)
                } else {
                    Ok(y)
                }
            };
            chunk.dense.attend(&project(0)?, &project(1)?, &project(2)?)
        };
        let rows_of = |chunk: &Chunk, t: &[Tensor]| -> Result<Vec<Tensor>> {
            let mut inputs = t.to_vec();
            inputs[0] = t[0].narrow(0, chunk.rows.start, chunk.rows.len())?;
            Ok(inputs)
        };
        let inputs: Vec<&Tensor> = [Some(x), Some(w), b].into_iter().flatten().collect();
        with_backward(
            &inputs,
            move |t| {
                let outputs = forward_chunks.iter().map(|c| attend(c, &rows_of(c, t)?)).collect::<Result<Vec<_>>>()?;
                match outputs.len() {
                    0 => Tensor::zeros((0, d), t[0].dtype(), t[0].device()),
                    _ => Tensor::cat(&outputs, 0),
                }
            },
            move |t, _, grad| {
                let mut dx = Vec::with_capacity(backward_chunks.len());
                let mut sums: Vec<Option<Tensor>> = vec![None; t.len() - 1];
                for chunk in backward_chunks.iter() {
                    let g = grad.narrow(0, chunk.rows.start, chunk.rows.len())?;
                    let grads = backprop_through(&|x| attend(chunk, x), &rows_of(chunk, t)?, &g)?;
                    let mut grads = grads.into_iter();
                    dx.push(grads.next().flatten().ok_or_else(|| candle_core::Error::Msg("attention: no ∂x".into()))?);
                    for (sum, g) in sums.iter_mut().zip(grads) {
                        *sum = match (sum.take(), g) {
                            (Some(a), Some(g)) => Some((a + g)?),
                            (a, g) => a.or(g),
                        };
                    }
                }
                let dx = match dx.len() {
                    0 => t[0].zeros_like()?,
                    _ => Tensor::cat(&dx, 0)?,
                };
                Ok([Some(dx)].into_iter().chain(sums).collect())
            },
        )
    }

    /// What every chunk shares: the dense key bias `[B, 1, 1, L]` and the dropout of the whole
    /// batch (drawn here, once, so that every computation of a chunk uses the same mask).
    fn prepare(&self, dtype: candle_core::DType, dev: &candle_core::Device) -> Result<Prepared> {
        let seqs = &self.sequences;
        let (b, h) = (seqs.batch_size(), self.num_heads);
        let l = seqs.lengths().max().unwrap_or(0);
        // The key bias of dense row s·L + i: row `start + i` of sequence s, or hidden padding.
        let mut bias = vec![f64::NEG_INFINITY; b * l];
        for (s, (start, len)) in seqs.offsets().iter().copied().zip(seqs.lengths()).enumerate() {
            bias[s * l..s * l + len].copy_from_slice(&seqs.key_bias()[start..start + len]);
        }
        let dropout = match &self.dropout {
            Some(m) => {
                // Sequence s's multipliers fill the top-left L_s × L_s block of each of its heads.
                let mut dense = vec![0f32; b * h * l * l];
                for t in head_blocks(self.sequences.as_ref(), h) {
                    let base = (t.sequence * h + t.head) * l * l;
                    for (i, row) in m[t.mask_offset..t.mask_offset + t.len * t.len].chunks(t.len.max(1)).enumerate() {
                        dense[base + i * l..base + i * l + t.len].copy_from_slice(row);
                    }
                }
                let dense = upload(dense, (b, h, l, l), dev, "attention dropout multipliers", Origin::Random)?;
                Some(DenseDropout::Multipliers(dense.to_dtype(dtype)?))
            }
            None if self.device_dropout > 0.0 => {
                let keep = device_keep_mask(self.device_dropout, &(b, h, l, l).into(), dev)?;
                Some(DenseDropout::Keep { keep, p: self.device_dropout })
            }
            None => None,
        };
        // Every key of every row valid (sequences of one length, no key masked): no bias to add,
        // which spares a pass over the `[B, H, L, L]` scores.
        // Made once per device and dtype for every layer of the pass (the sequences keep it).
        let bias_tensor = match bias.iter().all(|&v| v == 0.0) {
            true => None,
            false => Some(seqs.device_copies().get_or_make(
                &format!("composed attention's padding bias, {dtype:?}"),
                dev,
                || upload_slice(&bias, (b, 1, 1, l), dev, "attention padding bias", Origin::Input)?.to_dtype(dtype),
            )?),
        };
        Ok(Prepared { device: dev.clone(), longest: l, bias_host: bias, bias: bias_tensor, dropout })
    }

    /// The dense attentions of the batch for inputs of width `d`: chunks of consecutive whole
    /// sequences ([`chunk_plan`]), each padded to its own longest sequence and at most
    /// `chunk_weights` attention weights; a chunk of empty sequences only is left out.
    fn chunks(&self, prepared: &Prepared, d: usize, chunk_weights: usize) -> Result<Vec<Chunk>> {
        let seqs = &self.sequences;
        let (h, l) = (self.num_heads, prepared.longest);
        let offsets = seqs.offsets();
        let lengths: Vec<usize> = seqs.lengths().collect();
        // A chunk of empty sequences only has nothing to compute and nothing to send back.
        let plan: Vec<_> =
            chunk_plan(&lengths, h, chunk_weights).into_iter().filter(|g| offsets[g.start] < offsets[g.end]).collect();
        // The chunks' index maps depend on the layout alone: made once per device for every
        // layer and both passes.
        let key = format!("composed attention's chunk index maps, {h} heads, {chunk_weights} weights");
        let indexes: Arc<Vec<Option<DistinctRows>>> =
            seqs.device_copies().get_or_make(&key, &prepared.device, || {
                // Every chunk's maps in one upload.
                let mut stage = IndexStage::default();
                let staged = plan
                    .iter()
                    .map(|group| self.chunk_index(group.clone(), &lengths, &mut stage))
                    .collect::<Result<Vec<_>>>()?;
                let uploaded = stage.upload(&prepared.device, "attention chunks' index maps")?;
                let finished = staged.iter().map(|s| s.as_ref().map(|s| s.finish(&uploaded)).transpose());
                finished.collect::<Result<_>>().map(Arc::new)
            })?;
        let mut chunks = Vec::new();
        for (group, index) in plan.into_iter().zip(indexes.iter().cloned()) {
            let (first, n) = (group.start, group.len());
            let rows = offsets[first]..offsets[group.end];
            // The chunk's dense length: its longest sequence (the first L_c columns of the
            // batch's bias and dropout).
            let lc = lengths[group.clone()].iter().copied().max().unwrap_or(0);
            // No bias where none of the chunk's keys is hidden: a `[n, H, L_c, L_c]` pass fewer.
            let hidden = group.clone().any(|s| prepared.bias_host[s * l..s * l + lc].iter().any(|&v| v != 0.0));
            let bias = match (&prepared.bias, hidden) {
                (Some(bias), true) => Some(bias.narrow(0, first, n)?.narrow(3, 0, lc)?),
                _ => None,
            };
            let dense = DenseAttention {
                shape: (n, lc, h, d),
                index,
                core: Arc::new(AttentionCore {
                    bias,
                    dropout: prepared.dropout.as_ref().map(|drop| drop.narrow(first, n, lc)).transpose()?,
                }),
            };
            chunks.push(Chunk { rows, dense });
        }
        Ok(chunks)
    }

    /// The index map of the chunk of sequences `group` (not all empty) into its dense heads,
    /// staged in `stage`, or `None` where its sequences all have one length.
    ///
    /// The packed rows `[R, d]` seen as `[R·H, d_h]`: head j of the chunk's row r is row r·H + j,
    /// and goes to row (s·H + j)·L_c + i of the dense heads `[n·H·L_c, d_h]` when r is row i of
    /// the chunk's s-th sequence. A padding row repeats head j of its sequence's first row (of the
    /// chunk's first row for an empty sequence): masked as a key, never read as a query, so its
    /// values do not matter and its gradient is zero (`DistinctRows::spread`), and it holds only
    /// values of its own sequence, so a non-finite input spreads no further than it does anyway.
    /// Sequences all of length L_c: the packed rows are the dense batch already.
    fn chunk_index(
        &self,
        group: std::ops::Range<usize>,
        lengths: &[usize],
        stage: &mut IndexStage,
    ) -> Result<Option<StagedDistinctRows>> {
        let (offsets, h) = (self.sequences.offsets(), self.num_heads);
        let (first, n) = (group.start, group.len());
        let lc = lengths[group.clone()].iter().copied().max().unwrap_or(0);
        if lengths[group].iter().all(|&len| len == lc) {
            return Ok(None);
        }
        let local = |s: usize| offsets[first + s] - offsets[first];
        let heads: Vec<u32> = (0..n)
            .flat_map(|s| {
                (0..local(s + 1) - local(s)).flat_map(move |i| (0..h).map(move |j| ((s * h + j) * lc + i) as u32))
            })
            .collect();
        let fill = |row: usize| {
            let (s, j) = (row / (h * lc), row / lc % h);
            let own_first = if local(s + 1) > local(s) { local(s) } else { 0 };
            (own_first * h + j) as u32
        };
        StagedDistinctRows::stage(&heads, n * h * lc, Some(&fill), stage, "packed attention").map(Some)
    }
}

/// The chunks of consecutive sequences (by their lengths) in which the composed attention runs,
/// each padded to its longest sequence `L_c`: a chunk grows while its `n · H · L_c²` attention
/// weights stay within `chunk_weights` and within a quarter above its sequences' own `Σ H · ℓ²`
/// (below [`MIN_CHUNK_WEIGHTS`] whatever its padding, so that short sequences do not each make a
/// chunk of their own, and so kernel launches). TransAct packs its sequences shortest first on a
/// GPU's graph (`PackedSequences::sorted_by_length`), so consecutive sequences have similar
/// lengths; `homefeed-bench`'s lengths (uniform in 1..=100) then pad about 25% where one `L` for
/// the whole batch padded about 190%. Every chunk holds at least one sequence; no sequences, no
/// chunks.
fn chunk_plan(lengths: &[usize], heads: usize, chunk_weights: usize) -> Vec<std::ops::Range<usize>> {
    let mut plan = Vec::new();
    let (mut start, mut longest, mut own) = (0, 0usize, 0usize);
    for (s, &len) in lengths.iter().enumerate() {
        if s > start {
            let l = longest.max(len);
            let padded = (s + 1 - start) * heads * l * l;
            let own_then = own + heads * len * len;
            let fits = padded <= chunk_weights && (padded <= MIN_CHUNK_WEIGHTS || 4 * padded <= 5 * own_then);
            if !fits {
                plan.push(start..s);
                (start, longest, own) = (s, 0, 0);
            }
        }
        longest = longest.max(len);
        own += heads * len * len;
    }
    if start < lengths.len() {
        plan.push(start..lengths.len());
    }
    plan
}

/// A chunk of at most this many attention weights may pad as much as it needs
/// ([`chunk_plan`]): 4 MiB of f32 scores.
const MIN_CHUNK_WEIGHTS: usize = 1 << 20;

/// What the chunks of one composed attention share ([`Composed::prepare`]).
struct Prepared {
    device: candle_core::Device,
    /// `L`, the batch's longest sequence: the dense width of `bias` and `dropout`.
    longest: usize,
    /// The key bias `[B · L]` on the host, to see which chunks hide a key.
    bias_host: Vec<f64>,
    /// The key bias `[B, 1, 1, L]` (`None`: all zero).
    bias: Option<Tensor>,
    dropout: Option<DenseDropout>,
}

/// One chunk of the composed attention: its packed rows and its dense attention.
struct Chunk {
    rows: std::ops::Range<usize>,
    dense: DenseAttention,
}

/// At most this many attention weights (`n · H · L_c²` over a chunk's `n` sequences) in one dense
/// computation: the composed attention runs larger batches in chunks of whole sequences, so that
/// its `[n, H, L_c, L_c]` tensors stay within 64 MiB each (f32) at any batch size, and so does
/// what its backward pass recomputes (scoring batch 32 768 would otherwise hold 2.6 GB tensors).
/// Smaller chunks would save little more and launch more GPU kernels.
const CHUNK_WEIGHTS: usize = 1 << 24;

/// The dropout of the dense attention weights.
enum DenseDropout {
    /// Multipliers `[B, H, L, L]` in the weights' dtype (from host-drawn values).
    Multipliers(Tensor),
    /// A `u8` keep mask drawn on the device ([`device_keep_mask`]).
    Keep { keep: Tensor, p: f64 },
}

impl DenseDropout {
    /// The masks of sequences `first .. first + n`, their first `l` rows and columns (a strided
    /// view: nothing is copied).
    fn narrow(&self, first: usize, n: usize, l: usize) -> Result<Self> {
        let part = |t: &Tensor| t.narrow(0, first, n)?.narrow(2, 0, l)?.narrow(3, 0, l);
        Ok(match self {
            Self::Multipliers(m) => Self::Multipliers(part(m)?),
            Self::Keep { keep, p } => Self::Keep { keep: part(keep)?, p: *p },
        })
    }
}

/// What the dense attention needs besides `Q`, `K`, `V`, prepared once for both of its
/// computations (forward, and again in the backward pass).
struct DenseAttention {
    /// `(B, L, H, d)`.
    shape: (usize, usize, usize, usize),
    /// The dense head row of each packed head row (`None`: the packed rows are the dense batch),
    /// with its index tensors built once for the chunk: every `attend`
    /// (forward, and each recomputation in the backward pass) spreads `Q`, `K`, `V` into the
    /// dense heads and gathers the output back through them, one gather each way.
    index: Option<DistinctRows>,
    core: Arc<AttentionCore>,
}

/// `O = drop(softmax(Q Kᵀ + M)) V` on dense heads `[B, H, L, d_h]` (`Q` scaled already), one
/// graph node with the analytic backward pass ([`with_backward`]):
///
/// ```text
/// P = softmax(Q Kᵀ + M),  P_d = P ⊙ D
/// ∂V = P_dᵀ ∂O,  ∂P = (∂O Vᵀ) ⊙ D,  ∂S = P ⊙ (∂P − rowsum(∂P ⊙ P)),  ∂Q = ∂S K,  ∂K = ∂Sᵀ Q
/// ```
///
/// It recomputes `P` and holds about four `[B, H, L, L]` tensors at once, where back-propagation
/// through the composed operations held about twenty-five (every intermediate's gradient, and
/// candle's zero-initialised accumulators): at training batch 512 that was 1 GiB per layer.
struct AttentionCore {
    /// The key bias `M` `[B, 1, 1, L]` (`None`: all zero).
    bias: Option<Tensor>,
    dropout: Option<DenseDropout>,
}

impl AttentionCore {
    fn apply(self: &Arc<Self>, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (forward, backward) = (self.clone(), self.clone());
        with_backward(
            &[q, k, v],
            move |x| forward.forward(&x[0], &x[1], &x[2]),
            move |x, _, grad| backward.backward(&x[0], &x[1], &x[2], grad),
        )
    }

    /// `P`. The node's inputs take part in no graph here (its backward pass is written out), so
    /// the softmax is the fused kernel ([`rankstack_nn::softmax()`]).
    fn weights(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scores = q.matmul(&k.t()?)?;
        let scores = match &self.bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        rankstack_nn::softmax(&scores, D::Minus1)
    }

    /// `D`, if any.
    fn multipliers(&self, dtype: candle_core::DType) -> Result<Option<Tensor>> {
        match &self.dropout {
            Some(DenseDropout::Multipliers(m)) => Ok(Some(m.clone())),
            Some(DenseDropout::Keep { keep, p }) => device_multipliers(keep, *p, dtype).map(Some),
            None => Ok(None),
        }
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let weights = self.weights(q, k)?;
        let weights = match self.multipliers(weights.dtype())? {
            Some(m) => weights.mul(&m)?,
            None => weights,
        };
        weights.matmul(v)
    }

    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let p = self.weights(q, k)?;
        let m = self.multipliers(p.dtype())?;
        let dv = match &m {
            Some(m) => p.mul(m)?.t()?.matmul(grad)?,
            None => p.t()?.matmul(grad)?,
        };
        let mut dp = grad.matmul(&v.t()?)?;
        if let Some(m) = m {
            dp = dp.mul(&m)?;
        }
        let row = dp.mul(&p)?.sum_keepdim(D::Minus1)?;
        let ds = p.mul(&dp.broadcast_sub(&row)?)?;
        drop((p, dp));
        let dq = ds.matmul(k)?;
        let dk = ds.t()?.matmul(q)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
}

impl DenseAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, l, h, d) = self.shape;
        let (rows, dh) = (q.dim(0)?, d / h);
        // Packed rows [R, d] → dense heads [B, H, L, dh]: with padding one gather of the head rows
        // (distinct rows: not candle's serial CUDA index_add, see distinct_rows), else a strided
        // view of the rows themselves.
        let heads = |x: &Tensor| -> Result<Tensor> {
            match &self.index {
                None => x.reshape((b, l, h, dh))?.transpose(1, 2),
                Some(index) => index.spread(&x.reshape((rows * h, dh))?)?.reshape((b, h, l, dh)),
            }
        };
        // `Q` is scaled as it is copied (or after its gather); `K`, `V` made contiguous, a copy
        // only of the strided view.
        let q = heads(q)?.affine(1.0 / (dh as f64).sqrt(), 0.0)?;
        let (k, v) = (heads(k)?.contiguous()?, heads(v)?.contiguous()?);
        let out = self.core.apply(&q, &k, &v)?;
        match &self.index {
            None => out.transpose(1, 2)?.reshape((b * l, d)),
            Some(index) => index.gather(&out.reshape((b * h * l, dh))?)?.reshape((rows, d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::backprop::GradStore;
    use candle_core::{DType, Var};
    use rankstack_nn::testing::seeded_randn;

    use super::*;

    const INF: f64 = f64::NEG_INFINITY;

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Sequences of lengths 3, 0, 5, 1 (9 rows) with some hidden keys, 2 heads, width 6, and
    /// host dropout multipliers for their attention weights.
    fn sequences_heads_width_and_multipliers() -> (Arc<PackedSequences>, usize, usize, Arc<Vec<f32>>) {
        let bias = vec![0.0, INF, 0.0, /* */ 0.0, 0.0, INF, INF, 0.0, /* */ 0.0];
        let seqs = Arc::new(PackedSequences::new(&[3, 0, 5, 1], bias).unwrap());
        let h = 2;
        let n = seqs.attention_weight_count(h);
        let multipliers = Arc::new((0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.5 }).collect::<Vec<f32>>());
        (seqs, h, 6, multipliers)
    }

    /// The composed attention of `seqs` with `h` heads, dropout from host multipliers (none set).
    fn host_dropout(seqs: &Arc<PackedSequences>, h: usize) -> Composed {
        Composed {
            sequences: seqs.clone(),
            num_heads: h,
            dropout: None,
            device_dropout: 0.0,
            chunk_weights: CHUNK_WEIGHTS,
        }
    }

    /// The composed path (what GPUs run) against the fused CPU kernel (itself checked against the
    /// formula in `rankstack-kernels`), in value and every gradient, with and without dropout, on
    /// sequences of lengths 3, 0, 5, 1 with some hidden keys.
    #[test]
    fn the_composed_path_matches_the_fused_kernel_in_value_and_gradient() {
        let (seqs, h, d, multipliers) = sequences_heads_width_and_multipliers();
        for dropout in [None, Some(multipliers)] {
            let x = [1, 2, 3].map(|s| Var::from_tensor(&seeded_randn(s, &[9, d], DType::F64)).unwrap());
            let [q, k, v] = [0, 1, 2].map(|i| x[i].as_tensor());
            let fused = packed_attention(q, k, v, &seqs, h, dropout.clone()).unwrap();
            let r = seeded_randn(4, &[9, d], DType::F64);
            let g1 = (&fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
            // The whole batch at once, and in chunks of one, two and three sequences (L = 5:
            // 50 weights per sequence), the second sequence (empty) a chunk of its own.
            for chunk_weights in [CHUNK_WEIGHTS, 50, 100, 150] {
                let case = format!("dropout {}, chunks of {chunk_weights} weights", dropout.is_some());
                let op = Composed { dropout: dropout.clone(), chunk_weights, ..host_dropout(&seqs, h) };
                let composed = op.composed(q, k, v).unwrap();
                for (a, b) in flat(&fused).iter().zip(flat(&composed)) {
                    assert!((a - b).abs() <= 1e-13, "{case}: {a} vs {b}");
                }
                let g2 = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
                assert_same_gradients(&g1, &g2, &x, &case);
            }
        }
    }

    /// Scoring off the CPU kernels (what a GPU scores with): without dropout and with no input in
    /// a graph, `packed_attention` is the forward-only kernel, which gives the fused CPU kernel's
    /// and the composed path's values to f32 rounding; with inputs in a graph it composes, and the
    /// gradient flows.
    #[test]
    fn scoring_off_the_cpu_kernels_is_the_forward_only_kernel() {
        use rankstack_kernels::cpu::{with_isa, Isa};

        let (seqs, h, _, _) = sequences_heads_width_and_multipliers();
        let d = 2 * 8;
        let [q, k, v] = [1, 2, 3].map(|s| seeded_randn(s, &[9, d], DType::F32));
        let fused = packed_attention(&q, &k, &v, &seqs, h, None).unwrap();
        let scoring = with_isa(Isa::Candle, || packed_attention(&q, &k, &v, &seqs, h, None).unwrap());
        let kernel = packed_attention_forward_on_device(&q, &k, &v, seqs.as_ref(), h).unwrap().unwrap();
        assert_eq!(flat(&scoring), flat(&kernel), "the kernel is what scoring runs");
        let composed = host_dropout(&seqs, h).composed(&q, &k, &v).unwrap();
        for (name, other) in [("fused", &fused), ("composed", &composed)] {
            for (a, b) in flat(&scoring).iter().zip(flat(other)) {
                assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "{name}: {a} vs {b}");
            }
        }
        // Inputs in a graph: the composed path, with its gradient.
        let qv = Var::from_tensor(&q).unwrap();
        let trained = with_isa(Isa::Candle, || packed_attention(qv.as_tensor(), &k, &v, &seqs, h, None).unwrap());
        assert_eq!(flat(&trained), flat(&composed));
        let grads = trained.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(qv.as_tensor()).is_some(), "the query gets a gradient");
    }

    /// The projecting node (what a GPU trains with) against the fused CPU kernel of the
    /// projections: value and the gradients of `x`, `W_in` and `b_in`, with and without dropout,
    /// whole and in chunks (an empty sequence a chunk of its own), with and without bias.
    #[test]
    fn the_projecting_node_matches_the_fused_kernel_of_the_projections() {
        let (seqs, h, d, multipliers) = sequences_heads_width_and_multipliers();
        for dropout in [None, Some(multipliers)] {
            for with_bias in [true, false] {
                let var = |seed, dims: &[usize]| Var::from_tensor(&seeded_randn(seed, dims, DType::F64)).unwrap();
                let (x, w, b) = (var(1, &[9, d]), var(2, &[3 * d, d]), var(3, &[3 * d]));
                let b = with_bias.then_some(b);
                let project = |i: usize| {
                    let y = x.as_tensor().matmul(&w.as_tensor().narrow(0, i * d, d).unwrap().t().unwrap()).unwrap();
                    match &b {
                        Some(b) => y.broadcast_add(&b.as_tensor().narrow(0, i * d, d).unwrap()).unwrap(),
                        None => y,
                    }
                };
                let fused = packed_attention(&project(0), &project(1), &project(2), &seqs, h, dropout.clone()).unwrap();
                let r = seeded_randn(4, &[9, d], DType::F64);
                let g1 = (&fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for chunk_weights in [CHUNK_WEIGHTS, 50, 100] {
                    let case = format!("dropout {}, bias {with_bias}, chunks of {chunk_weights}", dropout.is_some());
                    let op = Composed { dropout: dropout.clone(), chunk_weights, ..host_dropout(&seqs, h) };
                    let node =
                        op.projected(x.as_tensor(), w.as_tensor(), b.as_ref().map(Var::as_tensor), None).unwrap();
                    for (a, c) in flat(&fused).iter().zip(flat(&node)) {
                        assert!((a - c).abs() <= 1e-13, "{case}: {a} vs {c}");
                    }
                    let g2 = (node * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    for (name, v) in [("x", Some(&x)), ("W", Some(&w)), ("b", b.as_ref())] {
                        let Some(v) = v else { continue };
                        let (a, c) = (flat(g1.get(v.as_tensor()).unwrap()), flat(g2.get(v.as_tensor()).unwrap()));
                        assert!(a.len() == c.len() && a.iter().any(|v| *v != 0.0), "∂{name} ({case})");
                        for (a, c) in a.iter().zip(&c) {
                            assert!((a - c).abs() <= 1e-12, "∂{name} ({case}): {a} vs {c}");
                        }
                    }
                }
            }
        }
        // Shapes are checked.
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = packed_self_attention_with_device_dropout(&t(&[9, 6]), &t(&[12, 6]), None, &seqs, 2, 0.0, None)
            .unwrap_err();
        assert!(e.to_string().contains("in_proj_weight [12, 6], expected [18, 6]"), "{e}");
    }

    /// Under autocast (bf16 products, f32 everything else) the projecting node against the
    /// projections written out with their casts and the fused CPU kernel of the attention: the
    /// same projections, so values within f32 rounding, and gradients within one bf16 rounding of
    /// the largest (the node's products round ∂Q, ∂K, ∂V of its own attention's backward pass).
    #[test]
    fn the_projecting_node_under_autocast_matches_the_cast_projections() {
        let (seqs, h, d, multipliers) = sequences_heads_width_and_multipliers();
        let bf16 = Some(DType::BF16);
        let flat32 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let within = |a: &[f64], c: &[f64], of_scale: f64, what: &str| {
            let scale = c.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = a.iter().zip(c).fold(0f64, |m, (a, c)| m.max((a - c).abs()));
            assert!(a.len() == c.len() && scale > 0.0 && err <= of_scale * scale, "{what}: {err} against {scale}");
        };
        for dropout in [None, Some(multipliers)] {
            let var = |seed, dims: &[usize]| Var::from_tensor(&seeded_randn(seed, dims, DType::F32)).unwrap();
            let (x, w, b) = (var(1, &[9, d]), var(2, &[3 * d, d]), var(3, &[3 * d]));
            let project = |i: usize| {
                let wi = w.as_tensor().narrow(0, i * d, d).unwrap().to_dtype(DType::BF16).unwrap();
                let y = x.as_tensor().to_dtype(DType::BF16).unwrap().matmul(&wi.t().unwrap()).unwrap();
                y.to_dtype(DType::F32).unwrap().broadcast_add(&b.as_tensor().narrow(0, i * d, d).unwrap()).unwrap()
            };
            let want = packed_attention(&project(0), &project(1), &project(2), &seqs, h, dropout.clone()).unwrap();
            let r = seeded_randn(4, &[9, d], DType::F32);
            let g1 = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for chunk_weights in [CHUNK_WEIGHTS, 50] {
                let case = format!("dropout {}, chunks of {chunk_weights}", dropout.is_some());
                let op = Composed { dropout: dropout.clone(), chunk_weights, ..host_dropout(&seqs, h) };
                let node = op.projected(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), bf16).unwrap();
                assert_eq!(node.dtype(), DType::F32);
                within(&flat32(&node), &flat32(&want), 1e-5, &case);
                let g2 = (node * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, v) in [("x", &x), ("W", &w), ("b", &b)] {
                    let (a, c) = (g2.get(v.as_tensor()).unwrap(), g1.get(v.as_tensor()).unwrap());
                    assert_eq!(a.dtype(), DType::F32, "∂{name}");
                    within(&flat32(a), &flat32(c), 1.0 / 64.0, &format!("∂{name} ({case})"));
                }
            }
        }
    }

    /// The core's analytic backward pass against back-propagation through its own forward
    /// operations, without dropout, with host multipliers and with a device keep mask.
    #[test]
    fn the_cores_backward_pass_is_the_derivative_of_its_forward_pass() {
        let (b, h, l, dh) = (2, 2, 4, 3);
        let cpu = candle_core::Device::Cpu;
        // The last key of the second sequence is hidden.
        let bias = Tensor::new(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, INF], &cpu).unwrap().reshape((b, 1, 1, l)).unwrap();
        let n = b * h * l * l;
        let keep: Vec<u8> = (0..n).map(|i| u8::from(i % 4 != 1)).collect();
        let multipliers: Vec<f64> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 1.5 }).collect();
        let dropouts = [
            None,
            Some(DenseDropout::Multipliers(Tensor::from_vec(multipliers, (b, h, l, l), &cpu).unwrap())),
            Some(DenseDropout::Keep { keep: Tensor::from_vec(keep, (b, h, l, l), &cpu).unwrap(), p: 0.25 }),
        ];
        for dropout in dropouts {
            let what = match &dropout {
                None => "none",
                Some(DenseDropout::Multipliers(_)) => "multipliers",
                Some(DenseDropout::Keep { .. }) => "keep mask",
            };
            let core = Arc::new(AttentionCore { bias: Some(bias.clone()), dropout });
            let x = [5, 6, 7].map(|s| Var::from_tensor(&seeded_randn(s, &[b, h, l, dh], DType::F64)).unwrap());
            let [q, k, v] = [0, 1, 2].map(|i| x[i].as_tensor());
            let r = seeded_randn(8, &[b, h, l, dh], DType::F64);
            let analytic = core.apply(q, k, v).unwrap();
            let composed = core.forward(q, k, v).unwrap();
            assert!(composed.track_op() && analytic.track_op());
            assert_eq!(flat(&analytic), flat(&composed), "{what}: values");
            let g1 = (analytic * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (composed * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert_same_gradients(&g1, &g2, &x, what);
        }
    }

    /// The gradients of `q`, `k`, `v` (`x`) in `g1` and `g2` agree within 1e-13 and are not zero.
    fn assert_same_gradients(g1: &GradStore, g2: &GradStore, x: &[Var; 3], case: &str) {
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            let (a, b) = (flat(g1.get(x[i].as_tensor()).unwrap()), flat(g2.get(x[i].as_tensor()).unwrap()));
            assert!(a.iter().any(|v| *v != 0.0), "∂{name} is zero ({case})");
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() <= 1e-13, "∂{name} ({case}): {a} vs {b}");
            }
        }
    }

    #[test]
    fn chunks_pad_to_their_own_longest_sequence_within_the_budget_and_a_quarter_above_their_weights() {
        assert!(chunk_plan(&[], 2, 100).is_empty());
        // The budget: 2 heads · 5² = 50 weights per sequence of 5.
        assert_eq!(chunk_plan(&[5, 5, 5], 2, 100), [0..2, 2..3]);
        // A sequence over the budget alone is still a chunk.
        assert_eq!(chunk_plan(&[20, 5], 2, 100), [0..1, 1..2]);
        // Short sequences share a chunk whatever their padding (below MIN_CHUNK_WEIGHTS) ...
        let one = chunk_plan(&[1, 10, 1, 10, 0], 1, 1 << 30);
        assert_eq!((one.len(), one[0].clone()), (1, 0..5));
        // ... longer ones while the padding stays within a quarter of their own weights: 3 ·
        // 1100² = 3.63M padded for 3.21M own joins; 4 · 2000² = 16M for 7.21M does not.
        assert_eq!(chunk_plan(&[1000, 1000, 1100, 2000, 2000], 1, 1 << 30), [0..3, 3..5]);
    }

    /// TransAct's order on a GPU's graph (shortest first) and any other order attend alike, and
    /// chunks padded to their own longest sequence give the fused kernel's values.
    #[test]
    fn sequences_sorted_by_length_attend_as_in_their_own_order() {
        let bias = vec![0.0, INF, 0.0, /* */ 0.0, 0.0, INF, INF, 0.0, /* */ 0.0];
        let seqs = Arc::new(PackedSequences::new(&[3, 0, 5, 1], bias).unwrap());
        let rows: Vec<u32> = (0..9).collect();
        let (sorted, order) = seqs.sorted_by_length(&rows).unwrap();
        assert_eq!(sorted.lengths().collect::<Vec<_>>(), [0, 1, 3, 5]);
        let sorted = Arc::new(sorted);
        let (h, d) = (2, 6);
        let x = [1, 2, 3].map(|s| seeded_randn(s, &[9, d], DType::F64));
        let index = Tensor::from_slice(&order, 9, &candle_core::Device::Cpu).unwrap();
        let permuted = x.clone().map(|t| t.index_select(&index, 0).unwrap());
        let want = packed_attention(&x[0], &x[1], &x[2], &seqs, h, None).unwrap().index_select(&index, 0).unwrap();
        for chunk_weights in [CHUNK_WEIGHTS, 20, 50] {
            let op = Composed { chunk_weights, ..host_dropout(&sorted, h) };
            let got = op.composed(&permuted[0], &permuted[1], &permuted[2]).unwrap();
            for (a, b) in flat(&want).iter().zip(flat(&got)) {
                assert!((a - b).abs() <= 1e-13, "chunks of {chunk_weights}: {a} vs {b}");
            }
        }
    }

    /// Off the CPU kernels, the layers of a pass copy what they derive from the sequences to the
    /// device once: the fused kernel's offsets and key bias, the composed attention's padding
    /// bias and chunk index maps (in both passes of training). Values are those of a fresh
    /// layout each time.
    #[test]
    fn layers_copy_the_sequences_layout_to_the_device_once() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        use rankstack_nn::host_transfer::record_transfers;

        let bias = vec![0.0, INF, 0.0, /* */ 0.0, 0.0, INF, INF, 0.0, /* */ 0.0];
        let fresh = || Arc::new(PackedSequences::new(&[3, 0, 5, 1], bias.clone()).unwrap());
        let whats = |t: &[rankstack_nn::host_transfer::Transfer]| t.iter().map(|t| t.what).collect::<Vec<_>>();
        with_isa(Isa::Candle, || {
            // Scoring's fused attention (f32, head width 8).
            let x = [1, 2, 3].map(|s| seeded_randn(s, &[9, 16], DType::F32));
            let seqs = fresh();
            let (first, uploads) = record_transfers(|| packed_attention(&x[0], &x[1], &x[2], &seqs, 2, None).unwrap());
            assert_eq!(whats(&uploads), ["attention sequence offsets", "attention key bias"]);
            let (second, none) = record_transfers(|| packed_attention(&x[0], &x[1], &x[2], &seqs, 2, None).unwrap());
            assert_eq!(whats(&none), Vec::<&str>::new());
            assert_eq!(flat(&first), flat(&second));

            // Training's composed attention with its projections, forward and backward passes.
            let (h, d) = (2, 6);
            let x = Var::from_tensor(&seeded_randn(4, &[9, d], DType::F64)).unwrap();
            let w = Var::from_tensor(&seeded_randn(5, &[3 * d, d], DType::F64)).unwrap();
            let step = |seqs: &Arc<PackedSequences>| {
                let y = packed_self_attention_with_device_dropout(&x, &w, None, seqs, h, 0.0, None).unwrap();
                let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                (flat(&y), flat(grads.get(&w).unwrap()))
            };
            let seqs = fresh();
            let (layer_one, uploads) = record_transfers(|| step(&seqs));
            let made = whats(&uploads);
            assert_eq!(
                made,
                ["attention padding bias", "attention chunks' index maps", "attention chunks' index maps"]
            );
            let (layer_two, none) = record_transfers(|| step(&seqs));
            assert_eq!(whats(&none), Vec::<&str>::new());
            assert_eq!(layer_one, layer_two);
            assert_eq!(step(&fresh()), layer_one);
        });
    }

    #[test]
    fn bad_shapes_are_errors() {
        let seqs = Arc::new(PackedSequences::new(&[3], vec![0.0; 3]).unwrap());
        let t = |r: usize| Tensor::zeros((r, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = packed_attention(&t(2), &t(2), &t(2), &seqs, 2, None).unwrap_err().to_string();
        assert!(e.contains("2 rows"), "{e}");
        let e = packed_attention_with_device_dropout(&t(3), &t(3), &t(3), &seqs, 2, 1.5).unwrap_err().to_string();
        assert!(e.contains("dropout 1.5"), "{e}");
    }
}
