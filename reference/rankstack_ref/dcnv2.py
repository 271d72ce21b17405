"""DCN-V2 cross networks (Wang et al. 2020), written from the formulas.

x0: input of the first cross layer, x: input of layer l, * element-wise.
  full rank:  x_{l+1} = x0 * (W x + b + s x) + x                      W: d x d
  low rank:   x_{l+1} = x0 * (U (V x) + b + s x) + x                  V: r x d, U: d x r
  mixture:    x_{l+1} = sum_i g_i(x) * x0 * (U_i f(C_i f(V_i x)) + b + s x) + x
              g = softmax_i(G_i x) over experts (G_i: d -> 1, no bias); one expert: g = 1;
              G_i per layer, or one set for the whole stack with shared_gates (torchrec)
  vector:     x_{l+1} = x0 (x^T w) + b + x                              w: d (DCN-V1; torchrec VectorCrossNet;
              the bias is outside the product with x0; no diag_scale)
s is diag_scale (0 by default). Parameter names follow the Rust crate.
"""

import torch
from torch import nn

from .common import ACTIVATIONS


class FullRankCross(nn.Module):
    def __init__(self, d, diag_scale):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.diag_scale = diag_scale

    def forward(self, x0, x):
        return x0 * (x @ self.weight.T + self.bias + self.diag_scale * x) + x


class LowRankCross(nn.Module):
    def __init__(self, d, rank, diag_scale):
        super().__init__()
        self.v = nn.Linear(d, rank, bias=False)
        self.u = nn.Linear(rank, d, bias=False)
        self.bias = nn.Parameter(torch.zeros(d))
        self.diag_scale = diag_scale

    def forward(self, x0, x):
        return x0 * (self.u(self.v(x)) + self.bias + self.diag_scale * x) + x


class VectorCross(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x0, x):
        return x0 * (x @ self.weight.T) + self.bias + x


class Expert(nn.Module):
    def __init__(self, d, rank):
        super().__init__()
        self.v = nn.Linear(d, rank, bias=False)
        self.c = nn.Linear(rank, rank, bias=False)
        self.u = nn.Linear(rank, d, bias=False)


class MixtureCross(nn.Module):
    def __init__(self, d, rank, num_experts, activation, diag_scale, shared_gates=None):
        super().__init__()
        self.experts = nn.ModuleList([Expert(d, rank) for _ in range(num_experts)])
        if shared_gates is not None:
            self._shared = [shared_gates]  # a plain list: not registered under this layer's name
        elif num_experts > 1:
            self.gates = nn.ModuleList([nn.Linear(d, 1, bias=False) for _ in range(num_experts)])
        self.bias = nn.Parameter(torch.zeros(d))
        self.act = ACTIVATIONS[activation]
        self.diag_scale = diag_scale

    def forward(self, x0, x):
        outs = []
        for e in self.experts:
            inner = e.u(self.act(e.c(self.act(e.v(x)))))
            outs.append(x0 * (inner + self.bias + self.diag_scale * x))
        if len(outs) == 1:
            return outs[0] + x
        gates = self._shared[0] if hasattr(self, "_shared") else self.gates
        g = torch.softmax(torch.cat([gate(x) for gate in gates], dim=1), dim=1)  # [B, E]
        mix = sum(g[:, i : i + 1] * outs[i] for i in range(len(outs)))
        return mix + x


def make_layer(d, config, shared_gates=None):
    kind = config["layer"]
    s = config.get("diag_scale", 0.0)
    if kind["type"] == "full_rank":
        return FullRankCross(d, s)
    if kind["type"] == "low_rank":
        return LowRankCross(d, kind["rank"], s)
    if kind["type"] == "vector":
        return VectorCross(d)
    if kind["type"] == "mixture":
        return MixtureCross(d, kind["rank"], kind["num_experts"], kind.get("activation", "relu"), s, shared_gates)
    raise ValueError(kind)


class CrossNet(nn.Module):
    """config: {"num_layers": L, "layer": {"type": ...}, "diag_scale": s}"""

    def __init__(self, d, config):
        super().__init__()
        kind = config["layer"]
        shared = None
        if kind["type"] == "mixture" and kind.get("shared_gates", False) and kind["num_experts"] > 1:
            # torchrec's LowRankMixtureCrossNet: one set of gates for the whole stack.
            self.gates = shared = nn.ModuleList([nn.Linear(d, 1, bias=False) for _ in range(kind["num_experts"])])
        self.layers = nn.ModuleList([make_layer(d, config, shared) for _ in range(config["num_layers"])])

    def forward(self, x0):
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class ParallelCrossNet(nn.Module):
    """config: {"num_towers": P, "tower": CrossNet config, "combine": "concat" | "mean"}"""

    def __init__(self, d, config):
        super().__init__()
        self.towers = nn.ModuleList([CrossNet(d, config["tower"]) for _ in range(config["num_towers"])])
        self.combine = config["combine"]

    def forward(self, x0):
        outs = [t(x0) for t in self.towers]
        if self.combine == "concat":
            return torch.cat(outs, dim=1)
        return torch.stack(outs, dim=0).mean(dim=0)
