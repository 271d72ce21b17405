"""The PyTorch side of `cargo xtask gpu-bench`: the `homefeed-bench` checkpoint and inputs that
`examples/gpu_bench.rs prepare` wrote, on the same CUDA GPU, timed the same way (median of at least
5 calls after 2 warm-ups, each call ending with the result read back to the host).

    python -m rankstack_ref.gpu_bench check DIR                 probabilities agree with rankstack's
    python -m rankstack_ref.gpu_bench infer DIR MODE            MODE: eager-f32, eager-tf32,
                                                                eager-bf16 (autocast), compile-f32
    python -m rankstack_ref.gpu_bench train DIR MODE            MODE: eager-f32, eager-bf16

Each command prints one JSON line per measurement as soon as it has it (a run cut short keeps
what it measured). Peak memory is torch.cuda.max_memory_allocated (tensor memory, as rankstack's
figure is), reset before each batch size.
"""

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file

from . import bench_compare, ranker

INFER_BATCHES = [512, 2048, 8192, 32768]
TRAIN_BATCHES = [2048, 8192]


def load_model(d):
    return ranker.load(os.path.join(d, "checkpoint")).cuda()


def load_inputs(d, b):
    x = load_file(os.path.join(d, f"inputs-{b}.safetensors"), device="cuda")
    labels = x.pop("labels", None)
    return x, labels


def median_seconds(fn, budget):
    return bench_compare.median_seconds(fn, budget, warmups=2, min_runs=5, max_runs=100)


def emit(record):
    record.update({"framework": "pytorch", "torch": torch.__version__, "gpu": torch.cuda.get_device_name()})
    print(json.dumps(record), flush=True)


def check(d):
    model = load_model(d).eval()
    expected = load_file(os.path.join(d, "expected.safetensors"))
    worst = 0.0
    with torch.no_grad():
        for key, want in expected.items():
            b = int(key.split(".")[1])
            x, _ = load_inputs(d, b)
            p = torch.sigmoid(model(x)).cpu()
            worst = max(worst, (p - want).abs().max().item())
    emit({"mode": "check", "max_abs_probability_difference": worst})
    if not worst < 1e-4:
        raise SystemExit(f"rankstack and PyTorch disagree on the GPU: max |dp| = {worst:.3g}")


def infer(d, mode):
    torch.backends.cuda.matmul.allow_tf32 = mode == "eager-tf32"
    torch.backends.cudnn.allow_tf32 = mode == "eager-tf32"
    model = load_model(d).eval()
    bf16 = mode == "eager-bf16"
    if mode == "compile-f32":
        model = torch.compile(model)
    expected = load_file(os.path.join(d, "expected.safetensors"))
    for b in INFER_BATCHES:
        x, _ = load_inputs(d, b)

        def run():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                return torch.sigmoid(model(x)).float().cpu()

        record = {"mode": "infer", "dtype": mode, "batch": b}
        try:
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            p = run()
            record["first_call_s"] = time.perf_counter() - started
            want = expected.get(f"probabilities.{b}")
            if want is not None:
                record["max_abs_probability_difference_from_rankstack_f32"] = (p - want).abs().max().item()
            median, runs = median_seconds(run, 2.0)
            record.update({"median_ms": median * 1e3, "runs": runs, "candidates_per_second": b / median,
                           "peak_tensor_bytes": torch.cuda.max_memory_allocated()})
        except torch.OutOfMemoryError as e:
            record["error"] = f"out of memory: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
        emit(record)
        del x


def train(d, mode):
    bf16 = mode == "eager-bf16"
    for b in TRAIN_BATCHES:
        model = load_model(d).train()
        x, labels = load_inputs(d, b)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        losses = []

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits.float(), labels, reduction="none").mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())

        record = {"mode": "train", "dtype": mode, "batch": b}
        try:
            torch.cuda.reset_peak_memory_stats()
            median, runs = median_seconds(step, 5.0)
            record.update({"median_ms": median * 1e3, "runs": runs, "examples_per_second": b / median,
                           "loss": losses[-1], "peak_tensor_bytes": torch.cuda.max_memory_allocated()})
        except torch.OutOfMemoryError as e:
            record["error"] = f"out of memory: {str(e).splitlines()[0]}"
        emit(record)
        del model, opt, x, labels
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["check", "infer", "train"])
    ap.add_argument("dir")
    ap.add_argument("mode", nargs="?", default="eager-f32")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device")
    # Tensors the reference creates without a device (padding) land on the GPU too.
    torch.set_default_device("cuda")
    if a.command == "check":
        check(a.dir)
    elif a.command == "infer":
        infer(a.dir, a.mode)
    else:
        train(a.dir, a.mode)


if __name__ == "__main__":
    main()
