"""Fixture cases for the dcnv2 crate (group "dcnv2")."""

import torch

from .dcnv2 import CrossNet, ParallelCrossNet
from .fixture import emit_case, randn

FULL = {"type": "full_rank"}
VECTOR = {"type": "vector"}


def low(r):
    return {"type": "low_rank", "rank": r}


def mix(r, e, act="relu", shared_gates=False):
    return {"type": "mixture", "rank": r, "num_experts": e, "activation": act, "shared_gates": shared_gates}


# (case, batch, d, config, input scale, weight scale)
CROSS_CASES = [
    ("full_rank_b4_d8_l3", 4, 8, {"num_layers": 3, "layer": FULL}, 1.0, 1.0),
    ("full_rank_b1_d1_l2", 1, 1, {"num_layers": 2, "layer": FULL}, 1.0, 1.0),
    ("full_rank_b5_d16_l4", 5, 16, {"num_layers": 4, "layer": FULL}, 1.0, 0.5),
    # 20 stacked layers: small weights keep the growth of x0 * (W x) bounded.
    ("full_rank_deep_b3_d6_l20", 3, 6, {"num_layers": 20, "layer": FULL}, 0.5, 0.2),
    ("full_rank_diag_b4_d8_l2", 4, 8, {"num_layers": 2, "layer": FULL, "diag_scale": 0.5}, 1.0, 1.0),
    # Inputs of magnitude up to 1e3.
    ("full_rank_large_b4_d8_l2", 4, 8, {"num_layers": 2, "layer": FULL}, 1e3, 1.0),
    ("low_rank_r1_b4_d8_l2", 4, 8, {"num_layers": 2, "layer": low(1)}, 1.0, 1.0),
    ("low_rank_r3_b2_d10_l3_diag", 2, 10, {"num_layers": 3, "layer": low(3), "diag_scale": 0.25}, 1.0, 1.0),
    ("low_rank_r1_b1_d1_l1", 1, 1, {"num_layers": 1, "layer": low(1)}, 1.0, 1.0),
    ("low_rank_deep_b2_d5_l20", 2, 5, {"num_layers": 20, "layer": low(2)}, 0.5, 0.3),
    ("mixture_e1_r2_relu_b4_d8_l2", 4, 8, {"num_layers": 2, "layer": mix(2, 1)}, 1.0, 1.0),
    ("mixture_e4_r3_relu_b4_d8_l2", 4, 8, {"num_layers": 2, "layer": mix(3, 4)}, 1.0, 1.0),
    ("mixture_e4_r2_tanh_b3_d6_l3_diag", 3, 6, {"num_layers": 3, "layer": mix(2, 4, "tanh"), "diag_scale": 0.3}, 1.0, 1.0),
    ("mixture_e1_r1_tanh_b1_d1_l2", 1, 1, {"num_layers": 2, "layer": mix(1, 1, "tanh")}, 1.0, 1.0),
    ("mixture_e3_r2_relu_shared_gates_b4_d6_l3", 4, 6, {"num_layers": 3, "layer": mix(2, 3, shared_gates=True)}, 1.0, 1.0),
    # Large inputs saturate the gate softmax: the max-shifted softmax must stay finite.
    ("mixture_e4_r2_relu_large_b4_d8_l1", 4, 8, {"num_layers": 1, "layer": mix(2, 4)}, 1e3, 1.0),
    # DCN-V1 (torchrec's VectorCrossNet): x0 (x^T w) + b + x.
    ("vector_b4_d8_l3", 4, 8, {"num_layers": 3, "layer": VECTOR}, 1.0, 1.0),
    ("vector_b1_d1_l2", 1, 1, {"num_layers": 2, "layer": VECTOR}, 1.0, 1.0),
    ("vector_deep_b3_d6_l12", 3, 6, {"num_layers": 12, "layer": VECTOR}, 0.5, 0.3),
]

# (case, batch, d, config)
PARALLEL_CASES = [
    ("parallel_concat_p2_low_rank_b3_d6", 3, 6, {"num_towers": 2, "combine": "concat", "tower": {"num_layers": 2, "layer": low(2)}}),
    ("parallel_mean_p3_full_rank_b4_d5", 4, 5, {"num_towers": 3, "combine": "mean", "tower": {"num_layers": 2, "layer": FULL}}),
]


def generate(out_dir):
    def one(case, seed, layer, module, b, d, config, x_scale=1.0, w_scale=1.0):
        emit_case(out_dir, "dcnv2", case, seed, layer=layer, config=config, module=module,
                  make_inputs=lambda gen: {"x": randn(gen, b, d, scale=x_scale)},
                  forward=lambda m, i: m(i["x"]), weight_scale=w_scale, extra_meta={"input_dim": d})

    for seed, (case, b, d, config, x_scale, w_scale) in enumerate(CROSS_CASES):
        one(case, 1000 + seed, "CrossNet", CrossNet(d, config), b, d, config, x_scale, w_scale)
    for seed, (case, b, d, config) in enumerate(PARALLEL_CASES):
        one(case, 2000 + seed, "ParallelCrossNet", ParallelCrossNet(d, config), b, d, config)
