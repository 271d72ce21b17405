//! Per-task heads.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use rankstack_nn::{linear_xavier, Linear, Mlp, Reseed};

use crate::TaskConfig;

/// One logit per task: `logit_t = w_tᵀ tower_t(h) + b_t` (the tower is optional), stacked into
/// `[batch, tasks]`. Parameters: `heads.<task>.tower.…` and `heads.<task>.logit.{weight [1, in], bias [1]}`.
#[derive(Debug)]
pub struct TaskHeads {
    heads: Vec<(Option<Mlp>, Linear)>,
    names: Vec<String>,
}

impl TaskHeads {
    /// Heads for `tasks`, each reading `input_dim` features.
    pub fn new(input_dim: usize, tasks: &[TaskConfig], vb: VarBuilder) -> rankstack_nn::Result<Self> {
        let mut heads = Vec::with_capacity(tasks.len());
        for (i, task) in tasks.iter().enumerate() {
            let vb = vb.pp(&task.name);
            let tower = match &task.tower {
                Some(cfg) => Some(
                    Mlp::new(input_dim, cfg, vb.pp("tower"))
                        .map_err(|e| e.nested_in("Ranker", &format!("tasks[{i}].tower")))?,
                ),
                None => None,
            };
            let width = tower.as_ref().map_or(input_dim, Mlp::output_dim);
            heads.push((tower, linear_xavier(width, 1, true, vb.pp("logit"))?));
        }
        Ok(Self { heads, names: tasks.iter().map(|t| t.name.clone()).collect() })
    }

    /// Task names in output order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Non-trainable state of the towers (BatchNorm running statistics).
    pub fn buffers(&self) -> Vec<(String, candle_core::Var)> {
        self.heads.iter().filter_map(|(t, _)| t.as_ref()).flat_map(Mlp::buffers).collect()
    }
}

impl ModuleT for TaskHeads {
    fn forward_t(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let logits = self
            .heads
            .iter()
            .map(|(tower, logit)| match tower {
                Some(t) => logit.forward(&t.forward_t(h, train)?),
                None => logit.forward(h),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&logits, 1)
    }
}

impl Reseed for TaskHeads {
    fn reseed(&self, seed: u64) {
        for ((tower, _), name) in self.heads.iter().zip(&self.names) {
            if let Some(t) = tower {
                t.reseed(rankstack_nn::reseed::child_seed(seed, name));
            }
        }
    }
}

impl rankstack_nn::LinearLayers for TaskHeads {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        let mut layers = Vec::new();
        for (tower, logit) in &mut self.heads {
            layers.extend(tower.linear_layers_mut());
            layers.push(logit);
        }
        layers
    }
}
