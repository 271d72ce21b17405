//! The CPU matrix-product engine behind [`super::packed_matmul`] (serving) and
//! [`super::linear`] (training): `C = A·B (+ bias)` on x86-64 with AVX-512 or AVX2 + FMA (the
//! path is [`super::isa::Isa::active`]; [`KernelPath`] names the micro-kernel a product takes).
//!
//! `B` `[k, n]` is packed into [`Panels`]: panels of [`NR`] columns; for each step `s` of the `k`
//! sweep a panel stores the [`NR`] 32-bit words of its columns: `B[s, j]` (f32), or
//! `bf16(B[2s, j]) | bf16(B[2s + 1, j]) << 16` (bf16 pairs; an odd `k` is padded with a zero). A
//! partial last panel is padded with zero columns. `A` `[m, k]` is not packed: the micro-kernel
//! broadcasts its values straight from memory through a row stride and a step stride, so a
//! row-major matrix and the transpose of one (column-major) both serve as `A` without a copy.
//!
//! A micro-tile of up to [`MR`] rows × [`NR`] columns keeps its 2·[`MR`] accumulator registers
//! for a whole sweep over `k`, then stores once. Threads take blocks of rows × panels, with row
//! blocks large enough that each panel, once in L2, serves up to 16 micro-tiles. Sweeps longer
//! than `MAX_K_BLOCK` steps (a longer panel would not stay in L2), or for a column-major `A`
//! than `COLUMN_MAJOR_K_BLOCK`, are split into equal blocks: the first block stores, the later
//! ones add to what is stored, the last one adds the bias.
//!
//! Results are deterministic: each element is summed by one thread in a fixed order.
//!
//! On the AVX2 path a column-major `A` is first copied, one task's block at a time, into tiles of
//! [`MR`] rows whose values lie in step order; the values and their order of summation are the
//! same, so the results are too.

use rayon::prelude::*;

use super::allocator::advise_huge_pages;
use super::isa::Isa;

/// Output columns of one packed panel: two AVX-512 registers of f32 accumulators.
pub const NR: usize = 32;
/// Rows of one micro-tile (2 · 12 = 24 accumulators of the 32 vector registers).
pub const MR: usize = 12;
/// Activation bytes of one block of rows (one task's rows). Each weight panel (k × 32 values, at
/// most about 0.5 MiB here, so it stays in L2) is read from memory once per block and then serves
/// every micro-tile of the block; the block itself streams from L3. Blocks sized for L2 instead
/// (384 KiB: 12 rows at k = 4288) re-read the weights from memory every 12–36 rows and ran the
/// MaskNet projection (4288 → 2144) at 178 instead of 222 GFLOP/s (2 threads, batch 512).
const ROW_CHUNK_BYTES: usize = 1536 * 1024;
/// A block of a column-major `A` (see [`Panels::multiply`]): at most this many steps and bytes,
/// so that it stays in L2 while the task's panels pass by (the MaskNet aggregation's input
/// gradient, `Wᵀ gᵀ` with `k` = 12 864, ran at 138 GFLOP/s with row-major blocking).
const COLUMN_MAJOR_K_BLOCK: usize = 1024;
const COLUMN_MAJOR_CHUNK_BYTES: usize = 384 * 1024;
/// Longest sweep over `k` in one pass (steps): a panel of 4608 steps is 576 KiB, still within L2
/// next to the activations. MaskNet's widest sweep in serving is 4288 steps (one block, so the
/// serving path sums in plain `k` order); the backward pass of its aggregation sweeps 12 864.
const MAX_K_BLOCK: usize = 4608;

/// The precision of the packed operand (and of the products).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightPrecision {
    /// f32 weights, f32 activations (FMA).
    F32,
    /// bf16 weights, f32 accumulation: with AVX512-BF16, activations rounded to bf16 and dot
    /// products of bf16 pairs; otherwise the weights widened to f32 in the kernel and the
    /// activations kept in f32 (see [`KernelPath`]).
    Bf16,
}

/// The micro-kernel a product takes on the active [`Isa`] path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// f32 × f32, 512-bit FMAs.
    F32Avx512,
    /// f32 × f32, 256-bit FMAs.
    F32Avx2,
    /// bf16 weights × activations rounded to bf16 pairs, AVX512-BF16 dot products.
    Bf16DotAvx512,
    /// bf16 weights widened to f32 as they are loaded (half the weight traffic of f32), × f32
    /// activations, 256-bit FMAs: for CPUs without AVX512-BF16.
    Bf16WidenedAvx2,
}

impl KernelPath {
    /// The path for `precision` on the active [`Isa`], if the engine has one there.
    pub fn for_precision(precision: WeightPrecision) -> Option<Self> {
        match (precision, Isa::active()) {
            (_, Isa::Generic | Isa::Candle) => None,
            (WeightPrecision::F32, Isa::Avx512) => Some(Self::F32Avx512),
            (WeightPrecision::F32, Isa::Avx2) => Some(Self::F32Avx2),
            (WeightPrecision::Bf16, Isa::Avx512) if Isa::has_avx512_bf16() => Some(Self::Bf16DotAvx512),
            (WeightPrecision::Bf16, _) => Some(Self::Bf16WidenedAvx2),
        }
    }

    /// Whether the activations enter as bf16 pairs ([`round_rows_to_bf16`]) rather than f32.
    pub fn rounds_activations(self) -> bool {
        self == Self::Bf16DotAvx512
    }

    /// One line for users: what the path computes with.
    pub fn description(self) -> &'static str {
        match self {
            Self::F32Avx512 => "f32, AVX-512 kernel",
            Self::F32Avx2 => "f32, AVX2 kernel",
            Self::Bf16DotAvx512 => "bf16 weights, activations rounded to bf16, AVX512-BF16 dot products",
            Self::Bf16WidenedAvx2 => "bf16 weights widened to f32 in the AVX2 kernel, f32 activations (no AVX512-BF16)",
        }
    }
}

/// What `--weights bf16` computes with on this CPU and path, in one line.
pub fn bf16_path_description() -> &'static str {
    match KernelPath::for_precision(WeightPrecision::Bf16) {
        Some(path) => path.description(),
        None => "bf16 weights widened to f32 and multiplied by candle (no SIMD kernel on this path)",
    }
}

/// Whether the packed engine runs products of `precision` on the active [`Isa`] path (AVX-512F
/// or AVX2 + FMA); elsewhere the callers take candle's product.
pub fn packed_kernel_available(precision: WeightPrecision) -> bool {
    KernelPath::for_precision(precision).is_some()
}

/// One 64-byte line of 16 packed words; the panels are built from these so every vector load
/// is aligned.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// `f32` → `bf16` bits, round to nearest even (NaN stays NaN).
fn bf16_bits(v: f32) -> u32 {
    u32::from(half::bf16::from_f32(v).to_bits())
}

/// One packed bf16 pair: `bf16(lo) | bf16(hi) << 16`, with a zero for a missing `hi` (the end of
/// an odd-length sweep).
fn bf16_pair(lo: f32, hi: Option<f32>) -> u32 {
    bf16_bits(lo) | (hi.map_or(0, bf16_bits) << 16)
}

/// The `B` operand `[k, n]`, packed (see the module documentation).
#[derive(Clone)]
pub struct Panels {
    precision: WeightPrecision,
    k: usize,
    n: usize,
    /// Steps of the `k` sweep: `k` (f32) or `ceil(k / 2)` (bf16 pairs).
    steps: usize,
    /// `[panel][step]` → two lines of [`NR`] packed columns.
    lines: Vec<Line>,
}

impl Panels {
    /// Packs `B[s, j] = src[s · k_stride + j · n_stride]` for `s < k`, `j < n` (rounded to bf16
    /// for [`WeightPrecision::Bf16`]). A weight `W` `[n, k]` is `B = Wᵀ` with strides `(1, k)`; a
    /// row-major `[k, n]` matrix is `B` itself with strides `(n, 1)`.
    ///
    /// # Panics
    /// If the strides reach outside `src`.
    pub fn pack(src: &[f32], k: usize, n: usize, k_stride: usize, n_stride: usize, precision: WeightPrecision) -> Self {
        Self::pack_with(src, (k, n), (k_stride, n_stride), precision, false)
    }

    /// [`Panels::pack`] for an operand that stays and is read whole by every product (a serving
    /// weight): its memory asks for transparent huge pages ([`advise_huge_pages`]), which speed
    /// up the weight streaming that dominates small batches.
    pub fn pack_resident(
        src: &[f32],
        k: usize,
        n: usize,
        k_stride: usize,
        n_stride: usize,
        precision: WeightPrecision,
    ) -> Self {
        Self::pack_with(src, (k, n), (k_stride, n_stride), precision, true)
    }

    fn pack_with(
        src: &[f32],
        (k, n): (usize, usize),
        (k_stride, n_stride): (usize, usize),
        precision: WeightPrecision,
        huge_pages: bool,
    ) -> Self {
        assert!(k > 0 && n > 0, "packing an empty operand");
        assert!((k - 1) * k_stride + (n - 1) * n_stride < src.len(), "packed operand out of bounds");
        let steps = match precision {
            WeightPrecision::F32 => k,
            WeightPrecision::Bf16 => k.div_ceil(2),
        };
        let mut lines = vec![Line::default(); n.div_ceil(NR) * steps * 2];
        let at = |s: usize, j: usize| src[s * k_stride + j * n_stride];
        lines.par_chunks_mut(steps * 2).enumerate().for_each(|(q, panel)| {
            // SAFETY: `Line` is `repr(C)` around 16 `u32`s, so the panel is `steps · NR`
            // contiguous words; word `s · NR + c` is column `c` of step `s`.
            let words: &mut [u32] =
                unsafe { std::slice::from_raw_parts_mut(panel.as_mut_ptr().cast(), panel.len() * 16) };
            let (j0, cols) = (q * NR, NR.min(n - q * NR));
            match precision {
                // Rows of B contiguous: a copy per step.
                WeightPrecision::F32 if n_stride == 1 => {
                    for s in 0..k {
                        for (w, v) in words[s * NR..][..cols].iter_mut().zip(&src[s * k_stride + j0..][..cols]) {
                            *w = v.to_bits();
                        }
                    }
                }
                // Otherwise (e.g. a weight [n, k], columns contiguous) in blocks of 16 steps,
                // whose 32 lines stay in L1 while the columns are read.
                WeightPrecision::F32 => {
                    for s0 in (0..k).step_by(16) {
                        for c in 0..cols {
                            for s in s0..k.min(s0 + 16) {
                                words[s * NR + c] = at(s, j0 + c).to_bits();
                            }
                        }
                    }
                }
                WeightPrecision::Bf16 => {
                    for s in 0..steps {
                        for c in 0..cols {
                            let hi = (2 * s + 1 < k).then(|| at(2 * s + 1, j0 + c));
                            words[s * NR + c] = bf16_pair(at(2 * s, j0 + c), hi);
                        }
                    }
                }
            }
        });
        if huge_pages {
            advise_huge_pages(&mut lines);
        }
        Self { precision, k, n, steps, lines }
    }

    /// The precision of the stored values.
    pub fn precision(&self) -> WeightPrecision {
        self.precision
    }

    /// `k`, the length of the sweep (in values, not bf16 pairs).
    pub fn k(&self) -> usize {
        self.k
    }

    /// `n`, the number of columns of the product.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Steps of the sweep: `k` (f32) or `ceil(k / 2)` (bf16 pairs).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Bytes held by the panels.
    pub fn size_in_bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// The stored `B[s, j]` (bf16-rounded for [`WeightPrecision::Bf16`]) as f32.
    pub fn value(&self, s: usize, j: usize) -> f32 {
        let panel = &self.lines[(j / NR) * self.steps * 2..];
        let word = |p: usize| panel[2 * p + (j % NR) / 16].0[j % 16];
        match self.precision {
            WeightPrecision::F32 => f32::from_bits(word(s)),
            WeightPrecision::Bf16 => {
                let pair = word(s / 2);
                half::bf16::from_bits((if s.is_multiple_of(2) { pair } else { pair >> 16 }) as u16).to_f32()
            }
        }
    }

    /// `A·B (+ bias)` `[m, n]`, row-major, where `A[r, s] = a[r · row_stride + s · step_stride]`
    /// for `r < m` and `s < k` — f32 values, except on [`KernelPath::Bf16DotAvx512`]
    /// ([`KernelPath::rounds_activations`]), where `s < steps` indexes bf16 pairs as
    /// [`round_rows_to_bf16`] writes them. `bias` has `n` entries. Needs a kernel for the panels'
    /// precision on the active path ([`packed_kernel_available`]).
    ///
    /// # Panics
    /// If `A` reaches outside `a`, the bias has the wrong length, or the kernel is unavailable.
    pub fn multiply<T: Copy + Sync>(
        &self,
        a: &[T],
        m: usize,
        row_stride: usize,
        step_stride: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        assert_eq!(std::mem::size_of::<T>(), 4, "A holds 32-bit words");
        let path = KernelPath::for_precision(self.precision)
            .unwrap_or_else(|| panic!("no {:?} kernel on the {} path", self.precision, Isa::active().name()));
        let (n, steps) = (self.n, self.steps);
        if m == 0 {
            return Vec::new();
        }
        // A's values per panel step: 2 where the kernel widens bf16 pairs against f32 activations.
        let per_step = if path == KernelPath::Bf16WidenedAvx2 { 2 } else { 1 };
        let a_len = if per_step == 2 { self.k } else { steps };
        assert!((m - 1) * row_stride + (a_len - 1) * step_stride < a.len(), "A operand out of bounds");
        let num_panels = n.div_ceil(NR);
        let mut padded_bias = vec![0f32; num_panels * NR];
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "bias length");
            padded_bias[..n].copy_from_slice(b);
        }
        // A row-major A streams each row from L3 in order, so a block of rows may be large; a
        // column-major one (unit row stride) reads a few values from a new line at every step, so
        // its block of rows × k steps must stay in L2 while every panel of the task passes by.
        let column_major = row_stride < step_stride;
        let (max_k_block, chunk_bytes) = if column_major {
            (COLUMN_MAJOR_K_BLOCK, COLUMN_MAJOR_CHUNK_BYTES)
        } else {
            (MAX_K_BLOCK, ROW_CHUNK_BYTES)
        };
        let k_blocks = steps.div_ceil(max_k_block);
        let k_block = steps.div_ceil(k_blocks);
        let chunk_rows = ((chunk_bytes / (4 * k_block)) / MR * MR).clamp(MR, 16 * MR);
        let row_chunks = m.div_ceil(chunk_rows);
        // Enough tasks for every thread even at one row (then the panels are split).
        let wanted = 4 * rayon::current_num_threads();
        let groups = wanted.div_ceil(row_chunks).clamp(1, num_panels);
        let panels_per_group = num_panels.div_ceil(groups);
        let groups = num_panels.div_ceil(panels_per_group);
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        let c_ptr = SendPtr(c.as_mut_ptr());
        let a_ptr = SendConstPtr(a.as_ptr().cast::<u32>());
        (0..row_chunks * groups).into_par_iter().for_each(|task| {
            let (c_ptr, a_ptr) = (&c_ptr, &a_ptr);
            let (chunk, group) = (task / groups, task % groups);
            let (r0, r1) = (chunk * chunk_rows, m.min((chunk + 1) * chunk_rows));
            // Widened bf16 panels of a task with many rows are widened once into an f32 panel
            // that the f32 micro-kernel then reads for every row (see `WIDEN_ONCE_ROWS`).
            let widen_once = path == KernelPath::Bf16WidenedAvx2 && r1 - r0 >= WIDEN_ONCE_ROWS;
            let mut widened = Vec::new();
            // A column-major A on the AVX2 path is copied block by block into tiles of MR rows
            // (see `pack_column_major_block`): its 6-row sub-tiles each read every line of the
            // strided block again, and the copy made the backward products of MaskNet's wide
            // layers 6–12% faster there (batch 512, 2 threads, AMD EPYC family 25, 2026-12-06).
            // On the AVX-512 path (one 12-row sweep per panel) it measured no faster.
            let pack_a = column_major && row_stride == 1 && path == KernelPath::F32Avx2;
            let mut packed_a: Vec<u32> = Vec::new();
            // k blocks outermost: the task's block of A stays in cache across its panels.
            for (block, s0) in (0..steps).step_by(k_block).enumerate() {
                let len = k_block.min(steps - s0);
                let last = block + 1 == k_blocks;
                // An odd k leaves the last bf16 pair without a second value to read from A.
                let odd_tail = per_step == 2 && last && self.k % 2 == 1;
                if pack_a {
                    // SAFETY: the rows r0..r1 and steps s0..s0 + len of A are in bounds (asserted above).
                    unsafe { pack_column_major_block(a_ptr.0, step_stride, r0..r1, s0..s0 + len, &mut packed_a) };
                }
                for q in group * panels_per_group..num_panels.min((group + 1) * panels_per_group) {
                    let mut panel = &self.lines[(q * steps + s0) * 2..][..len * 2];
                    let (mut tile_path, mut tile_steps, mut tile_odd_tail) = (path, len, odd_tail);
                    if widen_once {
                        // The same FMA chain per element as the widening micro-kernel (values
                        // 2p and 2p + 1 of each pair, in order): bit-identical results.
                        widen_panel(panel, &mut widened);
                        tile_steps = 2 * len - usize::from(odd_tail);
                        panel = &widened[..tile_steps * 2];
                        (tile_path, tile_odd_tail) = (KernelPath::F32Avx2, false);
                    }
                    let cols = NR.min(n - q * NR);
                    for r in (r0..r1).step_by(MR) {
                        // SAFETY: the kernel is available (asserted above); A's reads stay in
                        // bounds (asserted above); tasks write disjoint [rows × cols] blocks of
                        // c, whose capacity is m · n, and the first k block writes every element
                        // of its block before later blocks read it back, all before set_len.
                        unsafe {
                            kernel::tile(
                                tile_path,
                                MR.min(r1 - r),
                                if pack_a {
                                    packed_a.as_ptr().add((r - r0) * len)
                                } else {
                                    a_ptr.0.add(r * row_stride + s0 * per_step * step_stride)
                                },
                                if pack_a { 1 } else { row_stride },
                                if pack_a { MR } else { step_stride },
                                tile_steps,
                                tile_odd_tail,
                                panel.as_ptr().cast(),
                                c_ptr.0.add(r * n + q * NR),
                                n,
                                Store {
                                    bias: if last { padded_bias[q * NR..].as_ptr() } else { std::ptr::null() },
                                    accumulate: block > 0,
                                    cols,
                                },
                            )
                        }
                    }
                }
            }
        });
        // SAFETY: the tasks cover every (row, panel) pair, and each tile stores all its rows and
        // valid columns.
        unsafe { c.set_len(m * n) };
        c
    }
}

/// Copies rows `rows` × steps `steps` of a column-major `A` (`a[r + s · step_stride]`) into
/// `out` as tiles of [`MR`] rows, each tile `steps.len()`
/// steps of [`MR`] consecutive words (the last tile's missing rows left as they are: no kernel
/// reads them). The micro-kernel then reads one tile's values in order instead of one new cache
/// line per step.
///
/// # Safety
/// `a` must be readable at every `(r, s)` of `rows × steps`.
unsafe fn pack_column_major_block(
    a: *const u32,
    step_stride: usize,
    rows: std::ops::Range<usize>,
    steps: std::ops::Range<usize>,
    out: &mut Vec<u32>,
) {
    let (m, len) = (rows.len(), steps.len());
    let tiles = m.div_ceil(MR);
    out.resize(tiles * MR * len, 0);
    for t in 0..tiles {
        let r = rows.start + t * MR;
        let tile_rows = MR.min(rows.end - r);
        let dst = &mut out[t * MR * len..][..MR * len];
        for (i, s) in steps.clone().enumerate() {
            // SAFETY: (r .. r + tile_rows, s) lies in rows × steps (caller's contract).
            let src = unsafe { std::slice::from_raw_parts(a.add(r + s * step_stride), tile_rows) };
            dst[i * MR..][..tile_rows].copy_from_slice(src);
        }
    }
}

/// Rows from which a task on [`KernelPath::Bf16WidenedAvx2`] widens each bf16 panel block to
/// f32 once (into a task-local buffer the size of an f32 panel block) and runs the f32
/// micro-kernel over it, instead of widening in the micro-kernel for every sub-tile of rows. The
/// widening kernel holds 4 widened weight vectors and so only 4 rows of accumulators, against 6
/// for f32, and repeats the widening every 4 rows: it is the faster choice only for a few rows
/// (it never writes the f32 panel), and measured 4–9% slower than f32 from batch 64 on. 12 rows
/// are two sub-tiles of the f32 kernel (6 rows) or three of the widening one.
const WIDEN_ONCE_ROWS: usize = 12;

/// Widens a block of bf16-pair steps of one panel (`2 · pairs` lines) into `out`: f32 steps `2p`
/// and `2p + 1` are the low and high halves of pair `p` (bf16 → f32 is exact). A zero-padded
/// last pair (odd `k`) widens to a zero step that the caller does not sweep.
fn widen_panel(pairs: &[Line], out: &mut Vec<Line>) {
    // Every line of `out` is written below (a step is two lines, so `pairs` has an even length):
    // resizing keeps the last block's lines instead of zeroing them first.
    out.resize(2 * pairs.len(), Line::default());
    for (step, widened) in pairs.chunks_exact(2).zip(out.chunks_exact_mut(4)) {
        let (lo, hi) = widened.split_at_mut(2);
        for h in 0..2 {
            for c in 0..16 {
                let word = step[h].0[c];
                lo[h].0[c] = word << 16;
                hi[h].0[c] = word & 0xffff_0000;
            }
        }
    }
}

/// Rounds rows of f32 (`src`, rows of `k`) to rows of bf16 pairs (`ceil(k / 2)` words each),
/// zero-padding an odd `k`: the `A` operand of a bf16 product.
pub fn round_rows_to_bf16(src: &[f32], k: usize) -> Vec<u32> {
    let steps = k.div_ceil(2);
    assert!(Isa::has_avx512_bf16(), "rounding to bf16 pairs needs AVX512-BF16");
    let mut a = vec![0u32; src.len() / k * steps];
    a.par_chunks_mut(steps).zip(src.par_chunks(k)).for_each(|(dst, src)| {
        // SAFETY: AVX512-BF16 support asserted; dst has ceil(src.len() / 2) words.
        unsafe { kernel::round_row(src, dst) }
    });
    a
}

/// `src` `[rows, cols]` transposed to `[cols, rows]`, plus `row_bias[r]` on every value of source
/// row `r` (one rounding, as a bias added in the kernel).
pub fn transpose(src: &[f32], rows: usize, cols: usize, row_bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(src.len(), rows * cols, "transpose: length");
    if let Some(b) = row_bias {
        assert_eq!(b.len(), rows, "transpose: bias length");
    }
    const BLOCK: usize = 32;
    let mut dst: Vec<f32> = Vec::with_capacity(rows * cols);
    // Each task writes BLOCK destination rows (source columns), reading BLOCK × BLOCK tiles.
    dst.spare_capacity_mut()[..rows * cols].par_chunks_mut(BLOCK * rows).enumerate().for_each(|(jb, out)| {
        let j0 = jb * BLOCK;
        let width = out.len() / rows;
        for r0 in (0..rows).step_by(BLOCK) {
            for r in r0..rows.min(r0 + BLOCK) {
                let row = &src[r * cols + j0..][..width];
                match row_bias {
                    Some(b) => row.iter().enumerate().for_each(|(dj, v)| {
                        out[dj * rows + r].write(v + b[r]);
                    }),
                    None => row.iter().enumerate().for_each(|(dj, v)| {
                        out[dj * rows + r].write(*v);
                    }),
                }
            }
        }
    });
    // SAFETY: the tasks cover all `cols` destination rows, each with all `rows` columns.
    unsafe { dst.set_len(rows * cols) };
    dst
}

/// A raw output pointer shared by the tasks (each writes its own block).
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint regions (see `Panels::multiply`).
unsafe impl Sync for SendPtr {}
/// A raw pointer to the `A` operand, read by every task.
struct SendConstPtr(*const u32);
// SAFETY: only read while the borrowed slice lives (the parallel loop ends before `multiply`).
unsafe impl Sync for SendConstPtr {}

/// How a micro-tile stores its accumulators: `acc (+ stored, if accumulate) (+ bias, if not
/// null)` into the first `cols ≤ NR` columns.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read only by the x86-64 kernels
struct Store {
    bias: *const f32,
    accumulate: bool,
    cols: usize,
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{bf16_pair, KernelPath, Store, MR, NR};

    /// Rounds one row of f32 to bf16 pairs (zero-padding an odd length).
    ///
    /// # Safety
    /// Needs AVX-512F and AVX512-BF16; `dst.len() == src.len().div_ceil(2)`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
        // SAFETY: the caller guarantees AVX-512F/BF16 and `dst.len() == src.len().div_ceil(2)`; the
        // loads read 16 values of `src` and the stores write 8 words of `dst` within those lengths.
        unsafe {
            let full = src.len() / 16;
            for i in 0..full {
                let v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.as_mut_ptr().add(8 * i).cast(), h);
            }
            for p in 8 * full..dst.len() {
                dst[p] = bf16_pair(src[2 * p], src.get(2 * p + 1).copied());
            }
        }
    }

    /// One micro-tile on `path`: `rows ≤ MR` rows of `A` (word `a[r · rs + s · ss]`; on
    /// [`KernelPath::Bf16WidenedAvx2`] f32 values `a[r · rs + i · ss]`, two per step) over `steps`
    /// steps of one packed panel, stored to `y` (row stride `ldy`) as `store` says. `odd_tail`: the
    /// last step's second value does not exist (an odd `k` on the widened bf16 path).
    ///
    /// # Safety
    /// The CPU must have the path's instructions; the pointers must cover the ranges described.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        path: KernelPath,
        rows: usize,
        a: *const u32,
        rs: usize,
        ss: usize,
        steps: usize,
        odd_tail: bool,
        panel: *const __m512i,
        y: *mut f32,
        ldy: usize,
        store: Store,
    ) {
        // SAFETY: the caller's contract (see `# Safety`) is exactly what the micro-kernels
        // require; `rows` selects an instantiation with that many rows.
        unsafe {
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match (path, rows) {
                        $((KernelPath::F32Avx512, $r) => tile_f32::<$r>(a.cast(), rs, ss, steps, panel.cast(), y, ldy, store),)*
                        $((KernelPath::Bf16DotAvx512, $r) => tile_bf16::<$r>(a, rs, ss, steps, panel, y, ldy, store),)*
                        (KernelPath::F32Avx2, _) => super::avx2::tile_f32(rows, a.cast(), rs, ss, steps, panel.cast(), y, ldy, store),
                        (KernelPath::Bf16WidenedAvx2, _) => {
                            super::avx2::tile_bf16_widened(rows, a.cast(), rs, ss, steps, odd_tail, panel.cast(), y, ldy, store)
                        }
                        _ => unreachable!("a tile has 1..=MR rows"),
                    }
                };
            }
            const _: () = assert!(MR == 12 && NR == 32);
            dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
        }
    }

    /// Stores the accumulators of `R` rows as `store` says.
    ///
    /// # Safety
    /// Needs AVX-512F; `y` must address `R` rows (stride `ldy`) of `store.cols` writable values,
    /// and a non-null `store.bias` 32 readable values.
    #[target_feature(enable = "avx512f")]
    unsafe fn write<const R: usize>(lo: &[__m512; R], hi: &[__m512; R], y: *mut f32, ldy: usize, store: Store) {
        // SAFETY: the caller guarantees the extents of `y` and `store.bias` (see `# Safety`); the
        // masked loads and stores touch only the first `store.cols` columns of each row.
        unsafe {
            let cols = store.cols;
            let mask_lo: __mmask16 = if cols >= 16 { 0xffff } else { (1u16 << cols) - 1 };
            let mask_hi: __mmask16 = if cols >= 32 {
                0xffff
            } else if cols > 16 {
                (1u16 << (cols - 16)) - 1
            } else {
                0
            };
            let (bias_lo, bias_hi) = if store.bias.is_null() {
                (_mm512_setzero_ps(), _mm512_setzero_ps())
            } else {
                (_mm512_loadu_ps(store.bias), _mm512_loadu_ps(store.bias.add(16)))
            };
            for r in 0..R {
                let row = y.add(r * ldy);
                let (mut vlo, mut vhi) = (lo[r], hi[r]);
                if store.accumulate {
                    vlo = _mm512_add_ps(_mm512_maskz_loadu_ps(mask_lo, row), vlo);
                    vhi = _mm512_add_ps(_mm512_maskz_loadu_ps(mask_hi, row.add(16)), vhi);
                }
                if !store.bias.is_null() {
                    vlo = _mm512_add_ps(vlo, bias_lo);
                    vhi = _mm512_add_ps(vhi, bias_hi);
                }
                _mm512_mask_storeu_ps(row, mask_lo, vlo);
                _mm512_mask_storeu_ps(row.add(16), mask_hi, vhi);
            }
        }
    }

    /// `R` rows of f32 `A` (`a[r · rs + s · ss]`) times an f32 panel over `steps` steps, stored to
    /// `y` as `store` says.
    ///
    /// # Safety
    /// Needs AVX-512F; `a` must cover every `r · rs + s · ss` for `r < R`, `s < steps`; `panel`
    /// `2 · steps` 64-byte-aligned vectors; `y` as [`write`] requires.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_f32<const R: usize>(
        a: *const f32,
        rs: usize,
        ss: usize,
        steps: usize,
        panel: *const __m512,
        y: *mut f32,
        ldy: usize,
        store: Store,
    ) {
        // SAFETY: the reads of `a` and `panel` stay within the extents the caller guarantees (see
        // `# Safety`), and the panel's vectors are aligned; `write` gets the caller's `y` and `store`.
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            for s in 0..steps {
                let b0 = _mm512_load_ps(panel.add(2 * s).cast());
                let b1 = _mm512_load_ps(panel.add(2 * s + 1).cast());
                let col = a.add(s * ss);
                for r in 0..R {
                    let x = _mm512_set1_ps(*col.add(r * rs));
                    lo[r] = _mm512_fmadd_ps(x, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(x, b1, hi[r]);
                }
            }
            write::<R>(&lo, &hi, y, ldy, store);
        }
    }

    /// `R` rows of bf16-pair `A` (`a[r · rs + p · ss]`) times a bf16 panel over `pairs` steps,
    /// stored to `y` as `store` says.
    ///
    /// # Safety
    /// Needs AVX-512F and AVX512-BF16; `a` must cover every `r · rs + p · ss` for `r < R`,
    /// `p < pairs`; `panel` `2 · pairs` 64-byte-aligned vectors; `y` as [`write`] requires.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_bf16<const R: usize>(
        a: *const u32,
        rs: usize,
        ss: usize,
        pairs: usize,
        panel: *const __m512i,
        y: *mut f32,
        ldy: usize,
        store: Store,
    ) {
        // SAFETY: as in `tile_f32`; the transmutes reinterpret 512-bit vectors of packed bf16 pairs,
        // which have the same size and no invalid bit patterns.
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            for p in 0..pairs {
                let b0: __m512bh = std::mem::transmute(_mm512_load_si512(panel.add(2 * p)));
                let b1: __m512bh = std::mem::transmute(_mm512_load_si512(panel.add(2 * p + 1)));
                let col = a.add(p * ss);
                for r in 0..R {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*col.add(r * rs) as i32));
                    lo[r] = _mm512_dpbf16_ps(lo[r], x, b0);
                    hi[r] = _mm512_dpbf16_ps(hi[r], x, b1);
                }
            }
            write::<R>(&lo, &hi, y, ldy, store);
        }
    }
}

/// The AVX2 + FMA micro-kernels. A tile of up to [`MR`] rows × one [`NR`]-column panel is done as
/// sub-tiles of [`F32_ROWS`] (f32) or [`BF16_ROWS`] (widened bf16) rows × 16 columns, whose
/// accumulators fit the 16 vector registers; every output element is still one fused
/// multiply-add chain over `k` in order (the AVX-512 kernel's values, bit for bit, in f32).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Store, NR};

    /// Rows of an f32 sub-tile: 6 × 2 accumulators, 2 weight vectors, 1 broadcast.
    pub const F32_ROWS: usize = 6;
    /// Rows of a widened-bf16 sub-tile: 4 × 2 accumulators, 4 widened weight vectors, broadcasts.
    pub const BF16_ROWS: usize = 4;

    /// `store` for the columns `16·half ..` of a panel: at most 16 columns, the bias shifted.
    fn half_store(store: Store, half: usize) -> Option<Store> {
        let cols = store.cols.saturating_sub(16 * half).min(16);
        // SAFETY: the padded bias has NR entries per panel, so the second half stays inside it.
        let bias = if store.bias.is_null() { store.bias } else { unsafe { store.bias.add(16 * half) } };
        (cols > 0).then_some(Store { bias, accumulate: store.accumulate, cols })
    }

    /// The sub-tiles of a tile of `rows` rows, `sub_rows` rows at a time, times the panel's two
    /// 16-column halves that have columns to store: `(first row, rows, half, store)`.
    fn sub_tiles(rows: usize, sub_rows: usize, store: Store) -> impl Iterator<Item = (usize, usize, usize, Store)> {
        (0..rows).step_by(sub_rows).flat_map(move |r0| {
            (0..2).filter_map(move |half| half_store(store, half).map(|st| (r0, sub_rows.min(rows - r0), half, st)))
        })
    }

    /// An f32 tile of `rows ≤ MR` rows (see [`super::kernel::tile`]).
    ///
    /// # Safety
    /// Needs AVX2 and FMA; `a` must cover `r · rs + s · ss` for `r < rows`, `s < steps`; `panel`
    /// `steps` steps of [`NR`] f32 (64-byte aligned); `y` `rows` rows of `store.cols` writable
    /// values; a non-null `store.bias` [`NR`] values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_f32(
        rows: usize,
        a: *const f32,
        rs: usize,
        ss: usize,
        steps: usize,
        panel: *const f32,
        y: *mut f32,
        ldy: usize,
        store: Store,
    ) {
        for (r0, sub_rows, half, st) in sub_tiles(rows, F32_ROWS, store) {
            // SAFETY: the sub-tile's rows, columns and bias lie within the tile's (caller's
            // contract); the half panel starts 16 floats (64 bytes) into each aligned step.
            unsafe {
                let (a, p, y) = (a.add(r0 * rs), panel.add(16 * half), y.add(r0 * ldy + 16 * half));
                match sub_rows {
                    1 => f32_sub::<1>(a, rs, ss, steps, p, y, ldy, st),
                    2 => f32_sub::<2>(a, rs, ss, steps, p, y, ldy, st),
                    3 => f32_sub::<3>(a, rs, ss, steps, p, y, ldy, st),
                    4 => f32_sub::<4>(a, rs, ss, steps, p, y, ldy, st),
                    5 => f32_sub::<5>(a, rs, ss, steps, p, y, ldy, st),
                    _ => f32_sub::<F32_ROWS>(a, rs, ss, steps, p, y, ldy, st),
                }
            }
        }
    }

    /// `R` rows × 16 columns of f32.
    ///
    /// # Safety
    /// As [`tile_f32`], for `R` rows and the 16 columns at `panel`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_sub<const R: usize>(
        a: *const f32,
        rs: usize,
        ss: usize,
        steps: usize,
        panel: *const f32,
        y: *mut f32,
        ldy: usize,
        store: Store,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for s in 0..steps {
            // SAFETY: step `s` of the panel holds NR aligned floats; A's reads are in bounds
            // (caller's contract).
            unsafe {
                let b0 = _mm256_load_ps(panel.add(s * NR));
                let b1 = _mm256_load_ps(panel.add(s * NR + 8));
                let col = a.add(s * ss);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(*col.add(r * rs));
                    acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
                }
            }
        }
        // SAFETY: the caller's `y` and `store`.
        unsafe { write(&acc, y, ldy, store) }
    }

    /// A tile of bf16 weights (pairs) against f32 activations, `rows ≤ MR` rows over `pairs` steps;
    /// with `odd_tail` the last pair's second value is absent (not read from `a`).
    ///
    /// # Safety
    /// Needs AVX2 and FMA; `a` must cover `r · rs + i · ss` for `r < rows` and
    /// `i < 2 · pairs − odd_tail`; `panel` `pairs` steps of [`NR`] words (64-byte aligned); `y`
    /// and `store` as in [`tile_f32`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_bf16_widened(
        rows: usize,
        a: *const f32,
        rs: usize,
        ss: usize,
        pairs: usize,
        odd_tail: bool,
        panel: *const u32,
        y: *mut f32,
        ldy: usize,
        store: Store,
    ) {
        for (r0, sub_rows, half, st) in sub_tiles(rows, BF16_ROWS, store) {
            // SAFETY: as in `tile_f32`.
            unsafe {
                let (a, p, y) = (a.add(r0 * rs), panel.add(16 * half), y.add(r0 * ldy + 16 * half));
                match sub_rows {
                    1 => bf16_sub::<1>(a, rs, ss, pairs, odd_tail, p, y, ldy, st),
                    2 => bf16_sub::<2>(a, rs, ss, pairs, odd_tail, p, y, ldy, st),
                    3 => bf16_sub::<3>(a, rs, ss, pairs, odd_tail, p, y, ldy, st),
                    _ => bf16_sub::<BF16_ROWS>(a, rs, ss, pairs, odd_tail, p, y, ldy, st),
                }
            }
        }
    }

    /// `R` rows × 16 columns: each pair word `lo | hi << 16` widens to `lo << 16` and
    /// `hi << 16` (bf16 → f32 is exact), multiplied by `A[r, 2p]` and `A[r, 2p + 1]`.
    ///
    /// # Safety
    /// As [`tile_bf16_widened`], for `R` rows and the 16 columns at `panel`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16_sub<const R: usize>(
        a: *const f32,
        rs: usize,
        ss: usize,
        pairs: usize,
        odd_tail: bool,
        panel: *const u32,
        y: *mut f32,
        ldy: usize,
        store: Store,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let full = pairs - usize::from(odd_tail);
        for p in 0..pairs {
            // SAFETY: step `p` of the panel holds NR aligned words; A's reads stay within the
            // values the caller guarantees (the second value only for complete pairs).
            unsafe {
                let w0 = _mm256_load_si256(panel.add(p * NR).cast());
                let w1 = _mm256_load_si256(panel.add(p * NR + 8).cast());
                let (lo0, lo1) =
                    (_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)));
                let col = a.add(2 * p * ss);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(*col.add(r * rs));
                    acc[0] = _mm256_fmadd_ps(x, lo0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, lo1, acc[1]);
                }
                if p < full {
                    let hi0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
                    let hi1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
                    let col = col.add(ss);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = _mm256_set1_ps(*col.add(r * rs));
                        acc[0] = _mm256_fmadd_ps(x, hi0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(x, hi1, acc[1]);
                    }
                }
            }
        }
        // SAFETY: the caller's `y` and `store`.
        unsafe { write(&acc, y, ldy, store) }
    }

    /// Stores `R` rows of two 8-wide accumulators: `acc (+ stored, if accumulate) (+ bias)` into
    /// the first `store.cols ≤ 16` columns, in the AVX-512 kernel's order of additions.
    ///
    /// # Safety
    /// Needs AVX2; `y` must address `R` rows (stride `ldy`) of `store.cols` writable values, and a
    /// non-null `store.bias` 16 readable values.
    #[target_feature(enable = "avx2")]
    unsafe fn write<const R: usize>(acc: &[[__m256; 2]; R], y: *mut f32, ldy: usize, store: Store) {
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let cols = store.cols as i32;
        let masks =
            [_mm256_cmpgt_epi32(_mm256_set1_epi32(cols), iota), _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), iota)];
        // SAFETY: the masked loads and stores touch only the first `store.cols` columns of each
        // row, and the bias loads 16 values (caller's contract).
        unsafe {
            let bias = if store.bias.is_null() {
                None
            } else {
                Some([_mm256_loadu_ps(store.bias), _mm256_loadu_ps(store.bias.add(8))])
            };
            for (r, acc) in acc.iter().enumerate() {
                let row = y.add(r * ldy);
                for h in 0..2 {
                    let mut v = acc[h];
                    if store.accumulate {
                        v = _mm256_add_ps(_mm256_maskload_ps(row.add(8 * h), masks[h]), v);
                    }
                    if let Some(b) = bias {
                        v = _mm256_add_ps(v, b[h]);
                    }
                    _mm256_maskstore_ps(row.add(8 * h), masks[h], v);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{KernelPath, Store};

    /// Never called: the packed kernels need x86-64 with AVX-512.
    ///
    /// # Safety
    /// None needed; it panics.
    pub unsafe fn round_row(_: &[f32], _: &mut [u32]) {
        unreachable!("the packed kernels need x86-64 with AVX-512")
    }

    /// Never called: the packed kernels need x86-64 with AVX-512.
    ///
    /// # Safety
    /// None needed; it panics.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        _: KernelPath,
        _: usize,
        _: *const u32,
        _: usize,
        _: usize,
        _: usize,
        _: bool,
        _: *const u32,
        _: *mut f32,
        _: usize,
        _: Store,
    ) {
        unreachable!("the packed kernels need x86-64 with AVX-512")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::for_each_supported_isa;

    /// Deterministic values in [-1, 1) with a few exact zeros and sign changes.
    fn values(seed: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.5 - 1.0).collect()
    }

    /// A column-major `A` (unit row stride) gives the bits of the same matrix stored row-major,
    /// when both take one `k` block (the AVX2 path copies a column-major `A` into tiles first);
    /// over several `k` blocks (longer than `COLUMN_MAJOR_K_BLOCK`), it stays within f32
    /// rounding of the f64 product. Shapes with partial tiles, several tasks and partial panels.
    #[test]
    fn a_column_major_operand_gives_the_row_major_products() {
        for_each_supported_isa("gemm: column-major A", |isa| {
            if !packed_kernel_available(WeightPrecision::F32) {
                return;
            }
            for (m, k, n) in [(1, 1, 1), (13, 7, 33), (77, 300, 70), (250, 1024, 40), (29, 2500, 45)] {
                let a_rows = values(1, m * k); // A[r, s] = a_rows[r · k + s]
                let mut a_cols = vec![0f32; m * k]; // A[r, s] = a_cols[s · m + r]
                for r in 0..m {
                    for s in 0..k {
                        a_cols[s * m + r] = a_rows[r * k + s];
                    }
                }
                let b = values(2, k * n);
                let bias = values(3, n);
                let panels = Panels::pack(&b, k, n, n, 1, WeightPrecision::F32);
                let row_major = panels.multiply(&a_rows, m, k, 1, Some(&bias));
                let column_major = panels.multiply(&a_cols, m, 1, m, Some(&bias));
                if k <= COLUMN_MAJOR_K_BLOCK {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&column_major), bits(&row_major), "[{m}, {k}] x [{k}, {n}] on {}", isa.name());
                }
                for r in 0..m {
                    for j in 0..n {
                        let (mut want, mut bound) = (f64::from(bias[j]), f64::from(bias[j].abs()));
                        for s in 0..k {
                            let term = f64::from(a_rows[r * k + s]) * f64::from(b[s * n + j]);
                            want += term;
                            bound += term.abs();
                        }
                        let got = f64::from(column_major[r * n + j]);
                        let tolerance = (k + 1) as f64 * f64::from(f32::EPSILON) * bound;
                        assert!(
                            (got - want).abs() <= tolerance,
                            "[{m}, {k}] x [{k}, {n}] on {}: ({r}, {j}) = {got}, want {want} ± {tolerance}",
                            isa.name()
                        );
                    }
                }
            }
        });
    }
}
