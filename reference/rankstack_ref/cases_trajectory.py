"""Fixture cases for lock-step training (group "trajectory"): a small pinterest-homefeed ranker (item
table, padding row, BatchNorm, missing labels, weighted tasks, a task tower) trained for STEPS
AdamW steps from given weights on given batches, once with dense embedding updates
(torch.optim.AdamW) and once with rankstack's lazy row-sparse update. tests/trajectory.rs replays
them in rankstack.

Each file holds:
  param.<name>                 the initial weights (float32-representable, in float64)
  batch.<step>.<input key>     the inputs of each step, batch.<step>.labels
  f64.<...>, f32.<...>         the run in float64 (the truth) and PyTorch's own float32 run:
                               loss, grad_norm, lr [STEPS] and the final param.<name>, buffer.<name>
and metadata "fixture" = {layer, case, config (the RankerConfig), recipe}.
"""

import copy
import os

import torch
from . import trajectory
from .cases_ranker import FEATURES, SEQ, TASKS
from .fixture import init_params, randn
from .ranker import Ranker

STEPS = 30
BATCH = 16
ITEMS = 12

FEATURES_PADDED = copy.deepcopy(FEATURES)
FEATURES_PADDED["sparse"][0]["padding_id"] = 0  # country 0 is padding: never read, never updated

CONFIG = {
    "features": FEATURES_PADDED,
    "sequence": {**SEQ},
    "item_embedding": {"cardinality": ITEMS},
    "input_skip": False,
    "backbone": [{"type": "parallel_masknet", "config": {"num_blocks": 3, "block": {"output_dim": 6}}},
                 {"type": "crossnet", "config": {"num_layers": 4, "layer": {"type": "full_rank"}}}],
    "mlp": {"dims": [8, 4]},
    "tasks": TASKS,
}

# A short run with every part of the schedule (5 warm-up steps, then the cosine), weight decay
# large enough to matter, and a clipping norm between the early (clipped) and later gradient norms.
RECIPE = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "warmup": 5,
          "total": STEPS, "min_lr_ratio": 0.1, "clip": 3.0}


def make_batch(gen):
    s, b = SEQ["max_len"], BATCH
    lengths = [1 + int(torch.randint(0, s, (1,), generator=gen)) for _ in range(b)]
    types = torch.zeros(b, s, dtype=torch.int64)
    stamps = torch.zeros(b, s, dtype=torch.int64)
    items = torch.zeros(b, s, dtype=torch.int64)
    for i, n in enumerate(lengths):
        types[i, :n] = torch.randint(1, SEQ["num_action_types"], (n,), generator=gen)
        stamps[i, :n] = 1_000_000 - 60_000 * torch.arange(1, n + 1)
        items[i, :n] = torch.randint(0, ITEMS + 3, (n,), generator=gen)  # >= ITEMS: the OOV row
    dense = randn(gen, b, 2, scale=3.0)
    dense[0, 1] = float("nan")
    inputs = {
        "dense": dense.float(),
        "sparse.country.ids": torch.randint(0, 12, (b,), generator=gen),
        "sparse.country.offsets": torch.arange(b),
        "sparse.topic.ids": torch.randint(0, 20, (b,), generator=gen),
        "sparse.topic.offsets": torch.arange(b),
        "embedding.pin": randn(gen, b, 6).float(),
        "seq.action_types": types,
        "seq.item_ids": items,
        "seq.timestamps": stamps,
        "seq.request_time": torch.full((b,), 1_000_000, dtype=torch.int64),
        "seq.candidate_id": torch.randint(0, ITEMS + 3, (b,), generator=gen),
    }
    # Labels depend on the inputs (so that training has something to learn), some are missing.
    signal = inputs["dense"].nan_to_num(0.0).sum(1, keepdim=True) + inputs["embedding.pin"][:, :len(TASKS)]
    labels = (signal + torch.randn(b, len(TASKS), generator=gen) > 0).float()
    labels[torch.rand(b, len(TASKS), generator=gen) < 0.15] = float("nan")
    return inputs, labels


def case(out_dir, name, seed, lazy):
    gen = torch.Generator().manual_seed(seed)
    model = Ranker(copy.deepcopy(CONFIG)).double()
    init_params(model, gen)
    with torch.no_grad():  # padding rows start at zero, as rankstack makes them
        model.features.zero_padding_rows()
        model.sequence.action_emb.weight[0] = 0.0
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [make_batch(gen) for _ in range(STEPS)]
    recipe = {**RECIPE, "lazy": lazy}
    trajectory.write(os.path.join(out_dir, "trajectory", f"{name}.safetensors"), name, CONFIG, params, batches, recipe)


def generate(out_dir):
    case(out_dir, "homefeed_small_dense", 8000, lazy=False)
    case(out_dir, "homefeed_small_lazy", 8001, lazy=True)
