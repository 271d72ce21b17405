"""Fixture cases for the ranker-model crate (group "ranker"): the whole model, forward and
gradients, and a PyTorch-trained-style export that Rust must load and score identically."""

import copy
import os

import torch
from safetensors.torch import save_file

from .fixture import emit_case, randn
from .ranker import Ranker, export

SEQ = {"max_len": 5, "num_action_types": 5, "action_dim": 2, "item_dim": 3, "num_layers": 2, "num_heads": 2,
       "ff_dim": 8, "dropout": 0.0, "num_output_positions": 1, "time_window_ms": 0.0}
FEATURES = {
    "dense": [{"name": "age"}, {"name": "price", "missing_indicator": True}],
    "sparse": [{"name": "country", "cardinality": 10, "dim": 3}, {"name": "topic", "cardinality": 7, "dim": 2, "oov": "hash"}],
    "embedding": [{"name": "pin", "dim": 6, "projection": 3}],
}
TASKS = [{"name": "save"}, {"name": "click"}, {"name": "closeup", "tower": {"dims": [3]}}, {"name": "hide", "weight": 0.5}]

# pinterest-homefeed at reduced widths: parallel MaskNet (3 blocks, ratio 2.0) then 4 full-rank DCNv2.
HOMEFEED = {
    "features": FEATURES, "sequence": SEQ, "input_skip": False,
    "backbone": [{"type": "parallel_masknet", "config": {"num_blocks": 3, "block": {"output_dim": 6}}},
                 {"type": "crossnet", "config": {"num_layers": 4, "layer": {"type": "full_rank"}}}],
    "mlp": {"dims": [8, 4]}, "tasks": TASKS,
}
# pinterest-baseline at reduced widths: 4 DCNv2 with the input skip.
BASELINE = {
    "features": FEATURES, "sequence": SEQ, "input_skip": True,
    "backbone": [{"type": "crossnet", "config": {"num_layers": 4, "layer": {"type": "full_rank"}}}],
    "mlp": {"dims": [8, 4]}, "tasks": TASKS,
}

# The peer variants end to end: TransAct's public-code options and torch.nn.TransformerEncoder's
# (GELU, bias=False, final norm) in the sequence encoder, Twitter's per-block MaskNet with int()
# truncation of the aggregation width.
PEER_VARIANTS = {
    "features": FEATURES, "input_skip": False,
    "sequence": {**SEQ, "num_heads": 1, "fusion": "none", "max_pool": "all_positions", "future_mask": "after",
                 "action_vocab": [2, 1, 4, 3], "all_output_positions": True, "num_output_positions": 0,
                 "activation": "gelu", "bias": False, "final_norm": True},
    "backbone": [{"type": "parallel_masknet", "config": {"blocks": [
        {"output_dim": 6, "projection_ratio": 1.25, "aggregation_rounding": "truncate", "hidden_bias": True,
         "activation": "identity"},
        {"output_dim": 4, "projection_ratio": 0.5, "aggregation_rounding": "truncate", "input_layer_norm": True}]}}],
    "mlp": {"dims": [8, 4]}, "tasks": TASKS,
}


def make_inputs(gen, b):
    s = SEQ["max_len"]
    lengths = [1 + int(torch.randint(0, s, (1,), generator=gen)) for _ in range(b)]
    types = torch.zeros(b, s, dtype=torch.int64)
    stamps = torch.zeros(b, s, dtype=torch.int64)
    for i, n in enumerate(lengths):
        types[i, :n] = torch.randint(1, SEQ["num_action_types"], (n,), generator=gen)
        stamps[i, :n] = 1_000_000 - 60_000 * torch.arange(1, n + 1)
    dense = randn(gen, b, 2, scale=3.0)
    dense[0, 1] = float("nan")  # a missing value: replaced by 0, flagged by the indicator column
    return {
        "dense": dense,
        "sparse.country.ids": torch.randint(0, 12, (b,), generator=gen),  # 10 and 11: out of vocabulary
        "sparse.country.offsets": torch.arange(b),
        "sparse.topic.ids": torch.randint(0, 20, (b,), generator=gen),
        "sparse.topic.offsets": torch.arange(b),
        "embedding.pin": randn(gen, b, 6),
        "seq.action_types": types,
        "seq.item_embeddings": randn(gen, b, s, SEQ["item_dim"]),
        "seq.timestamps": stamps,
        "seq.request_time": torch.full((b,), 1_000_000, dtype=torch.int64),
        "seq.candidate": randn(gen, b, SEQ["item_dim"]),
    }


def generate(out_dir):
    cases = [("homefeed_small", HOMEFEED), ("baseline_small", BASELINE), ("peer_variants_small", PEER_VARIANTS)]
    for seed, (case, config) in enumerate(cases):
        # Training mode (BatchNorm batch statistics), dropout 0 and no time window: deterministic.
        emit_case(out_dir, "ranker", case, 6000 + seed, layer="Ranker", config=config, module=Ranker(config),
                  make_inputs=lambda gen: make_inputs(gen, 6), forward=lambda m, i: m(i))

    # "Train in PyTorch, serve in Rust": a model with trained-looking BatchNorm statistics, exported
    # as a rankstack checkpoint, plus eval-mode probabilities for a batch.
    gen = torch.Generator().manual_seed(7000)
    model = Ranker(copy.deepcopy(HOMEFEED))
    from .fixture import init_params
    init_params(model, gen)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model({k: (v.float() if v.is_floating_point() else v) for k, v in make_inputs(gen, 8).items()})
        model.eval()
        inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in make_inputs(gen, 5).items()}
        probabilities = torch.sigmoid(model(inputs))
    path = os.path.join(out_dir, "ranker", "exported_homefeed_small")
    export(model, path)
    save_file({**{f"input.{k}": v.contiguous() for k, v in inputs.items()}, "probabilities": probabilities.contiguous()},
              os.path.join(path, "expected.safetensors"))
