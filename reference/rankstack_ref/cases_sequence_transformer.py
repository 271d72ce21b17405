"""Fixture cases for the sequence-transformer crate (group "sequence_transformer").

Metadata `mode` is "train" (dropout 0 so the result is deterministic) or "eval". Train cases pass an
explicit per-example time window `input.window_ms` (int64): the random draw itself is tested in Rust
for reproducibility; the reference checks the masking it implies.
"""

import torch

from .fixture import init_params, randn, write_fixture
from .sequence_transformer import SequenceTransformer

REQUEST = 1_700_000_000_000  # ms


def small(**kw):
    c = {"max_len": 6, "num_action_types": 5, "action_dim": 4, "item_dim": 3, "num_layers": 2, "num_heads": 2,
         "ff_dim": 8, "dropout": 0.0, "num_output_positions": 3, "time_window_ms": 1000.0}
    c.update(kw)
    return c


def sequences(gen, b, s_in, e, lengths, future=(), one_valid_at=None):
    """Newest-first sequences: lengths[i] real actions then padding; ages grow with position."""
    types = torch.zeros(b, s_in, dtype=torch.int64)
    ts = torch.zeros(b, s_in, dtype=torch.int64)
    req = torch.full((b,), REQUEST, dtype=torch.int64) + torch.randint(0, 10_000, (b,), generator=gen)
    for i in range(b):
        n = lengths[i]
        types[i, :n] = torch.randint(1, 5, (n,), generator=gen)
        ages = torch.cumsum(torch.randint(50, 400, (n,), generator=gen), 0)
        ts[i, :n] = req[i] - ages
    for (i, j) in future:  # actions at or after the request time
        ts[i, j] = req[i] + (0 if j % 2 == 0 else 25)
    if one_valid_at is not None:
        for i, j in enumerate(one_valid_at):
            types[i] = 0
            types[i, j] = 2 + i % 3
            for p in range(j):  # positions before the valid one: future actions
                types[i, p] = 1
                ts[i, p] = req[i] + 10
    items = randn(gen, b, s_in, e)
    items = items * (types > 0)[:, :, None]  # padded positions carry zero embeddings
    return {"action_types": types, "item_embeddings": items, "timestamps": ts, "request_time": req,
            "candidate": randn(gen, b, e)}


# (case, config, batch, s_in, mode, options)
CASES = [
    ("concat_train_window_b4_s6", small(), 4, 6, "train",
     {"lengths": [6, 4, 2, 5], "future": [(3, 1)], "window": [300, 0, 900, 120]}),
    ("concat_eval_padding_heavy_b5_s8", small(max_len=8, num_output_positions=4), 5, 8, "eval",
     {"lengths": [1, 2, 0, 3, 1], "future": [(3, 0)]}),
    ("concat_eval_one_valid_action_b4_s5", small(max_len=5), 4, 5, "eval",
     {"lengths": [0, 0, 0, 0], "one_valid_at": [0, 0, 2, 1]}),
    ("append_prenorm_learned_pos_train_b3_s5",
     small(max_len=5, fusion="append", item_dim=4, norm_first=True, positional="learned", num_output_positions=2), 3, 5, "train",
     {"lengths": [5, 3, 1], "window": [500, 2000, 50]}),
    ("append_eval_b2_s4", small(max_len=4, fusion="append", item_dim=4, num_output_positions=4), 2, 4, "eval",
     {"lengths": [4, 2]}),
    ("truncate_long_input_b3_s4_in7", small(max_len=4, num_output_positions=2), 3, 7, "eval",
     {"lengths": [7, 5, 2]}),
    ("pad_short_input_b3_s6_in3", small(max_len=6, num_output_positions=4), 3, 3, "eval",
     {"lengths": [3, 1, 2]}),
    ("one_layer_one_head_k0_b2_s3", small(max_len=3, num_layers=1, num_heads=1, num_output_positions=0), 2, 3, "eval",
     {"lengths": [3, 2]}),
]


def generate(out_dir):
    for seed, (case, config, b, s_in, mode, opts) in enumerate(CASES):
        seed = 7000 + seed
        gen = torch.Generator().manual_seed(seed)
        module = SequenceTransformer(config)
        init_params(module, gen)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if ".norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + randn(gen, *p.shape, scale=0.1))
            module.action_emb.weight[0] = 0.0
        module.train(mode == "train")
        inputs = sequences(gen, b, s_in, config["item_dim"], opts["lengths"], opts.get("future", ()),
                           opts.get("one_valid_at"))
        if "window" in opts:
            inputs["window_ms"] = torch.tensor(opts["window"], dtype=torch.int64)
        write_fixture(out_dir, "sequence_transformer", case, layer="SequenceTransformer", config=config,
                      module=module, inputs=inputs, forward=lambda m, i: m(i), seed=seed, extra_meta={"mode": mode})
