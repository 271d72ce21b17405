//! Importing Pinterest's TransAct module (`transformer_user_action`, `transact.py`): its state
//! dict renamed into [`crate::SequenceTransformer`] parameters.
//!
//! | TransAct | rankstack |
//! |---|---|
//! | `action_emb_module.weight` `[V, a]` | `action_emb.weight` |
//! | `transformer_encoder.layers.{i}.…` (and `transformer_encoder.norm.*`) | `encoder.layers.{i}.…` (`encoder.norm.*`) |
//! | `out_linear.{weight,bias}` `[d, d]`, `[d]` (with `concat_max_pool`) | `pool_proj.{weight,bias}` |
//! | `action_type_lookup` (buffer: raw action id → row) | checked against `action_vocab`, not stored |
//!
//! TransAct's options map to config fields (`docs/compatibility.md`): `max_pool: "all_positions"`
//! (its max-pool over every position; `"none"` for `concat_max_pool = False`),
//! `future_mask: "after"` (its strict `t > request_time`), `action_vocab` (its vocabulary without
//! the leading padding id), `fusion: "none"` (`concat_candidate_emb = False`),
//! `all_output_positions` (`latest_n_emb = 0`), `time_window_sampling: "per_batch_days"`.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rankstack_nn::state_dict::StateDictImport;
use rankstack_nn::{Error, Result};

use crate::torch_transformer::{import_encoder, EncoderShape};
use crate::{Fusion, MaxPool, PositionalEncoding, SequenceTransformerConfig};

const LAYER: &str = "TransAct import";

/// The tensors of the [`crate::SequenceTransformer`] `config` describes, from a TransAct module's
/// state dict (see the module docs for the mapping). Every TransAct tensor is checked — missing,
/// unexpected, mis-shaped, integer or non-finite ones are reported together under TransAct's
/// names — and its `action_type_lookup` buffer, when present, must map raw ids to rows as the
/// config's `action_vocab` does (the error lists the vocabulary the buffer implies). Refused:
/// configs TransAct has no counterpart for (append fusion, a learned positional encoding,
/// pre-norm).
pub fn from_transact_state_dict(
    config: &SequenceTransformerConfig,
    mut state: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if config.fusion == Fusion::Append {
        return Err(Error::config(
            LAYER,
            "fusion",
            "TransAct concatenates the candidate to every action or leaves it out: use \"concat\" or \"none\"",
        ));
    }
    if config.positional != PositionalEncoding::None {
        return Err(Error::config(LAYER, "positional", "TransAct has no positional encoding: use \"none\""));
    }
    if config.norm_first {
        return Err(Error::config(LAYER, "norm_first", "TransAct's encoder is post-norm: set it to false"));
    }
    config.validate()?;
    if let Some(lookup) = state.remove("action_type_lookup") {
        check_action_lookup(&lookup, config)?;
    }
    let d = config.model_dim();
    let mut import = StateDictImport::new("TransAct", state);
    import.rename("action_emb_module.weight", &[config.num_action_types, config.action_dim], "action_emb.weight");
    let shape = EncoderShape {
        d,
        ff: config.ff_dim,
        num_layers: config.num_layers,
        bias: config.bias,
        final_norm: config.final_norm,
    };
    import_encoder(&mut import, "transformer_encoder.", "encoder.", shape);
    if config.max_pool != MaxPool::None {
        import.rename("out_linear.weight", &[d, d], "pool_proj.weight");
        import.rename("out_linear.bias", &[d], "pool_proj.bias");
    }
    import.finish()
}

/// Checks TransAct's `action_type_lookup` (entry `r`: the table row of raw id `r`, 0 = padding)
/// against the config: the same rows as `action_vocab` gives (`action_vocab[i]` ↦ row `i + 1`), or,
/// without one, the identity on `0..num_action_types`.
fn check_action_lookup(lookup: &Tensor, config: &SequenceTransformerConfig) -> Result<()> {
    let bad = |reason: String| Error::input(LAYER, "action_type_lookup", reason);
    if lookup.rank() != 1 || lookup.dtype().is_float() {
        return Err(bad(format!(
            "expected a 1-D integer tensor, got {:?} of shape {:?}",
            lookup.dtype(),
            lookup.dims()
        )));
    }
    let rows = config.num_action_types;
    let lookup = rankstack_nn::host_transfer::read_input::<i64>(&lookup.to_dtype(DType::I64)?, "action type lookup")?;
    // raw id of each row 1..rows, as the buffer says
    let mut raw_of_row: Vec<Option<i64>> = vec![None; rows.saturating_sub(1)];
    for (raw, &row) in lookup.iter().enumerate() {
        if row == 0 {
            continue;
        }
        let slot = usize::try_from(row - 1).ok().and_then(|i| raw_of_row.get_mut(i));
        match slot {
            Some(slot @ None) => *slot = Some(raw as i64),
            Some(Some(first)) => return Err(bad(format!("raw ids {first} and {raw} both map to row {row}"))),
            None => return Err(bad(format!("raw id {raw} maps to row {row}, outside the {rows}-row action table"))),
        }
    }
    let implied: Vec<i64> = raw_of_row
        .iter()
        .enumerate()
        .map(|(i, raw)| raw.ok_or_else(|| bad(format!("no raw id maps to row {}", i + 1))))
        .collect::<Result<_>>()?;
    match &config.action_vocab {
        Some(vocab) if *vocab == implied => Ok(()),
        None if implied.iter().enumerate().all(|(i, &raw)| raw == i as i64 + 1) => Ok(()),
        Some(vocab) => Err(bad(format!("implies action_vocab = {implied:?}, the config has {vocab:?}"))),
        None => Err(bad(format!("remaps raw ids: set action_vocab = {implied:?} in the config"))),
    }
}
