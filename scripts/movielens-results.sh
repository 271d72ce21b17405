#!/usr/bin/env bash
# Reproduces every number in docs/results.md: MovieLens-100k test metrics of five presets, trained by
# rankstack and by the PyTorch reference (reference/rankstack_ref/train.py) on the same split with the
# same resolved config and recipe, over three seeds; then training throughput of both, side by side.
#
# Usage: scripts/movielens-results.sh [accuracy|throughput|table|all]   (default: all)
#   OUT=data/results  EPOCHS=1  SEEDS="0 1 2"  BATCH=256  LR=2e-3  THROUGHPUT_STEPS=100
#   PRESETS="mlp dcnv2 ..." (default: all five)  LANES="rankstack pytorch" (which frameworks run)
#   INITS="xavier-normal layers" (rankstack's --init conventions to run; the PyTorch reference runs
#   its own Xavier-normal draw for xavier-normal, and starts from the very weights rankstack drew
#   for layers: the initialisation-matched runs)  BIN=path/to/rankstack (default: a release build)
#
# In the accuracy runs rankstack trains with --dense-embedding-gradients: the update PyTorch's nn.Embedding + AdamW
# makes, so that the two frameworks run the same algorithm (rankstack's default row-sparse, lazy
# update is timed separately in the throughput rows).
#
# accuracy   runs two lanes at once, one thread each (RAYON_NUM_THREADS=1 / torch.set_num_threads(1)):
#            all rankstack runs in one, all PyTorch runs in the other. One thread per process keeps the
#            lanes from disturbing each other's numerics and candle's thread pool from spin-waiting.
# throughput runs alone (start it on an otherwise idle machine): for each preset, rankstack and
#            PyTorch alternately, 2 threads each, THROUGHPUT_STEPS training steps on the training file.
# table      prints the markdown tables of docs/results.md from OUT/*.jsonl.
#
# Results are appended as JSON lines to OUT/accuracy.jsonl and OUT/throughput.jsonl (delete them to
# start afresh). Needs the Rust toolchain, python3 and network access for the first run (the data and
# the reference venv).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode="${1:-all}"
out="${OUT:-data/results}"
epochs="${EPOCHS:-1}"
seeds="${SEEDS:-0 1 2}"
batch="${BATCH:-256}"
lr="${LR:-2e-3}"
throughput_steps="${THROUGHPUT_STEPS:-100}"
read -r -a presets <<<"${PRESETS:-mlp dcnv2 masknet-parallel pinterest-baseline pinterest-homefeed}"
lanes="${LANES:-rankstack pytorch}"
inits="${INITS:-xavier-normal layers}"
bin="${BIN:-$root/target/release/rankstack}"
python="$root/reference/.venv/bin/python"
data="data/movielens"

prepare() {
    scripts/fetch-movielens.sh
    if [[ -z "${BIN:-}" ]]; then cargo build --release --quiet --bin rankstack; fi
    cargo xtask venv
    if [[ ! -s "$data/train.parquet" || ! -s "$data/test.parquet" ]]; then
        "$bin" data movielens --input data/ml-100k --out-dir "$data"
    fi
    mkdir -p "$out/configs"
    # The resolved configs (preset + the data's schema) that both frameworks train.
    for p in "${presets[@]}"; do
        if [[ ! -s "$out/configs/$p.json" ]]; then
            rm -rf "$out/tmp-$p"
            "$bin" train --preset "$p" --data "$data/train.parquet" --eval "$data/test.parquet" \
                --out "$out/tmp-$p" --max-steps 1 --quiet >/dev/null
            cp "$out/tmp-$p/$(cat "$out/tmp-$p/LATEST")/config.json" "$out/configs/$p.json"
            rm -rf "$out/tmp-$p"
        fi
    done
}

with_field() { # KEY VALUE: copies the JSON line on stdin with KEY set to the string VALUE
    "$python" -c 'import json, sys; r = json.loads(sys.stdin.read()); r[sys.argv[1]] = sys.argv[2]; print(json.dumps(r))' "$1" "$2"
}

rust_run() { # preset seed threads init [extra args...]
    local p="$1" seed="$2" threads="$3" init="$4"
    shift 4
    local dir="$out/runs/rust-$p-seed$seed-$init${RUN_TAG:-}"
    rm -rf "$dir"
    RAYON_NUM_THREADS="$threads" "$bin" train --config "$out/configs/$p.json" --data "$data/train.parquet" \
        --eval "$data/test.parquet" --out "$dir" --epochs "$epochs" --batch-size "$batch" --lr "$lr" \
        --seed "$seed" --init "$init" --quiet "$@" >"$dir.log"
    "$python" -c '
import json, os, re, sys
p, seed, threads, log, metrics, init = sys.argv[1:7]
commit = os.environ.get("COMMIT", "")
rate = float(re.search(r"\(([0-9.]+) examples/s\)", open(log).read()).group(1))
lines = [json.loads(l) for l in open(metrics)]
evals = [l for l in lines if l["kind"] == "eval"]
steps = max(l["step"] for l in lines)
tasks = {name: {"auc": m["auc"], "log_loss": m["log_loss"]} for name, m in evals[-1]["tasks"]} if evals else {}
print(json.dumps({"framework": "rankstack", "preset": p, "seed": int(seed), "threads": int(threads), "init": init,
                  "commit": commit, "steps": steps, "examples_per_second": rate, "tasks": tasks}))
' "$p" "$seed" "$threads" "$dir.log" "$dir/metrics.jsonl" "$init"
}

torch_run() { # preset seed threads init [extra args...]
    local p="$1" seed="$2" threads="$3" init="$4"
    shift 4
    local start=(--init "$init")
    if [[ "$init" == layers ]]; then
        # Initialisation-matched: start from the weights rankstack draws with --init layers.
        local dir="$out/runs/init-$p-seed$seed-layers"
        rm -rf "$dir"
        "$bin" train --config "$out/configs/$p.json" --data "$data/train.parquet" --eval "$data/test.parquet" \
            --out "$dir" --max-steps 1 --lr 0 --seed "$seed" --init layers --quiet >/dev/null
        start=(--init-from "$dir/$(cat "$dir/LATEST")")
    fi
    PYTHONPATH="$root/reference" "$python" -m rankstack_ref.train --config "$out/configs/$p.json" \
        --train "$data/train.parquet" --test "$data/test.parquet" --epochs "$epochs" \
        --batch-size "$batch" --lr "$lr" --seed "$seed" --threads "$threads" "${start[@]}" "$@" |
        with_field preset "$p" | with_field init "$init" | with_field commit "${COMMIT:-}"
}

accuracy() {
    mkdir -p "$out/runs"
    local pids=()
    if [[ " $lanes " == *" rankstack "* ]]; then
        (
            for seed in $seeds; do for p in "${presets[@]}"; do for init in $inits; do
                rust_run "$p" "$seed" 1 "$init" --dense-embedding-gradients >>"$out/accuracy.jsonl"
                echo "rankstack $p seed $seed init $init done" >&2
            done; done; done
        ) &
        pids+=($!)
    fi
    if [[ " $lanes " == *" pytorch "* ]]; then
        (
            for seed in $seeds; do for p in "${presets[@]}"; do for init in $inits; do
                torch_run "$p" "$seed" 1 "$init" >>"$out/accuracy.jsonl"
                echo "pytorch $p seed $seed init $init done" >&2
            done; done; done
        ) &
        pids+=($!)
    fi
    for pid in "${pids[@]}"; do wait "$pid"; done
}

throughput() {
    mkdir -p "$out/runs"
    for p in "${presets[@]}"; do
        RUN_TAG=-dense rust_run "$p" 0 2 layers --max-steps "$throughput_steps" --dense-embedding-gradients |
            with_field embedding_updates dense >>"$out/throughput.jsonl"
        RUN_TAG=-sparse rust_run "$p" 0 2 layers --max-steps "$throughput_steps" |
            with_field embedding_updates row-sparse >>"$out/throughput.jsonl"
        torch_run "$p" 0 2 layers --max-steps "$throughput_steps" --no-eval >>"$out/throughput.jsonl"
        echo "throughput $p done" >&2
    done
}

table() {
    PYTHONPATH="$root/reference" "$python" -m rankstack_ref.results "$out"
}

case "$mode" in
    accuracy) prepare && accuracy && table ;;
    throughput) prepare && throughput && table ;;
    table) table ;;
    all) prepare && accuracy && throughput && table ;;
    *) echo "usage: $0 [accuracy|throughput|table|all]" >&2 && exit 2 ;;
esac
