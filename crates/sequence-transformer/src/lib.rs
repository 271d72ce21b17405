//! A TransAct-style user-action sequence encoder (Pinterest Homefeed) on candle.
//!
//! - [`SequenceTransformer`]: action-type embedding, early fusion with the candidate
//!   ([`Fusion`]), masking ([`key_mask`], [`TimeWindowSampler`]), a [`TransformerEncoder`] and the
//!   `[max-pool ‖ first K]` output compression.
//! - [`TransformerEncoder`] / [`TransformerEncoderLayer`] / [`MultiHeadAttention`]: PyTorch
//!   `nn.TransformerEncoder(Layer)` / `nn.MultiheadAttention` semantics and parameter names
//!   (options: ReLU or GELU, `bias=False`, a final `norm`, and a caller's `src_mask`
//!   ([`AttentionMask`], [`src_mask`])).
//! - [`PackedSequences`] and [`packed_attention()`]: variable-length sequences stored back to back
//!   as the rows of one tensor, and attention over them (on the CPU one fused kernel of
//!   `rankstack-kernels`); TransAct drops the rows no output depends on (padding), and every
//!   encoder layer runs on the packed rows.
//! - [`pooling`]: the masked max-pool of the output.
//! - `action_lookup` (private): the action-type embedding's lookup, whose backward pass off the CPU
//!   kernels is a matrix product (tables of up to 64 rows) or a segmented sum, never candle's
//!   serial CUDA `index_add`.
//! - Importing peers: [`from_transact_state_dict`] (Pinterest's TransAct module) and
//!   [`from_torch_transformer_state_dict`] (`torch.nn.TransformerEncoder`), with single-layer
//!   checkpoints ([`save_sequence_transformer`], [`load_sequence_transformer`],
//!   [`save_transformer_encoder`], [`load_transformer_encoder`]; `docs/compatibility.md`).
//!
//! Numerics are checked against `torch.nn.TransformerEncoder` itself on its autograd ("slow")
//! path, the path every training step takes; the inference fast path differs only in zeroing the
//! outputs at masked positions.

#![forbid(unsafe_code)]

mod action_lookup;
pub mod attention;
mod checkpoint;
pub mod config;
pub mod encoder;
pub mod mask;
pub mod packed;
pub mod packed_attention;
pub mod pool_all;
pub mod pooling;
pub mod src_mask;
mod torch_transformer;
mod transact;
pub mod transformer;
pub mod vocab;

pub use attention::MultiHeadAttention;
pub use checkpoint::{
    load_sequence_transformer, load_transformer_encoder, save_sequence_transformer, save_transformer_encoder,
    SEQUENCE_TRANSFORMER_LAYER, TRANSFORMER_ENCODER_LAYER,
};
pub use config::{
    Fusion, FutureMask, MaxPool, PositionalEncoding, SequenceTransformerConfig, TimeWindowSampling, DAY_MS,
    MAX_ACTION_TYPES, MAX_SEQUENCE_LEN,
};
pub use encoder::{EncoderLayerConfig, TransformerEncoder, TransformerEncoderLayer};
pub use mask::{key_mask, key_mask_with, TimeWindowSampler};
pub use packed::PackedSequences;
pub use packed_attention::{
    packed_attention, packed_attention_with_device_dropout, packed_self_attention_with_device_dropout,
};
pub use src_mask::AttentionMask;
pub use torch_transformer::{from_torch_transformer_state_dict, TorchTransformerConfig};
pub use transact::from_transact_state_dict;
pub use transformer::{SequenceBatch, SequenceTransformer};
pub use vocab::ActionVocab;
