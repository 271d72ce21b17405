"""The PyTorch side of `cargo xtask bench-compare`: the same checkpoint and inputs as
`examples/bench_compare.rs`, timed the same way (median of at least 3 calls after a warm-up).

    python -m rankstack_ref.bench_compare check DIR            outputs agree with rankstack's
    python -m rankstack_ref.bench_compare infer DIR [--fastpath] [--bf16]
    python -m rankstack_ref.bench_compare train DIR
    python -m rankstack_ref.bench_compare gemm

Threads: --threads (default 2), set with torch.set_num_threads; one inter-op thread. Each command
prints one JSON line with the process's peak resident memory (ru_maxrss).

--fastpath lets nn.TransformerEncoder take PyTorch's fused inference path (no autograd, eval mode).
It computes zeros at masked sequence positions instead of the slow path's values, so `check` always
compares with the fast path off; `infer` with and without it gives both timings. --bf16 runs under
torch.autocast("cpu", dtype=torch.bfloat16).
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch
from safetensors.torch import load_file

from . import ranker

INFER_BATCHES = [1, 64, 512, 2048]
TRAIN_BATCH = 512


def load_model(d):
    try:
        return ranker.load(os.path.join(d, "checkpoint"))
    except ValueError as e:
        raise SystemExit(str(e))


def load_inputs(d, b):
    x = load_file(os.path.join(d, f"inputs-{b}.safetensors"))
    labels = x.pop("labels", None)
    return x, labels


def median_seconds(fn, budget, warmups=1, min_runs=3, max_runs=200):
    for _ in range(warmups):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check(d):
    torch.backends.mha.set_fastpath_enabled(False)
    model = load_model(d).eval()
    expected = load_file(os.path.join(d, "expected.safetensors"))
    worst = 0.0
    with torch.no_grad():
        for b in INFER_BATCHES:
            x, _ = load_inputs(d, b)
            p = torch.sigmoid(model(x))
            worst = max(worst, (p - expected[f"probabilities.{b}"]).abs().max().item())
    print(json.dumps({"mode": "check", "max_abs_probability_difference": worst}))
    if not worst < 1e-4:
        raise SystemExit(f"rankstack and PyTorch disagree: max |Δp| = {worst:.3g}")


def infer(d, fastpath, bf16):
    torch.backends.mha.set_fastpath_enabled(fastpath)
    model = load_model(d).eval()
    expected = load_file(os.path.join(d, "expected.safetensors"))
    rows = []
    worst = 0.0
    # BENCH_BATCHES=1,64 times those batch sizes only (quick A/B runs), as the rankstack side.
    only = os.environ.get("BENCH_BATCHES")
    batches = [int(b) for b in only.split(",")] if only else INFER_BATCHES
    for b in batches:
        x, _ = load_inputs(d, b)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            p = torch.sigmoid(model(x)).float()
        worst = max(worst, (p - expected[f"probabilities.{b}"]).abs().max().item())

        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                torch.sigmoid(model(x))

        median, runs = median_seconds(run, 5.0)
        rows.append({"batch": b, "median_ms": median * 1e3, "runs": runs})
    print(json.dumps({"framework": "pytorch", "mode": "infer", "dtype": "bf16-autocast" if bf16 else "f32",
                      "fastpath": fastpath, "threads": torch.get_num_threads(), "rows": rows,
                      "max_abs_probability_difference_from_f32": worst,
                      "peak_rss_bytes": peak_rss_bytes(), "torch": torch.__version__}))


def train(d):
    model = load_model(d).train()
    x, labels = load_inputs(d, TRAIN_BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        logits = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    median, runs = median_seconds(step, 10.0)
    print(json.dumps({"framework": "pytorch", "mode": "train", "dtype": "f32", "threads": torch.get_num_threads(),
                      "rows": [{"batch": TRAIN_BATCH, "median_ms": median * 1e3, "runs": runs}],
                      "peak_rss_bytes": peak_rss_bytes(), "torch": torch.__version__}))


def gemm():
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    median, runs = median_seconds(lambda: a @ b, 3.0)
    print(json.dumps({"framework": "pytorch", "mode": "gemm", "n": n, "gflops": 2 * n ** 3 / median / 1e9,
                      "runs": runs, "threads": torch.get_num_threads()}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["check", "infer", "train", "gemm"])
    ap.add_argument("dir", nargs="?")
    ap.add_argument("--fastpath", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    if a.command == "check":
        check(a.dir)
    elif a.command == "infer":
        infer(a.dir, a.fastpath, a.bf16)
    elif a.command == "train":
        train(a.dir)
    else:
        gemm()


if __name__ == "__main__":
    main()
