"""Feature encoders, written from the spec with stock PyTorch modules.

  dense:     x <- isfinite(x) ? x : 0; x <- sign(x) log1p|x|; x <- (x - mean_fit) / std_fit;
             x <- BatchNorm1d(x); x <- clamp(x, -c, c); then 0/1 missing indicators appended.
  sparse:    nn.EmbeddingBag(mode=sum|mean, padding_idx) after the OOV mapping
             (reserved: id >= card -> row card; hash: id mod card; reject: error).
  embedding: optional nn.Linear projection.
  each sparse/embedding block optionally F.normalize(dim=1, eps=1e-12); extra blocks as is.
Parameter and buffer names equal the Rust crate's.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

DENSE_DEFAULTS = {
    "replace_non_finite": True,
    "signed_log1p": True,
    "standardize": False,
    "batch_norm": True,
    "batch_norm_momentum": 0.1,
    "batch_norm_eps": 1e-5,
    "clamp": True,
    "clamp_value": 5.0,
}


def default_dim(cardinality):
    raw = 6.0 * math.sqrt(math.sqrt(cardinality))
    return min(max(math.ceil(raw / 4.0) * 4, 4), 64)


def sparse_dim(f):
    return f.get("dim") or default_dim(f["cardinality"])


def sparse_rows(f):
    return f["cardinality"] + (1 if f.get("oov", "reserved") == "reserved" else 0)


class Dense(nn.Module):
    def __init__(self, n, indicators, cfg):
        super().__init__()
        self.cfg = {**DENSE_DEFAULTS, **cfg}
        self.indicators = indicators
        if self.cfg["standardize"]:
            self.register_buffer("standardize_mean", torch.zeros(n))
            self.register_buffer("standardize_std", torch.ones(n))
        if self.cfg["batch_norm"]:
            self.batch_norm = nn.BatchNorm1d(n, eps=self.cfg["batch_norm_eps"], momentum=self.cfg["batch_norm_momentum"])

    def pre(self, x):
        finite = torch.isfinite(x)
        if self.cfg["replace_non_finite"]:
            x = torch.where(finite, x, torch.zeros_like(x))
        if self.cfg["signed_log1p"]:
            x = torch.sign(x) * torch.log1p(x.abs())
        return x, finite

    @torch.no_grad()
    def fit(self, data):
        x, _ = self.pre(data)
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = torch.where(std < 1e-12, torch.ones_like(std), std)
        self.standardize_mean.copy_(mean)
        self.standardize_std.copy_(std)

    def forward(self, x):
        h, finite = self.pre(x)
        if self.cfg["standardize"]:
            h = (h - self.standardize_mean) / self.standardize_std
        if self.cfg["batch_norm"]:
            h = self.batch_norm(h)
        if self.cfg["clamp"]:
            c = self.cfg["clamp_value"]
            h = torch.clamp(h, -c, c)
        if self.indicators:
            h = torch.cat([h, (~finite)[:, self.indicators].to(h.dtype)], dim=1)
        return h


class FeatureEncoder(nn.Module):
    """schema: the Rust FeatureSchema as a dict. Inputs (dict): "dense" [B, n];
    "sparse.<name>.ids" [N] and "sparse.<name>.offsets" [B] (int64, EmbeddingBag layout);
    "embedding.<name>" [B, dim]; "extra.<name>" [B, dim]."""

    def __init__(self, schema):
        super().__init__()
        self.schema = schema
        dense = schema.get("dense", [])
        if dense:
            indicators = [i for i, f in enumerate(dense) if f.get("missing_indicator", False)]
            self.dense = Dense(len(dense), indicators, schema.get("dense_pipeline", {}))
        self.sparse = nn.ModuleDict()
        for f in schema.get("sparse", []):
            bag = nn.EmbeddingBag(sparse_rows(f), sparse_dim(f), mode=f.get("pooling", "sum"),
                                  padding_idx=f.get("padding_id"))
            self.sparse[f["name"]] = bag
        self.embedding = nn.ModuleDict()
        for f in schema.get("embedding", []):
            if f.get("projection"):
                self.embedding[f["name"]] = nn.Linear(f["dim"], f["projection"], bias=f.get("projection_bias", True))

    def zero_padding_rows(self):
        with torch.no_grad():
            for f in self.schema.get("sparse", []):
                if f.get("padding_id") is not None:
                    self.sparse[f["name"]].weight[f["padding_id"]] = 0.0

    @staticmethod
    def map_ids(ids, f):
        card = f["cardinality"]
        if (ids < 0).any():
            raise ValueError("negative id")
        policy = f.get("oov", "reserved")
        if policy == "reserved":
            return torch.where(ids >= card, torch.full_like(ids, card), ids)
        if policy == "hash":
            return ids % card
        if (ids >= card).any():
            raise ValueError("id out of range")
        return ids

    def forward(self, inputs):
        blocks = []
        if self.schema.get("dense"):
            blocks.append(self.dense(inputs["dense"]))
        for f in self.schema.get("sparse", []):
            n = f["name"]
            ids = self.map_ids(inputs[f"sparse.{n}.ids"], f)
            y = self.sparse[n](ids, inputs[f"sparse.{n}.offsets"])
            blocks.append(F.normalize(y, dim=1, eps=1e-12) if f.get("normalize", True) else y)
        for f in self.schema.get("embedding", []):
            n = f["name"]
            x = inputs[f"embedding.{n}"]
            y = self.embedding[n](x) if f.get("projection") else x
            blocks.append(F.normalize(y, dim=1, eps=1e-12) if f.get("normalize", True) else y)
        for f in self.schema.get("extra", []):
            blocks.append(inputs[f"extra.{f['name']}"])
        return torch.cat(blocks, dim=1)
