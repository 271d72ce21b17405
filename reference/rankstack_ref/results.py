"""Markdown tables for docs/results.md from the JSON lines that scripts/movielens-results.sh writes.

    python -m rankstack_ref.results OUT_DIR

Accuracy: mean ± sample standard deviation over seeds of test AUC and log loss, per preset, task and
framework. Throughput: examples/s of the training loop per preset and framework, and their ratio.
"""

import json
import os
import statistics
import sys

PRESETS = ["mlp", "dcnv2", "masknet-parallel", "pinterest-baseline", "pinterest-homefeed"]
FRAMEWORKS = [("rankstack", "rankstack"), ("pytorch", "PyTorch")]


def read(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(values):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


INITS = [("xavier-normal", "Xavier-normal"), ("layers", "layers")]


def accuracy_table(rows):
    """One row per preset, framework and initialisation convention (`init`: `xavier-normal`, or
    `layers` — for PyTorch, started from rankstack's `--init layers` weights), with the commits the
    runs came from. Presets beyond the five (config variants in OUT/configs) follow them."""
    tasks = sorted({t for r in rows for t in r["tasks"]})
    head = ["preset", "framework", "initialisation", "seeds"]
    for t in tasks:
        head += [f"{t} AUC", f"{t} log loss"]
    head.append("commit")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    presets = PRESETS + sorted({r["preset"] for r in rows} - set(PRESETS))
    for p in presets:
        for key, label in FRAMEWORKS:
            for init, init_label in INITS:
                runs = [r for r in rows if r["preset"] == p and r["framework"] == key and r["tasks"]
                        and r.get("init", "xavier-normal") == init]
                if not runs:
                    continue
                if key == "pytorch" and init == "layers":
                    init_label = "layers (rankstack's drawn weights)"
                cells = [f"`{p}`", label, init_label, str(len(runs))]
                for t in tasks:
                    cells.append(mean_std([r["tasks"][t]["auc"] for r in runs if t in r["tasks"]]))
                    cells.append(mean_std([r["tasks"][t]["log_loss"] for r in runs if t in r["tasks"]]))
                cells.append(", ".join(sorted({r.get("commit") or "?" for r in runs})))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_table(rows):
    lines = ["| preset | rankstack ex/s (dense embedding updates) | rankstack ex/s (row-sparse, default) | PyTorch ex/s"
             " | rankstack / PyTorch (dense) | rankstack / PyTorch (row-sparse) |", "|---|---|---|---|---|---|"]
    for p in PRESETS:
        def rate(framework, updates=None):
            xs = [r["examples_per_second"] for r in rows if r["preset"] == p and r["framework"] == framework
                  and (updates is None or r.get("embedding_updates") == updates)]
            return statistics.median(xs) if xs else float("nan")
        dense, sparse, torch = rate("rankstack", "dense"), rate("rankstack", "row-sparse"), rate("pytorch")
        lines.append(f"| `{p}` | {dense:.0f} | {sparse:.0f} | {torch:.0f} | {dense / torch:.2f} | {sparse / torch:.2f} |")
    return "\n".join(lines)


def main():
    out = sys.argv[1]
    acc = read(os.path.join(out, "accuracy.jsonl"))
    thr = read(os.path.join(out, "throughput.jsonl"))
    if acc:
        print("### Test metrics (mean ± std over seeds)\n")
        print(accuracy_table(acc))
        print()
    if thr:
        print("### Training throughput (2 threads each, one run on the same machine)\n")
        print(throughput_table(thr))


if __name__ == "__main__":
    main()
