"""Fixture cases for the masknet crate (group "masknet")."""

import torch

from .fixture import emit_case, randn
from .masknet import MaskBlock, ParallelMaskNet, SerialMaskNet


def block(q, **kw):
    b = {"output_dim": q}
    b.update(kw)
    return b


# (case, batch, m, z, block config, input scale)
BLOCK_CASES = [
    ("block_b4_m6_q5", 4, 6, 6, block(5), 1.0),
    ("block_b3_m6_z4_agg7_bias_inln_identity", 3, 6, 4,
     block(5, aggregation_dim=7, hidden_bias=True, input_layer_norm=True, activation="identity"), 1.0),
    ("block_b1_m1_z1_q3", 1, 1, 1, block(3), 1.0),
    ("block_b2_m5_ratio1.5_q4", 2, 5, 5, block(4, projection_ratio=1.5), 1.0),
    ("block_large_b4_m8_q6", 4, 8, 8, block(6), 1e3),
    # Twitter's recap MaskBlock: int() truncation of the aggregation width (1.25 x 10 = 12, not 13),
    # bias on the hidden projection, no activation after the LayerNorm.
    ("block_twitter_truncate_b3_m10_rf1.25_bias_identity", 3, 10, 10,
     block(6, projection_ratio=1.25, aggregation_rounding="truncate", hidden_bias=True, activation="identity"), 1.0),
]

# (case, batch, m, config)
PARALLEL_CASES = [
    ("parallel_u3_b3_m10_q8", 3, 10, {"num_blocks": 3, "block": block(8, projection_ratio=2.0), "top_mlp": None}),
    ("parallel_u2_b4_m6_q4_top_mlp", 4, 6, {"num_blocks": 2, "block": block(4),
     "top_mlp": {"dims": [5, 3], "activation": "relu", "activate_last": False, "normalization": "layer_norm", "dropout": 0.0}}),
    ("parallel_u1_b1_m1_q2", 1, 1, {"num_blocks": 1, "block": block(2), "top_mlp": None}),
    # Per-block configs (Twitter's `mask_blocks` list): different widths, ratios, rounding, norms.
    ("parallel_per_block_twitter_b3_m10", 3, 10, {"blocks": [
        block(6, projection_ratio=1.25, aggregation_rounding="truncate", hidden_bias=True, activation="identity",
              input_layer_norm=True),
        block(4, aggregation_dim=5),
        block(3, projection_ratio=0.75, aggregation_rounding="truncate", hidden_bias=True, activation="identity")],
        "top_mlp": None}),
    ("parallel_per_block_top_mlp_b2_m6", 2, 6, {"blocks": [block(4), block(2, projection_ratio=1.5)],
     "top_mlp": {"dims": [3], "activation": "relu", "activate_last": False, "normalization": "none", "dropout": 0.0}}),
]

SERIAL_CASES = [
    ("serial_3_b4_m8", 4, 8, {"blocks": [block(6), block(5, hidden_bias=True), block(4, activation="identity")]}),
    ("serial_2_b2_m4_inln", 2, 4, {"blocks": [block(4, input_layer_norm=True), block(3, input_layer_norm=True)]}),
]


def generate(out_dir):
    for seed, (case, b, m, z, cfg, x_scale) in enumerate(BLOCK_CASES):
        emit_case(out_dir, "masknet", case, 3000 + seed, layer="MaskBlock", config=cfg, module=MaskBlock(m, z, cfg),
                  make_inputs=lambda gen: {"mask_input": randn(gen, b, m, scale=x_scale),
                                           "hidden_input": randn(gen, b, z, scale=x_scale)},
                  forward=lambda mod, i: mod(i["mask_input"], i["hidden_input"]),
                  extra_meta={"mask_input_dim": m, "hidden_input_dim": z})
    networks = [(3000 + 1000, "ParallelMaskNet", ParallelMaskNet, PARALLEL_CASES),
                (3000 + 2000, "SerialMaskNet", SerialMaskNet, SERIAL_CASES)]
    for base_seed, layer, cls, cases in networks:
        for seed, (case, b, m, cfg) in enumerate(cases):
            emit_case(out_dir, "masknet", case, base_seed + seed, layer=layer, config=cfg, module=cls(m, cfg),
                      make_inputs=lambda gen: {"x": randn(gen, b, m)}, forward=lambda mod, i: mod(i["x"]),
                      extra_meta={"input_dim": m})
