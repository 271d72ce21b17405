"""Fixture cases from torchrec's own cross networks (group "torchrec").

Each case seeds one of torchrec's `CrossNet`, `LowRankCrossNet`, `LowRankMixtureCrossNet`,
`VectorCrossNet` (run unmodified, from the pinned torchrec package) and writes
  fixtures/torchrec/<case>.safetensors              the usual fixture (fixture.py) with the torchrec
                                                   module's parameters and gradients under torchrec's
                                                   names; metadata: the importer (`peer`) and the
                                                   rankstack config that reproduces the module,
  fixtures/torchrec/state_dicts/<case>.safetensors  `save_file(module.state_dict(), path)` in float32:
                                                   the file a user hands to `rankstack import`.

torchrec 1.9.2's package `__init__` imports fbgemm_gpu, whose only release (1.9.0) is built for
torch 2.14 and does not load beside the pinned torch 2.15 (undefined symbol). The cross networks
need nothing but torch, so `torchrec/modules/crossnet.py` is loaded from the installed package by
path, without running the package `__init__`.
"""

import importlib.metadata
import importlib.util
import os

import torch
from safetensors.torch import save_file

from .fixture import emit_case, randn

TORCHREC_VERSION = "1.9.2"


def torchrec_crossnet():
    """torchrec's `modules/crossnet.py`, from the installed (pinned) torchrec."""
    version = importlib.metadata.version("torchrec")
    if version != TORCHREC_VERSION:
        raise RuntimeError(f"torchrec {version} installed, the fixtures pin {TORCHREC_VERSION}")
    spec = importlib.util.find_spec("torchrec")  # locates the package without importing it
    path = os.path.join(spec.submodule_search_locations[0], "modules", "crossnet.py")
    module_spec = importlib.util.spec_from_file_location("torchrec_modules_crossnet", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def low(r):
    return {"type": "low_rank", "rank": r}


def mix(r, e):
    return {"type": "mixture", "rank": r, "num_experts": e, "activation": "relu", "shared_gates": True}


# (case, importer (`rankstack import --from`), torchrec class, its keyword arguments, batch, N, rankstack config)
CASES = [
    ("crossnet_b4_d6_l3", "torchrec-crossnet", "CrossNet", {"num_layers": 3}, 4, 6,
     {"num_layers": 3, "layer": {"type": "full_rank"}}),
    ("crossnet_b1_d1_l1", "torchrec-crossnet", "CrossNet", {"num_layers": 1}, 1, 1,
     {"num_layers": 1, "layer": {"type": "full_rank"}}),
    ("lowrank_r2_b4_d8_l2", "torchrec-lowrank", "LowRankCrossNet", {"num_layers": 2, "low_rank": 2}, 4, 8,
     {"num_layers": 2, "layer": low(2)}),
    ("mixture_e3_r2_b4_d6_l2", "torchrec-mixture", "LowRankMixtureCrossNet",
     {"num_layers": 2, "num_experts": 3, "low_rank": 2}, 4, 6, {"num_layers": 2, "layer": mix(2, 3)}),
    ("mixture_e1_r3_b3_d5_l2", "torchrec-mixture", "LowRankMixtureCrossNet",
     {"num_layers": 2, "num_experts": 1, "low_rank": 3}, 3, 5, {"num_layers": 2, "layer": mix(3, 1)}),
    ("vector_b4_d7_l3", "torchrec-crossnet", "VectorCrossNet", {"num_layers": 3}, 4, 7,
     {"num_layers": 3, "layer": {"type": "vector"}}),
]


def generate(out_dir):
    crossnet = torchrec_crossnet()
    for seed, (case, peer, cls, kwargs, b, d, config) in enumerate(CASES):
        module = getattr(crossnet, cls)(in_features=d, **kwargs)
        emit_case(out_dir, "torchrec", case, 7000 + seed, layer="CrossNet", config=config, module=module,
                  make_inputs=lambda gen: {"x": randn(gen, b, d)}, forward=lambda m, i: m(i["x"]),
                  extra_meta={"input_dim": d, "peer": peer, "torchrec_class": cls, "torchrec": TORCHREC_VERSION})
        # emit_case turned the module to float64 for the reference run; a user's file is float32.
        state = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
        path = os.path.join(out_dir, "torchrec", "state_dicts")
        os.makedirs(path, exist_ok=True)
        save_file(state, os.path.join(path, f"{case}.safetensors"))
