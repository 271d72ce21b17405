//! The assembled ranker.

use candle_core::backprop::GradStore;
use candle_core::{ModuleT, Result, Tensor, Var};
use candle_nn::VarBuilder;
use feature_encoders::{ExtraFeature, FeatureBatch, FeatureEncoder};
use rankstack_nn::host_transfer::{upload, Origin};
use rankstack_nn::probe::mark;
use rankstack_nn::reseed::child_seed;
use rankstack_nn::{Error, Mlp, Reseed, RowGradient};
use sequence_transformer::{SequenceBatch, SequenceTransformer};

use crate::loss::{calibrated_probability, weighted_multitask_loss};
use crate::{ItemTable, RankerConfig, Stage, TaskHeads, SEQUENCE_BLOCK};

/// One batch of ranker inputs.
#[derive(Debug, Clone)]
pub struct RankerBatch {
    /// Raw features in schema order (without the sequence block, which the model computes).
    pub features: FeatureBatch,
    /// The user sequences; required iff the config has a sequence encoder.
    pub sequence: Option<UserSequence>,
}

/// The user-action sequences of a batch, newest action first (see
/// [`sequence_transformer::SequenceBatch`] for the shapes and masking rules).
#[derive(Debug, Clone)]
pub struct UserSequence {
    /// `[B, S]` integer action types, 0 = padding.
    pub action_types: Tensor,
    /// `[B, S]` integer timestamps (ms).
    pub timestamps: Tensor,
    /// `[B]` integer request times (ms).
    pub request_time: Tensor,
    /// The items acted on and the candidate item.
    pub items: SequenceItems,
}

/// How a batch describes the sequence's items and the candidate.
#[derive(Debug, Clone)]
pub enum SequenceItems {
    /// Pretrained vectors: `sequence` `[B, S, E]`, `candidate` `[B, E]`.
    Embeddings { sequence: Tensor, candidate: Tensor },
    /// Item ids, embedded by the model's learned `item_embedding` table (see
    /// [`crate::ItemEmbeddingConfig`]): `sequence` `[B, S]`, `candidate` `[B]`.
    Ids { sequence: Tensor, candidate: Tensor },
}

/// The Homefeed ranker:
///
/// ```text
/// e = FeatureEncoder(features ‖ TransAct(sequence))          [B, D]
/// z = stage_n(… stage_1(e))                                  backbone (MaskNet / DCNv2 stages)
/// h = MLP(z)            or MLP([z ‖ e]) with input_skip
/// logits = [head_t(h)]_t                                     [B, tasks]
/// ```
///
/// Parameter prefixes: `features.`, `sequence.`, `backbone.{i}.`, `mlp.`, `heads.<task>.`. Widths
/// are inferred stage by stage from the encoder's output, so configs name only the layers.
#[derive(Debug)]
pub struct Ranker {
    config: RankerConfig,
    encoder: FeatureEncoder,
    sequence: Option<SequenceTransformer>,
    stages: Vec<Stage>,
    mlp: Mlp,
    heads: TaskHeads,
    item_table: Option<ItemTable>,
    /// `[tasks]` f64, the config's task weights on the device (copied there once, not per step).
    task_weights: Tensor,
    device: candle_core::Device,
}

impl Ranker {
    /// Builds the ranker, validating the config. Errors name the offending config field.
    pub fn new(config: &RankerConfig, vb: VarBuilder) -> rankstack_nn::Result<Self> {
        config.validate()?;
        let sequence = match &config.sequence {
            Some(cfg) => {
                Some(SequenceTransformer::new(cfg, vb.pp("sequence")).map_err(|e| e.nested_in("Ranker", "sequence"))?)
            }
            None => None,
        };
        let item_table = match (&config.item_embedding, &config.sequence) {
            (Some(items), Some(seq)) => Some(ItemTable::new(items, seq.item_dim, vb.pp("item_embedding"))?),
            (Some(_), None) => {
                return Err(Error::config("Ranker", "item_embedding", "needs a `sequence` encoder to feed"));
            }
            (None, _) => None,
        };
        let mut schema = config.features.clone();
        if let Some(seq) = &sequence {
            schema.extra.push(ExtraFeature { name: SEQUENCE_BLOCK.to_string(), dim: seq.output_dim() });
        }
        let encoder = FeatureEncoder::new(&schema, vb.pp("features")).map_err(|e| e.nested_in("Ranker", "features"))?;
        let encoded = encoder.output_dim();
        if encoded == 0 {
            return Err(Error::config("Ranker", "features", "the features produce no columns"));
        }
        let mut width = encoded;
        let mut stages = Vec::with_capacity(config.backbone.len());
        for (i, stage) in config.backbone.iter().enumerate() {
            let built = Stage::new(i, width, stage, vb.pp("backbone").pp(i))?;
            width = built.output_dim();
            stages.push(built);
        }
        let mlp_input = if config.input_skip { width + encoded } else { width };
        let mlp = Mlp::new(mlp_input, &config.mlp, vb.pp("mlp")).map_err(|e| e.nested_in("Ranker", "mlp"))?;
        let heads = TaskHeads::new(mlp.output_dim(), &config.tasks, vb.pp("heads"))?;
        let device = vb.device().clone();
        let weights: Vec<f64> = config.tasks.iter().map(|t| t.weight).collect();
        let task_weights = upload(weights, config.tasks.len(), &device, "task weights", Origin::Constant)?;
        Ok(Self { config: config.clone(), encoder, sequence, stages, mlp, heads, item_table, task_weights, device })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &RankerConfig {
        &self.config
    }

    /// The device the parameters live on (inputs may be on the host: integer ids and labels are
    /// read there and only what the model derives from them is copied to this device).
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// Task names, in the order of the logit columns.
    pub fn task_names(&self) -> &[String] {
        self.heads.names()
    }

    /// The feature encoder.
    pub fn encoder(&self) -> &FeatureEncoder {
        &self.encoder
    }

    /// The sequence encoder, if configured.
    pub fn sequence_encoder(&self) -> Option<&SequenceTransformer> {
        self.sequence.as_ref()
    }

    /// The backbone stages.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The shared MLP.
    pub fn mlp(&self) -> &Mlp {
        &self.mlp
    }

    /// Non-trainable state (BatchNorm running statistics, fitted standardisation) by full name. Save
    /// it with the parameters; [`crate::checkpoint`] does.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self.encoder.buffers();
        out.extend(self.mlp.buffers());
        out.extend(self.heads.buffers());
        out
    }

    /// Row-sparse gradients for every embedding table (the feature tables and the item table):
    /// training passes then leave the tables out of the graph, and
    /// [`Ranker::take_row_gradients`] returns the gradients of the rows they touched, for a
    /// row-sparse optimizer update (see [`rankstack_nn::row_sparse`]). Off by default, so that the
    /// tables get ordinary dense gradients.
    pub fn set_row_sparse_gradients(&self, on: bool) {
        self.encoder.set_row_sparse_gradients(on);
        if let Some(t) = &self.item_table {
            t.set_row_sparse_gradients(on);
        }
    }

    /// The row gradients of every table touched by training passes since the last call.
    pub fn take_row_gradients(&self, grads: &GradStore) -> Result<Vec<RowGradient>> {
        let mut out = self.encoder.take_row_gradients(grads)?;
        if let Some(t) = &self.item_table {
            out.extend(t.take_row_gradients(grads)?);
        }
        Ok(out)
    }

    /// The encoder output `[batch, D]` (the sequence block included).
    pub fn encode(&self, batch: &RankerBatch, train: bool) -> Result<Tensor> {
        let mut features = batch.features.clone();
        match (&self.sequence, &batch.sequence) {
            (Some(seq), Some(s)) => features.extra.push(seq.forward_t(&self.sequence_batch(s, train)?, train)?),
            (Some(_), None) => {
                return Err(Error::input(
                    "Ranker",
                    "sequence",
                    "the model has a sequence encoder but the batch has no sequences",
                )
                .into())
            }
            (None, Some(_)) => {
                return Err(Error::input(
                    "Ranker",
                    "sequence",
                    "the batch has sequences but the model has no sequence encoder",
                )
                .into())
            }
            (None, None) => {}
        }
        let encoded = self.encoder.forward_t(&features, train)?;
        mark("features", &encoded)?;
        Ok(encoded)
    }

    fn sequence_batch(&self, s: &UserSequence, train: bool) -> Result<SequenceBatch> {
        let (item_embeddings, candidate) = match (&s.items, &self.item_table) {
            (SequenceItems::Embeddings { sequence, candidate }, None) => (sequence.clone(), candidate.clone()),
            (SequenceItems::Ids { sequence, candidate }, Some(table)) => {
                (table.lookup(sequence, train)?, table.lookup(candidate, train)?)
            }
            (SequenceItems::Ids { .. }, None) => {
                return Err(Error::input(
                    "Ranker",
                    "sequence.items",
                    "item ids given, but the model has no `item_embedding` table",
                )
                .into())
            }
            (SequenceItems::Embeddings { .. }, Some(_)) => {
                return Err(Error::input(
                    "Ranker",
                    "sequence.items",
                    "item embeddings given, but the model embeds item ids",
                )
                .into())
            }
        };
        Ok(SequenceBatch {
            action_types: s.action_types.clone(),
            item_embeddings,
            timestamps: s.timestamps.clone(),
            request_time: s.request_time.clone(),
            candidate,
        })
    }

    /// Logits `[batch, tasks]`; `train` enables dropout, BatchNorm batch statistics and the
    /// sequence encoder's random time window. Its parts mark their ends for
    /// [`rankstack_nn::probe::record_parts`]: `transact.*` and `transformer.*` (the sequence
    /// encoder), `features` (the feature encoder), each backbone stage by its type
    /// ([`crate::StageConfig::type_name`]), `mlp`, `heads`. On the CPU it runs on the kernels' worker pool
    /// ([`rankstack_nn::on_worker_pool_for_rows`]): its hundreds of kernel calls then start without a
    /// cross-thread wake-up each, and a batch of a few rows takes no more workers than other
    /// processes leave CPUs free. (A GPU's kernels gain nothing from it, so there it runs here.)
    pub fn forward_t(&self, batch: &RankerBatch, train: bool) -> Result<Tensor> {
        // A batch without features is an error that the encoder reports; its size does not matter.
        let rows = batch.features.rows().unwrap_or(usize::MAX);
        rankstack_nn::on_worker_pool_for_rows(self.device(), rows, || self.forward_on_this_thread(batch, train))
    }

    fn forward_on_this_thread(&self, batch: &RankerBatch, train: bool) -> Result<Tensor> {
        let encoded = self.encode(batch, train)?;
        let mut z = encoded.clone();
        for (stage, config) in self.stages.iter().zip(&self.config.backbone) {
            z = stage.forward_t(&z, train)?;
            mark(config.type_name(), &z)?;
        }
        if self.config.input_skip {
            z = Tensor::cat(&[&z, &encoded], 1)?;
        }
        let h = self.mlp.forward_t(&z, train)?;
        mark("mlp", &h)?;
        let logits = self.heads.forward_t(&h, train)?;
        mark("heads", &logits)?;
        Ok(logits)
    }

    /// Evaluation-mode logits.
    pub fn forward(&self, batch: &RankerBatch) -> Result<Tensor> {
        self.forward_t(batch, false)
    }

    /// Evaluation-mode probabilities `[batch, tasks]`, calibrated per task for negative
    /// down-sampling where the task config sets a rate.
    pub fn predict(&self, batch: &RankerBatch) -> Result<Tensor> {
        self.probabilities(&self.forward(batch)?)
    }

    /// Calibrated probabilities from logits.
    pub fn probabilities(&self, logits: &Tensor) -> Result<Tensor> {
        let columns = self
            .config
            .tasks
            .iter()
            .enumerate()
            .map(|(t, task)| {
                let logit = logits.narrow(1, t, 1)?;
                calibrated_probability(&logit, task.negative_sampling_rate.unwrap_or(1.0))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&columns, 1)
    }

    /// The weighted multi-task loss of [`crate::multitask_loss`] with this config's task weights.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor, example_weights: Option<&Tensor>) -> Result<Tensor> {
        weighted_multitask_loss(logits, labels, &self.task_weights, example_weights)
    }
}

impl Reseed for Ranker {
    /// Reseeds the sequence encoder, every backbone stage, the MLP and the task towers.
    fn reseed(&self, seed: u64) {
        if let Some(seq) = &self.sequence {
            seq.reseed(child_seed(seed, "sequence"));
        }
        for (i, stage) in self.stages.iter().enumerate() {
            stage.reseed(child_seed(seed, &format!("backbone.{i}")));
        }
        self.mlp.reseed(child_seed(seed, "mlp"));
        self.heads.reseed(child_seed(seed, "heads"));
    }
}

impl rankstack_nn::LinearLayers for Ranker {
    /// The linear layers of the feature encoder, the sequence transformer, the backbone stages,
    /// the MLP and the heads (for packing a serving model, see
    /// [`crate::checkpoint::load_packed_for_serving`]).
    fn linear_layers_mut(&mut self) -> Vec<&mut rankstack_nn::Linear> {
        let mut layers = self.encoder.linear_layers_mut();
        layers.extend(self.sequence.linear_layers_mut());
        layers.extend(self.stages.linear_layers_mut());
        layers.extend(self.mlp.linear_layers_mut());
        layers.extend(self.heads.linear_layers_mut());
        layers
    }
}
