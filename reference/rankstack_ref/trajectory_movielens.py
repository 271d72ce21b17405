"""A long lock-step trajectory on real data, outside CI: the reference Ranker trained for N steps
(default 200) on MovieLens batches, from Xavier-normal weights, in float64 and in float32, written
in the trajectory fixture layout (cases_trajectory.py) for `tests/trajectory.rs`'s ignored
`movielens_trajectory` test to replay in rankstack (docs/trajectory.md):

    python -m rankstack_ref.trajectory_movielens --config data/results/configs/pinterest-homefeed.json \\
        --train data/movielens/train.parquet --out data/trajectory/pinterest-homefeed.safetensors

Dropout and the random time window are switched off (rankstack draws them from its own generator),
every other part of the results recipe is kept: AdamW (lr 2e-3, weight decay 0.01), 50 warm-up
steps then cosine decay to 10% over the N steps, clipping at 1.0, dense embedding updates.
"""

import argparse
import copy
import json
import os

import torch

from . import trajectory
from .fixture import round_to_f32
from .ranker import Ranker
from .train import load, take, xavier_normal_init


def deterministic(config):
    """The config with dropout and the training-time window off."""
    config = copy.deepcopy(config)

    def walk(x):
        if isinstance(x, dict):
            for k in x:
                if k == "dropout":
                    x[k] = 0.0
                else:
                    walk(x[k])
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(config)
    if config.get("sequence"):
        config["sequence"]["time_window_ms"] = 0.0
    return config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    config = deterministic(json.load(open(a.config)))
    model = xavier_normal_init(Ranker(copy.deepcopy(config)))
    with torch.no_grad():  # padding rows start at zero, as rankstack makes them
        model.features.zero_padding_rows()
        if model.sequence is not None:
            model.sequence.action_emb.weight[0] = 0.0
    params = {k: round_to_f32(v.detach().double()) for k, v in model.named_parameters()}
    x, y, n = load(a.train, config)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed))
    batches = [(take(x, perm[t * a.batch_size:(t + 1) * a.batch_size]), y[perm[t * a.batch_size:(t + 1) * a.batch_size]])
               for t in range(a.steps)]
    recipe = {"lr": 2e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "warmup": 50,
              "total": a.steps, "min_lr_ratio": 0.1, "clip": 1.0, "lazy": False}
    trajectory.write(a.out, os.path.basename(a.out), config, params, batches, recipe)

if __name__ == "__main__":
    main()
