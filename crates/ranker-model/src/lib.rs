//! The assembled Homefeed ranker (Pinterest, arXiv 2412.01985): feature encoders, the TransAct
//! sequence encoder, an interaction backbone of MaskNet and DCNv2 stages, a shared MLP and
//! multi-task heads; named presets, checkpoints (config + safetensors) and a cost planner.
//!
//! ```
//! use candle_core::{DType, Device};
//! use ranker_model::{presets, Ranker};
//! use rankstack_nn::SeededVarMap;
//!
//! let config = presets::preset("mlp")?;
//! let params = SeededVarMap::new(0);
//! let ranker = Ranker::new(&config, params.var_builder(DType::F32, &Device::Cpu))?;
//! assert_eq!(ranker.task_names(), ["save", "click", "closeup", "hide"]);
//! let cost = ranker.cost(512);
//! assert!(cost.total().params > 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod checkpoint;
mod config;
mod cost;
mod heads;
mod item_table;
mod loss;
mod model;
pub mod presets;
mod random_batch;
mod stage;

pub use config::{ItemEmbeddingConfig, RankerConfig, StageConfig, TaskConfig, SEQUENCE_BLOCK};
pub use cost::{
    CostReport, ModuleCost, TrainingCalibration, CUDA_BF16_TRAINING_ACTIVATIONS, CUDA_TRAINING_ACTIVATIONS,
};
pub use heads::TaskHeads;
pub use item_table::ItemTable;
pub use loss::{calibrated_probability, multitask_loss};
pub use model::{Ranker, RankerBatch, SequenceItems, UserSequence};
pub use random_batch::{batch_from_reference_inputs, random_batch, random_labels, reference_inputs};
pub use stage::Stage;
