"""Fixture cases for the sequence-transformer crate (group "sequence_transformer").

Metadata `mode` is "train" (dropout 0 so the result is deterministic) or "eval". Train cases pass an
explicit per-example time window `input.window_ms` (int64): the random draw itself is tested in Rust
for reproducibility; the reference checks the masking it implies.

The `transact_*` cases cover the options that reproduce TransAct's public code (max-pool over all
positions, the strict future mask with actions at exactly the request time, raw ids through an
`action_vocab` with unknown ids, no candidate fusion, no max-pool, every position in the output) and
the `encoder_*` cases the torch.nn.TransformerEncoder options (GELU, bias=False, a final norm).
Group "transformer_encoder" runs torch.nn.TransformerEncoder itself with a caller's `src_mask`
(additive [S, S] or [B*H, S, S], or boolean as int64, non-zero = not allowed) and an optional
`src_key_padding_mask` (int64, 1 = padded).
"""

import torch
from torch import nn

from .fixture import emit_case, init_params, randn, write_fixture
from .sequence_transformer import SequenceTransformer

REQUEST = 1_700_000_000_000  # ms


def small(**kw):
    c = {"max_len": 6, "num_action_types": 5, "action_dim": 4, "item_dim": 3, "num_layers": 2, "num_heads": 2,
         "ff_dim": 8, "dropout": 0.0, "num_output_positions": 3, "time_window_ms": 1000.0}
    c.update(kw)
    return c


def sequences(gen, b, s_in, e, lengths, future=(), one_valid_at=None, vocab=None, unknown=(), padded_items=False,
              age_unit_ms=1):
    """Newest-first sequences: lengths[i] real actions then padding; ages grow with position."""
    types = torch.zeros(b, s_in, dtype=torch.int64)
    ts = torch.zeros(b, s_in, dtype=torch.int64)
    req = torch.full((b,), REQUEST, dtype=torch.int64) + torch.randint(0, 10_000, (b,), generator=gen)
    for i in range(b):
        n = lengths[i]
        types[i, :n] = torch.randint(1, 5, (n,), generator=gen)
        ages = torch.cumsum(torch.randint(50, 400, (n,), generator=gen), 0) * age_unit_ms
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
    if not padded_items:
        items = items * (types > 0)[:, :, None]  # padded positions carry zero embeddings
    if vocab is not None:  # types 1.. become raw ids vocab[type - 1]; some ids are not in the vocab
        raw = torch.tensor([0] + list(vocab), dtype=torch.int64)
        types = raw[types]
        for (i, j, rid) in unknown:
            types[i, j] = rid
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
    # TransAct's public code: pool over every position, strict future mask (actions at exactly the
    # request time stay visible), raw action ids through a vocabulary (unknown ids become padding).
    # Pool-all cases give padded positions random item embeddings: identical padded tokens would
    # tie in the max, and which of the tied positions PyTorch's float rounding favours (its
    # gradient goes to the first maximum) is arbitrary.
    ("transact_pool_all_strict_mask_vocab_eval_b4_s6",
     small(max_pool="all_positions", future_mask="after", action_vocab=[7, 3, 11, 42]), 4, 6, "eval",
     {"lengths": [6, 4, 2, 5], "future": [(0, 2), (1, 1), (3, 4)], "vocab": [7, 3, 11, 42],
      "unknown": [(0, 3, 99), (2, 1, -5), (3, 2, 5)], "padded_items": True}),
    ("transact_pool_all_strict_mask_train_window_b3_s5",
     small(max_len=5, max_pool="all_positions", future_mask="after", num_output_positions=2), 3, 5, "train",
     {"lengths": [5, 3, 1], "future": [(0, 2), (1, 2)], "window": [300, 0, 900], "padded_items": True}),
    ("transact_no_candidate_no_pool_all_positions_b3_s4",
     small(max_len=4, item_dim=4, fusion="none", max_pool="none", all_output_positions=True, num_output_positions=0),
     3, 4, "eval", {"lengths": [4, 2, 1]}),
    ("transact_no_candidate_all_positions_pool_all_train_b2_s3",
     small(max_len=3, item_dim=4, fusion="none", max_pool="all_positions", all_output_positions=True,
           num_output_positions=3), 2, 3, "train", {"lengths": [3, 1], "window": [200, 0], "padded_items": True}),
    # TransAct's per-batch window: one whole number of days for the batch (here 2 days; actions 8 h
    # to 67 h apart, so it masks the recent ones).
    ("transact_per_batch_day_window_train_b3_s6",
     small(time_window_sampling="per_batch_days", time_window_ms=3 * 86_400_000.0), 3, 6, "train",
     {"lengths": [6, 5, 3], "window": [2 * 86_400_000] * 3, "age_unit_ms": 600_000}),
    # torch.nn.TransformerEncoder options inside TransAct.
    ("encoder_gelu_no_bias_final_norm_train_b3_s5",
     small(max_len=5, activation="gelu", bias=False, final_norm=True), 3, 5, "train",
     {"lengths": [5, 3, 2], "window": [400, 0, 100]}),
    ("encoder_gelu_prenorm_final_norm_eval_b2_s4",
     small(max_len=4, activation="gelu", norm_first=True, final_norm=True), 2, 4, "eval", {"lengths": [4, 3]}),
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
                           opts.get("one_valid_at"), opts.get("vocab"), opts.get("unknown", ()),
                           opts.get("padded_items", False), opts.get("age_unit_ms", 1))
        if "window" in opts:
            inputs["window_ms"] = torch.tensor(opts["window"], dtype=torch.int64)
        write_fixture(out_dir, "sequence_transformer", case, layer="SequenceTransformer", config=config,
                      module=module, inputs=inputs, forward=lambda m, i: m(i), seed=seed, extra_meta={"mode": mode})


def encoder_config(**kw):
    c = {"d_model": 8, "num_layers": 2, "num_heads": 2, "ff_dim": 12, "dropout": 0.0, "norm_first": False,
         "layer_norm_eps": 1e-5, "activation": "relu", "bias": True, "final_norm": False}
    c.update(kw)
    return c


def torch_encoder(c):
    layer = nn.TransformerEncoderLayer(c["d_model"], c["num_heads"], dim_feedforward=c["ff_dim"], dropout=c["dropout"],
                                       activation=c["activation"], layer_norm_eps=c["layer_norm_eps"], batch_first=True,
                                       norm_first=c["norm_first"], bias=c["bias"])
    norm = nn.LayerNorm(c["d_model"], eps=c["layer_norm_eps"], bias=c["bias"]) if c["final_norm"] else None
    return nn.TransformerEncoder(layer, c["num_layers"], norm=norm, enable_nested_tensor=False)


def additive_mask(gen, shape, forbid_above_diagonal):
    """Finite biases, with -inf above the diagonal if asked (every query keeps key 0 and itself)."""
    m = randn(gen, *shape)
    if forbid_above_diagonal:
        s = shape[-1]
        m = m.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return m


def causal_bool(s):
    return torch.ones(s, s, dtype=torch.int64).triu(1)


def key_padding(b, s, lengths):
    return torch.stack([(torch.arange(s) >= n).to(torch.int64) for n in lengths])


# (case, config, batch, seq, mode, src_mask kind, key padding lengths or None)
ENCODER_CASES = [
    ("additive_2d_src_mask_key_padding_b3_s5", encoder_config(), 3, 5, "eval", "additive_2d", [5, 3, 4]),
    ("bool_causal_gelu_no_bias_final_norm_prenorm_train_b2_s4",
     encoder_config(activation="gelu", bias=False, final_norm=True, norm_first=True), 2, 4, "train", "bool_causal", None),
    ("additive_3d_per_head_b2_s3", encoder_config(num_layers=1), 2, 3, "eval", "additive_3d", None),
    ("bool_causal_key_padding_relu_b2_s5", encoder_config(num_heads=1), 2, 5, "eval", "bool_causal", [5, 2]),
]


def encoder_forward(m, i):
    mask = i["src_mask"]
    mask = mask.bool() if not mask.is_floating_point() else mask
    kpm = i["key_padding"].bool() if "key_padding" in i else None
    if kpm is not None and mask.is_floating_point():
        kpm = torch.zeros(kpm.shape, dtype=mask.dtype).masked_fill(kpm, float("-inf"))
    return m(i["x"], mask=mask, src_key_padding_mask=kpm)


def generate_encoder(out_dir):
    for seed, (case, c, b, s, mode, kind, lengths) in enumerate(ENCODER_CASES):
        def make_inputs(gen, b=b, s=s, c=c, kind=kind, lengths=lengths):
            inputs = {"x": randn(gen, b, s, c["d_model"])}
            if kind == "additive_2d":
                inputs["src_mask"] = additive_mask(gen, (s, s), True)
            elif kind == "additive_3d":
                inputs["src_mask"] = additive_mask(gen, (b * c["num_heads"], s, s), False)
            else:
                inputs["src_mask"] = causal_bool(s)
            if lengths is not None:
                inputs["key_padding"] = key_padding(b, s, lengths)
            return inputs
        module = torch_encoder(c)
        module.train(mode == "train")
        emit_case(out_dir, "transformer_encoder", case, 7500 + seed, layer="TransformerEncoder", config=c,
                  module=module, make_inputs=make_inputs, forward=encoder_forward, extra_meta={"mode": mode})
