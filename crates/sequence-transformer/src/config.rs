//! Configuration of the sequence transformer.

use serde::{Deserialize, Serialize};

use rankstack_nn::Error;

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
}

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
        }
    }
}

impl SequenceTransformerConfig {
    /// The model width `d`.
    pub fn model_dim(&self) -> usize {
        match self.fusion {
            Fusion::Concat => self.action_dim + 2 * self.item_dim,
            Fusion::Append => self.action_dim + self.item_dim,
        }
    }

    /// Tokens seen by the encoder: `S`, or `S + 1` with [`Fusion::Append`].
    pub fn num_tokens(&self) -> usize {
        self.max_len + usize::from(self.fusion == Fusion::Append)
    }

    /// Output width `(K + 1) · d`.
    pub fn output_dim(&self) -> usize {
        (self.num_output_positions + 1) * self.model_dim()
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
        Ok(())
    }
}
