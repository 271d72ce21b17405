"""The whole ranker, assembled from the reference layers and built from the same config document
(the Rust RankerConfig as a dict) as the Rust crate, with the same parameter names:

  e      = FeatureEncoder(features + [user_sequence = SequenceTransformer(sequence)])
  z      = stage_n(... stage_1(e))        parallel/serial MaskNet, CrossNet, ParallelCrossNet
  h      = Mlp(z), or Mlp([z, e]) with input_skip
  logits = [logit_t(tower_t(h))]_t
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .common import Mlp
from .dcnv2 import CrossNet, ParallelCrossNet
from .feature_encoders import FeatureEncoder
from .masknet import ParallelMaskNet, SerialMaskNet
from .sequence_transformer import SequenceTransformer, output_dim

SEQUENCE_BLOCK = "user_sequence"


class Head(nn.Module):
    def __init__(self, width, task):
        super().__init__()
        self.tower = Mlp(width, task["tower"]) if task.get("tower") else None
        out = task["tower"]["dims"][-1] if task.get("tower") else width
        self.logit = nn.Linear(out, 1)

    def forward(self, h):
        return self.logit(self.tower(h) if self.tower is not None else h)


def stage_output(stage, width):
    c = stage["config"]
    if stage["type"] == "parallel_masknet":
        if c.get("top_mlp"):
            return c["top_mlp"]["dims"][-1]
        if c.get("blocks"):
            return sum(b["output_dim"] for b in c["blocks"])
        return c["num_blocks"] * c["block"]["output_dim"]
    if stage["type"] == "serial_masknet":
        return c["blocks"][-1]["output_dim"]
    if stage["type"] == "crossnet":
        return width
    return width * c["num_towers"] if c.get("combine", "concat") == "concat" else width


def make_stage(stage, width):
    cls = {"parallel_masknet": ParallelMaskNet, "serial_masknet": SerialMaskNet,
           "crossnet": CrossNet, "parallel_crossnet": ParallelCrossNet}[stage["type"]]
    return cls(width, stage["config"])


class Ranker(nn.Module):
    """inputs: the FeatureEncoder's keys plus, with a sequence encoder, "seq.<name>" for the
    SequenceTransformer's inputs (with an item table: "seq.item_ids" [B, S] and "seq.candidate_id" [B]
    instead of "seq.item_embeddings" and "seq.candidate")."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        features = json.loads(json.dumps(config["features"]))
        if config.get("sequence") is not None:
            self.sequence = SequenceTransformer(config["sequence"])
            features.setdefault("extra", []).append({"name": SEQUENCE_BLOCK, "dim": output_dim(self.sequence.c)})
        else:
            self.sequence = None
        self.features = FeatureEncoder(features)
        items = config.get("item_embedding")
        if items is not None:
            # Learned item table for id sequences: row `id`, or the last row for ids >= cardinality.
            self.item_cardinality = items["cardinality"]
            self.item_embedding = nn.Embedding(items["cardinality"] + 1, config["sequence"]["item_dim"])
        width = self.encoded_width(features)
        encoded = width
        stages = []
        for stage in config.get("backbone", []):
            stages.append(make_stage(stage, width))
            width = stage_output(stage, width)
        self.backbone = nn.ModuleList(stages)
        self.input_skip = config.get("input_skip", False)
        self.mlp = Mlp(width + (encoded if self.input_skip else 0), config["mlp"])
        self.heads = nn.ModuleDict({t["name"]: Head(config["mlp"]["dims"][-1], t) for t in config["tasks"]})

    @staticmethod
    def encoded_width(features):
        from .feature_encoders import sparse_dim
        dense = features.get("dense", [])
        w = len(dense) + sum(1 for f in dense if f.get("missing_indicator", False))
        w += sum(sparse_dim(f) for f in features.get("sparse", []))
        w += sum(f.get("projection") or f["dim"] for f in features.get("embedding", []))
        w += sum(f["dim"] for f in features.get("extra", []))
        return w

    def forward(self, inputs):
        inputs = dict(inputs)
        if self.sequence is not None:
            seq = {k[len("seq."):]: v for k, v in inputs.items() if k.startswith("seq.")}
            if "item_ids" in seq:
                seq["item_embeddings"] = self.item_embedding(seq.pop("item_ids").clamp(max=self.item_cardinality))
                seq["candidate"] = self.item_embedding(seq.pop("candidate_id").clamp(max=self.item_cardinality))
            inputs[f"extra.{SEQUENCE_BLOCK}"] = self.sequence(seq)
        e = self.features(inputs)
        z = e
        for stage in self.backbone:
            z = stage(z)
        if self.input_skip:
            z = torch.cat([z, e], dim=1)
        h = self.mlp(z)
        return torch.cat([head(h) for head in self.heads.values()], dim=1)


def export(model, out_dir):
    """Writes a rankstack checkpoint: config.json and model.safetensors (float32 parameters and
    buffers under their names). `rankstack` (ranker_model::checkpoint::load) serves it as is."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2, sort_keys=True)
        f.write("\n")


def load(ckpt_dir):
    """Reads a rankstack checkpoint (the layout `export` writes and `rankstack` saves) into a
    Ranker. A missing or unexpected parameter is an error; BatchNorm's `num_batches_tracked` may be
    absent."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        config = json.load(f)
    model = Ranker(config)
    state = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return model
