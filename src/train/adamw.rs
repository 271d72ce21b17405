//! AdamW with state that can be saved and restored (for resumable training).

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};

/// AdamW hyper-parameters (PyTorch defaults except the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    /// `β₁`.
    pub beta1: f64,
    /// `β₂`.
    pub beta2: f64,
    /// `ε`.
    pub eps: f64,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// AdamW (Loshchilov & Hutter), exactly PyTorch's `torch.optim.AdamW` update for step `t ≥ 1`:
///
/// ```text
/// θ ← θ − lr·λ·θ
/// m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
/// θ ← θ − lr · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)
/// ```
///
/// Parameters without a gradient in a step are left untouched (their moments too). The moments
/// are kept per parameter name so that [`AdamW::state`] / [`AdamW::load_state`] can checkpoint them.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    step: u64,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimizer over named parameters.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> rankstack_nn::Result<Self> {
        let bad = |field: &str, v: f64| rankstack_nn::Error::config("AdamW", field, format!("invalid value {v}"));
        if !(config.lr.is_finite() && config.lr >= 0.0) {
            return Err(bad("lr", config.lr));
        }
        if !(0.0..1.0).contains(&config.beta1) {
            return Err(bad("beta1", config.beta1));
        }
        if !(0.0..1.0).contains(&config.beta2) {
            return Err(bad("beta2", config.beta2));
        }
        if !(config.eps.is_finite() && config.eps > 0.0) {
            return Err(bad("eps", config.eps));
        }
        if !(config.weight_decay.is_finite() && config.weight_decay >= 0.0) {
            return Err(bad("weight_decay", config.weight_decay));
        }
        Ok(Self { params, m: HashMap::new(), v: HashMap::new(), step: 0, config })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// One update with learning rate `lr` (the schedule's value for this step).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (name, var) in &self.params {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.to_dtype(var.dtype())?;
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?,
                None => (&g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The optimizer state as named tensors (`m.<param>`, `v.<param>`, `step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("v.{k}"), t.clone());
        }
        out.insert("step".to_string(), Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?);
        Ok(out)
    }

    /// Restores a state from [`AdamW::state`]; tensors for unknown parameters are an error.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> rankstack_nn::Result<()> {
        let known: std::collections::HashSet<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        self.m.clear();
        self.v.clear();
        for (key, t) in state {
            if key == "step" {
                self.step = t.to_dtype(DType::I64)?.to_vec1::<i64>()?.first().copied().unwrap_or(0) as u64;
                continue;
            }
            let (slot, name) = key.split_once('.').unwrap_or(("", key));
            if !known.contains(name) || !(slot == "m" || slot == "v") {
                return Err(rankstack_nn::Error::Checkpoint(vec![rankstack_nn::error::TensorMismatch::Unexpected {
                    name: key.clone(),
                }]));
            }
            let map = if slot == "m" { &mut self.m } else { &mut self.v };
            map.insert(name.to_string(), t.clone());
        }
        Ok(())
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (PyTorch's `clip_grad_norm_`, with its `1e-6` in the divisor).
pub fn clip_grad_norm(params: &[(String, Var)], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for (_, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for (_, var) in params {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}
