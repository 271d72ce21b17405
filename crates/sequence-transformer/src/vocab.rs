//! Remapping raw action ids through a vocabulary (TransAct's `action_vocab`).

use std::collections::HashMap;

use rankstack_nn::Error;

const LAYER: &str = "SequenceTransformer";

/// Checks an `action_vocab` for a table of `num_action_types` rows: non-empty, no 0 (raw 0 is
/// padding), no duplicates, and exactly `num_action_types − 1` ids (row 0 is padding).
pub(crate) fn validate(vocab: &[i64], num_action_types: usize) -> rankstack_nn::Result<()> {
    if vocab.is_empty() {
        return Err(Error::config(LAYER, "action_vocab", "is empty; list the raw action ids, or leave it out"));
    }
    if vocab.contains(&0) {
        return Err(Error::config(LAYER, "action_vocab", "lists 0, which is the padding id"));
    }
    let mut seen = HashMap::with_capacity(vocab.len());
    for (i, &id) in vocab.iter().enumerate() {
        if let Some(first) = seen.insert(id, i) {
            return Err(Error::config(LAYER, "action_vocab", format!("lists id {id} twice (at {first} and {i})")));
        }
    }
    if vocab.len() + 1 != num_action_types {
        return Err(Error::config(
            LAYER,
            "num_action_types",
            format!(
                "is {num_action_types} but action_vocab lists {} ids (plus the padding row: {})",
                vocab.len(),
                vocab.len() + 1
            ),
        ));
    }
    Ok(())
}

/// Raw action id → type: `vocab[i]` ↦ `i + 1`; any other id ↦ 0 (padding).
///
/// ```
/// # use sequence_transformer::ActionVocab;
/// let vocab = ActionVocab::new(&[7, 3, 11]);
/// assert_eq!(vocab.map(&[3, 7, 0, 5, -1, 11]), vec![2, 1, 0, 0, 0, 3]);
/// ```
#[derive(Debug, Clone)]
pub struct ActionVocab {
    index: HashMap<i64, i64>,
}

impl ActionVocab {
    /// The lookup for `vocab` (validated by the config).
    pub fn new(vocab: &[i64]) -> Self {
        Self { index: vocab.iter().enumerate().map(|(i, &id)| (id, i as i64 + 1)).collect() }
    }

    /// The types of `raw` ids.
    pub fn map(&self, raw: &[i64]) -> Vec<i64> {
        raw.iter().map(|id| self.index.get(id).copied().unwrap_or(0)).collect()
    }
}
