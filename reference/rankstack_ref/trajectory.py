"""Lock-step training trajectories: the reference Ranker trained for N steps from given initial
weights on given batches, recording per step the loss, the global gradient norm before clipping and
the learning rate, and at the end every parameter and buffer.

The recipe is rankstack's trainer (src/train/trainer.rs), written from its formulas:

  lr_t      = warmup_cosine(t)                              (train.warmup_cosine)
  L         = sum_t w_t * mean over labelled rows of BCE    (train.loss_fn)
  norm      = ||grad||_2 over every parameter, before clipping
  grad     *= clip / (norm + 1e-6) if norm > clip           (torch.nn.utils.clip_grad_norm_)
  AdamW     decoupled weight decay on every parameter (matrices, biases, norms, embedding tables)

Two optimizers:
  dense  torch.optim.AdamW itself (what nn.Embedding + AdamW do: every table row decays and moves
         by its momentum every step);
  lazy   the row-sparse "lazy" AdamW of rankstack's default embedding mode, from its formula: the
         embedding tables update only the rows the batch looked up (weight decay, moments and the
         update, with the global step's bias corrections); every other tensor as dense.

Dropout is off (the config's rates are 0): rankstack draws its masks from its own generator inside
each layer, and the reference has no hook to receive them (see docs/trajectory.md).
"""

import copy
import json
import math
import os

import torch
from safetensors.torch import save_file

from .ranker import Ranker
from .train import loss_fn, warmup_cosine


def touched_rows(config, inputs):
    """The table rows a batch looks up, per table parameter name: the sparse features' ids after the
    OOV mapping (padding excluded), and for the item table every sequence and candidate id (ids at
    or above the cardinality share the last row), as rankstack's RowGather records them."""
    rows = {}
    for f in config["features"].get("sparse", []):
        ids = inputs[f"sparse.{f['name']}.ids"]
        card = f["cardinality"]
        oov = f.get("oov", "reserved")
        mapped = torch.where(ids < card, ids, ids % card if oov == "hash" else torch.full_like(ids, card))
        if f.get("padding_id") is not None:
            mapped = mapped[mapped != f["padding_id"]]
        rows[f"features.sparse.{f['name']}.weight"] = torch.unique(mapped)
    if config.get("item_embedding") is not None:
        card = config["item_embedding"]["cardinality"]
        ids = torch.cat([inputs["seq.item_ids"].flatten(), inputs["seq.candidate_id"].flatten()])
        rows["item_embedding.weight"] = torch.unique(ids.clamp(max=card))
    return rows


class LazyAdamW:
    """AdamW whose embedding tables update only the rows given for the step (see the module doc)."""

    def __init__(self, named_params, lr, betas, eps, weight_decay):
        self.params = list(named_params)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = {n: torch.zeros_like(p) for n, p in self.params}
        self.v = {n: torch.zeros_like(p) for n, p in self.params}
        self.t = 0

    @torch.no_grad()
    def step(self, lr, rows):
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for name, p in self.params:
            if p.grad is None:
                continue
            at = rows.get(name, slice(None))
            theta, g, m, v = p[at], p.grad[at], self.m[name][at], self.v[name][at]
            m = self.b1 * m + (1 - self.b1) * g
            v = self.b2 * v + (1 - self.b2) * g * g
            update = (m / bc1) / ((v / bc2).sqrt() + self.eps)
            p[at] = theta * (1 - lr * self.wd) - lr * update
            self.m[name][at], self.v[name][at] = m, v


def run(config, params, batches, recipe, dtype):
    """Trains `Ranker(config)` in `dtype` from `params` (name -> tensor) on `batches` (a list of
    (inputs, labels)) with `recipe` (lr, beta1, beta2, eps, weight_decay, warmup, total,
    min_lr_ratio, clip, lazy). Returns per-step tensors `loss`, `grad_norm`, `lr` and the final
    `param.<name>` / `buffer.<name>` tensors."""
    model = Ranker(config).to(dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dict(model.named_buffers())]
    if missing or unexpected:
        raise ValueError(f"initial weights: missing {missing}, unexpected {unexpected}")
    named = list(model.named_parameters())
    betas = (recipe["beta1"], recipe["beta2"])
    if recipe["lazy"]:
        opt = LazyAdamW(named, recipe["lr"], betas, recipe["eps"], recipe["weight_decay"])
    else:
        opt = torch.optim.AdamW([p for _, p in named], lr=recipe["lr"], betas=betas, eps=recipe["eps"],
                                weight_decay=recipe["weight_decay"])
    lr_at = warmup_cosine(recipe["lr"], recipe["warmup"], recipe["total"], recipe["min_lr_ratio"])
    weights = torch.tensor([t.get("weight", 1.0) for t in config["tasks"]], dtype=dtype)
    losses, norms, lrs = [], [], []
    model.train()
    for step, (inputs, labels) in enumerate(batches):
        x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        lr = lr_at(step)
        loss = loss_fn(model(x), labels.to(dtype), weights)
        for _, p in named:
            p.grad = None
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], recipe["clip"])
        if recipe["lazy"]:
            opt.step(lr, touched_rows(config, inputs))
        else:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
        losses.append(loss.item())
        norms.append(float(norm))
        lrs.append(lr)
    out = {"loss": torch.tensor(losses, dtype=torch.float64), "grad_norm": torch.tensor(norms, dtype=torch.float64),
           "lr": torch.tensor(lrs, dtype=torch.float64)}
    for name, p in named:
        out[f"param.{name}"] = p.detach().clone()
    for name, b in model.named_buffers():
        if b.is_floating_point():
            out[f"buffer.{name}"] = b.detach().clone()
    return out


def relative_divergence(a, b):
    """max |a - b| / max |b| over all `param.*` tensors of two runs (b the reference)."""
    num = max(float((a[k] - b[k].to(a[k].dtype)).abs().max()) for k in b if k.startswith("param."))
    den = max(float(b[k].abs().max()) for k in b if k.startswith("param."))
    return num / den if den > 0 else math.inf


def write(path, case, config, params, batches, recipe):
    """Runs `config` from `params` on `batches` with `recipe` in float64 and float32 and writes the
    trajectory file (the layout of cases_trajectory.py: param.*, batch.<step>.*, f64.*, f32.*, and
    metadata "fixture" = {layer, case, config, recipe})."""
    tensors = {f"param.{k}": v.contiguous() for k, v in params.items()}
    for step, (inputs, labels) in enumerate(batches):
        for k, v in inputs.items():
            tensors[f"batch.{step}.{k}"] = (v.double() if v.is_floating_point() else v).contiguous()
        tensors[f"batch.{step}.labels"] = labels.double().contiguous()
    for prefix, dtype in [("f64", torch.float64), ("f32", torch.float32)]:
        for k, v in run(copy.deepcopy(config), params, batches, recipe, dtype).items():
            tensors[f"{prefix}.{k}"] = v.contiguous()
    fields = {"layer": "Trajectory", "case": case, "config": config, "recipe": json.dumps(recipe, sort_keys=True)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(tensors, path, metadata={"fixture": json.dumps(fields, sort_keys=True)})
