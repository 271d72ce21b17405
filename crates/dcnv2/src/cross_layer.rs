//! One DCN-V2 cross layer.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rankstack_nn::{init::xavier_normal, linear_xavier, softmax, Activation, Linear};

use crate::config::CrossLayerKind;

/// One low-rank expert: `U φ(C φ(V x))`, or `U (V x)` without `C` for the plain low-rank layer.
#[derive(Debug, Clone)]
struct LowRankMap {
    v: Linear,
    c: Option<Linear>,
    u: Linear,
}

impl LowRankMap {
    fn new(d: usize, rank: usize, with_c: bool, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            v: linear_xavier(d, rank, false, vb.pp("v"))?,
            c: if with_c { Some(linear_xavier(rank, rank, false, vb.pp("c"))?) } else { None },
            u: linear_xavier(rank, d, false, vb.pp("u"))?,
        })
    }

    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let h = self.v.forward(x)?;
        let h = match &self.c {
            Some(c) => act.apply(&c.forward(&act.apply(&h)?)?)?,
            None => h,
        };
        self.u.forward(&h)
    }
}

#[derive(Debug, Clone)]
enum Interaction {
    /// `W x` with `W` stored `[d, d]`.
    FullRank { weight: Linear },
    /// `xᵀw` with `w` stored `[1, d]` (DCN-V1).
    Vector { weight: Linear },
    /// `U (V x)`.
    LowRank(LowRankMap),
    /// `Σᵢ gᵢ Uᵢ φ(Cᵢ φ(Vᵢ x))`; `gates` holds the `[1, d]` gate rows (empty for E = 1). They are
    /// concatenated at each call, not once here: a tensor derived at construction would not follow
    /// later updates of the variables (training, checkpoint loading).
    Mixture { experts: Vec<LowRankMap>, gates: Vec<Tensor>, activation: Activation },
}

/// The `[1, dim]` gate rows `gates.{i}.weight` under `vb` (none for a single expert, whose gate is 1).
pub(crate) fn gate_rows(dim: usize, num_experts: usize, vb: &VarBuilder) -> Result<Vec<Tensor>> {
    if num_experts < 2 {
        return Ok(Vec::new());
    }
    (0..num_experts).map(|i| vb.pp("gates").pp(i).get_with_hints((1, dim), "weight", xavier_normal(dim, 1))).collect()
}

/// One cross layer, `x' = x0 ⊙ (f(x) + b + s·x) + x`, where `f` is the full-rank, low-rank or
/// mixture map of [`CrossLayerKind`], or DCN-V1's vector layer `x' = x0 (xᵀw) + b + x` (see the crate docs for the formulas and parameter names).
///
/// The mixture is computed as `x0 ⊙ (Σᵢ gᵢ fᵢ(x) + b + s·x) + x`, which equals the published
/// `Σᵢ gᵢ · x0 ⊙ (fᵢ(x) + b + s·x) + x` because the gates sum to one, and needs one product with
/// `x0` instead of `E`.
#[derive(Debug, Clone)]
pub struct CrossLayer {
    interaction: Interaction,
    bias: Tensor,
    diag_scale: f64,
    dim: usize,
}

impl CrossLayer {
    /// A layer on `dim` features. `kind` must already be validated (see [`crate::CrossNetConfig`]).
    /// `shared_gates` holds the stack-wide gate rows when the mixture shares them across layers.
    pub(crate) fn new(
        dim: usize,
        kind: CrossLayerKind,
        diag_scale: f64,
        vb: VarBuilder,
        shared_gates: Option<&[Tensor]>,
    ) -> Result<Self> {
        let interaction = match kind {
            CrossLayerKind::FullRank => Interaction::FullRank {
                weight: Linear::new(vb.get_with_hints((dim, dim), "weight", xavier_normal(dim, dim))?, None),
            },
            CrossLayerKind::Vector => Interaction::Vector {
                weight: Linear::new(vb.get_with_hints((1, dim), "weight", xavier_normal(dim, 1))?, None),
            },
            CrossLayerKind::LowRank { rank } => Interaction::LowRank(LowRankMap::new(dim, rank, false, &vb)?),
            CrossLayerKind::Mixture { rank, num_experts, activation, .. } => {
                let experts = (0..num_experts)
                    .map(|i| LowRankMap::new(dim, rank, true, &vb.pp("experts").pp(i)))
                    .collect::<Result<Vec<_>>>()?;
                let gates = match shared_gates {
                    Some(shared) => shared.to_vec(),
                    None => gate_rows(dim, num_experts, &vb)?,
                };
                Interaction::Mixture { experts, gates, activation }
            }
        };
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { interaction, bias, diag_scale, dim })
    }

    /// Width of the input and output.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `x0 ⊙ (f(x) + b + s·x) + x` for `x0`, `x` of shape `[batch, dim]` (checked by the caller);
    /// for the vector layer `x0 (xᵀw) + b + x`.
    pub fn forward(&self, x0: &Tensor, x: &Tensor) -> Result<Tensor> {
        let fx = match &self.interaction {
            Interaction::Vector { weight } => {
                // [batch, 1]: one scalar per example scales the whole of x0.
                let scale = weight.forward(x)?;
                return x0.broadcast_mul(&scale)?.broadcast_add(&self.bias)? + x;
            }
            Interaction::FullRank { weight } => weight.forward(x)?,
            Interaction::LowRank(map) => map.forward(x, Activation::Identity)?,
            Interaction::Mixture { experts, gates, activation } => match gates.as_slice() {
                [] => experts[0].forward(x, *activation)?,
                gates => {
                    // g: [batch, E], softmax over experts.
                    let g = softmax(&x.matmul(&Tensor::cat(gates, 0)?.t()?)?, 1)?;
                    let mut mixed: Option<Tensor> = None;
                    for (i, expert) in experts.iter().enumerate() {
                        let term = expert.forward(x, *activation)?.broadcast_mul(&g.narrow(1, i, 1)?)?;
                        mixed = Some(match mixed {
                            None => term,
                            Some(acc) => (acc + term)?,
                        });
                    }
                    mixed.expect("at least two experts")
                }
            },
        };
        let mut inner = fx.broadcast_add(&self.bias)?;
        if self.diag_scale != 0.0 {
            inner = (inner + (x * self.diag_scale)?)?;
        }
        x0.mul(&inner)? + x
    }
}

impl rankstack_nn::LinearLayers for LowRankMap {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        let mut layers = vec![&mut self.v];
        layers.extend(self.c.linear_layers_mut());
        layers.push(&mut self.u);
        layers
    }
}

impl rankstack_nn::LinearLayers for CrossLayer {
    fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.interaction {
            Interaction::FullRank { weight } | Interaction::Vector { weight } => vec![weight],
            Interaction::LowRank(map) => map.linear_layers_mut(),
            Interaction::Mixture { experts, .. } => experts.linear_layers_mut(),
        }
    }
}
