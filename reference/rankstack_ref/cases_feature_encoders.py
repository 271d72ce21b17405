"""Fixture cases for the feature-encoders crate (group "feature_encoders").

Metadata `mode` is "train" or "eval". Tensors beyond the standard ones:
  initial_buffer.<name>  buffer values before the forward pass (set them before running);
  extra.fit_data         the sample the dense z-score statistics are fitted on (call fit first).
`buffer.<name>` holds the buffers after the forward pass (train mode updates BatchNorm's).
"""

import torch

from .feature_encoders import FeatureEncoder
from .fixture import init_params, randn, round_to_f32, write_fixture

SPARSE = [
    # single-valued, reserved OOV row, default width (16 -> 12)
    {"name": "country", "cardinality": 16},
    # multi-valued mean bags with a padding id; empty bags occur
    {"name": "topics", "cardinality": 50, "pooling": "mean", "padding_id": 0},
    # hashed OOV, width override, no L2 normalisation
    {"name": "hashed", "cardinality": 7, "oov": "hash", "dim": 5, "normalize": False},
    # sum bags, reserved OOV row
    {"name": "boards", "cardinality": 30, "oov": "reserved"},
]
EMBEDDING = [
    {"name": "pin", "dim": 12, "projection": 6},
    {"name": "user", "dim": 5},
    {"name": "query", "dim": 4, "projection": 3, "projection_bias": False, "normalize": False},
]
DENSE = [{"name": "age"}, {"name": "ctr", "missing_indicator": True}, {"name": "count"},
         {"name": "score", "missing_indicator": True}]
EXTRA = [{"name": "sequence", "dim": 3}]


def full_schema(pipeline=None):
    s = {"dense": DENSE, "sparse": SPARSE, "embedding": EMBEDDING, "extra": EXTRA}
    if pipeline is not None:
        s["dense_pipeline"] = pipeline
    return s


def dense_values(gen, b, n, non_finite=True):
    # Heavy-tailed values (counts up to ~1e4) plus NaN / +inf / -inf entries.
    x = torch.randn(b, n, generator=gen, dtype=torch.float64)
    x = x * torch.exp(3.0 * torch.rand(b, n, generator=gen, dtype=torch.float64))
    x[:, min(2, n - 1)] = torch.floor(torch.rand(b, generator=gen, dtype=torch.float64) * 1e4)
    if non_finite:
        x[0, 1 % n] = float("nan")
        x[min(2, b - 1), 3 % n] = float("inf")
        x[min(1, b - 1), 0] = float("-inf")
        x[min(3, b - 1), 1 % n] = float("nan")
    return round_to_f32(x)


def bags(gen, b, f, max_len, empty=(), padding_only=()):
    """Random bags with ids in [0, 1.5 * cardinality) (so OOV ids occur)."""
    ids, offsets = [], []
    for i in range(b):
        offsets.append(len(ids))
        if i in empty:
            continue
        if i in padding_only:
            ids.extend([f["padding_id"]] * 2)
            continue
        n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
        bag = torch.randint(0, int(1.5 * f["cardinality"]), (n,), generator=gen).tolist()
        if f.get("padding_id") is not None and n > 1:
            bag[-1] = f["padding_id"]
        ids.extend(bag)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def make_inputs(gen, schema, b, empty_bags=(), padding_only=()):
    inputs = {}
    if schema.get("dense"):
        inputs["dense"] = dense_values(gen, b, len(schema["dense"]))
    for f in schema.get("sparse", []):
        single = f["name"] == "country"
        ids, offsets = bags(gen, b, f, 1 if single else 4,
                            empty=() if single else empty_bags,
                            padding_only=padding_only if f.get("padding_id") is not None else ())
        inputs[f"sparse.{f['name']}.ids"] = ids
        inputs[f"sparse.{f['name']}.offsets"] = offsets
    for f in schema.get("embedding", []):
        inputs[f"embedding.{f['name']}"] = randn(gen, b, f["dim"])
    for f in schema.get("extra", []):
        inputs[f"extra.{f['name']}"] = randn(gen, b, f["dim"])
    return inputs


def randomise_running_stats(module, gen):
    if hasattr(module, "dense") and hasattr(module.dense, "batch_norm"):
        bn = module.dense.batch_norm
        with torch.no_grad():
            bn.running_mean.copy_(randn(gen, *bn.running_mean.shape, scale=0.5))
            bn.running_var.copy_(round_to_f32(0.5 + torch.rand(bn.running_var.shape, generator=gen, dtype=torch.float64)))
            bn.num_batches_tracked.fill_(7)


# (case, schema, batch, mode, options)
CASES = [
    ("full_default_train_b6", full_schema(), 6, "train", {"empty_bags": (2,), "padding_only": (4,)}),
    ("full_default_eval_b5", full_schema(), 5, "eval", {"empty_bags": (0, 3)}),
    ("full_bn_momentum_train_b4", full_schema({"batch_norm_momentum": 0.3, "batch_norm_eps": 1e-3, "clamp_value": 1.5}),
     4, "train", {}),
    ("dense_standardize_fit_eval_b5", {"dense": DENSE, "dense_pipeline": {"standardize": True, "batch_norm": False, "clamp_value": 2.0}},
     5, "eval", {"fit": 20}),
    ("dense_standardize_bn_fit_train_b4", {"dense": DENSE, "dense_pipeline": {"standardize": True}}, 4, "train", {"fit": 16}),
    ("dense_no_log_no_clamp_train_b3", {"dense": DENSE[:2], "dense_pipeline": {"signed_log1p": False, "clamp": False}},
     3, "train", {}),
    ("sparse_only_empty_and_padding_bags_b5", {"sparse": SPARSE[1:]}, 5, "eval", {"empty_bags": (0, 2), "padding_only": (3,)}),
    ("embedding_and_extra_b1", {"embedding": EMBEDDING, "extra": EXTRA}, 1, "eval", {}),
]


def generate(out_dir):
    for seed, (case, schema, b, mode, opts) in enumerate(CASES):
        seed = 5000 + seed
        gen = torch.Generator().manual_seed(seed)
        module = FeatureEncoder(schema)
        init_params(module, gen)
        module.zero_padding_rows()
        module = module.double()
        extra = {}
        if "fit" in opts:
            data = dense_values(gen, opts["fit"], len(schema["dense"]))
            module.dense.fit(data)
            extra["extra.fit_data"] = data
        if mode == "eval":
            randomise_running_stats(module, gen)
        for name, buf in module.named_buffers():
            if "batch_norm" in name:
                extra[f"initial_buffer.{name}"] = buf.clone()
        module.train(mode == "train")
        inputs = make_inputs(gen, schema, b, opts.get("empty_bags", ()), opts.get("padding_only", ()))
        write_fixture(out_dir, "feature_encoders", case, layer="FeatureEncoder", config=schema, module=module,
                      inputs=inputs, forward=lambda m, i: m(i), seed=seed, extra_meta={"mode": mode},
                      extra_tensors=extra)
