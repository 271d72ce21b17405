//! Importing Pinterest's TransAct module (`transformer_user_action`, `transact.py`): its state
//! dict renamed into [`crate::SequenceTransformer`] parameters.
//!
//! | TransAct | rankstack |
//! |---|---|
//! | `action_emb_module.weight` `[V, a]` | `action_emb.weight` |
//! | `transformer_encoder.layers.{i}.…` | `encoder.layers.{i}.…` (same names below) |
//! | `out_linear.{weight,bias}` `[d, d]`, `[d]` | `pool_proj.{weight,bias}` |
//! | `action_type_lookup` (buffer: raw action id → row) | none: ids must already be rows |
//!
//! The default config reproduces TransAct (`concat_candidate_emb`, `concat_max_pool`,
//! `latest_n_emb = num_output_positions`, post-norm, no positional encoding) wherever no padded or
//! future action falls in the max-pool and no action carries exactly the request time: TransAct
//! max-pools over all positions and masks only `t > request_time` (`docs/compatibility.md`).

use std::collections::HashMap;

use candle_core::Tensor;
use rankstack_nn::state_dict::StateDictImport;
use rankstack_nn::{Error, Result};

use crate::torch_transformer::import_encoder_layers;
use crate::{Fusion, PositionalEncoding, SequenceTransformerConfig};

/// The tensors of the [`crate::SequenceTransformer`] `config` describes, from a TransAct module's
/// state dict (see the module docs for the mapping). Every TransAct tensor is checked — missing,
/// unexpected, mis-shaped, integer or non-finite ones are reported together under TransAct's
/// names. Refused: configs TransAct has no counterpart for (append fusion, a learned positional
/// encoding, pre-norm).
pub fn from_transact_state_dict(
    config: &SequenceTransformerConfig,
    state: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    const LAYER: &str = "TransAct import";
    if config.fusion != Fusion::Concat {
        return Err(Error::config(
            LAYER,
            "fusion",
            "TransAct concatenates the candidate to every action: use \"concat\"",
        ));
    }
    if config.positional != PositionalEncoding::None {
        return Err(Error::config(LAYER, "positional", "TransAct has no positional encoding: use \"none\""));
    }
    if config.norm_first {
        return Err(Error::config(LAYER, "norm_first", "TransAct's encoder is post-norm: set it to false"));
    }
    config.validate()?;
    let d = config.model_dim();
    let mut import = StateDictImport::new("TransAct", state);
    import.rename("action_emb_module.weight", &[config.num_action_types, config.action_dim], "action_emb.weight");
    import_encoder_layers(&mut import, "transformer_encoder.", "encoder.", config.num_layers, d, config.ff_dim);
    import.rename("out_linear.weight", &[d, d], "pool_proj.weight");
    import.rename("out_linear.bias", &[d], "pool_proj.bias");
    import.skip("action_type_lookup");
    import.finish()
}
