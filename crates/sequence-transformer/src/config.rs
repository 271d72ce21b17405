//! Configuration of the sequence transformer.

use serde::{Deserialize, Serialize};

use rankstack_nn::{Activation, Error};

const LAYER: &str = "SequenceTransformer";

/// How the candidate item is fused with the sequence ("early fusion").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fusion {
    /// Every position is `[action_emb ‖ item_emb ‖ candidate_emb]`; `d = action_dim + 2·item_dim`.
    #[default]
    Concat,
    /// Positions are `[action_emb ‖ item_emb]` and the candidate is one extra token
    /// `[candidate_token ‖ candidate_emb]` after the `S` actions (index `S`; never masked, part of
    /// the max-pool, not of the first-K block); `d = action_dim + item_dim`. `candidate_token` is a
    /// learned `[action_dim]` vector standing in for the action embedding.
    Append,
    /// No fusion: positions are `[action_emb ‖ item_emb]` and the candidate is not used
    /// (TransAct's `concat_candidate_emb = False`); `d = action_dim + item_dim`. The batch still
    /// carries a `candidate` (checked for shape), which gets a zero gradient.
    None,
}

/// What the max-pool block of the output covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxPool {
    /// `Linear(max over the unmasked positions)` (the TransAct paper).
    #[default]
    Unmasked,
    /// `Linear(max over every token)`, padded and masked ones included, as TransAct's public code
    /// does (`tfmr_out.max(dim=1)`): a masked position's encoder output (its query still attends
    /// to the unmasked keys) takes part. Every row then goes through the encoder, and the gradient
    /// goes to the first position attaining the maximum, as with `torch.max(dim).values`
    /// ([`crate::pool_all::max_pool_first`]).
    AllPositions,
    /// No max-pool block and no `pool_proj` (TransAct's `concat_max_pool = False`); the output is
    /// the first-K block alone, so K must be > 0.
    None,
}

/// Which actions count as "not in the past" (masked at inference and in training).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FutureMask {
    /// `timestamp ≥ request_time`: an action at exactly the request time is masked.
    #[default]
    AtOrAfter,
    /// `timestamp > request_time` (TransAct's public code): an action at exactly the request time
    /// is kept.
    After,
}

/// How the random training time windows are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeWindowSampling {
    /// One continuous window `T_b ~ U[0, time_window_ms]` per example.
    #[default]
    PerExample,
    /// One window per batch, a whole number of days: `T = n · 86 400 000` ms with
    /// `n ~ U{0, …, ⌊time_window_ms / 86 400 000⌋}`, the same for every example (TransAct's public
    /// code draws one window per batch). Needs `time_window_ms ≥ 86 400 000`.
    PerBatchDays,
}

/// One day in milliseconds, the unit of [`TimeWindowSampling::PerBatchDays`].
pub const DAY_MS: f64 = 86_400_000.0;

/// Positional encoding added to the tokens before the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionalEncoding {
    /// None (TransAct found positional encodings hurt).
    #[default]
    None,
    /// A learned `[tokens, d]` table `pos_emb.weight` added by position (index 0 = newest).
    Learned,
}

/// The longest sequence a config may ask for: attention costs `max_len²` per head and sequence,
/// and a config or a data file's schema (untrusted input) must not size an allocation before it is
/// checked. TransAct uses 100.
pub const MAX_SEQUENCE_LEN: usize = 1 << 16;

/// The most action types a config may ask for (the action embedding table has one row each;
/// TransAct uses a few dozen).
pub const MAX_ACTION_TYPES: usize = 1 << 20;

/// Options of [`crate::SequenceTransformer`]. Defaults follow TransAct: `S = 100`, action and item
/// width 32, concat fusion (`d = 96`), 2 post-norm layers, 2 heads, feed-forward 32, dropout 0.1,
/// no positional encoding, first `K = 10` positions plus the max-pool, 1-hour training window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequenceTransformerConfig {
    /// Sequence length `S` (longer inputs keep the newest `S`, shorter ones are padded).
    pub max_len: usize,
    /// Rows of the action-type table, including the padding type 0.
    pub num_action_types: usize,
    /// Action-type embedding width.
    pub action_dim: usize,
    /// Item (and candidate) embedding width `E`.
    pub item_dim: usize,
    /// Candidate fusion.
    pub fusion: Fusion,
    /// Number of encoder layers.
    pub num_layers: usize,
    /// Attention heads; must divide `d`.
    pub num_heads: usize,
    /// Feed-forward width.
    pub ff_dim: usize,
    /// Dropout probability (attention weights, feed-forward, both residual branches), training only.
    pub dropout: f64,
    /// Pre-norm (`x + f(norm(x))`) instead of PyTorch's default post-norm (`norm(x + f(x))`).
    pub norm_first: bool,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Positional encoding.
    pub positional: PositionalEncoding,
    /// `K`: the number of leading (newest) positions kept in the output, `≤ max_len`.
    pub num_output_positions: usize,
    /// Upper bound of the random training time window `T ~ U[0, time_window_ms]`; 0 disables it.
    pub time_window_ms: f64,
    /// Seed of the time-window and dropout streams.
    pub seed: u64,
    /// What the max-pool block covers (or whether there is one).
    pub max_pool: MaxPool,
    /// Which actions are masked as "not in the past".
    pub future_mask: FutureMask,
    /// Keep every one of the `S` positions in the output (TransAct's `latest_n_emb = 0`):
    /// `K = max_len`; `num_output_positions` must then be 0 or `max_len`.
    pub all_output_positions: bool,
    /// Raw action ids, remapped on input: `action_vocab[i]` becomes type `i + 1`, and every id not
    /// listed (negative or unknown ones included) becomes padding (type 0, masked) instead of an
    /// error, as TransAct's `action_vocab` lookup does. Raw 0 always means padding and may not be
    /// listed; `num_action_types` must be `len + 1`. Without it, types are used as given and an
    /// id outside `0..num_action_types` is an error.
    pub action_vocab: Option<Vec<i64>>,
    /// Feed-forward activation of the encoder layers (`torch.nn.TransformerEncoderLayer`'s
    /// `activation`: `relu`, or `gelu` in its exact erf form).
    pub activation: Activation,
    /// Biases in the encoder (`torch.nn.TransformerEncoderLayer`'s `bias`): off removes the
    /// attention, feed-forward and LayerNorm biases.
    pub bias: bool,
    /// A final LayerNorm after the last encoder layer (`torch.nn.TransformerEncoder`'s `norm`),
    /// parameters `encoder.norm.*`.
    pub final_norm: bool,
    /// How training windows are drawn.
    pub time_window_sampling: TimeWindowSampling,
}

impl Default for SequenceTransformerConfig {
    fn default() -> Self {
        Self {
            max_len: 100,
            num_action_types: 16,
            action_dim: 32,
            item_dim: 32,
            fusion: Fusion::Concat,
            num_layers: 2,
            num_heads: 2,
            ff_dim: 32,
            dropout: 0.1,
            norm_first: false,
            layer_norm_eps: 1e-5,
            positional: PositionalEncoding::None,
            num_output_positions: 10,
            time_window_ms: 3_600_000.0,
            seed: 0,
            max_pool: MaxPool::Unmasked,
            future_mask: FutureMask::AtOrAfter,
            all_output_positions: false,
            action_vocab: None,
            activation: Activation::Relu,
            bias: true,
            final_norm: false,
            time_window_sampling: TimeWindowSampling::PerExample,
        }
    }
}

impl SequenceTransformerConfig {
    /// The model width `d`.
    pub fn model_dim(&self) -> usize {
        match self.fusion {
            Fusion::Concat => self.action_dim + 2 * self.item_dim,
            Fusion::Append | Fusion::None => self.action_dim + self.item_dim,
        }
    }

    /// `K`, the number of leading positions in the output: `max_len` with
    /// `all_output_positions`, else `num_output_positions`.
    pub fn output_positions(&self) -> usize {
        if self.all_output_positions {
            self.max_len
        } else {
            self.num_output_positions
        }
    }

    /// Tokens seen by the encoder: `S`, or `S + 1` with [`Fusion::Append`].
    pub fn num_tokens(&self) -> usize {
        self.max_len + usize::from(self.fusion == Fusion::Append)
    }

    /// Output width `(K + 1) · d`, or `K · d` without a max-pool.
    pub fn output_dim(&self) -> usize {
        let pooled = usize::from(self.max_pool != MaxPool::None);
        (self.output_positions() + pooled) * self.model_dim()
    }

    /// Checks every value; errors name the field.
    pub fn validate(&self) -> rankstack_nn::Result<()> {
        let positive = [
            ("max_len", self.max_len),
            ("action_dim", self.action_dim),
            ("item_dim", self.item_dim),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("ff_dim", self.ff_dim),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::config(LAYER, *field, "must be > 0"));
        }
        if self.max_len > MAX_SEQUENCE_LEN {
            return Err(Error::config(
                LAYER,
                "max_len",
                format!("{} exceeds {MAX_SEQUENCE_LEN} (attention is quadratic in it)", self.max_len),
            ));
        }
        if self.num_action_types > MAX_ACTION_TYPES {
            return Err(Error::config(
                LAYER,
                "num_action_types",
                format!("{} exceeds {MAX_ACTION_TYPES}", self.num_action_types),
            ));
        }
        if self.num_action_types < 2 {
            return Err(Error::config(
                LAYER,
                "num_action_types",
                format!("must be ≥ 2 (type 0 is padding), got {}", self.num_action_types),
            ));
        }
        let d = self.model_dim();
        if !d.is_multiple_of(self.num_heads) {
            return Err(Error::config(
                LAYER,
                "num_heads",
                format!("{} heads do not divide the model width d = {d}", self.num_heads),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(LAYER, "dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::config(
                LAYER,
                "layer_norm_eps",
                format!("must be finite and > 0, got {}", self.layer_norm_eps),
            ));
        }
        if self.num_output_positions > self.max_len {
            return Err(Error::config(
                LAYER,
                "num_output_positions",
                format!("K = {} exceeds max_len = {}", self.num_output_positions, self.max_len),
            ));
        }
        if !(self.time_window_ms.is_finite() && self.time_window_ms >= 0.0) {
            return Err(Error::config(
                LAYER,
                "time_window_ms",
                format!("must be finite and ≥ 0, got {}", self.time_window_ms),
            ));
        }
        self.validate_variants()
    }

    /// The options that reproduce peers' variants, and how they combine.
    fn validate_variants(&self) -> rankstack_nn::Result<()> {
        let k = self.num_output_positions;
        if self.all_output_positions && k != 0 && k != self.max_len {
            return Err(Error::config(
                LAYER,
                "num_output_positions",
                format!(
                    "is {} but all_output_positions keeps all {} positions; set it to 0 or {}",
                    self.num_output_positions, self.max_len, self.max_len
                ),
            ));
        }
        if self.max_pool == MaxPool::None && self.output_positions() == 0 {
            return Err(Error::config(
                LAYER,
                "max_pool",
                "is `none` and num_output_positions is 0: the output would be empty",
            ));
        }
        if let Some(vocab) = &self.action_vocab {
            crate::vocab::validate(vocab, self.num_action_types)?;
        }
        if self.time_window_sampling == TimeWindowSampling::PerBatchDays
            && self.time_window_ms > 0.0
            && self.time_window_ms < DAY_MS
        {
            return Err(Error::config(
                LAYER,
                "time_window_ms",
                format!(
                    "is {} but per_batch_days windows are whole days: it must be 0 (off) or ≥ {DAY_MS}",
                    self.time_window_ms
                ),
            ));
        }
        Ok(())
    }
}
