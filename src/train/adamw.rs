//! AdamW with state that can be saved and restored (for resumable training).

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, TensorId, Var};
use rankstack_kernels::cpu::adamw::{adamw_update_in_place, bias_corrections, AdamWCoefficients};
use rankstack_kernels::cpu::kernels_run_on;
use rankstack_kernels::cpu::sum_of_squares::sum_of_squares;
use rankstack_kernels::device_adamw::AdamWMoments;
use rankstack_kernels::device_sum_of_squares::sum_of_squares_on_device;
use rankstack_kernels::index_stage::IndexStage;
use rankstack_kernels::overwrite_rows::{check_distinct_rows, OverwriteRows};
use rankstack_nn::host_transfer::{move_to_device, read_computed, read_input, upload, Origin};
use rankstack_nn::RowGradient;

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

/// AdamW (Loshchilov & Hutter), PyTorch's `torch.optim.AdamW` update for step `t ≥ 1`:
///
/// ```text
/// θ ← θ − lr·λ·θ
/// m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
/// θ ← θ − lr · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)
/// ```
///
/// Parameters without a gradient in a step are left untouched (their moments too). The moments
/// are kept per parameter name so that [`AdamW::state`] / [`AdamW::load_state`] can checkpoint them.
///
/// **Row-sparse updates** ([`RowGradient`], from tables in row-sparse mode): only the rows in the
/// gradient are updated — weight decay, moments and step — with the formula above and the global
/// step `t`. Rows a step does not touch keep their weights and moments ("lazy" AdamW, as
/// torchrec's fused row-wise optimizers). For the touched rows one step gives exactly the dense
/// update of a zero-elsewhere gradient; untouched rows differ from a dense update, which would
/// decay them and move them by their old momentum.
///
/// With `f32` parameters the update is fused, in place, with the tensor version's arithmetic
/// operation for operation (so the same bits): on the CPU one pass over parameter, gradient and
/// host moments; off the CPU kernels (a GPU, or the CPU under `RANKSTACK_CPU=candle`) two
/// launches per parameter ([`AdamWMoments`]: the moments, then the parameter), where the tensor
/// version is sixteen launches and allocates about fifteen temporaries per parameter per step.
/// Other dtypes use the tensor version.
///
/// `RANKSTACK_ADAMW=tensors` in the environment selects the tensor version for every parameter
/// (`fused`, the default, the fused updates): to measure one against the other on a device
/// (`.gpu/bench.sh` does), or to set a fused kernel aside. Another value is an error at
/// construction.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// Each parameter's position in `params` by tensor id, to find a row gradient's table.
    index_of: HashMap<TensorId, usize>,
    moments: HashMap<String, Moments>,
    step: u64,
    config: AdamWConfig,
    /// Use the fused kernel where it applies (off only in tests, to compare with the tensor path).
    fused: bool,
}

/// First and second moments of one parameter.
#[derive(Debug)]
enum Moments {
    /// CPU `f32` parameters: flat buffers updated in place by the fused kernel.
    Host { m: Vec<f32>, v: Vec<f32>, dims: Vec<usize> },
    /// `f32` parameters off the CPU kernels: both moments in one tensor on the parameter's
    /// device, updated in place by two fused passes.
    Device(AdamWMoments),
    /// Anything else: tensors on the parameter's device.
    Tensors { m: Tensor, v: Tensor },
}

/// Which [`Moments`] a parameter's update keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum MomentsKind {
    Host,
    Device,
    Tensors,
}

/// The per-step constants of the update: the bias corrections `1 − βᵗ` and the unrounded learning
/// rate (for the tensor version), and the fused kernel's `f32` constants.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    bc1: f64,
    bc2: f64,
    /// The step's learning rate, unrounded (the tensor version scales by it in f64).
    step_lr: f64,
    /// The factor the step's gradients are multiplied by first (1: none).
    grad_scale: f64,
    fused: AdamWCoefficients,
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
        let fused = fused_updates(std::env::var(ADAMW_ENV).ok().as_deref())?;
        let index_of = params.iter().enumerate().map(|(i, (_, v))| (v.as_tensor().id(), i)).collect();
        Ok(Self { params, index_of, moments: HashMap::new(), step: 0, config, fused })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// One update with learning rate `lr` (the schedule's value for this step), from the dense
    /// gradients in `grads` and the row gradients `rows` (of tables in row-sparse mode; their
    /// tables must be parameters of this optimizer).
    pub fn step(&mut self, grads: &GradStore, rows: &[RowGradient], lr: f64) -> Result<()> {
        self.step_with_gradient_scale(grads, rows, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `scale` first (gradient clipping's factor,
    /// [`clip_scale`]): the same bits as [`clip_to_norm`] followed by [`AdamW::step`], but the
    /// fused updates scale each gradient element as they read it instead of writing every
    /// gradient again (on a GPU one launch and one full-size tensor per gradient less).
    pub fn step_with_gradient_scale(
        &mut self,
        grads: &GradStore,
        rows: &[RowGradient],
        lr: f64,
        scale: f64,
    ) -> Result<()> {
        // Every row gradient is checked before anything is updated: a bad one changes nothing.
        // The rows that a device update writes back are staged as they are checked, and go to
        // the device in one upload for all tables.
        let mut stage = IndexStage::default();
        let mut staged = Vec::with_capacity(rows.len());
        let mut stage_device: Option<Device> = None;
        for r in rows {
            let Some(&i) = self.index_of.get(&r.table.id()) else {
                candle_core::bail!("AdamW: a row gradient's table is not one of the optimizer's parameters");
            };
            let (name, var) = &self.params[i];
            let named = |e: candle_core::Error| e.context(format!("parameter {name}"));
            // The stage's device: that of the first table updated on a device (tables elsewhere
            // upload their own rows).
            let on_the_stage = self.moments_kind(var) != MomentsKind::Host
                && stage_device.get_or_insert_with(|| var.device().clone()).same_device(var.device());
            if on_the_stage {
                staged.push(Some(OverwriteRows::stage(&r.rows, r.table.dim(0)?, &mut stage, "AdamW").map_err(named)?));
            } else {
                check_distinct_rows(&r.rows, r.table.dim(0)?, "AdamW").map_err(named)?;
                staged.push(None);
            }
        }
        let written = match (&stage_device, staged.iter().any(Option::is_some)) {
            (Some(device), true) => Some(stage.upload(device, "overwritten rows")?),
            _ => None,
        };
        let mut indexes = Vec::with_capacity(rows.len());
        for s in &staged {
            indexes.push(match (s, &written) {
                (Some(s), Some(written)) => Some(s.finish(written)?),
                _ => None,
            });
        }
        self.step += 1;
        let k = self.coefficients(lr, scale);
        for i in 0..self.params.len() {
            let (name, var) = self.params[i].clone();
            if let Some(g) = grads.get(var.as_tensor()) {
                self.update(&name, &var, g, None, &k)?;
            }
            for (r, index) in rows.iter().zip(&indexes).filter(|(r, _)| r.table.id() == var.as_tensor().id()) {
                self.update(&name, &var, &r.grad, Some((&r.rows, index.as_ref())), &k)?;
            }
        }
        Ok(())
    }

    /// The constants of the current step (`self.step` is already the new step `t`), its gradients
    /// multiplied by `scale`.
    fn coefficients(&self, lr: f64, scale: f64) -> Coefficients {
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = bias_corrections(c.beta1, c.beta2, t);
        Coefficients {
            bc1,
            bc2,
            step_lr: lr,
            grad_scale: scale,
            fused: AdamWCoefficients::new(c.beta1, c.beta2, c.eps, c.weight_decay, lr, t).with_gradient_scale(scale),
        }
    }

    /// How `var`'s moments are kept and updated: fused for `f32` (on the host with the CPU
    /// kernels, else on the parameter's device), the tensor version otherwise.
    fn moments_kind(&self, var: &Var) -> MomentsKind {
        match (self.fused && var.dtype() == DType::F32, kernels_run_on(var.device())) {
            (false, _) => MomentsKind::Tensors,
            (true, true) => MomentsKind::Host,
            (true, false) => MomentsKind::Device,
        }
    }

    /// Updates `var` (all of it, or the rows `rows` of `g`, with their index on the device where
    /// [`AdamW::step_with_gradient_scale`] uploaded it) with the step's constants `k`.
    fn update(
        &mut self,
        name: &str,
        var: &Var,
        g: &Tensor,
        rows: Option<(&[u32], Option<&OverwriteRows>)>,
        k: &Coefficients,
    ) -> Result<()> {
        let g = g.to_dtype(var.dtype())?;
        if !self.moments.contains_key(name) {
            let moments = match self.moments_kind(var) {
                MomentsKind::Host => {
                    let n = var.elem_count();
                    Moments::Host { m: vec![0.0; n], v: vec![0.0; n], dims: var.dims().to_vec() }
                }
                MomentsKind::Device => Moments::Device(AdamWMoments::zeros(var.as_tensor())?),
                MomentsKind::Tensors => Moments::Tensors { m: var.zeros_like()?, v: var.zeros_like()? },
            };
            self.moments.insert(name.to_string(), moments);
        }
        let c = self.config;
        let (bc1, bc2, lr) = (k.bc1, k.bc2, k.step_lr);
        // A bad row (out of range, repeated) is an error naming the parameter; nothing is updated.
        let named = |e: candle_core::Error| e.context(format!("parameter {name}"));
        // The rows' ids on the parameter's device, for the device and tensor updates.
        let overwrite = |(rows, index): (&[u32], Option<&OverwriteRows>)| match index {
            Some(index) => Ok(index.clone()),
            None => OverwriteRows::new(rows, var.dim(0)?, var.device(), "AdamW").map_err(named),
        };
        match self.moments.get_mut(name).expect("inserted above") {
            Moments::Host { m, v, .. } => {
                let dim = if var.rank() >= 2 { var.elem_count() / var.dim(0)? } else { 1 };
                adamw_update_in_place(var.as_tensor(), &g, m, v, rows.map(|(r, _)| (r, dim)), k.fused).map_err(named)
            }
            Moments::Device(moments) => {
                let rows = rows.map(overwrite).transpose()?;
                moments.step(var.as_tensor(), &g, rows.as_ref(), k.fused).map_err(named)
            }
            Moments::Tensors { m, v } => {
                // Clipping's factor, as `clip_to_norm` applies it (`g · scale`, no op at 1).
                let g = if k.grad_scale == 1.0 { g } else { (g * k.grad_scale)? };
                // A row-sparse update gathers the rows, updates them and writes them back in
                // place: work and host→device traffic in the rows touched, not the table.
                let rows = rows.map(overwrite).transpose()?;
                let (theta, mm, vv) = match &rows {
                    None => (var.as_tensor().clone(), m.clone(), v.clone()),
                    Some(rows) => {
                        let at = |t: &Tensor| t.index_select(rows.index(), 0);
                        (at(var.as_tensor())?, at(m)?, at(v)?)
                    }
                };
                let new_m = ((mm * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                let new_v = ((vv * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let update = ((&new_m / bc1)? / ((&new_v / bc2)?.sqrt()? + c.eps)?)?;
                let new_theta = ((theta * (1.0 - lr * c.weight_decay))? - (update * lr)?)?;
                match rows {
                    None => {
                        var.set(&new_theta)?;
                        *m = new_m;
                        *v = new_v;
                    }
                    Some(rows) => {
                        rows.apply(var.as_tensor(), &new_theta).map_err(named)?;
                        rows.apply(m, &new_m).map_err(named)?;
                        rows.apply(v, &new_v).map_err(named)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The optimizer state as named tensors (`m.<param>`, `v.<param>`, `step`). Moments kept as
    /// device tensors are returned without a copy (a copy of every moment would double their
    /// memory at each checkpoint): they share storage with the optimizer's, which the fused
    /// update and a row-sparse step change in place, so read or write them before the next step
    /// (the trainer writes them at once).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (k, moments) in &self.moments {
            let (m, v) = match moments {
                Moments::Host { m, v, dims } => (
                    Tensor::from_slice(m, dims.as_slice(), &candle_core::Device::Cpu)?,
                    Tensor::from_slice(v, dims.as_slice(), &candle_core::Device::Cpu)?,
                ),
                Moments::Device(moments) => (moments.m()?, moments.v()?),
                Moments::Tensors { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("m.{k}"), m);
            out.insert(format!("v.{k}"), v);
        }
        out.insert("step".to_string(), Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?);
        Ok(out)
    }

    /// The first optimizer moment (`m.<param>` or `v.<param>`, in parameter order) holding a
    /// non-finite value, if any: checked before the state is saved (host moments on the host,
    /// tensor moments on their device, all of them in one check: one read back).
    pub fn first_non_finite_state(&self) -> rankstack_nn::Result<Option<String>> {
        use rankstack_nn::finite::{first_non_finite, first_non_finite_host};
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, _) in &self.params {
            let (m, v) = match self.moments.get(name) {
                Some(Moments::Tensors { m, v }) => (m.clone(), v.clone()),
                Some(Moments::Device(moments)) => (moments.m()?, moments.v()?),
                _ => continue,
            };
            tensors.extend([(format!("m.{name}"), m), (format!("v.{name}"), v)]);
        }
        let on_device = first_non_finite(tensors.iter().map(|(n, t)| (n.as_str(), t)))?;
        for (name, _) in &self.params {
            let found = match self.moments.get(name) {
                None => None,
                Some(Moments::Host { m, v, .. }) => first_non_finite_host([("m", m.as_slice()), ("v", v.as_slice())])
                    .map(|slot| format!("{slot}.{name}")),
                Some(Moments::Tensors { .. } | Moments::Device(_)) => {
                    on_device.clone().filter(|n| n.split_once('.').is_some_and(|(_, param)| param == name))
                }
            };
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Restores a state from [`AdamW::state`]; tensors for unknown parameters, a moment without
    /// its partner, or a shape that differs from the parameter's are errors.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> rankstack_nn::Result<()> {
        let unexpected = |key: &str| {
            rankstack_nn::Error::Checkpoint(vec![rankstack_nn::error::TensorMismatch::Unexpected {
                name: key.to_string(),
            }])
        };
        let mut moments = HashMap::new();
        let mut step = 0;
        for (key, t) in state {
            if key == "step" {
                step =
                    read_input::<i64>(&t.to_dtype(DType::I64)?, "optimizer step")?.first().copied().unwrap_or(0) as u64;
                continue;
            }
            let (slot, name) = key.split_once('.').unwrap_or(("", key));
            let Some((_, var)) = self.params.iter().find(|(n, _)| n == name) else { return Err(unexpected(key)) };
            if !(slot == "m" || slot == "v") {
                return Err(unexpected(key));
            }
            if t.dims() != var.dims() {
                return Err(rankstack_nn::Error::Checkpoint(vec![rankstack_nn::error::TensorMismatch::Shape {
                    name: key.clone(),
                    expected: var.dims().to_vec(),
                    actual: t.dims().to_vec(),
                }]));
            }
            if slot == "m" {
                let Some(v) = state.get(&format!("v.{name}")) else { return Err(unexpected(key)) };
                let to = |t: &Tensor| {
                    move_to_device(&t.to_dtype(var.dtype())?, var.device(), "optimizer moments", Origin::State)
                };
                // Own copies: steps update them in place, and the caller's state must not change
                // with them.
                let entry = match self.moments_kind(var) {
                    MomentsKind::Host => {
                        let flat = |t: &Tensor| read_input::<f32>(&t.to_dtype(DType::F32)?, "optimizer moments");
                        Moments::Host { m: flat(t)?, v: flat(v)?, dims: var.dims().to_vec() }
                    }
                    MomentsKind::Device => Moments::Device(AdamWMoments::from_moments(&to(t)?, &to(v)?)?),
                    MomentsKind::Tensors => Moments::Tensors { m: to(t)?.copy()?, v: to(v)?.copy()? },
                };
                moments.insert(name.to_string(), entry);
            } else if !state.contains_key(&format!("m.{name}")) {
                return Err(unexpected(key));
            }
        }
        self.moments = moments;
        self.step = step;
        Ok(())
    }
}

/// The environment variable that chooses AdamW's update: `fused` (the default) or `tensors`.
pub const ADAMW_ENV: &str = "RANKSTACK_ADAMW";

/// Whether `RANKSTACK_ADAMW`'s `value` asks for the fused updates (unset or `fused`) or the tensor
/// version (`tensors`); anything else is a configuration error naming the variable.
fn fused_updates(value: Option<&str>) -> rankstack_nn::Result<bool> {
    match value {
        None | Some("fused") => Ok(true),
        Some("tensors") => Ok(false),
        Some(other) => Err(rankstack_nn::Error::config(
            "AdamW",
            ADAMW_ENV,
            format!("`{other}`: expected `fused` (the default) or `tensors`"),
        )),
    }
}

/// The global L2 norm of all gradients of `params`: the dense ones in `grads` and the row
/// gradients `rows` (a row gradient counts as the dense gradient that is zero outside its rows).
/// Summed in f64 ([`squared_grad_norm`], read back).
pub fn grad_norm(params: &[(String, Var)], grads: &GradStore, rows: &[RowGradient]) -> Result<f64> {
    Ok(match squared_grad_norm(params, grads, rows)? {
        None => 0.0,
        Some(t) => read_computed::<f64>(&t, "squared gradient norm")?[0].sqrt(),
    })
}

/// The square of [`grad_norm`] as an f64 scalar tensor on the gradients' device (`None` without
/// gradients), for a caller that reads it back together with other values (the trainer reads it
/// with the loss: one wait for a GPU per step).
///
/// On the CPU each gradient's sum of squares is one pass of
/// [`rankstack_kernels::cpu::sum_of_squares`], added in parameter order on the host. Off the CPU
/// kernels (a GPU) it is [`sum_of_squares_on_device`]: one launch per gradient into block partial
/// sums and one sum of those, on the device (the tensor formulation wrote two f64 copies of every
/// gradient in four launches each).
pub fn squared_grad_norm(params: &[(String, Var)], grads: &GradStore, rows: &[RowGradient]) -> Result<Option<Tensor>> {
    let gradients: Vec<&Tensor> = params
        .iter()
        .flat_map(|(_, var)| {
            let id = var.as_tensor().id();
            grads
                .get(var.as_tensor())
                .into_iter()
                .chain(rows.iter().filter(move |r| r.table.id() == id).map(|r| &r.grad))
        })
        .collect();
    if gradients.is_empty() {
        return Ok(None);
    }
    let mut host = Vec::with_capacity(gradients.len());
    for g in &gradients {
        match sum_of_squares(g)? {
            Some(s) => host.push(s),
            None => break,
        }
    }
    if host.len() == gradients.len() {
        let total = host.into_iter().fold(0.0, |total, s| total + s);
        // The CPU kernels summed on the host: `gradients` are CPU tensors.
        return Ok(Some(upload(vec![total], (), gradients[0].device(), "squared gradient norm", Origin::Computed)?));
    }
    // The sum stays on the gradients' device: one value, read back with the loss.
    sum_of_squares_on_device(&gradients)
}

/// Scales all gradients — dense ones in `grads` and the row gradients `rows` — so that their
/// global L2 norm ([`grad_norm`]) is at most `max_norm`; returns the norm before clipping
/// (PyTorch's `clip_grad_norm_`, with its `1e-6` in the divisor).
pub fn clip_grad_norm(
    params: &[(String, Var)],
    grads: &mut GradStore,
    rows: &mut [RowGradient],
    max_norm: f64,
) -> Result<f64> {
    let norm = grad_norm(params, grads, rows)?;
    clip_to_norm(params, grads, rows, norm, max_norm)?;
    Ok(norm)
}

/// The factor [`clip_to_norm`] multiplies every gradient by when their global norm is `norm`:
/// `max_norm / (norm + 1e-6)` when `norm > max_norm`, else `None` (nothing to clip).
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// The scaling of [`clip_grad_norm`] for gradients whose global norm `norm` is known already:
/// when `norm > max_norm`, multiplies every gradient by `max_norm / (norm + 1e-6)`
/// ([`clip_scale`]; the trainer hands that factor to [`AdamW::step_with_gradient_scale`] instead).
pub fn clip_to_norm(
    params: &[(String, Var)],
    grads: &mut GradStore,
    rows: &mut [RowGradient],
    norm: f64,
    max_norm: f64,
) -> Result<()> {
    if let Some(scale) = clip_scale(norm, max_norm) {
        for (_, var) in params {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
        for r in rows.iter_mut() {
            r.grad = (&r.grad * scale)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32], dims: (usize, usize)) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, dims, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rankstack_nn::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Gradients of `0.5·Σ (w ⊙ c)²` for a fixed `c`: a deterministic function of the weights.
    fn grads_of(w: &Var) -> GradStore {
        let c = Tensor::from_slice(&values(w.elem_count(), 99), w.dims(), &Device::Cpu).unwrap();
        (w.as_tensor() * &c).unwrap().sqr().unwrap().sum_all().unwrap().affine(0.5, 0.0).unwrap().backward().unwrap()
    }

    fn bits(v: &Var) -> Vec<u32> {
        v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    /// The three ways an `f32` parameter's moments are kept: on the host (the CPU kernels), on
    /// the device in one tensor (the GPU's graph: the CPU kernels off), the tensor version.
    const MODES: [&str; 3] = ["host", "device", "tensors"];

    /// An optimizer over `params` that updates in `mode` (one of [`MODES`]).
    fn optimizer_in(mode: &str, params: Vec<(String, Var)>, config: AdamWConfig) -> AdamW {
        let mut opt = AdamW::new(params, config).unwrap();
        opt.fused = mode != "tensors";
        opt
    }

    /// Runs `f` with the CPU kernels of `mode` (off for "device").
    fn in_mode<R>(mode: &str, f: impl FnOnce() -> R) -> R {
        use rankstack_kernels::cpu::{with_isa, Isa};
        if mode == "device" {
            with_isa(Isa::Candle, f)
        } else {
            f()
        }
    }

    #[test]
    fn fused_updates_give_the_tensor_version_bit_for_bit() {
        let init = values(4 * 70_000, 1); // several parallel chunks
        let config = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..AdamWConfig::default() };
        let mut runs: Vec<(Var, AdamW)> = MODES
            .iter()
            .map(|mode| {
                let w = var(&init, (4, 70_000));
                (w.clone(), optimizer_in(mode, vec![("w".into(), w)], config))
            })
            .collect();
        for step in 0..3 {
            let mut after = Vec::new();
            for (mode, (w, opt)) in MODES.iter().zip(&mut runs) {
                let grads = grads_of(w);
                in_mode(mode, || opt.step(&grads, &[], 1e-2 / (step + 1) as f64).unwrap());
                after.push(bits(w));
            }
            assert_eq!(after[0], after[2], "step {step}: host");
            assert_eq!(after[1], after[2], "step {step}: device");
        }
        let states: Vec<_> = runs.iter().map(|(_, opt)| opt.state().unwrap()).collect();
        assert!(matches!(runs[1].1.moments["w"], Moments::Device(_)));
        for k in ["m.w", "v.w"] {
            for (mode, state) in MODES.iter().zip(&states) {
                assert_eq!(state[k].to_vec2::<f32>().unwrap(), states[2][k].to_vec2::<f32>().unwrap(), "{mode} {k}");
            }
        }
    }

    /// Clipping's factor handed to the update gives the bits of clipping the gradients first and
    /// stepping: dense and row gradients, on every path.
    #[test]
    fn a_scaled_step_is_clipping_then_stepping_bit_for_bit() {
        let init = values(6 * 70_000, 4); // several parallel chunks
        let table_init = values(9 * 3, 5);
        let config = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..AdamWConfig::default() };
        for mode in MODES {
            let run = |fold: bool| {
                let (w, table) = (var(&init, (6, 70_000)), var(&table_init, (9, 3)));
                let params = vec![("w".to_string(), w.clone()), ("t".to_string(), table.clone())];
                let mut opt = optimizer_in(mode, params.clone(), config);
                for step in 0..3 {
                    let mut grads = grads_of(&w);
                    let grad = Tensor::from_slice(&values(2 * 3, 10 + step), (2, 3), &Device::Cpu).unwrap();
                    let mut rows = vec![RowGradient { table: table.as_tensor().clone(), rows: vec![2, 7], grad }];
                    let norm = grad_norm(&params, &grads, &rows).unwrap();
                    let max = norm * 0.3; // clips every step
                    in_mode(mode, || {
                        if fold {
                            let scale = clip_scale(norm, max).unwrap();
                            opt.step_with_gradient_scale(&grads, &rows, 1e-2, scale).unwrap();
                        } else {
                            clip_to_norm(&params, &mut grads, &mut rows, norm, max).unwrap();
                            opt.step(&grads, &rows, 1e-2).unwrap();
                        }
                    });
                }
                (bits(&w), bits(&table))
            };
            assert_eq!(run(true), run(false), "{mode}");
        }
        assert_eq!(clip_scale(0.5, 1.0), None);
        assert_eq!(clip_scale(3.0, 1.0), Some(1.0 / (3.0 + 1e-6)));
    }

    #[test]
    fn the_environment_chooses_the_fused_updates_or_the_tensor_version() {
        assert!(fused_updates(None).unwrap());
        assert!(fused_updates(Some("fused")).unwrap());
        assert!(!fused_updates(Some("tensors")).unwrap());
        let err = fused_updates(Some("Tensors")).unwrap_err().to_string();
        assert!(err.contains("RANKSTACK_ADAMW") && err.contains("`Tensors`"), "{err}");
    }

    #[test]
    fn matches_the_adamw_formula_in_f64() {
        let init = [0.5f32, -1.5, 2.0, 0.0, 3.0, -0.25];
        let w = var(&init, (2, 3));
        let config = AdamWConfig { lr: 0.1, beta1: 0.8, beta2: 0.9, eps: 1e-6, weight_decay: 0.05 };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
        let grads_seq =
            [[1.0f64, -2.0, 0.5, 0.0, 4.0, -0.1], [0.3, 0.3, -1.0, 2.0, -4.0, 0.2], [-1.0, 0.0, 0.0, 1.0, 1.0, 1.0]];
        let (mut theta, mut m, mut v) = (init.map(f64::from), [0.0f64; 6], [0.0f64; 6]);
        for (t, g) in grads_seq.iter().enumerate() {
            let lr = 0.1 * (t + 1) as f64;
            let gt = Tensor::from_vec(g.iter().map(|&x| x as f32).collect::<Vec<_>>(), (2, 3), &Device::Cpu).unwrap();
            // A GradStore holding exactly `gt` for `w`: the gradient of Σ w ⊙ gt.
            let grads = (w.as_tensor() * &gt).unwrap().sum_all().unwrap().backward().unwrap();
            opt.step(&grads, &[], lr).unwrap();
            let n = (t + 1) as i32;
            for i in 0..6 {
                theta[i] *= 1.0 - lr * config.weight_decay;
                m[i] = config.beta1 * m[i] + (1.0 - config.beta1) * g[i];
                v[i] = config.beta2 * v[i] + (1.0 - config.beta2) * g[i] * g[i];
                let mh = m[i] / (1.0 - config.beta1.powi(n));
                let vh = v[i] / (1.0 - config.beta2.powi(n));
                theta[i] -= lr * mh / (vh.sqrt() + config.eps);
            }
            let got = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..6 {
                assert!((f64::from(got[i]) - theta[i]).abs() <= 1e-6 * (1.0 + theta[i].abs()), "step {t}, {i}");
            }
        }
    }

    #[test]
    fn the_first_non_finite_moment_is_named_in_parameter_order_on_every_path() {
        for mode in MODES {
            let vars: Vec<(String, Var)> = ["a", "b", "c"]
                .iter()
                .zip(1..)
                .map(|(n, seed)| (n.to_string(), var(&values(6, seed), (2, 3))))
                .collect();
            let mut opt = optimizer_in(mode, vars.clone(), AdamWConfig::default());
            let loss = vars
                .iter()
                .map(|(_, v)| v.as_tensor().sqr().unwrap().sum_all().unwrap())
                .reduce(|a, b| (a + b).unwrap());
            in_mode(mode, || opt.step(&loss.unwrap().backward().unwrap(), &[], 0.1).unwrap());
            assert_eq!(opt.first_non_finite_state().unwrap(), None, "{mode}");
            for ((name, slot), expected) in [(("c", "m"), "m.c"), (("b", "v"), "v.b")] {
                let nan = |t: &Tensor| t.affine(f64::NAN, 0.0).unwrap();
                match opt.moments.get_mut(name).unwrap() {
                    Moments::Host { m, v, .. } => (if slot == "m" { m } else { v })[4] = f32::NAN,
                    Moments::Device(moments) => {
                        let (m, v) = (moments.m().unwrap(), moments.v().unwrap());
                        let (m, v) = if slot == "m" { (nan(&m), v) } else { (m, nan(&v)) };
                        *moments = AdamWMoments::from_moments(&m, &v).unwrap();
                    }
                    Moments::Tensors { m, v } => {
                        let t = if slot == "m" { m } else { v };
                        *t = nan(t);
                    }
                }
                assert_eq!(opt.first_non_finite_state().unwrap().as_deref(), Some(expected), "{mode}");
            }
        }
    }

    /// A state saved after two steps and loaded into a new optimizer continues as the first one
    /// does, bit for bit, with its moments in the mode's own kind.
    #[test]
    fn a_restored_state_continues_the_same_bits_on_every_path() {
        let init = values(5 * 4, 3);
        let config = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..AdamWConfig::default() };
        for mode in MODES {
            let (a, b) = (var(&init, (5, 4)), var(&init, (5, 4)));
            let mut first = optimizer_in(mode, vec![("w".into(), a.clone())], config);
            for _ in 0..2 {
                in_mode(mode, || first.step(&grads_of(&a), &[], 1e-2).unwrap());
            }
            let state = first.state().unwrap();
            b.set(a.as_tensor()).unwrap();
            let mut second = optimizer_in(mode, vec![("w".into(), b.clone())], config);
            in_mode(mode, || second.load_state(&state).unwrap());
            let kind = match &second.moments["w"] {
                Moments::Host { .. } => "host",
                Moments::Device(_) => "device",
                Moments::Tensors { .. } => "tensors",
            };
            assert_eq!(kind, mode);
            for step in 0..2 {
                in_mode(mode, || first.step(&grads_of(&a), &[], 1e-2).unwrap());
                in_mode(mode, || second.step(&grads_of(&b), &[], 1e-2).unwrap());
                assert_eq!(bits(&a), bits(&b), "{mode}, step {step} after the restore");
            }
        }
    }

    #[test]
    fn a_row_sparse_step_is_the_dense_step_on_the_touched_rows_and_leaves_the_others() {
        let init = values(6 * 3, 7);
        let rows = vec![1u32, 4];
        let g_rows = values(2 * 3, 8);
        let mut g_dense = vec![0f32; 18];
        for (k, &r) in rows.iter().enumerate() {
            g_dense[r as usize * 3..r as usize * 3 + 3].copy_from_slice(&g_rows[k * 3..k * 3 + 3]);
        }
        let config = AdamWConfig { lr: 0.1, weight_decay: 0.1, ..AdamWConfig::default() };
        for mode in MODES {
            let (dense_w, sparse_w) = (var(&init, (6, 3)), var(&init, (6, 3)));
            let mut dense = optimizer_in(mode, vec![("t".into(), dense_w.clone())], config);
            let mut sparse = optimizer_in(mode, vec![("t".into(), sparse_w.clone())], config);
            let gt = Tensor::from_slice(&g_dense, (6, 3), &Device::Cpu).unwrap();
            let grads = (dense_w.as_tensor() * &gt).unwrap().sum_all().unwrap().backward().unwrap();
            in_mode(mode, || dense.step(&grads, &[], 0.1).unwrap());
            let row_grad = RowGradient {
                table: sparse_w.as_tensor().clone(),
                rows: rows.clone(),
                grad: Tensor::from_slice(&g_rows, (2, 3), &Device::Cpu).unwrap(),
            };
            let no_dense = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap().sum_all().unwrap().backward().unwrap();
            in_mode(mode, || sparse.step(&no_dense, &[row_grad], 0.1).unwrap());
            let (d, s) = (bits(&dense_w), bits(&sparse_w));
            let before: Vec<u32> = init.iter().map(|x| x.to_bits()).collect();
            for r in 0..6 {
                let at = r * 3..r * 3 + 3;
                if rows.contains(&(r as u32)) {
                    assert_eq!(d[at.clone()], s[at], "mode {mode}: touched row {r}");
                } else {
                    assert_eq!(s[at.clone()], before[at.clone()], "mode {mode}: untouched row {r} kept");
                    assert_ne!(d[at.clone()], before[at], "mode {mode}: the dense step decays row {r}");
                }
            }
        }
    }

    /// The rows that the device updates of several tables write back go to the device in one
    /// upload; each table gets the bits of a step of its own.
    #[test]
    fn the_row_gradients_of_several_tables_share_one_upload_of_their_rows() {
        use rankstack_nn::host_transfer::record_transfers;

        let config = AdamWConfig { lr: 0.1, weight_decay: 0.1, ..AdamWConfig::default() };
        let row_grad = |w: &Var, rows: Vec<u32>, seed: u64| RowGradient {
            table: w.as_tensor().clone(),
            grad: Tensor::from_slice(&values(rows.len() * 3, seed), (rows.len(), 3), &Device::Cpu).unwrap(),
            rows,
        };
        let no_dense = || Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap().sum_all().unwrap().backward().unwrap();
        for mode in MODES {
            let (a, b) = (var(&values(6 * 3, 1), (6, 3)), var(&values(5 * 3, 2), (5, 3)));
            let mut both = optimizer_in(mode, vec![("a".into(), a.clone()), ("b".into(), b.clone())], config);
            let grads = [row_grad(&a, vec![1, 4], 3), row_grad(&b, vec![0, 2, 3], 4)];
            let ((), transfers) = record_transfers(|| in_mode(mode, || both.step(&no_dense(), &grads, 0.1).unwrap()));
            let written: Vec<_> =
                transfers.iter().filter(|t| t.what == "overwritten rows").map(|t| t.elements).collect();
            let expected: &[usize] = if mode == "host" { &[] } else { &[5] };
            assert_eq!(written, expected, "mode {mode}");
            for (w, rows, seed, init) in [(&a, vec![1, 4], 3, 1), (&b, vec![0, 2, 3], 4, 2)] {
                let alone = var(&values(w.elem_count(), init), w.dims2().unwrap());
                let mut opt = optimizer_in(mode, vec![("w".into(), alone.clone())], config);
                in_mode(mode, || opt.step(&no_dense(), &[row_grad(&alone, rows, seed)], 0.1).unwrap());
                assert_eq!(bits(w), bits(&alone), "mode {mode}");
            }
        }
    }

    #[test]
    fn a_row_gradient_of_an_unknown_table_is_an_error() {
        let w = var(&[1.0, 2.0], (1, 2));
        let other = var(&[1.0, 2.0], (1, 2));
        let mut opt = AdamW::new(vec![("w".into(), w)], AdamWConfig::default()).unwrap();
        let r = RowGradient { table: other.as_tensor().clone(), rows: vec![0], grad: other.as_tensor().clone() };
        let none = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(opt.step(&none, &[r], 0.1).unwrap_err().to_string().contains("not one of the optimizer's parameters"));
    }

    #[test]
    fn a_bad_row_is_an_error_naming_the_parameter_and_changes_nothing() {
        for mode in MODES {
            for (rows, expected) in
                [(vec![1, 4], "row 4 is out of range (a matrix of 4 rows)"), (vec![2, 0, 2], "row 2 is written twice")]
            {
                let w = var(&values(4 * 2, 1), (4, 2));
                let mut opt = optimizer_in(mode, vec![("table".into(), w.clone())], AdamWConfig::default());
                let before = bits(&w);
                let grad = Tensor::from_slice(&values(rows.len() * 2, 2), (rows.len(), 2), &Device::Cpu).unwrap();
                let r = RowGradient { table: w.as_tensor().clone(), rows, grad };
                let none = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap().sum_all().unwrap().backward().unwrap();
                let err = in_mode(mode, || opt.step(&none, &[r], 0.1).unwrap_err().to_string());
                assert!(err.contains(expected), "mode {mode}: {err}");
                assert!(err.contains("parameter table"), "mode {mode}: {err}");
                assert_eq!(bits(&w), before, "mode {mode}: the table changed");
                assert_eq!(opt.step_count(), 0, "mode {mode}: a rejected step is not counted");
            }
        }
    }

    #[test]
    fn the_gradient_norm_of_the_cpu_kernel_equals_the_devices_partial_sums() {
        use rankstack_kernels::cpu::{with_isa, Isa};
        let (w, b) = (var(&values(300 * 70, 1), (300, 70)), var(&values(70, 2), (1, 70)));
        let table = var(&values(50 * 8, 3), (50, 8));
        let params = vec![("w".to_string(), w.clone()), ("t".to_string(), table.clone()), ("b".to_string(), b.clone())];
        let x = Tensor::from_slice(&values(300, 4), (1, 300), &Device::Cpu).unwrap();
        let loss = x.matmul(w.as_tensor()).unwrap().broadcast_add(b.as_tensor()).unwrap().sqr().unwrap().sum_all();
        let grads = loss.unwrap().backward().unwrap();
        let grad = Tensor::from_slice(&values(3 * 8, 5), (3, 8), &Device::Cpu).unwrap();
        let rows = vec![RowGradient { table: table.as_tensor().clone(), rows: vec![4, 9, 30], grad }];
        let kernel = grad_norm(&params, &grads, &rows).unwrap();
        let tensors = with_isa(Isa::Candle, || grad_norm(&params, &grads, &rows).unwrap());
        assert!(kernel > 0.0 && (kernel - tensors).abs() <= 1e-14 * tensors, "{kernel} vs {tensors}");
    }

    #[test]
    fn clipping_counts_row_gradients_as_their_dense_equivalent() {
        let w = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (3, 2));
        let b = var(&[0.5, 0.5], (1, 2));
        let params = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
        // Dense gradient of b: [3, 0]; row gradient of w: row 1 = [0, 4]. Global norm 5.
        let gb = Tensor::from_slice(&[3.0f32, 0.0], (1, 2), &Device::Cpu).unwrap();
        let mut grads = (b.as_tensor() * &gb).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = Tensor::from_slice(&[0.0f32, 4.0], (1, 2), &Device::Cpu).unwrap();
        let mut rows = vec![RowGradient { table: w.as_tensor().clone(), rows: vec![1], grad }];
        assert!((grad_norm(&params, &grads, &rows).unwrap() - 5.0).abs() < 1e-12);
        let norm = clip_grad_norm(&params, &mut grads, &mut rows, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        assert!((grad_norm(&params, &grads, &rows).unwrap() - 5.0 / (5.0 + 1e-6)).abs() < 1e-6);
        let scale = 1.0 / (5.0 + 1e-6);
        let gb = grads.get(b.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!((f64::from(gb[0][0]) - 3.0 * scale).abs() < 1e-7);
        let gw = rows[0].grad.to_vec2::<f32>().unwrap();
        assert!((f64::from(gw[0][1]) - 4.0 * scale).abs() < 1e-7 && gw[0][0] == 0.0);
    }
}
