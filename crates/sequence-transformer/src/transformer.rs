//! TransAct: the user-action sequence encoder of Pinterest's Homefeed ranker.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::distinct_rows::DistinctRows;
use rankstack_nn::host_transfer::{read_input, upload, Origin};
use rankstack_nn::probe::mark;
use rankstack_nn::{linear_xavier, Error, Linear};

use crate::action_lookup::ActionLookup;
use crate::pool_all::MaxPoolFirst;
use crate::pooling::masked_max_pool;
use crate::{
    key_mask_with, ActionVocab, EncoderLayerConfig, Fusion, MaxPool, PackedSequences, PositionalEncoding,
    SequenceTransformerConfig, TimeWindowSampler, TransformerEncoder,
};

const LAYER: &str = "SequenceTransformer";

/// One batch of user-action sequences, newest action first.
#[derive(Debug, Clone)]
pub struct SequenceBatch {
    /// `[B, S_in]` integer action types; 0 is padding.
    pub action_types: Tensor,
    /// `[B, S_in, E]` item embeddings.
    pub item_embeddings: Tensor,
    /// `[B, S_in]` integer action timestamps in ms.
    pub timestamps: Tensor,
    /// `[B]` integer request times in ms.
    pub request_time: Tensor,
    /// `[B, E]` embedding of the candidate item being ranked.
    pub candidate: Tensor,
}

/// TransAct (Xia et al., 2023):
///
/// ```text
/// tokens_j = [A(type_j) ‖ item_j ‖ candidate]            (concat fusion; append: see Fusion)
///        H = Encoder(tokens (+ P), key mask)               [B, S, d]
///      out = [Linear(max_{j unmasked} H_j) ‖ H_0 ‖ … ‖ H_{K−1}]   [B, (K + 1)·d]
/// ```
///
/// Inputs longer than `S` keep the newest `S` actions; shorter ones are padded with type 0. The key
/// mask ([`crate::key_mask`]) hides padding, actions at or after the request time (or only after
/// it: [`crate::FutureMask`]) and, in training only, a random recent window `T ~ U[0,
/// time_window_ms]` per example (or one whole number of days per batch:
/// [`crate::TimeWindowSampling`]; drawn by a seeded [`TimeWindowSampler`]); position 0 is never
/// masked. Masked positions still produce encoder
/// outputs (as PyTorch's autograd "slow path" does; the inference fast path would zero them), and
/// those of the first `K` appear in the output as computed.
///
/// Options reproducing TransAct's public code (see [`SequenceTransformerConfig`]): the max-pool
/// over every position ([`MaxPool::AllPositions`]) or none ([`MaxPool::None`]), no candidate
/// fusion ([`Fusion::None`]), every position in the output (`all_output_positions`), raw action ids
/// through an `action_vocab` (unknown ones become padding), and the encoder's `activation`, `bias`
/// and `final_norm`.
///
/// Parameters, under the names of the PyTorch reference (`reference/rankstack_ref/sequence_transformer.py`):
/// `action_emb.weight` `[num_action_types, action_dim]` (row 0 = padding: initialised to zero,
/// never read, no gradient), `encoder.layers.{i}.*` ([`TransformerEncoder`], the state dict of a
/// `torch.nn.TransformerEncoder`), `pool_proj.{weight,bias}` `[d, d]` (absent with
/// [`MaxPool::None`]), and optionally
/// `pos_emb.weight` `[tokens, d]` and `candidate_token` `[action_dim]`.
///
/// ```
/// # use candle_core::{Device, DType, Tensor};
/// # use rankstack_nn::SeededVarMap;
/// # use sequence_transformer::{SequenceBatch, SequenceTransformer, SequenceTransformerConfig};
/// let config = SequenceTransformerConfig { max_len: 8, num_output_positions: 2, ..Default::default() };
/// let params = SeededVarMap::new(0);
/// let model = SequenceTransformer::new(&config, params.var_builder(DType::F32, &Device::Cpu))?;
/// let dev = Device::Cpu;
/// let batch = SequenceBatch {
///     action_types: Tensor::new(&[[1u32, 2, 0], [3, 0, 0]], &dev)?,
///     item_embeddings: Tensor::ones((2, 3, 32), DType::F32, &dev)?,
///     timestamps: Tensor::new(&[[900i64, 500, 0], [990, 0, 0]], &dev)?,
///     request_time: Tensor::new(&[1000i64, 1000], &dev)?,
///     candidate: Tensor::ones((2, 32), DType::F32, &dev)?,
/// };
/// let y = model.forward_t(&batch, true)?;
/// assert_eq!(y.dims(), &[2, 3 * 96]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SequenceTransformer {
    config: SequenceTransformerConfig,
    action_emb: Tensor,
    action_lookup: ActionLookup,
    /// The all-positions max-pool with its positions on the device (`max_pool = "all_positions"`).
    pool_first: Option<MaxPoolFirst>,
    pos_emb: Option<Tensor>,
    candidate_token: Option<Tensor>,
    encoder: TransformerEncoder,
    pool_proj: Option<Linear>,
    window: TimeWindowSampler,
    vocab: Option<ActionVocab>,
}

struct Prepared {
    types: Vec<i64>,
    timestamps: Vec<i64>,
    request: Vec<i64>,
    items: Tensor,
    batch: usize,
}

impl SequenceTransformer {
    /// Validates `config` and creates the parameters.
    pub fn new(config: &SequenceTransformerConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        config.validate()?;
        let d = config.model_dim();
        let action_emb = vb.get_with_hints(
            (config.num_action_types, config.action_dim),
            "action_emb.weight",
            Init::Randn { mean: 0.0, stdev: 1.0 / (config.action_dim as f64).sqrt() },
        )?;
        action_emb.slice_set(&Tensor::zeros((1, config.action_dim), action_emb.dtype(), action_emb.device())?, 0, 0)?;
        let action_lookup = ActionLookup::new(&action_emb)?;
        let pos_emb = match config.positional {
            PositionalEncoding::None => None,
            PositionalEncoding::Learned => Some(vb.get_with_hints(
                (config.num_tokens(), d),
                "pos_emb.weight",
                Init::Randn { mean: 0.0, stdev: 0.02 },
            )?),
        };
        let candidate_token = match config.fusion {
            Fusion::Concat | Fusion::None => None,
            Fusion::Append => Some(vb.get_with_hints(
                config.action_dim,
                "candidate_token",
                Init::Randn { mean: 0.0, stdev: 1.0 / (config.action_dim as f64).sqrt() },
            )?),
        };
        let layer = EncoderLayerConfig {
            num_heads: config.num_heads,
            ff_dim: config.ff_dim,
            dropout: config.dropout,
            norm_first: config.norm_first,
            layer_norm_eps: config.layer_norm_eps,
            seed: config.seed,
            activation: config.activation,
            bias: config.bias,
        };
        let encoder =
            TransformerEncoder::with_final_norm(d, config.num_layers, &layer, config.final_norm, vb.pp("encoder"))?;
        let pool_proj = match config.max_pool {
            MaxPool::None => None,
            MaxPool::Unmasked | MaxPool::AllPositions => Some(linear_xavier(d, d, true, vb.pp("pool_proj"))?),
        };
        let pool_first = match config.max_pool {
            MaxPool::AllPositions => Some(MaxPoolFirst::new(config.num_tokens(), action_emb.device())?),
            MaxPool::Unmasked | MaxPool::None => None,
        };
        let window_seed = config.seed ^ rankstack_nn::rng::hash_name(&format!("{}.time_window", vb.prefix()));
        Ok(Self {
            config: config.clone(),
            action_emb,
            action_lookup,
            pool_first,
            pos_emb,
            candidate_token,
            encoder,
            pool_proj,
            window: TimeWindowSampler::with_sampling(config.time_window_ms, config.time_window_sampling, window_seed),
            vocab: config.action_vocab.as_deref().map(ActionVocab::new),
        })
    }

    /// The config.
    pub fn config(&self) -> &SequenceTransformerConfig {
        &self.config
    }

    /// Model width `d`.
    pub fn model_dim(&self) -> usize {
        self.config.model_dim()
    }

    /// Output width `(K + 1) · d`.
    pub fn output_dim(&self) -> usize {
        self.config.output_dim()
    }

    /// The encoder.
    pub fn encoder(&self) -> &TransformerEncoder {
        &self.encoder
    }

    /// The training time-window sampler (its RNG state is part of a training checkpoint).
    pub fn time_window_sampler(&self) -> &TimeWindowSampler {
        &self.window
    }

    /// Validates shapes and ids, truncates to the newest `S` or pads to `S`.
    fn prepare(&self, batch: &SequenceBatch) -> Result<Prepared> {
        use rankstack_nn::shape::{expect_dims, expect_same_batch};
        let c = &self.config;
        let e = c.item_dim;
        expect_dims(LAYER, "action_types", &batch.action_types, &[None, None])?;
        let (b, s_in) = batch.action_types.dims2()?;
        if s_in == 0 {
            return Err(Error::input(
                LAYER,
                "action_types",
                "sequence length S is 0; pad empty histories with type 0 instead",
            )
            .into());
        }
        expect_dims(LAYER, "item_embeddings", &batch.item_embeddings, &[None, Some(s_in), Some(e)])?;
        expect_dims(LAYER, "timestamps", &batch.timestamps, &[None, Some(s_in)])?;
        expect_dims(LAYER, "request_time", &batch.request_time, &[None])?;
        expect_dims(LAYER, "candidate", &batch.candidate, &[None, Some(e)])?;
        for (name, t) in [
            ("item_embeddings", &batch.item_embeddings),
            ("timestamps", &batch.timestamps),
            ("request_time", &batch.request_time),
            ("candidate", &batch.candidate),
        ] {
            expect_same_batch(LAYER, ("action_types", &batch.action_types), (name, t))?;
        }
        let s = c.max_len;
        let keep = s_in.min(s);
        let host = |t: &Tensor, what| -> Result<Vec<i64>> {
            let t = t.narrow(1, 0, keep)?.to_dtype(DType::I64)?;
            let t = if keep < s { t.pad_with_zeros(1, 0, s - keep)? } else { t };
            read_input::<i64>(&t, what)
        };
        let types = host(&batch.action_types, "action types")?;
        // Raw ids through the vocabulary: unknown ones become padding.
        let types = match &self.vocab {
            Some(vocab) => vocab.map(&types),
            None => types,
        };
        if let Some((i, &t)) = types.iter().enumerate().find(|(_, &t)| t < 0 || t as usize >= c.num_action_types) {
            return Err(Error::input(
                LAYER,
                "action_types",
                format!("type {t} at [{}, {}] is outside 0..{}", i / s, i % s, c.num_action_types),
            )
            .into());
        }
        let timestamps = host(&batch.timestamps, "timestamps")?;
        let request = read_input::<i64>(&batch.request_time.to_dtype(DType::I64)?, "request times")?;
        let items = batch.item_embeddings.narrow(1, 0, keep)?;
        let items = if keep < s { items.pad_with_zeros(1, 0, s - keep)? } else { items };
        Ok(Prepared { types, timestamps, request, items, batch: b })
    }

    /// The key mask `[B, tokens]` (u8, 1 = masked) the encoder would use for `batch`, with the
    /// given training windows (`None`: no window masking). See [`crate::key_mask`].
    pub fn mask(&self, batch: &SequenceBatch, window: Option<&[f64]>) -> Result<Tensor> {
        let p = self.prepare(batch)?;
        let m = self.mask_of(&p, window)?;
        let m = m.into_iter().map(u8::from).collect::<Vec<_>>();
        upload(m, (p.batch, self.config.num_tokens()), batch.candidate.device(), "key mask", Origin::Input)
    }

    fn mask_of(&self, p: &Prepared, window: Option<&[f64]>) -> Result<Vec<bool>> {
        let s = self.config.max_len;
        if let Some(w) = window {
            if w.len() != p.batch {
                return Err(
                    Error::input(LAYER, "window", format!("{} windows for a batch of {}", w.len(), p.batch)).into()
                );
            }
        }
        let m = key_mask_with(&p.types, &p.timestamps, &p.request, s, window, self.config.future_mask);
        Ok(match self.config.fusion {
            Fusion::Concat | Fusion::None => m,
            // The appended candidate token (index S) is never masked.
            Fusion::Append => m.chunks(s).flat_map(|row| row.iter().copied().chain([false])).collect(),
        })
    }

    /// The encoder over the tokens `x` `[B, n, d]` with key mask `masked` `[B·n]`.
    ///
    /// Only the unmasked rows and the first K feed the output (a masked row is never a key, so it
    /// reaches no other row): the encoder runs on those rows alone, packed, and its output is
    /// scattered back (zeros elsewhere, which the pooling skips). With [`MaxPool::AllPositions`]
    /// every row feeds the pool, so every row is encoded.
    fn encode(&self, x: &Tensor, masked: &[bool], train: bool) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let keep_first = match self.config.max_pool {
            MaxPool::AllPositions => n,
            MaxPool::Unmasked | MaxPool::None => self.config.output_positions(),
        };
        let (sequences, rows) = PackedSequences::compact(masked, b, n, keep_first)?;
        // On a GPU's graph the attention pads chunks of consecutive sequences to their longest:
        // packed shortest first, they pad little. (The CPU kernels attend each sequence alone.)
        let (sequences, rows) = match kernels_run_on(x.device()) {
            true => (sequences, rows),
            false => sequences.sorted_by_length(&rows)?,
        };
        // Distinct rows both ways: gathers, not candle's serial CUDA index_add (see distinct_rows).
        // A row left out of the encoder is read by nothing but the masked pool, which skips it
        // (it is masked: `compact` keeps every unmasked row and the first K, which are read
        // directly), so its value does not matter and its gradient is zero: it repeats a row of
        // the encoder's output (`DistinctRows::spread`) instead of a zero row appended to that
        // output first (a copy of it).
        let fill = left_out_rows_fill(&rows, b, n);
        let rows = match &fill {
            Some(fill) => DistinctRows::with_fill(&rows, b * n, |j| fill[j / n], x.device(), "TransAct packing")?,
            None => DistinctRows::new(&rows, b * n, x.device(), "TransAct packing")?,
        };
        let packed = rows.gather(&x.reshape((b * n, d))?)?;
        mark("transact.pack", &packed)?;
        let packed = self.encoder.forward_packed(&packed, &Arc::new(sequences), train)?;
        let h = match fill {
            Some(_) => rows.spread(&packed)?,
            None => rows.scatter(&packed)?,
        };
        let h = h.reshape((b, n, d))?;
        mark("transact.unpack", &h)?;
        Ok(h)
    }

    /// Forward pass with explicit training windows (`None`: no window masking, as in evaluation);
    /// `train` switches dropout. [`SequenceTransformer::forward_t`] draws the windows itself.
    pub fn forward_with_window(&self, batch: &SequenceBatch, window: Option<&[f64]>, train: bool) -> Result<Tensor> {
        let p = self.prepare(batch)?;
        let masked = self.mask_of(&p, window)?;
        mark("transact.prepare", &batch.candidate)?;
        let tokens = self.tokens(&p, &batch.candidate)?;
        mark("transact.tokens", &tokens)?;
        let h = self.encode(&tokens, &masked, train)?;
        let out = self.compress(&h, &masked)?;
        mark("transact.pool", &out)?;
        Ok(out)
    }

    /// The encoder's input tokens `[B, n, d]`: action embedding ‖ item embedding, fused with the
    /// candidate, plus the positional embedding.
    fn tokens(&self, p: &Prepared, candidate: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, s) = (p.batch, c.max_len);
        let (dtype, dev) = (self.action_emb.dtype(), self.action_emb.device());

        // Action embeddings; padding (type 0) is zeroed by a mask so row 0 never gets a gradient.
        let ids = p.types.iter().map(|&t| t as u32).collect::<Vec<_>>();
        let not_pad = p.types.iter().map(|&t| if t == 0 { 0.0 } else { 1.0 }).collect::<Vec<f64>>();
        let not_pad = upload(not_pad, (b * s, 1), dev, "action padding mask", Origin::Input)?.to_dtype(dtype)?;
        let actions = self.action_lookup.lookup(&self.action_emb, &ids)?;
        let actions = actions.broadcast_mul(&not_pad)?.reshape((b, s, c.action_dim))?;
        let candidate = candidate.unsqueeze(1)?;
        let mut x = match (&self.candidate_token, c.fusion) {
            (_, Fusion::None) => Tensor::cat(&[&actions, &p.items], 2)?,
            (_, Fusion::Concat) => {
                let cand = candidate.broadcast_as((b, s, c.item_dim))?.contiguous()?;
                Tensor::cat(&[&actions, &p.items, &cand], 2)?
            }
            (Some(token), Fusion::Append) => {
                let tokens = Tensor::cat(&[&actions, &p.items], 2)?;
                let token = token.reshape((1, 1, c.action_dim))?.broadcast_as((b, 1, c.action_dim))?.contiguous()?;
                let cand = Tensor::cat(&[&token, &candidate], 2)?;
                Tensor::cat(&[&tokens, &cand], 1)?
            }
            (None, Fusion::Append) => unreachable!("append fusion always has a candidate token"),
        };
        if let Some(pos) = &self.pos_emb {
            x = x.broadcast_add(&pos.unsqueeze(0)?)?;
        }
        Ok(x)
    }

    /// `[max-pool ‖ first K]` of the encoder output `h` `[B, n, d]` (either block may be absent,
    /// not both: the config checks).
    fn compress(&self, h: &Tensor, masked: &[bool]) -> Result<Tensor> {
        let (b, _, d) = h.dims3()?;
        let mut parts = Vec::with_capacity(2);
        if let Some(pool_proj) = &self.pool_proj {
            // Over unmasked positions (position 0 is never masked, so the max is finite), or all.
            let pooled = match self.config.max_pool {
                MaxPool::AllPositions => match &self.pool_first {
                    Some(pool) => pool.forward(h)?,
                    None => crate::pool_all::max_pool_first(h)?,
                },
                MaxPool::Unmasked | MaxPool::None => masked_max_pool(h, masked)?,
            };
            parts.push(pool_proj.forward(&pooled)?);
        }
        let k = self.config.output_positions();
        if k > 0 {
            parts.push(h.narrow(1, 0, k)?.reshape((b, k * d))?);
        }
        match parts.len() {
            1 => Ok(parts.remove(0)),
            _ => Tensor::cat(&parts, 1),
        }
    }

    /// Forward pass; in training (`train = true`) each example gets a random time window (if
    /// `time_window_ms > 0`; per example, or one per batch: `time_window_sampling`) and dropout is
    /// active.
    pub fn forward_t(&self, batch: &SequenceBatch, train: bool) -> Result<Tensor> {
        if train && self.config.time_window_ms > 0.0 {
            let b = batch.action_types.dims().first().copied().unwrap_or(0);
            let window = self.window.sample(b);
            self.forward_with_window(batch, Some(&window), true)
        } else {
            self.forward_with_window(batch, None, train)
        }
    }

    /// Evaluation-mode forward pass.
    pub fn forward(&self, batch: &SequenceBatch) -> Result<Tensor> {
        self.forward_t(batch, false)
    }
}

impl rankstack_nn::Reseed for SequenceTransformer {
    /// Resets every random stream from `seed`: dropout `j` of layer `i` (attention weights,
    /// feed-forward, residual 1, residual 2, in [`crate::TransformerEncoderLayer::dropouts`] order)
    /// from `child_seed(seed, "encoder.layers.{i}.dropout{j}")`, and the time-window sampler from
    /// `child_seed(seed, "time_window")`.
    fn reseed(&self, seed: u64) {
        use rankstack_nn::reseed::child_seed;
        for (i, layer) in self.encoder.layers().iter().enumerate() {
            for (j, dropout) in layer.dropouts().iter().enumerate() {
                dropout.reseed(child_seed(seed, &format!("encoder.layers.{i}.dropout{j}")));
            }
        }
        self.window.set_rng_state(rankstack_nn::rng::Rng::new(child_seed(seed, "time_window")).state());
    }
}

impl rankstack_nn::LinearLayers for SequenceTransformer {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        let mut layers = self.encoder.linear_layers_mut();
        layers.extend(self.pool_proj.as_mut());
        layers
    }
}

/// For each of `b` sequences of `n` positions, the packed row its positions left out of the encoder
/// repeat when the encoder's output is spread back (`rows`: the dense position of each packed
/// row): the sequence's first packed row, or the first of all for a sequence with none (nothing of
/// it is read). `None` when nothing was packed: there is no row to repeat.
fn left_out_rows_fill(rows: &[u32], b: usize, n: usize) -> Option<Vec<u32>> {
    if rows.is_empty() {
        return None;
    }
    let mut first: Vec<Option<u32>> = vec![None; b];
    for (i, &r) in rows.iter().enumerate() {
        first[r as usize / n.max(1)].get_or_insert(i as u32);
    }
    Some(first.into_iter().map(|f| f.unwrap_or(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rankstack_nn::testing::seeded_randn;
    use rankstack_nn::SeededVarMap;

    #[test]
    fn left_out_rows_repeat_their_sequences_first_packed_row() {
        // Three sequences of 3 positions, packed shortest first: sequence 1's positions 0 and 1,
        // then sequence 0's position 0; sequence 2 has none and repeats packed row 0.
        assert_eq!(left_out_rows_fill(&[3, 4, 0], 3, 3), Some(vec![2, 0, 0]));
        assert_eq!(left_out_rows_fill(&[], 2, 3), None);
    }

    #[test]
    fn compaction_changes_neither_the_output_nor_the_gradients() {
        // Histories of 6, 5, …, 1 real actions (padding after), plus random training windows:
        // masked rows both inside and beyond the first K positions.
        let (b, s, e) = (6, 6, 4);
        let config = SequenceTransformerConfig {
            max_len: s,
            num_action_types: 5,
            action_dim: 4,
            item_dim: e,
            ff_dim: 8,
            num_output_positions: 2,
            dropout: 0.0,
            ..Default::default()
        };
        let dev = Device::Cpu;
        let req = 1_000_000i64;
        let (mut types, mut ts) = (vec![0u32; b * s], vec![0i64; b * s]);
        for i in 0..b {
            for j in 0..s - i {
                types[i * s + j] = 1 + ((i + j) % 4) as u32;
                ts[i * s + j] = req - 1000 * (j as i64 + 1);
            }
        }
        let batch = SequenceBatch {
            action_types: Tensor::from_vec(types, (b, s), &dev).unwrap(),
            item_embeddings: seeded_randn(1, &[b, s, e], DType::F64),
            timestamps: Tensor::from_vec(ts, (b, s), &dev).unwrap(),
            request_time: Tensor::from_vec(vec![req; b], b, &dev).unwrap(),
            candidate: seeded_randn(2, &[b, e], DType::F64),
        };
        let store = SeededVarMap::new(3);
        let model = SequenceTransformer::new(&config, store.var_builder(DType::F64, &dev)).unwrap();
        let window = [2500.0, 0.0, 1500.0, 0.0, 0.0, 3500.0];
        let p = model.prepare(&batch).unwrap();
        let masked = model.mask_of(&p, Some(&window)).unwrap();
        let x = model.tokens(&p, &batch.candidate).unwrap();
        // The reference: the encoder on every row, with the additive key mask.
        let additive: Vec<f64> = masked.iter().map(|&m| if m { f64::NEG_INFINITY } else { 0.0 }).collect();
        let additive = Tensor::from_vec(additive, (b, s), &dev).unwrap();
        let run = |compact: bool| {
            let h = match compact {
                true => model.encode(&x, &masked, true).unwrap(),
                false => model.encoder.forward_t(&x, Some(&additive), true).unwrap(),
            };
            let y = model.compress(&h, &masked).unwrap();
            let r = seeded_randn(4, y.dims(), DType::F64);
            let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut all: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
            for (_, var) in store.named_vars() {
                all.extend(grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap());
            }
            all
        };
        assert!(masked.iter().filter(|&&m| m).count() > 8, "the case must mask rows");
        // With the CPU kernels, and on the GPU's graph (sequences packed shortest first, the
        // composed attention, left-out rows spread back as repeats).
        use rankstack_kernels::cpu::{with_isa, Isa};
        for isa in [None, Some(Isa::Candle)] {
            let (dense, packed) = match isa {
                None => (run(false), run(true)),
                Some(isa) => with_isa(isa, || (run(false), run(true))),
            };
            for (a, b) in packed.iter().zip(&dense) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{isa:?}: {a} vs {b}");
            }
        }
    }
}
