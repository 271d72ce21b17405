"""The PyTorch side of the results comparison: trains the reference Ranker on the same Parquet files
and the same resolved config as `rankstack train`, with the same recipe (AdamW, linear warm-up then
cosine decay, gradient-norm clipping), and reports per-task test AUC / log loss and throughput.

    python -m rankstack_ref.train --config RUN/checkpoint/config.json --train train.parquet \
        --test test.parquet --epochs 1 --batch-size 256 --lr 2e-3 --seed 0 [--threads 2] \
        [--max-steps N] [--no-eval] [--init xavier-normal|layers | --init-from CHECKPOINT_DIR]

Prints one JSON line: examples/s of the training loop (data already in memory; evaluation excluded)
and, unless --no-eval, per-task test AUC and log loss. The column convention is that of rankstack's `data` module.
"""

import argparse
import json
import math
import time

import pyarrow.parquet as pq
import torch

from .ranker import Ranker
from .ranker import load as load_checkpoint


def load(path, config):
    """Reads a whole (small) Parquet file into tensors keyed like Ranker's inputs."""
    table = pq.read_table(path)
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    x = {}
    feats = config["features"]
    if feats.get("dense"):
        x["dense"] = torch.tensor([[float("nan") if cols[f["name"]][i] is None else cols[f["name"]][i]
                                    for f in feats["dense"]] for i in range(n)], dtype=torch.float32)
    for f in feats.get("sparse", []):
        vals = cols[f["name"]]
        bags = [v if isinstance(v, list) else [v] for v in vals]
        x[f"sparse.{f['name']}.bags"] = bags
    for f in feats.get("embedding", []):
        x[f"embedding.{f['name']}"] = torch.tensor(cols[f["name"]], dtype=torch.float32)
    seq = config.get("sequence")
    if seq is not None:
        s = seq["max_len"]

        def pad(rows, fill=0):
            out = torch.full((n, s), fill, dtype=torch.int64)
            for i, r in enumerate(rows):
                r = r[:s]
                if r:
                    out[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
            return out

        x["seq.action_types"] = pad(cols["seq_action_types"])
        x["seq.timestamps"] = pad(cols["seq_timestamps"])
        x["seq.request_time"] = torch.tensor(cols["request_time"], dtype=torch.int64)
        if "seq_item_ids" in cols:
            x["seq.item_ids"] = pad(cols["seq_item_ids"])
            x["seq.candidate_id"] = torch.tensor(cols["candidate_item_id"], dtype=torch.int64)
        else:
            e = seq["item_dim"]
            emb = torch.zeros(n, s, e)
            for i, r in enumerate(cols["seq_item_embeddings"]):
                r = r[:s]
                if r:
                    emb[i, :len(r)] = torch.tensor(r, dtype=torch.float32)
            x["seq.item_embeddings"] = emb
            x["seq.candidate"] = torch.tensor(cols["candidate_item_embedding"], dtype=torch.float32)
    labels = torch.tensor([[float("nan") if cols[f"label_{t['name']}"][i] is None else cols[f"label_{t['name']}"][i]
                            for t in config["tasks"]] for i in range(n)], dtype=torch.float32)
    return x, labels, n


def take(x, idx):
    out = {}
    for k, v in x.items():
        if k.endswith(".bags"):
            name = k[: -len(".bags")]
            bags = [v[i] for i in idx.tolist()]
            out[f"{name}.ids"] = torch.tensor([i for b in bags for i in b], dtype=torch.int64)
            out[f"{name}.offsets"] = torch.tensor([0] + [len(b) for b in bags[:-1]], dtype=torch.int64).cumsum(0)
        else:
            out[k] = v[idx]
    return out


def warmup_cosine(peak, warmup, total, min_ratio):
    """The learning rate of (0-based) step t: linear warm-up to `peak` over `warmup` steps, then cosine
    decay to `peak * min_ratio` at `total` (rankstack's WarmupCosine, src/train/schedule.rs)."""

    def lr_at(t):
        if t < warmup:
            return peak * (t + 1) / warmup
        prog = min(1.0, (t - warmup) / max(1, total - warmup))
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    return lr_at


def xavier_normal_init(model):
    """rankstack's `--init xavier-normal` convention (rankstack_nn::InitScheme): every parameter of
    two or more dimensions whose name does not contain "norm" Xavier-normal, every bias zero, the
    rest as constructed. Draws from torch's global generator. Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                torch.nn.init.xavier_normal_(p)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)
    return model


def layers_init(model):
    """rankstack's `--init layers` convention (each layer's own initialisation, as the Rust layers
    document it), drawn from torch's global generator: Xavier-normal matrices and zero biases
    (xavier_normal_init), except feature tables and action-type embeddings N(0, 1/dim) (padding rows
    zero), the attention input projection Xavier-uniform, and the transformer's feed-forward layers
    PyTorch's default U(+-1/sqrt(in)), biases included. Returns the model."""
    xavier_normal_init(model)
    with torch.no_grad():
        for name, table in model.features.sparse.items():
            table.weight.normal_(0.0, table.weight.shape[1] ** -0.5)
        model.features.zero_padding_rows()
        if model.sequence is not None:
            emb = model.sequence.action_emb.weight
            emb.normal_(0.0, emb.shape[1] ** -0.5)
            emb[0] = 0.0
            for layer in model.sequence.encoder.layers:
                torch.nn.init.xavier_uniform_(layer.self_attn.in_proj_weight)
                layer.linear1.reset_parameters()
                layer.linear2.reset_parameters()
    return model


INITS = {"xavier-normal": xavier_normal_init, "layers": layers_init}
DEFAULT_INIT = "layers"  # rankstack's TrainOptions::init


def loss_fn(logits, labels, weights):
    mask = ~torch.isnan(labels)
    y = torch.where(mask, labels, torch.zeros_like(labels))
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * mask
    means = per.sum(0) / mask.sum(0).clamp(min=1e-30)
    return (means * weights).sum()


def auc(scores, labels):
    pairs = sorted((s, y) for s, y in zip(scores, labels) if not math.isnan(y))
    pos = neg = below = acc = 0.0
    i = 0
    while i < len(pairs):
        j, p, q = i, 0.0, 0.0
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            p += pairs[j][1]
            q += 1 - pairs[j][1]
            j += 1
        acc += p * (below + 0.5 * q)
        below += q
        pos += p
        neg += q
        i = j
    return acc / (pos * neg) if pos and neg else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", choices=sorted(INITS), default=DEFAULT_INIT,
                    help="initialisation convention, as rankstack train --init")
    ap.add_argument("--init-from", default=None, help="start from this rankstack checkpoint's weights")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    config = json.load(open(a.config))
    if a.init_from:
        # Initialisation-matched runs: the weights rankstack drew (a rankstack checkpoint).
        model = load_checkpoint(a.init_from)
    else:
        model = INITS[a.init](Ranker(config))
    weights = torch.tensor([t.get("weight", 1.0) for t in config["tasks"]])
    x, y, n = load(a.train, config)
    xt, yt, nt = load(a.test, config)
    steps_per_epoch = math.ceil(n / a.batch_size)
    total = steps_per_epoch * a.epochs
    if a.max_steps is not None:
        total = min(total, a.max_steps)
    warmup = max(1, min(a.warmup, total // 2))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)

    lr_at = warmup_cosine(a.lr, warmup, total, a.min_lr_ratio)

    step, examples, start = 0, 0, time.perf_counter()
    gen = torch.Generator().manual_seed(a.seed)
    window_gen = torch.Generator().manual_seed(a.seed + 1)
    window_ms = (config.get("sequence") or {}).get("time_window_ms", 0.0) or 0.0
    for _ in range(a.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * a.batch_size:(b + 1) * a.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            batch = take(x, idx)
            if window_ms > 0:
                # TransAct's training-time mask of a random recent window, T_b ~ U[0, max) per
                # example (rankstack's sequence_transformer::mask); never at evaluation.
                batch["seq.window_ms"] = torch.rand(len(idx), generator=window_gen, dtype=torch.float64) * window_ms
            loss = loss_fn(model(batch), y[idx], weights)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
            opt.step()
            step += 1
            examples += len(idx)
    elapsed = time.perf_counter() - start
    result = {"framework": "pytorch", "torch": torch.__version__, "threads": a.threads, "seed": a.seed,
              "steps": step, "batch_size": a.batch_size, "examples_per_second": examples / elapsed,
              "tasks": {}}
    if a.no_eval:
        print(json.dumps(result))
        return
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(take(xt, torch.arange(i, min(i + 1024, nt))))) for i in range(0, nt, 1024)])
    for t, task in enumerate(config["tasks"]):
        p, l = probs[:, t].tolist(), yt[:, t].tolist()
        keep = [(pi, li) for pi, li in zip(p, l) if not math.isnan(li)]
        ll = -sum(li * math.log(min(max(pi, 1e-7), 1 - 1e-7)) + (1 - li) * math.log(1 - min(max(pi, 1e-7), 1 - 1e-7)) for pi, li in keep) / max(1, len(keep))
        result["tasks"][task["name"]] = {"auc": auc(p, l), "log_loss": ll}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
