"""MaskNet (Wang et al. 2021), written from the formulas.

MaskBlock(v_emb of width m, h of width z):
  mask = W2 relu(W1 v_emb + b1) + b2          W1: t x m (aggregation), W2: z x t (projection)
  t    = round(projection_ratio * m) (aggregation_rounding "truncate": int(projection_ratio * m), as
         Twitter's recap MaskNet), or aggregation_dim when given
  h'   = LN_in(h) if input_layer_norm else h
  out  = act(LN(W_h (mask * h')))              W_h: q x z, bias optional (off by default)
ParallelMaskNet: u blocks on (v_emb, v_emb), outputs concatenated (u*q), optional top MLP; or one config
per block ("blocks": [...]), outputs concatenated (sum of q_i).
SerialMaskNet: block 1 on (v_emb, v_emb); block k on (v_emb, out_{k-1}).
"""

import math

import torch
from torch import nn

from .common import ACTIVATIONS, Mlp


def aggregation_dim(m, block):
    if block.get("aggregation_dim") is not None:
        return block["aggregation_dim"]
    product = block.get("projection_ratio", 2.0) * m
    if block.get("aggregation_rounding", "round") == "truncate":
        return int(product)
    return int(math.floor(product + 0.5))


class InstanceMask(nn.Module):
    def __init__(self, m, t, z):
        super().__init__()
        self.aggregation = nn.Linear(m, t)
        self.projection = nn.Linear(t, z)

    def forward(self, v):
        return self.projection(torch.relu(self.aggregation(v)))


class MaskBlock(nn.Module):
    def __init__(self, m, z, block):
        super().__init__()
        q = block["output_dim"]
        eps = block.get("layer_norm_eps", 1e-5)
        self.mask = InstanceMask(m, aggregation_dim(m, block), z)
        self.input_norm = nn.LayerNorm(z, eps=eps) if block.get("input_layer_norm", False) else None
        self.hidden = nn.Linear(z, q, bias=block.get("hidden_bias", False))
        self.output_norm = nn.LayerNorm(q, eps=eps)
        self.act = ACTIVATIONS[block.get("activation", "relu")]

    def forward(self, v, h):
        if self.input_norm is not None:
            h = self.input_norm(h)
        return self.act(self.output_norm(self.hidden(self.mask(v) * h)))


class ParallelMaskNet(nn.Module):
    """config: {"num_blocks": u, "block": {...}} or {"blocks": [{...}, ...]}, and "top_mlp": Mlp config or null"""

    def __init__(self, m, config):
        super().__init__()
        blocks = config.get("blocks") or [config["block"]] * config["num_blocks"]
        self.blocks = nn.ModuleList([MaskBlock(m, m, b) for b in blocks])
        top = config.get("top_mlp")
        self.top_mlp = Mlp(sum(b["output_dim"] for b in blocks), top) if top else None

    def forward(self, v):
        y = torch.cat([b(v, v) for b in self.blocks], dim=1)
        return self.top_mlp(y) if self.top_mlp is not None else y


class SerialMaskNet(nn.Module):
    """config: {"blocks": [block, ...]}"""

    def __init__(self, m, config):
        super().__init__()
        blocks, z = [], m
        for block in config["blocks"]:
            blocks.append(MaskBlock(m, z, block))
            z = block["output_dim"]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, v):
        h = v
        for b in self.blocks:
            h = b(v, h)
        return h


class TwitterMaskBlock(nn.Module):
    """A MaskBlock as Twitter's recap code computes it (the-algorithm-ml, projects/home/recap/model/
    mask_net.py), written from that code, with its parameter names: no activation after the output
    LayerNorm, a bias on the hidden layer, the aggregation width `int(reduction_factor * m)`
    (truncated) or `aggregation_size`, an optional LayerNorm on the masked input.

    block: {"output_size": q, "reduction_factor": r | "aggregation_size": t, "input_layer_norm": bool}
    """

    def __init__(self, block, input_dim, mask_input_dim):
        super().__init__()
        self._input_layer_norm = nn.LayerNorm(input_dim) if block.get("input_layer_norm") else None
        if block.get("reduction_factor"):
            aggregation_size = int(mask_input_dim * block["reduction_factor"])
        else:
            aggregation_size = block["aggregation_size"]
        self._mask_layer = nn.Sequential(nn.Linear(mask_input_dim, aggregation_size), nn.ReLU(),
                                         nn.Linear(aggregation_size, input_dim))
        self._hidden_layer = nn.Linear(input_dim, block["output_size"])
        self._layer_norm = nn.LayerNorm(block["output_size"])

    def forward(self, net, mask_input):
        if self._input_layer_norm is not None:
            net = self._input_layer_norm(net)
        return self._layer_norm(self._hidden_layer(net * self._mask_layer(mask_input)))


class TwitterMaskNet(nn.Module):
    """Twitter's MaskNet without its optional top MLP. config: {"use_parallel": bool, "mask_blocks": [block, ...]}.
    Returns {"output": ..., "shared_layer": ...} as Twitter's module does."""

    def __init__(self, config, in_features):
        super().__init__()
        self.use_parallel = config["use_parallel"]
        blocks, size = [], in_features
        for block in config["mask_blocks"]:
            blocks.append(TwitterMaskBlock(block, in_features if self.use_parallel else size, in_features))
            size = block["output_size"]
        self._mask_blocks = nn.ModuleList(blocks)

    def forward(self, inputs):
        if self.use_parallel:
            out = torch.cat([b(net=inputs, mask_input=inputs) for b in self._mask_blocks], dim=1)
        else:
            out = inputs
            for b in self._mask_blocks:
                out = b(net=out, mask_input=inputs)
        return {"output": out, "shared_layer": out}
