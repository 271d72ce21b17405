//! Scaled dot-product attention over packed variable-length sequences off the CPU kernels (a
//! GPU, or the CPU under `RANKSTACK_CPU=candle`), forward only: scoring's attention as one kernel.
//!
//! ```text
//! O_h = softmax(Q_h K_hᵀ / √d_h + M) V_h     for every sequence and head h
//! ```
//!
//! The attention composed of candle operations (`sequence_transformer::packed_attention`'s
//! fallback) pads the sequences into dense `[B, H, L, L]` chunks and writes the scores, the
//! weights and the spread and gathered heads: at scoring batch 2048 about 280 launches and
//! 1.7 GB written per forward pass of the two TransAct layers. Here each (sequence, head) is one
//! CUDA block whose threads take its query rows; a thread keeps its query row and its output row
//! in registers, computes its scores twice (their maximum, then the weights and the weighted
//! values) and writes only its output: one launch per layer, nothing of size `L²`, no padding.
//! On the CPU the same arithmetic row by row (`attend_row_body`, with hardware FMA where the CPU
//! has it and each score computed once; the CUDA kernel is `cuda/packed_attention.cu`, tested
//! against it on the host by `cuda_on_host`, bit for bit).
//!
//! It computes no gradient, so it applies only where none of `Q`, `K`, `V` takes part in a graph
//! (scoring, evaluation of constant weights), to `f32` with a head width of [`HEAD_WIDTHS`] (the
//! kernel keeps a row in registers, one instantiation per width). Elsewhere
//! [`packed_attention_forward_on_device`] returns `None`, and the caller composes the attention.
//! `RANKSTACK_DEVICE_ATTENTION=composed` turns it off (to measure one against the other).
//!
//! The weights are normalised after the values are summed (`Σ_j e^{s_j − m} v_j / Σ_j e^{s_j − m}`,
//! one division per output): the composed attention's results to a few ulp, not its bits. A row
//! whose keys are all hidden gets NaN, as the composed softmax gives it.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! use rankstack_kernels::cpu::packed_attention::SequenceLayout;
//! use rankstack_kernels::device_packed_attention::packed_attention_forward_on_device;
//! struct Two; // two sequences of 2 and 1 rows, every row a key
//! impl SequenceLayout for Two {
//!     fn row_offsets(&self) -> &[usize] { &[0, 2, 3] }
//!     fn key_bias(&self) -> &[f64] { &[0.0, 0.0, 0.0] }
//! }
//! let x = Tensor::new(&[[1f32; 8], [2f32; 8], [3f32; 8]], &Device::Cpu)?;
//! let out = packed_attention_forward_on_device(&x, &x, &x, &Two, 1)?.expect("f32, width 8");
//! // A sequence of one row attends to itself.
//! assert_eq!(out.get(2)?.to_vec1::<f32>()?, vec![3f32; 8]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::auxiliary::on_host;
use crate::cpu::packed_attention::{check, SequenceLayout};
use crate::float::contiguous_storage;
use crate::host_transfer::{upload, Origin};

/// The head widths `d / num_heads` the kernel is instantiated for (`cuda/packed_attention.cu`).
pub const HEAD_WIDTHS: [usize; 8] = [8, 16, 24, 32, 48, 64, 96, 128];

/// The environment variable that chooses scoring's attention off the CPU kernels: `fused` (the
/// default, this module) or `composed` (candle operations).
pub const DEVICE_ATTENTION_ENV: &str = "RANKSTACK_DEVICE_ATTENTION";

/// Whether [`DEVICE_ATTENTION_ENV`]'s `value` allows the fused kernel; anything but `fused`
/// (or unset) and `composed` is an error naming the variable.
fn fused_allowed(value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("fused") => Ok(true),
        Some("composed") => Ok(false),
        Some(other) => {
            candle_core::bail!("{DEVICE_ATTENTION_ENV}=`{other}`: expected `fused` (the default) or `composed`")
        }
    }
}

/// The attention of the packed rows `q`, `k`, `v` `[R, d]` (checked against `sequences`, as
/// `cpu::packed_attention::check` does), with no gradient, on their device; `None` where it does
/// not apply (an input in a graph, not `f32`, a head width not in [`HEAD_WIDTHS`], or
/// [`DEVICE_ATTENTION_ENV`] set to `composed`). Copies the sequences' row offsets and key bias to
/// the device (`R + B + 1` values), once per device where the sequences keep
/// [`SequenceLayout::device_copies`].
pub fn packed_attention_forward_on_device<S: SequenceLayout + ?Sized>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &S,
    num_heads: usize,
) -> Result<Option<Tensor>> {
    check(q, k, v, sequences, num_heads)?;
    if !fused_allowed(std::env::var(DEVICE_ATTENTION_ENV).ok().as_deref())? {
        return Ok(None);
    }
    let (rows, d) = q.dims2()?;
    let head_width = d / num_heads;
    let in_graph = [q, k, v].iter().any(|t| t.track_op());
    let f32_only = [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if in_graph || !f32_only || !HEAD_WIDTHS.contains(&head_width) || rows > u32::MAX as usize {
        return Ok(None);
    }
    let offsets = sequences.row_offsets();
    let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let device = q.device();
    let make_layout = || -> Result<(Tensor, Tensor)> {
        let starts: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let key_bias = sequences.key_bias().iter().map(|&b| b as f32).collect();
        Ok((
            upload(starts, offsets.len(), device, "attention sequence offsets", Origin::Input)?,
            upload(key_bias, rows, device, "attention key bias", Origin::Input)?,
        ))
    };
    let (offsets, key_bias) = match sequences.device_copies() {
        Some(copies) => copies.get_or_make("fused attention's offsets and key bias", device, make_layout)?,
        None => make_layout()?,
    };
    let op = PackedAttentionForward {
        offsets,
        key_bias,
        heads: num_heads,
        head_width,
        scale: (1.0 / (head_width as f64).sqrt()) as f32,
        longest,
    };
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op).map(Some)
}

/// The op: `Q`, `K`, `V` in, `O` out; the sequences' layout on the device.
struct PackedAttentionForward {
    /// `[B + 1]` u32: the first row of each sequence, then `R`.
    offsets: Tensor,
    /// `[R]` f32: each row's bias as a key.
    key_bias: Tensor,
    heads: usize,
    head_width: usize,
    /// `1 / √d_h`, rounded to f32.
    scale: f32,
    /// The longest sequence (the CUDA blocks' threads).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    longest: usize,
}

/// The packed rows' layout, as the CPU mirror and the CUDA kernel read it.
struct Rows<'a> {
    offsets: &'a [u32],
    key_bias: &'a [f32],
    heads: usize,
    head_width: usize,
    scale: f32,
}

/// Keys scored at once by the CPU mirror: independent fused multiply-add chains side by side, so
/// that one chain's latency hides behind the others'. Each chain is still one key's dot product in
/// the kernel's order, so the bits do not change.
const KEYS_AT_ONCE: usize = 8;

impl Rows<'_> {
    /// Row `i`'s output of every head (`out`, `d` values), for row `i` of the sequence
    /// `begin..end`: the CUDA kernel's threads, operation for operation. Each score is computed
    /// once and kept in `scores` (the kernel computes it twice, the same way: the same bits).
    /// `inline(always)`, so that [`Rows::attend_row_fma`] compiles it with hardware FMA.
    #[inline(always)]
    fn attend_row_body(
        &self,
        [q, k, v]: [&[f32]; 3],
        (begin, end): (usize, usize),
        i: usize,
        out: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        let dh = self.head_width;
        let d = self.heads * dh;
        for (h, out) in out.chunks_exact_mut(dh).enumerate() {
            let column = h * dh;
            let qr = &q[i * d + column..][..dh];
            let key = |j: usize| &k[j * d + column..][..dh];
            scores.clear();
            let mut j = begin;
            while j + KEYS_AT_ONCE <= end {
                let keys: [&[f32]; KEYS_AT_ONCE] = std::array::from_fn(|l| key(j + l));
                let mut dots = [0f32; KEYS_AT_ONCE];
                for (c, &qc) in qr.iter().enumerate() {
                    for (dot, kl) in dots.iter_mut().zip(&keys) {
                        *dot = qc.mul_add(kl[c], *dot);
                    }
                }
                scores.extend(dots.iter().zip(&self.key_bias[j..]).map(|(&dot, &bias)| dot * self.scale + bias));
                j += KEYS_AT_ONCE;
            }
            for j in j..end {
                let dot = qr.iter().zip(key(j)).fold(0f32, |dot, (&a, &b)| a.mul_add(b, dot));
                scores.push(dot * self.scale + self.key_bias[j]);
            }
            let mut m = f32::NEG_INFINITY;
            for &s in scores.iter() {
                if s > m {
                    m = s;
                }
            }
            let mut sum = 0f32;
            out.fill(0.0);
            for (j, &s) in (begin..end).zip(scores.iter()) {
                let p = (s - m).exp();
                sum += p;
                for (acc, &vj) in out.iter_mut().zip(&v[j * d + column..][..dh]) {
                    *acc = p.mul_add(vj, *acc);
                }
            }
            for acc in out.iter_mut() {
                *acc /= sum;
            }
        }
    }

    /// [`Rows::attend_row_body`] compiled with FMA and AVX2: `mul_add` one instruction instead of
    /// a call to libm's `fmaf` (an exactly rounded fused multiply-add either way: the same bits).
    ///
    /// # Safety
    /// Needs FMA and AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_row_fma(
        &self,
        qkv: [&[f32]; 3],
        span: (usize, usize),
        i: usize,
        out: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        self.attend_row_body(qkv, span, i, out, scores)
    }

    /// Every row's output `[R, d]`, in parallel over rows, with hardware FMA where the CPU has it.
    fn attend(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        self.attend_with(q, k, v, hardware_fma())
    }

    /// [`Rows::attend`], with hardware FMA (`fma`, which needs [`hardware_fma`]) or libm's.
    fn attend_with(&self, q: &[f32], k: &[f32], v: &[f32], fma: bool) -> Vec<f32> {
        assert!(!fma || hardware_fma(), "this CPU has no FMA and AVX2");
        let d = self.heads * self.head_width;
        let rows = self.key_bias.len();
        let mut out = vec![0f32; rows * d];
        if d == 0 {
            return out;
        }
        out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores, (i, row)| {
            // The sequence of row i: the last offset at or below it.
            let s = self.offsets.partition_point(|&o| o as usize <= i) - 1;
            let span = (self.offsets[s] as usize, self.offsets[s + 1] as usize);
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: `fma` only where `hardware_fma()` (asserted above).
                return unsafe { self.attend_row_fma([q, k, v], span, i, row, scores) };
            }
            self.attend_row_body([q, k, v], span, i, row, scores);
        });
        out
    }
}

/// Whether the CPU has FMA and AVX2 for [`Rows::attend_row_fma`].
fn hardware_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedAttentionForward {
    fn check(&self, layouts: [&Layout; 3]) -> Result<(usize, usize)> {
        let (rows, d) = layouts[0].shape().dims2()?;
        if layouts.iter().any(|l| l.shape().dims() != [rows, d] || !l.is_contiguous()) {
            candle_core::bail!("packed attention forward: q, k and v must be contiguous [{rows}, {d}]");
        }
        Ok((rows, d))
    }
}

impl CustomOp3 for PackedAttentionForward {
    fn name(&self) -> &'static str {
        "packed-attention-forward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = self.check([l1, l2, l3])?;
        let what = "packed attention forward";
        let out = on_host(what, (&self.offsets, &self.key_bias), |offsets, key_bias| {
            let layout = Rows { offsets, key_bias, heads: self.heads, head_width: self.head_width, scale: self.scale };
            Ok(layout.attend(
                contiguous_storage(s1, l1, what)?,
                contiguous_storage(s2, l2, what)?,
                contiguous_storage(s3, l3, what)?,
            ))
        })?;
        Ok((CpuStorage::F32(out), Shape::from((rows, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        use crate::auxiliary::on_gpu;

        let (rows, d) = self.check([l1, l2, l3])?;
        let device = s1.device().clone();
        let q = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let k = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let v = s3.as_cuda_slice::<f32>()?.slice(l3.start_offset()..);
        let out = device.alloc_zeros::<f32>(rows * d)?;
        let sequences = self.offsets.dim(0)? - 1;
        if rows > 0 && sequences > 0 {
            on_gpu(
                "packed attention forward",
                (&self.offsets, &self.key_bias),
                |offsets: &CudaView<u32>, key_bias: &CudaView<f32>| {
                    let name = format!("packed_attention_f32_dh{}", self.head_width);
                    let func = device.get_or_load_custom_func(&name, "rankstack_packed_attention", PTX)?;
                    let shape = crate::launch_shape::one_block_per_sequence_head(sequences * self.heads, self.longest);
                    let heads = self.heads as u32;
                    let mut launch = func.builder();
                    launch.arg(&q).arg(&k).arg(&v).arg(offsets).arg(key_bias);
                    launch.arg(&heads).arg(&self.scale).arg(&out);
                    // SAFETY: the arguments match the kernel's signature; the offsets are
                    // non-decreasing and end at `rows` (`check` against the layout), so every row read
                    // and written is below `rows`, and every column below `d = heads · head_width`.
                    unsafe { launch.launch(shape.config()) }.w()?;
                    Ok(())
                },
            )?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, device), Shape::from((rows, d))))
    }
}

/// `cuda/packed_attention.cu`, compiled by the build script.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/packed_attention.ptx"));

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::oracle::values;

    /// Sequences of lengths 3, 0, 1, 5 and 2 (an empty one, one of a single row), a hidden key in
    /// the first and a finite bias in the fourth.
    struct Layout5 {
        offsets: Vec<usize>,
        key_bias: Vec<f64>,
    }

    impl SequenceLayout for Layout5 {
        fn row_offsets(&self) -> &[usize] {
            &self.offsets
        }
        fn key_bias(&self) -> &[f64] {
            &self.key_bias
        }
    }

    fn layout() -> Layout5 {
        let inf = f64::NEG_INFINITY;
        Layout5 {
            offsets: vec![0, 3, 3, 4, 9, 11],
            key_bias: vec![0.0, inf, 0.0, 0.0, 0.0, -1.5, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    }

    /// The attention in f64 from the formula, sequence by sequence and head by head.
    fn oracle(q: &[f64], k: &[f64], v: &[f64], seqs: &Layout5, heads: usize, dh: usize) -> Vec<f64> {
        let d = heads * dh;
        let mut out = vec![0f64; q.len()];
        for w in seqs.offsets.windows(2) {
            for i in w[0]..w[1] {
                for h in 0..heads {
                    let c0 = h * dh;
                    let scores: Vec<f64> = (w[0]..w[1])
                        .map(|j| {
                            let dot: f64 = (0..dh).map(|c| q[i * d + c0 + c] * k[j * d + c0 + c]).sum();
                            dot / (dh as f64).sqrt() + seqs.key_bias[j]
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..dh {
                        out[i * d + c0 + c] =
                            (w[0]..w[1]).zip(&e).map(|(j, p)| p / sum * v[j * d + c0 + c]).sum::<f64>();
                    }
                }
            }
        }
        out
    }

    fn inputs(rows: usize, d: usize) -> [Vec<f64>; 3] {
        [values(1, rows * d), values(2, rows * d), values(3, rows * d)]
    }

    fn tensor(x: &[f64], rows: usize, d: usize) -> Tensor {
        Tensor::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<f32>>(), (rows, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_the_formula_for_every_head_width() {
        let seqs = layout();
        for heads in [1, 2] {
            for dh in HEAD_WIDTHS {
                let d = heads * dh;
                let [q, k, v] = inputs(11, d);
                let (qt, kt, vt) = (tensor(&q, 11, d), tensor(&k, 11, d), tensor(&v, 11, d));
                let got = packed_attention_forward_on_device(&qt, &kt, &vt, &seqs, heads).unwrap().unwrap();
                // The oracle of the inputs as rounded to f32.
                let r = |x: &[f64]| x.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>();
                let want = oracle(&r(&q), &r(&k), &r(&v), &seqs, heads, dh);
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!((g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "heads {heads}, dh {dh}, {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn a_row_attends_to_its_own_sequence_only_and_a_lone_row_to_itself() {
        let seqs = layout();
        let (heads, dh) = (2, 8);
        let [q, k, mut v] = inputs(11, heads * dh);
        let base = |v: &[f64]| {
            let (qt, kt, vt) = (tensor(&q, 11, 16), tensor(&k, 11, 16), tensor(v, 11, 16));
            packed_attention_forward_on_device(&qt, &kt, &vt, &seqs, heads).unwrap().unwrap().to_vec2::<f32>().unwrap()
        };
        let before = base(&v);
        // The lone row of sequence 2 (row 3) attends to itself: its output is its value.
        assert_eq!(before[3], v[3 * 16..4 * 16].iter().map(|&x| x as f32).collect::<Vec<_>>());
        // Changing the values of the last sequence (rows 9, 10) changes no other row's output.
        for x in &mut v[9 * 16..] {
            *x += 1.0;
        }
        let after = base(&v);
        assert_eq!(before[..9], after[..9]);
        assert_ne!(before[9..], after[9..]);
        // A hidden key (row 1) gets no weight: its value does not matter.
        for x in &mut v[16..32] {
            *x = 1e6;
        }
        assert_eq!(base(&v)[..3], before[..3]);
    }

    #[test]
    fn does_not_apply_in_a_graph_to_other_dtypes_or_head_widths() {
        let seqs = layout();
        let x = tensor(&values(1, 11 * 16), 11, 16);
        let var = Var::from_tensor(&x).unwrap();
        assert!(packed_attention_forward_on_device(var.as_tensor(), &x, &x, &seqs, 2).unwrap().is_none());
        let x64 = x.to_dtype(DType::F64).unwrap();
        assert!(packed_attention_forward_on_device(&x64, &x64, &x64, &seqs, 2).unwrap().is_none());
        let x20 = tensor(&values(1, 11 * 20), 11, 20);
        assert!(packed_attention_forward_on_device(&x20, &x20, &x20, &seqs, 2).unwrap().is_none());
        // Shapes are checked whatever path applies.
        let err = packed_attention_forward_on_device(&x, &x, &x20, &seqs, 2).unwrap_err().to_string();
        assert!(err.contains("must have one shape"), "{err}");
        assert!(fused_allowed(Some("composed")).is_ok_and(|fused| !fused));
        let err = fused_allowed(Some("flash")).unwrap_err().to_string();
        assert!(err.contains("RANKSTACK_DEVICE_ATTENTION=`flash`"), "{err}");
    }

    /// The CPU mirror with hardware FMA writes the bits of the one with libm's `fmaf` (which the
    /// kernel's host run also calls): sequences shorter and longer than [`KEYS_AT_ONCE`], a
    /// hidden key, every head width.
    #[test]
    fn hardware_and_library_fma_write_the_same_bits() {
        if !hardware_fma() {
            crate::cpu::skipped("packed attention mirror [fma]", "FMA and AVX2");
            return;
        }
        let mut seqs = layout();
        seqs.offsets.push(11 + 37);
        seqs.key_bias.extend((0..37).map(|i| if i % 5 == 2 { f64::NEG_INFINITY } else { 0.25 }));
        let rows = seqs.key_bias.len();
        let offsets: Vec<u32> = seqs.offsets.iter().map(|&o| o as u32).collect();
        let key_bias: Vec<f32> = seqs.key_bias.iter().map(|&b| b as f32).collect();
        for (heads, dh) in HEAD_WIDTHS.iter().map(|&dh| (1, dh)).chain([(2, 48), (3, 8)]) {
            let d = heads * dh;
            let [q, k, v] = inputs(rows, d).map(|x| x.iter().map(|&v| v as f32 * 4.0).collect::<Vec<f32>>());
            let scale = (1.0 / (dh as f64).sqrt()) as f32;
            let mirror = Rows { offsets: &offsets, key_bias: &key_bias, heads, head_width: dh, scale };
            let bits = |fma| mirror.attend_with(&q, &k, &v, fma).iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(true), bits(false), "heads {heads}, width {dh}");
        }
    }

    /// The CUDA kernel, run on the CPU (`cuda_on_host`) with the launch's shape, writes the CPU
    /// mirror's bits: every head width, one and two heads, the sequences of `layout` and a
    /// sequence longer than a block's threads (they loop).
    #[test]
    fn the_cuda_kernel_on_the_host_writes_the_cpu_mirrors_bits() {
        use crate::cuda_on_host::{launch, Arg};
        use crate::launch_shape::one_block_per_sequence_head;

        let mut long = layout();
        long.offsets.push(11 + 150);
        long.key_bias.extend((0..150).map(|i| if i % 7 == 3 { f64::NEG_INFINITY } else { 0.0 }));
        for seqs in [layout(), long] {
            let rows = seqs.key_bias.len();
            for (heads, dh) in HEAD_WIDTHS.iter().map(|&dh| (1, dh)).chain([(2, 48), (3, 8)]) {
                let d = heads * dh;
                let scale = (1.0 / (dh as f64).sqrt()) as f32;
                let [q, k, v] = inputs(rows, d).map(|x| x.iter().map(|&v| v as f32).collect::<Vec<f32>>());
                let mut offsets: Vec<u32> = seqs.offsets.iter().map(|&o| o as u32).collect();
                let mut key_bias: Vec<f32> = seqs.key_bias.iter().map(|&b| b as f32).collect();
                let mirror = Rows { offsets: &offsets, key_bias: &key_bias, heads, head_width: dh, scale };
                let want: Vec<u32> = mirror.attend(&q, &k, &v).iter().map(|x| x.to_bits()).collect();
                let longest = seqs.offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap();
                let shape = one_block_per_sequence_head((offsets.len() - 1) * heads, longest);
                let (mut q, mut k, mut v, mut out) = (q, k, v, vec![7f32; rows * d]);
                launch(
                    &format!("packed_attention_f32_dh{dh}"),
                    shape,
                    &mut [
                        Arg::F32s(&mut q),
                        Arg::F32s(&mut k),
                        Arg::F32s(&mut v),
                        Arg::U32s(&mut offsets),
                        Arg::F32s(&mut key_bias),
                        Arg::U32(heads as u32),
                        Arg::F32(scale),
                        Arg::F32s(&mut out),
                    ],
                )
                .unwrap();
                let got: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "{rows} rows, heads {heads}, width {dh}");
            }
        }
    }
}
