//! The served model and the slot that swaps it atomically on a reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::Device;
use ranker_model::{checkpoint, Ranker};
use rankstack_nn::packed_matmul::WeightPrecision;
use rankstack_nn::Result;

use super::signature::ModelSignature;
use crate::data::DataSchema;
use crate::train::resolve_checkpoint;

/// One loaded checkpoint, immutable once loaded: requests hold an `Arc` to the model they were
/// checked against and are scored by exactly that model, whatever reloads happen meanwhile.
pub struct ServedModel {
    /// The scoring model.
    pub ranker: Ranker,
    /// What its rows hold.
    pub schema: DataSchema,
    /// Its tensors as the protocol shows them.
    pub signature: ModelSignature,
    /// The version the protocol reports: 1 for the first load, +1 per reload.
    pub version: u64,
    /// The checkpoint directory it came from.
    pub checkpoint: PathBuf,
    /// The device it scores on.
    pub device: Device,
}

impl ServedModel {
    /// Loads `path` (a checkpoint, or a run directory's `LATEST`) for scoring on `device`
    /// ([`checkpoint::load_serving_model`]: packed weights on the CPU, f32 or bf16 weights on a GPU).
    pub fn load(path: &Path, weights: WeightPrecision, device: &Device, version: u64) -> Result<Self> {
        let dir = resolve_checkpoint(path)?;
        let ranker = checkpoint::load_serving_model(&dir, weights, device)?;
        let schema = DataSchema::of_model(ranker.config())?;
        let signature = ModelSignature::new(&schema)?;
        Ok(Self { ranker, schema, signature, version, checkpoint: dir, device: device.clone() })
    }
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServedModel(version {}, {})", self.version, self.checkpoint.display())
    }
}

/// The current model, swapped whole by [`ModelSlot::reload`].
pub struct ModelSlot {
    current: RwLock<Arc<ServedModel>>,
    /// Serialises reloads (so versions increase by one and two loads never race).
    reloading: Mutex<()>,
    source: PathBuf,
    weights: WeightPrecision,
}

impl ModelSlot {
    /// A slot holding `model`, loaded from `source` with `weights`.
    pub fn new(model: ServedModel, source: PathBuf, weights: WeightPrecision) -> Self {
        Self { current: RwLock::new(Arc::new(model)), reloading: Mutex::new(()), source, weights }
    }

    /// The model new requests are checked against and scored by.
    pub fn current(&self) -> Arc<ServedModel> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads `path` (default: the `--checkpoint` path again, which follows a run's `LATEST`) and
    /// makes it current in one step. On any error the current model stays. Blocks while loading.
    pub fn reload(&self, path: Option<&Path>) -> Result<Arc<ServedModel>> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current();
        let model = ServedModel::load(path.unwrap_or(&self.source), self.weights, &old.device, old.version + 1)?;
        let model = Arc::new(model);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = model.clone();
        Ok(model)
    }
}
